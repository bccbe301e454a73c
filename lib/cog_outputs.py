"""Output files: each prediction writes its images into a folder of its own, under
$TMPDIR/fast-sd-outputs/<process id>/, and no file stays there longer than Cog needs it.

What a Cog server does with an output path (coglet 0.23.1; tests/test_cog_outputs.py and tests/test_soak.py check
what this module relies on): run() yields the path, and the server's own process (not the worker that runs the
predictor) opens the file, reads it whole and closes it, milliseconds later, then sends the bytes from memory: as a
data URI in the response and in every webhook, or with --upload-url in one PUT. It reads each file once, after the
worker has moved on, and does not tell the worker; a file removed before that read is silently missing from the
output ("Failed to read FileOutput" in the server's log), even when it is removed only as the prediction ends.

So under a Cog server every prediction's folder is watched (inotify), and each file is removed as soon as a reader
has closed it (IN_CLOSE_NOWRITE; the predictor never reads its own outputs), the folder with its last file. A
prediction that fails or is canceled has its folder removed at once. A file that no one reads (the server failed
to) is removed OUTPUTS_KEEP_SECONDS after its prediction ended, as every file is where inotify is unavailable.
Outside a Cog server (scripts/predict.sh, the tests, the benchmarks) the files are the caller's, kept until the
process exits. Folders left by processes that have ended are removed when the next one starts.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import queue
import select
import shutil
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IN_CLOSE_NOWRITE, IN_ONLYDIR = 0x10, 0x01000000
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
TICK = 0.2  # seconds between looks at the messages and at files past their time


class _Inotify:
    """The few inotify calls needed (Linux), through libc."""

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise self._error("inotify_init1")

    def _error(self, call: str) -> OSError:
        errno = ctypes.get_errno()
        return OSError(errno, f"{call}: {os.strerror(errno)}")

    def add(self, folder: Path) -> int:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_CLOSE_NOWRITE | IN_ONLYDIR)
        if wd < 0:
            raise self._error("inotify_add_watch")
        return wd

    def remove(self, wd: int) -> None:
        self.libc.inotify_rm_watch(self.fd, wd)  # fails harmlessly where the folder is gone already

    def read(self, timeout: float) -> list[tuple[int, str]]:
        """(watch, file name) of each file closed after reading, waiting up to `timeout` seconds for any."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events, i = [], 0
        while i + EVENT.size <= len(data):
            wd, mask, _, length = EVENT.unpack_from(data, i)
            name = data[i + EVENT.size : i + EVENT.size + length].rstrip(b"\0")
            i += EVENT.size + length
            if mask & IN_CLOSE_NOWRITE and name:
                events.append((wd, os.fsdecode(name)))
        return events

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Folder:
    path: Path
    wd: int | None  # its inotify watch; None: removed by time only
    unread: set[str] = field(default_factory=set)  # files yielded that no one has read yet
    ended: float | None = None  # when its prediction succeeded (time.monotonic())


class Outputs:
    """The output folders of one process. `served`: under a Cog server (files removed once read); otherwise the
    caller's.

    The bookkeeping lives on one thread, which the other threads only send messages to (a queue): a generator that is
    garbage-collected may run its cleanup on any thread at any moment, even one that holds a lock, so none is taken.
    """

    def __init__(self, root: Path | None = None, served: bool = False, keep_seconds: float = 600.0):
        base = Path(root or Path(tempfile.gettempdir()) / "fast-sd-outputs")
        _remove_ended_processes(base)
        self.root = base / str(os.getpid())
        self.root.mkdir(parents=True, exist_ok=True)
        self.served, self.keep_seconds = served, keep_seconds
        self._messages: queue.SimpleQueue = queue.SimpleQueue()
        self._inotify: _Inotify | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not served:
            _remove_at_exit(self.root)
            return
        try:
            self._inotify = _Inotify()
        except OSError as e:
            log.warning("outputs: no inotify (%s); files are removed %g s after their prediction", e, keep_seconds)
        self._thread = threading.Thread(target=self._watch, name="outputs", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> Outputs:
        import coglet

        from lib.settings import Settings

        return cls(served=coglet.server.active, keep_seconds=Settings().outputs_keep_seconds)

    # -- one prediction, from any thread ---------------------------------------------------------------------------
    def new(self) -> Path:
        """A fresh folder for one prediction's files (watched before any file is in it)."""
        path = Path(tempfile.mkdtemp(dir=self.root))
        wd = None
        if self._inotify is not None:
            try:
                wd = self._inotify.add(path)
            except OSError as e:  # e.g. the user's inotify watches are used up: this folder goes by time
                log.warning("outputs: %s; %s is removed %g s after its prediction", e, path.name, self.keep_seconds)
        self._send("new", path, wd)
        return path

    def deliver(self, path: Path, files: Iterable[Path], cancel: Callable[[], None] = lambda: None) -> Iterator[Path]:
        """`files` (written into `path`) as run() yields them. When they run out the prediction has succeeded, and the
        folder goes once Cog has read them; if they raise, or the caller stops early (a cancel) or drops them unread,
        `cancel` is called (so that nothing more is written into the folder) and the folder goes at once."""
        settled = [False]
        stream = self._stream(path, files, cancel, settled)
        # A generator dropped before it started has no `finally` to run.
        weakref.finalize(stream, lambda: settled[0] or (cancel(), self.discard(path)))
        return stream

    def _stream(self, path: Path, files: Iterable[Path], cancel: Callable[[], None], settled: list) -> Iterator[Path]:
        succeeded = False
        try:
            for file in files:
                self._send("yielded", path, Path(file).name)  # before Cog can read it
                yield file
            succeeded = True
        finally:
            settled[0] = True
            if succeeded:
                self._send("succeeded", path)
            else:
                cancel()
                self.discard(path)

    def discard(self, path: Path) -> None:
        """A failed or canceled prediction's folder, removed now with whatever it holds."""
        shutil.rmtree(path, ignore_errors=True)
        self._send("discarded", path)  # and again later if an image of the request was being written into it

    def _send(self, *message) -> None:
        if self.served:
            self._messages.put(message)

    # -- the bookkeeping thread --------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Removes each file once read, a folder with its last file, and files and folders past their time."""
        folders: dict[Path, _Folder] = {}
        watches: dict[int, _Folder] = {}
        leftovers: set[Path] = set()  # removed while a late write went on: removed again

        def forget(path: Path) -> None:
            folder = folders.pop(path, None)
            if folder is not None and folder.wd is not None:
                watches.pop(folder.wd, None)
                self._inotify.remove(folder.wd)

        def remove(folder: _Folder) -> None:
            forget(folder.path)
            shutil.rmtree(folder.path, ignore_errors=True)

        def receive() -> None:
            while True:
                try:
                    kind, path, *rest = self._messages.get_nowait()
                except queue.Empty:
                    return
                if kind == "new":
                    folders[path] = folder = _Folder(path, rest[0])
                    if folder.wd is not None:
                        watches[folder.wd] = folder
                elif kind == "yielded" and path in folders:
                    folders[path].unread.add(rest[0])
                elif kind == "succeeded" and path in folders:
                    folders[path].ended = time.monotonic()
                    if not folders[path].unread:
                        remove(folders[path])
                elif kind == "discarded":
                    forget(path)
                    shutil.rmtree(path, ignore_errors=True)
                    if path.exists():
                        leftovers.add(path)

        def read(events: list[tuple[int, str]]) -> None:
            for wd, name in events:
                folder = watches.get(wd)
                if folder is None or name not in folder.unread:
                    continue
                folder.unread.discard(name)
                (folder.path / name).unlink(missing_ok=True)
                if folder.ended is not None and not folder.unread:
                    remove(folder)

        def sweep() -> None:
            now = time.monotonic()
            for folder in list(folders.values()):
                if folder.ended is not None and now - folder.ended >= self.keep_seconds:
                    unread, waited = sorted(folder.unread), now - folder.ended
                    log.warning("outputs: %s unread %.0f s after its prediction: removed", unread, waited)
                    remove(folder)
            for path in list(leftovers):
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    leftovers.discard(path)

        try:
            while not self._stop.is_set():
                if self._inotify is not None:
                    events = self._inotify.read(TICK)
                else:
                    self._stop.wait(TICK)
                    events = []
                try:
                    receive()  # after the read: a file's "yielded" was sent before any read of it
                    read(events)
                    sweep()
                except Exception:  # noqa: BLE001 - the thread must outlive one bad removal
                    log.exception("outputs: removing files")
        finally:
            if self._inotify is not None:
                self._inotify.close()

    def files(self) -> list[Path]:
        """Every file under this process's folder (for checks and tests)."""
        return [p for p in self.root.rglob("*") if p.is_file()]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _remove_ended_processes(base: Path) -> None:
    """Remove the folders of processes that no longer run (a server that was killed cannot clean up after itself)."""
    if not base.is_dir():
        return
    for child in base.iterdir():
        if not child.name.isdigit() or int(child.name) == os.getpid():
            continue
        try:
            os.kill(int(child.name), 0)
        except ProcessLookupError:
            shutil.rmtree(child, ignore_errors=True)
        except PermissionError:  # another user's process, running
            pass


_at_exit: set[Path] = set()


def _remove_at_exit(root: Path) -> None:
    if root not in _at_exit:
        _at_exit.add(root)
        atexit.register(shutil.rmtree, root, True)
