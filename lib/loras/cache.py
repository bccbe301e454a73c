"""The style-LoRA cache: LORA_CACHE_DIR (default WEIGHTS_DIR/.loras), one file per URL named by the URL's sha256,
written atomically; least-recently-used files are evicted to keep the folder under LORA_CACHE_BYTES. The same URL
is not fetched again (a changed file needs a new URL). A fetched LoRA is held open by its request, so eviction
cannot pull it from under a queued request."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lib.engine.inputs import InputError
from lib.loras.check import check_file
from lib.loras.fetch import check_url, download, shown
from lib.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LoraFile:
    """A fetched LoRA, verified, held open (eviction may unlink the cache file; the job can still read it)."""

    url: str
    path: Path
    size: int
    cached: bool  # found in the cache (no download)
    seconds: float  # fetch time (cache lookup, or download)
    handle: BinaryIO = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read(self) -> bytes:
        with self._lock:  # several jobs of one batch may share the handle
            self.handle.seek(0)
            return self.handle.read()

    def close(self) -> None:
        self.handle.close()


_url_locks = [threading.Lock() for _ in range(64)]  # by URL hash: one download of a URL at a time
_guard = threading.Lock()


def cache_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def fetch(url: str) -> LoraFile:
    """The LoRA at `url`, from the cache or downloaded into it (checked as the module docstring says)."""
    check_url(url)
    started = time.perf_counter()
    folder = Settings().lora_cache_dir
    key = cache_key(url)
    path = folder / f"{key}.safetensors"
    with _url_locks[int(key[:8], 16) % len(_url_locks)]:  # a second request for the URL then finds it cached
        handle = _open_cached(path)
        cached = handle is not None
        if handle is None:
            folder.mkdir(parents=True, exist_ok=True)
            download(url, path)
            with _guard:  # not in the middle of an eviction
                _touch(path)
                handle = open(path, "rb")
            evict(folder, Settings().lora_cache_bytes, keep=path)
    size = os.fstat(handle.fileno()).st_size
    seconds = time.perf_counter() - started
    log.info(
        "lora %s: %s (%.1f MB) in %.3f s", shown(url), "cache hit" if cached else "downloaded", size / 1e6, seconds
    )
    return LoraFile(url, path, size, cached, seconds, handle)


def _open_cached(path: Path) -> BinaryIO | None:
    with _guard:  # not in the middle of an eviction; once open, an eviction cannot take it from this request
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        _touch(path)
    try:
        check_file(handle)
    except InputError:  # damaged on disk: fetch it again
        handle.close()
        log.warning("lora cache: %s is damaged; fetching it again", path.name)
        path.unlink(missing_ok=True)
        return None
    return handle


def _touch(path: Path) -> None:
    """Least recently used = oldest mtime (set to the nanosecond: the file system's own clock is coarser)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def evict(folder: Path, budget: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used LoRAs until the folder holds at most `budget` bytes (never `keep`).
    Returns the files deleted."""
    with _guard:
        entries = []
        for p in folder.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, p))
        for p in folder.glob(".*.part"):  # leftovers of a killed process
            with contextlib.suppress(FileNotFoundError):
                if time.time() - p.stat().st_mtime > 3600:
                    p.unlink()
        total = sum(size for _, size, _ in entries)
        deleted = []
        for _, size, p in sorted(entries, key=lambda e: (e[0], e[2].name)):
            if total <= budget:
                break
            if keep is not None and p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            deleted.append(p)
        if deleted:
            log.info("lora cache: evicted %d file(s) to stay under %.1f MB", len(deleted), budget / 1e6)
        return deleted
