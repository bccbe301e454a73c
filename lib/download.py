"""HTTP transfer of weight files: parallel ranged GETs, resume, streaming sha256, atomic placement.

Why our own module: huggingface_hub speaks the Hub's API (a plain bucket mirror does not), pget does no
checksums, and aria2 means driving a subprocess. This is plain `requests` over a thread pool:
- a file is cut into chunks fetched in parallel (several connections beat per-connection CDN limits) and
  written in place with pwrite into a partial file next to the cache, never at the final path;
- chunks already on disk are recorded in a sidecar, so a killed process resumes where it stopped, and a
  cut connection resumes mid-chunk;
- the sha256 follows the bytes in file order as they land (read back from the page cache) and a helper
  thread flushes them to disk meanwhile, so verification and durability overlap the transfer instead of
  following it;
- only a file whose sha256 (and size) verifies is renamed into place, after fsync: a marker that says
  "verified" must never outlive a power cut that the file's bytes did not.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

BLOCK = 1 << 20  # read/write unit: big enough to keep Python's per-call overhead small
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# What a flaky network raises (resets, truncated bodies, timeouts); a full disk (plain OSError) is not one.
NET_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
              ConnectionError, TimeoutError)


class WeightsError(RuntimeError):
    """Weights could not be fetched or verified; the message names the repo, the file and the URL."""


class _Transient(Exception):
    """A failure worth retrying (5xx, reset, stall, short body)."""


class _Aborted(Exception):
    """Another transfer failed for good: stop, keeping what is on disk for the next run to resume."""


@dataclass(frozen=True)
class Settings:
    # Parallel HTTP connections, all files together: several beat per-connection CDN limits, but each
    # costs CPU, which the sha256 needs too (on the 2-core benchmark machine 8 gained nothing over 4).
    connections: int = min(16, max(4, 2 * (os.cpu_count() or 2)))
    files: int = 4  # files in flight at once
    chunk_size: int = 32 << 20
    timeout: float = 30.0  # seconds without a byte before a connection counts as stalled
    retries: int = 5  # failed attempts in a row (without progress) before giving up
    backoff: float = 0.5  # first retry delay, doubled each time, capped at 8 s
    progress_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> "Settings":
        def get(name, kind, default):
            try:
                value = kind(os.environ.get(name, default))
            except ValueError:
                raise WeightsError(f"{name}={os.environ[name]!r} is not a {kind.__name__}") from None
            if value <= 0:
                raise WeightsError(f"{name}={value} must be positive")
            return value

        return cls(connections=get("WEIGHTS_CONNECTIONS", int, cls.connections),
                   timeout=get("WEIGHTS_TIMEOUT", float, cls.timeout),
                   retries=get("WEIGHTS_RETRIES", int, cls.retries),
                   progress_seconds=get("WEIGHTS_PROGRESS_SECONDS", float, cls.progress_seconds))


@dataclass(frozen=True)
class Job:
    label: str  # "repo R, file F": every error message starts with it
    url: str
    dest: Path  # final path: replaced atomically, only once verified
    partial: Path  # bytes accumulate here (same filesystem as dest); sidecar partial + ".json"
    size: int
    sha256: str | None  # None: trust on first download (the caller records the hash it gets)
    etag: str | None = None  # a resumed partial is kept only while the server's file is the same


@dataclass(frozen=True)
class Probe:
    size: int
    commit: str | None  # X-Repo-Commit: the Hub's resolved revision
    sha256: str | None  # X-Linked-Etag of Hub LFS files is their sha256
    etag: str | None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


class Downloader:
    def __init__(self, settings: Settings | None = None, *, token: str | None = None,
                 log: Callable[[str], None] = print):
        self.settings = settings or Settings.from_env()
        self.token = token
        self.log = log
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4,
                                                pool_maxsize=self.settings.connections + self.settings.files)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._cancel = threading.Event()

    def close(self) -> None:
        self.session.close()

    # -- requests ---------------------------------------------------------------------------------------
    def _request(self, method: str, url: str, origin: str, follow: bool = True, **headers) -> requests.Response:
        # Identity encoding: sizes and ranges must count file bytes. The token goes to the origin only;
        # requests drops it itself on a redirect to another host (the Hub's CDN).
        headers["Accept-Encoding"] = "identity"
        if self.token and _origin(url) == _origin(origin):
            headers["Authorization"] = f"Bearer {self.token}"
        t = self.settings.timeout
        return self.session.request(method, url, headers=headers, stream=True, timeout=(t, t),
                                    allow_redirects=follow)

    def _check(self, r: requests.Response, label: str, url: str) -> None:
        code = r.status_code
        if code < 400:
            return
        detail = r.headers.get("X-Error-Message")
        detail = f" ({detail})" if detail else ""
        if code in (401, 403):
            sent = "the token in HF_TOKEN was refused" if self.token else "no token was sent"
            raise WeightsError(f"{label}: HTTP {code} from {url}{detail}: access denied ({sent}). Gated or "
                               "private repos need HF_TOKEN set to a token whose account accepted the licence")
        if code == 404:
            raise WeightsError(f"{label}: HTTP 404 not found at {url}{detail}: check the repo, revision and "
                               "path in the manifest, and that WEIGHTS_BASE_URL mirrors them")
        if code in (408, 429) or code >= 500:
            raise _Transient(f"HTTP {code}")
        raise WeightsError(f"{label}: HTTP {code} from {url}{detail}")

    def _backoff(self, failures: int, label: str, url: str, reason: object, abort=None) -> None:
        if failures > self.settings.retries:
            raise WeightsError(f"{label}: giving up after {failures} failed attempts in a row, last: {reason} "
                               f"({url}); WEIGHTS_TIMEOUT/WEIGHTS_RETRIES tune the patience")
        delay = min(self.settings.backoff * 2 ** (failures - 1), 8.0)
        self.log(f"weights: {label}: {reason}; retry {failures}/{self.settings.retries} in {delay:.1f} s")
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            self._raise_if_aborted(abort)
            time.sleep(min(left, 0.1))
        self._raise_if_aborted(abort)

    def _raise_if_aborted(self, abort: threading.Event | None) -> None:
        if self._cancel.is_set() or (abort is not None and abort.is_set()):
            raise _Aborted()

    def probe(self, url: str, label: str) -> Probe:
        """HEAD a file: its size, and the Hub's commit and sha256 when the server says them."""
        failures = 0
        while True:
            try:
                hops = self._head(url)
                r = hops[-1]
                self._check(r, label, url)
                headers = [h.headers for h in hops]
                size = _first(headers, "X-Linked-Size") or r.headers.get("Content-Length")
                if size is None:
                    raise WeightsError(f"{label}: the server sent no size for {url}")
                linked = (_first(headers, "X-Linked-Etag") or "").strip('"').lower()
                etag = linked or (r.headers.get("ETag") or "").removeprefix("W/").strip('"') or None
                return Probe(int(size), _first(headers, "X-Repo-Commit"),
                             linked if SHA256_RE.match(linked) else None, etag)
            except (_Transient, *NET_ERRORS) as e:
                failures += 1
                self._backoff(failures, label, url, _reason(e))

    def _head(self, origin: str) -> list[requests.Response]:
        # Like huggingface_hub: stop at the Hub's redirect to its CDN, which already carries the size and
        # sha256 (the CDN's signed URLs need not accept HEAD); follow other redirects (renamed repos, mirrors).
        hops, url = [], origin
        for _ in range(10):
            with self._request("HEAD", url, origin, follow=False) as r:
                hops.append(r)
            if not r.is_redirect or r.headers.get("X-Linked-Size"):
                return hops
            url = urljoin(url, r.headers["Location"])
        raise _Transient(f"too many redirects from {origin}")

    # -- one byte range -------------------------------------------------------------------------------------
    def _fetch_range(self, job: Job, route: dict, fd: int, start: int, end: int, progress: "_Progress",
                     abort: threading.Event, written: Callable[[int], None]) -> None:
        """Write bytes [start, end) of job's file at their offsets, calling written(offset) as they land;
        retries resume where the last one stopped."""
        off, failures = start, 0
        while off < end:
            self._raise_if_aborted(abort)
            # After the first response, go straight to where the origin redirected (the Hub's CDN): one
            # round trip less per chunk. After any failure, ask the origin again (signed URLs expire).
            url = route.get("direct") or job.url
            got = off
            try:
                with self._request("GET", url, job.url, Range=f"bytes={off}-{end - 1}") as r:
                    if url != job.url and r.status_code >= 400:  # e.g. an expired signed URL
                        raise _Transient(f"HTTP {r.status_code} from the redirect target")
                    self._check(r, job.label, job.url)
                    _check_range(r, job, off)
                    route["direct"] = r.url
                    raw = r.raw
                    while off < end:
                        self._raise_if_aborted(abort)
                        data = raw.read(min(BLOCK, end - off))
                        if not data:
                            raise _Transient(f"connection closed at byte {off} of {job.size}")
                        os.pwrite(fd, data, off)
                        off += len(data)
                        written(off)
                        progress.add(len(data))
            except (_Transient, *NET_ERRORS) as e:
                route.pop("direct", None)
                failures = 1 if off > got else failures + 1  # progress resets the patience
                self._backoff(failures, job.label, job.url, _reason(e), abort)

    # -- one file -------------------------------------------------------------------------------------------
    def _fetch_file(self, job: Job, chunks_pool: ThreadPoolExecutor, progress: "_Progress") -> str:
        """Download, verify and place one file; returns its sha256. A wrong hash refetches once from zero."""
        for attempt in (1, 2):
            self._raise_if_aborted(None)
            part = _Partial(job, self.settings.chunk_size)
            if part.done:
                self.log(f"weights: {job.label}: resuming, {human(part.done_bytes())} already on disk")
            progress.skip(part.done_bytes())
            try:
                sha = self._transfer(job, part, chunks_pool, progress)
            except BaseException:
                part.close()
                if not part.done:
                    part.discard()  # nothing a later run could resume
                raise
            part.close()
            if job.sha256 is None or sha == job.sha256:
                job.dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(job.partial, job.dest)
                part.forget()
                return sha
            part.discard()
            progress.unskip(job.size)
            if attempt == 1:
                self.log(f"weights: {job.label}: sha256 mismatch (got {sha}), fetching it again")
        raise WeightsError(f"{job.label}: sha256 mismatch twice from {job.url}: got {sha}, expected "
                           f"{job.sha256}. The server's file is not the pinned one (upstream changed, or a "
                           "bad mirror); if the new file is trusted, re-pin it in the manifest")

    def _transfer(self, job: Job, part: "_Partial", pool: ThreadPoolExecutor, progress: "_Progress") -> str:
        abort, route = threading.Event(), {}
        frontier = _Frontier(part)

        def chunk(i: int, start: int, end: int) -> None:
            self._fetch_range(job, route, part.fd, start, end, progress, abort, lambda off: frontier.advance(i, off))
            part.mark(i)

        futures = {i: pool.submit(chunk, i, s, e) for i, (s, e) in enumerate(part.chunks) if i not in part.done}
        flusher = _Flusher(part.fd) if len(part.chunks) > 1 else None
        h, buf = hashlib.sha256(), memoryview(bytearray(max(1, min(8 << 20, job.size))))
        try:
            # The hash follows the bytes in file order as they land (read back from the page cache), so
            # it runs alongside the transfer and little is left to hash when the last byte arrives.
            for i, (s, e) in enumerate(part.chunks):
                pos = s
                while pos < e:
                    upto = frontier.wait(i, pos, futures.get(i))
                    _hash_range(h, part.fd, pos, upto, buf)
                    pos = upto
                if flusher:
                    flusher.kick()
        except BaseException:
            abort.set()
            for f in futures.values():
                f.cancel()  # those not started yet
            raise
        finally:
            # Every writer must be gone before the fd closes.
            wait(futures.values())
            if flusher:
                flusher.stop()
        os.fsync(part.fd)  # durable before it can be renamed into place and marked verified
        return h.hexdigest()

    # -- many files -----------------------------------------------------------------------------------------
    def fetch_all(self, jobs: list[Job], on_done: Callable[[Job, str], None]) -> int:
        """Fetch jobs, several at once, biggest first; on_done(job, sha256) runs in this thread as each lands.

        The first error stops the others (their partials stay for a resume) and is raised. Returns bytes
        transferred."""
        self._cancel.clear()
        s = self.settings
        jobs = sorted(jobs, key=lambda j: -j.size)
        with _Progress(sum(j.size for j in jobs), len(jobs), self.log, s.progress_seconds) as progress, \
                ThreadPoolExecutor(s.connections, thread_name_prefix="chunk") as chunks, \
                ThreadPoolExecutor(s.files, thread_name_prefix="file") as files:
            futures = {files.submit(self._fetch_file, j, chunks, progress): j for j in jobs}
            error = None
            try:
                for f in as_completed(futures):
                    try:
                        on_done(futures[f], f.result())
                        progress.files_done += 1
                    except _Aborted:
                        pass
                    except Exception as e:
                        error = error or e
                        self._cancel.set()
            except BaseException:  # Ctrl-C: the pools' exit waits for their threads, so stop them first
                self._cancel.set()
                raise
            if error:
                raise error
            return progress.fetched


class _Partial:
    """The partial file of a job and its sidecar listing the chunks already written."""

    def __init__(self, job: Job, chunk_size: int):
        self.job = job
        self.sidecar = job.partial.with_name(job.partial.name + ".json")
        self.chunks = [(s, min(s + chunk_size, job.size)) for s in range(0, job.size, chunk_size)]
        self.meta = {"size": job.size, "sha256": job.sha256, "etag": job.etag, "chunk": chunk_size}
        self.done: set[int] = set()
        job.partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            saved = json.loads(self.sidecar.read_text())
            if job.partial.exists() and {k: saved.get(k) for k in self.meta} == self.meta:
                self.done = set(saved["done"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        flags = os.O_RDWR | os.O_CREAT | (0 if self.done else os.O_TRUNC)
        self.fd = os.open(job.partial, flags, 0o644)
        self._lock = threading.Lock()
        if not self.done and job.size:
            # Reserving the blocks up front makes the writeback of the parallel chunks sequential (fsync
            # then costs far less: docs/benchmarks.md) and turns a full disk into an error now, not later.
            try:
                os.posix_fallocate(self.fd, 0, job.size)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    self.close()
                    self.discard()
                    raise WeightsError(f"{job.label}: no space left for {human(job.size)} in {job.partial.parent}")

    def done_bytes(self) -> int:
        return sum(self.chunks[i][1] - self.chunks[i][0] for i in self.done)

    def mark(self, i: int) -> None:
        if len(self.chunks) == 1:
            return  # a one-chunk file restarts from zero after a crash; no sidecar to keep
        with self._lock:
            self.done.add(i)
            write_json(self.sidecar, {**self.meta, "done": sorted(self.done)})

    def close(self) -> None:
        os.close(self.fd)

    def forget(self) -> None:
        self.sidecar.unlink(missing_ok=True)

    def discard(self) -> None:
        self.job.partial.unlink(missing_ok=True)
        self.forget()


class _Frontier:
    """How far each chunk has been written from its start (chunks are written in order within)."""

    def __init__(self, part: _Partial):
        self.upto = [e if i in part.done else s for i, (s, e) in enumerate(part.chunks)]
        self.cond = threading.Condition()

    def advance(self, i: int, offset: int) -> None:
        with self.cond:
            self.upto[i] = offset
            self.cond.notify_all()

    def wait(self, i: int, pos: int, future) -> int:
        """The offset chunk i is written up to, once it is past pos; raises the chunk's error if it failed."""
        with self.cond:
            while self.upto[i] <= pos:
                if future is not None and future.done():
                    future.result()  # raises what stopped it
                self.cond.wait(0.05)
            return self.upto[i]


class _Flusher:
    """Writes dirty pages back while the transfer goes on, so the final fsync finds little left to do."""

    def __init__(self, fd: int):
        self.fd, self.pending, self.stopped = fd, threading.Event(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.pending.wait()
            if self.stopped:
                return
            self.pending.clear()
            os.fdatasync(self.fd)

    def kick(self) -> None:
        self.pending.set()

    def stop(self) -> None:
        self.stopped = True
        self.pending.set()
        self.thread.join()


class _Progress:
    """Bytes, rate and ETA in the log every few seconds while files download."""

    def __init__(self, total: int, files: int, log: Callable[[str], None], every: float):
        self.total, self.files, self.log, self.every = total, files, log, every
        self.done = self.skipped = self.files_done = 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.t0 = time.monotonic()

    @property
    def fetched(self) -> int:
        return self.done - self.skipped

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n

    def skip(self, n: int) -> None:  # bytes a resume found on disk: done, but not part of the rate
        with self.lock:
            self.done += n
            self.skipped += n

    def unskip(self, size: int) -> None:  # a file that failed verification starts over
        with self.lock:
            self.total += size

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        rate = self.fetched / elapsed
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if rate > 0 else ""
        pct = 100 * self.done / self.total if self.total else 100
        return (f"weights: {human(self.done)} of {human(self.total)} ({pct:.0f}%), {self.files_done} of "
                f"{self.files} files, {human(rate)}/s{eta}")

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.log(self.line())

    def __enter__(self) -> "_Progress":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _check_range(r: requests.Response, job: Job, off: int) -> None:
    """The body must be the bytes asked for, of a file of the expected size."""
    if r.status_code == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
        if not m or int(m[1]) != off:
            raise _Transient(f"bad Content-Range {r.headers.get('Content-Range')!r} for offset {off}")
        if m[2] != "*" and int(m[2]) != job.size:
            raise WeightsError(f"{job.label}: the server's file has {m[2]} bytes, expected {job.size} ({job.url})")
    elif off:
        raise WeightsError(f"{job.label}: the server ignored a Range request ({job.url}): resume and "
                           "parallel download need a server with Range support")
    elif int(r.headers.get("Content-Length", job.size)) != job.size:
        raise WeightsError(f"{job.label}: the server's file has {r.headers['Content-Length']} bytes, "
                           f"expected {job.size} ({job.url})")


def _hash_range(h, fd: int, start: int, end: int, buf: memoryview) -> None:
    while start < end:
        n = os.preadv(fd, [buf[: min(len(buf), end - start)]], start)  # into one buffer: no allocations
        if not n:
            raise WeightsError(f"partial file ended early at byte {start}")
        h.update(buf[:n])
        start += n


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _first(headers: list, name: str) -> str | None:
    return next((h[name] for h in headers if h.get(name)), None)


def _origin(url: str) -> tuple[str, str]:
    u = urlsplit(url)
    return u.scheme, u.netloc


def _reason(e: BaseException) -> str:
    if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return "stalled (no data within WEIGHTS_TIMEOUT)"
    while e.args and isinstance(e.args[0], BaseException):  # requests wraps urllib3 wraps the socket error
        e = e.args[0]
    return (e.args[0] if e.args and isinstance(e.args[0], str) else str(e)) or type(e).__name__
