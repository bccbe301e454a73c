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

What a file must match: what the server says of it, where it speaks the Hub's protocol (it sends
`X-Repo-Commit`): for a regular (non-LFS) file its `ETag` is the git blob SHA-1 of the content, for an LFS
file `X-Linked-Etag` is its sha256 (and `X-Linked-Size` its size); and what the caller pinned (manifest or
lock), where it pinned something. Bytes that do not match the server's own word are a bad transfer
(fetched again once); bytes that match it but not the pin are `PinMismatch`: the pin is out of date.
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from lib.atomic import write_json
from lib.settings import Settings

BLOCK = 1 << 20  # read/write unit: big enough to keep Python's per-call overhead small
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
FDATASYNC = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
# What a flaky network raises (resets, truncated bodies, timeouts); a full disk (plain OSError) is not one.
NET_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


class WeightsError(RuntimeError):
    """Weights could not be fetched or verified; the message names the repo, the file and the URL."""


@dataclass(frozen=True)
class Mismatch:
    """One file whose served content (as the Hub vouches for it) is not what was pinned."""

    label: str
    pinned_sha256: str | None
    pinned_size: int | None
    served_sha256: str
    served_size: int
    evidence: str  # why the served hash is the Hub's: "X-Linked-Etag" or "matches its ETag (git blob SHA-1 ...)"
    commit: str | None
    repin: str | None  # the command that re-pins it


class PinMismatch(WeightsError):
    """Files the Hub serves, verified against its own ETags, differ from their pinned size or sha256."""

    def __init__(self, mismatches: list[Mismatch]):
        self.mismatches = mismatches
        lines = [
            f"{len(mismatches)} file(s) differ from what the manifest pins, though they are what the Hub says they are:"
        ]
        for m in mismatches:
            pinned = f"sha256 {m.pinned_sha256 or '(not pinned)'}" + (
                f", {m.pinned_size} bytes" if m.pinned_size is not None else ""
            )
            lines.append(
                f"  {m.label}: pinned {pinned}; served sha256 {m.served_sha256}, {m.served_size} bytes "
                f"({m.evidence}) at commit {m.commit or '(not sent)'}"
            )
        commands = sorted({m.repin for m in mismatches if m.repin})
        lines.append(
            "The repo changed upstream, or the pins were made from another copy of its files. If the served "
            "files are the ones to trust, re-pin them (the manifest then names the commit):"
        )
        lines += [f"  {c}" for c in commands]
        super().__init__("\n".join(lines))


class _Transient(Exception):
    """A failure worth retrying (5xx, reset, stall, short body)."""


class _Aborted(Exception):
    """Another transfer failed for good: stop, keeping what is on disk for the next run to resume."""


@dataclass(frozen=True)
class Tuning:
    """How transfers run. The fields that WEIGHTS_* variables set default to their declared defaults."""

    # Parallel HTTP connections, all files together: several beat per-connection CDN limits, but each
    # costs CPU, which the sha256 needs too (on the 2-core benchmark machine 8 gained nothing over 4).
    connections: int = field(default_factory=lambda: Settings({}).weights_connections)
    files: int = 4  # files in flight at once
    chunk_size: int = 32 << 20
    timeout: float = field(default_factory=lambda: Settings({}).weights_timeout)  # seconds without a byte: stalled
    retries: int = field(default_factory=lambda: Settings({}).weights_retries)  # failed attempts in a row
    backoff: float = 0.5  # first retry delay, doubled each time, capped at 8 s
    progress_seconds: float = field(default_factory=lambda: Settings({}).weights_progress_seconds)

    @classmethod
    def from_env(cls) -> Tuning:
        s = Settings()
        return cls(
            connections=s.weights_connections,
            timeout=s.weights_timeout,
            retries=s.weights_retries,
            progress_seconds=s.weights_progress_seconds,
        )


@dataclass(frozen=True)
class Probe:
    """What a HEAD learned of a file. The Hub (X-Repo-Commit sent) vouches for the content: an LFS file by its
    sha256 (X-Linked-Etag), a regular file by the git blob SHA-1 of its content (ETag)."""

    size: int
    commit: str | None  # X-Repo-Commit: the commit the revision resolved to
    lfs_sha256: str | None
    git_sha1: str | None
    etag: str | None  # the raw validator: a resumed partial is kept only while it is unchanged

    @property
    def evidence(self) -> str | None:
        """How the server vouches for the content, for messages (None: it does not)."""
        if self.lfs_sha256:
            return "the Hub's X-Linked-Etag"
        if self.git_sha1:
            return f"matches the Hub's ETag, git blob SHA-1 {self.git_sha1}"
        return None


@dataclass(frozen=True)
class Transfer:
    label: str  # "repo R, file F": every error message starts with it
    url: str
    dest: Path  # final path: replaced atomically, only once verified
    partial: Path  # bytes accumulate here (same filesystem as dest); sidecar partial + ".json"
    size: int
    sha256: str | None  # pinned (manifest or lock); None: trusted on first download, the caller records it
    probe: Probe | None = None  # what the server said; the content must match what it vouches for
    pinned_size: int | None = None
    repin: str | None = None  # the command that re-pins this file, for PinMismatch

    @property
    def etag(self) -> str | None:
        return self.probe.etag if self.probe else None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


class Downloader:
    def __init__(self, tuning: Tuning | None = None, *, token: str | None = None, log: Callable[[str], None] = print):
        self.tuning = tuning or Tuning.from_env()
        self.token = token
        self.log = log
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=4, pool_maxsize=self.tuning.connections + self.tuning.files
        )
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
        t = self.tuning.timeout
        return self.session.request(method, url, headers=headers, stream=True, timeout=(t, t), allow_redirects=follow)

    def _check(self, r: requests.Response, label: str, url: str) -> None:
        code = r.status_code
        if code < 400:
            return
        kind, message = r.headers.get("X-Error-Code"), r.headers.get("X-Error-Message")
        detail = f" ({': '.join(x for x in (kind, message) if x)})" if kind or message else ""
        sent = "the token in HF_TOKEN was refused" if self.token else "no token was sent: HF_TOKEN is not set"
        if kind == "GatedRepo":
            raise WeightsError(
                f"{label}: HTTP {code} from {url}{detail}: the repo is gated ({sent}). Accept its "
                "licence on the repo's Hub page with your account, then set HF_TOKEN to a token of "
                "that account"
            )
        if code in (401, 403):
            raise WeightsError(
                f"{label}: HTTP {code} from {url}{detail}: access denied ({sent}). Gated or "
                "private repos need HF_TOKEN set to a token whose account accepted the licence"
            )
        if code == 404:
            what = {
                "EntryNotFound": "the file is not in the repo at this revision",
                "RevisionNotFound": "the revision does not exist in the repo",
                "RepoNotFound": "the repo does not exist (or is private)",
            }.get(kind, "not found")
            raise WeightsError(
                f"{label}: HTTP 404 from {url}{detail}: {what}. Check the repo, revision and path "
                "in the manifest, and that WEIGHTS_BASE_URL mirrors them"
            )
        if code in (408, 429) or code >= 500:
            raise _Transient(f"HTTP {code}")
        raise WeightsError(f"{label}: HTTP {code} from {url}{detail}")

    def _backoff(self, failures: int, label: str, url: str, reason: object, abort=None) -> None:
        if failures > self.tuning.retries:
            raise WeightsError(
                f"{label}: giving up after {failures} failed attempts in a row, last: {reason} "
                f"({url}); WEIGHTS_TIMEOUT/WEIGHTS_RETRIES tune the patience"
            )
        delay = self._delay(failures)
        self.log(f"weights: {label}: {reason}; retry {failures}/{self.tuning.retries} in {delay:.1f} s")
        self._sleep(delay, abort)

    def _delay(self, attempt: int) -> float:
        """Seconds before retry `attempt` (1, 2, ...): exponential, at most 8 s."""
        return min(self.tuning.backoff * 2 ** (attempt - 1), 8.0)

    def _sleep(self, delay: float, abort: threading.Event | None = None) -> None:
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            self._raise_if_aborted(abort)
            time.sleep(min(left, 0.1))
        self._raise_if_aborted(abort)

    def _raise_if_aborted(self, abort: threading.Event | None) -> None:
        if self._cancel.is_set() or (abort is not None and abort.is_set()):
            raise _Aborted()

    def probe_all(self, targets: list[tuple[str, str]]) -> list[Probe]:
        """HEAD every (url, label) in parallel. Failures worth retrying are retried in rounds, all waiting files
        together, with one log line per round; after WEIGHTS_RETRIES rounds, one error says what is wrong."""
        results: list[Probe | None] = [None] * len(targets)
        waiting, rounds, started = list(range(len(targets))), 0, time.monotonic()
        with ThreadPoolExecutor(min(self.tuning.connections, max(1, len(targets)))) as pool:
            while waiting:
                failed = {}
                for i, outcome in zip(waiting, pool.map(lambda i: self._probe_once(*targets[i]), waiting), strict=True):
                    if isinstance(outcome, Probe):
                        results[i] = outcome
                    else:
                        failed[i] = outcome
                if not failed:
                    break
                rounds += 1
                reasons = Counter(failed.values())
                reason = reasons.most_common(1)[0][0] + (
                    f" (and {len(reasons) - 1} other reasons)" if len(reasons) > 1 else ""
                )
                url, label = targets[next(iter(failed))]
                if rounds > self.tuning.retries:
                    raise WeightsError(
                        f"{len(failed)} of {len(targets)} file(s) could not be reached at {_host(url)}: {reason}; "
                        f"gave up after {rounds} attempts in {time.monotonic() - started:.0f} s (first: {label}, "
                        f"{url}). Check this machine's network access to {_host(url)}, or set WEIGHTS_BASE_URL to a "
                        "mirror you can reach, or WEIGHTS_OFFLINE=1 to load files already in WEIGHTS_DIR"
                    )
                delay = self._delay(rounds)
                self.log(
                    f"weights: {len(failed)} file(s) not reachable at {_host(url)}: {reason}; retry "
                    f"{rounds}/{self.tuning.retries} in {delay:.1f} s"
                )
                self._sleep(delay)
                waiting = list(failed)
        return results  # type: ignore[return-value]

    def _probe_once(self, url: str, label: str) -> Probe | str:
        """One HEAD: the Probe, or the reason of a failure worth retrying. Other failures raise WeightsError."""
        try:
            hops = self._head(url)
            r = hops[-1]
            self._check(r, label, url)
        except (_Transient, *NET_ERRORS) as e:
            return _reason(e)
        headers = [h.headers for h in hops]
        size = _first(headers, "X-Linked-Size") or r.headers.get("Content-Length")
        if size is None:
            raise WeightsError(f"{label}: the server sent no size for {url}")
        commit = _first(headers, "X-Repo-Commit")
        linked = _unquote(_first(headers, "X-Linked-Etag"))
        etag = _unquote(r.headers.get("ETag"))
        hub = commit is not None  # only the Hub's ETags have a meaning we can check
        return Probe(
            int(size),
            commit,
            linked if hub and SHA256_RE.match(linked or "") else None,
            etag if hub and not linked and SHA1_RE.match(etag or "") else None,
            linked or etag,
        )

    def fetch_bytes(self, url: str, label: str, size: int) -> bytes:
        """A small file, whole, into memory (retried like the HEADs)."""
        failures = 0
        while True:
            try:
                with self._request("GET", url, url) as r:
                    self._check(r, label, url)
                    data = r.raw.read(size + 1, decode_content=False)
                if len(data) != size:
                    raise _Transient(f"got {len(data)} bytes, expected {size}")
                return data
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
    def _fetch_range(
        self,
        job: Transfer,
        route: dict,
        fd: int,
        start: int,
        end: int,
        progress: "_Progress",
        abort: threading.Event,
        written: Callable[[int], None],
    ) -> None:
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
                    if url != job.url and r.status_code >= 400:
                        # The redirect target refused: its signed URL expired. Ask the origin for a fresh one,
                        # at once and without counting a failure (a refusal right after a redirect is one).
                        route.pop("direct", None)
                        continue
                    if r.history and r.status_code in (400, 401, 403):
                        raise WeightsError(
                            f"{job.label}: HTTP {r.status_code} from {_host(r.url)}, where {job.url} "
                            "redirected: the download link it gave was refused at once (is this "
                            "machine's clock right?)"
                        )
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
    def _fetch_file(self, job: Transfer, chunks_pool: ThreadPoolExecutor, progress: "_Progress") -> str:
        """Download, verify and place one file; returns its sha256. Bytes that do not match what the server
        vouches for, or (where it vouches for nothing) the pin, are fetched again once from zero."""
        for attempt in (1, 2):
            self._raise_if_aborted(None)
            part = _Partial(job, self.tuning.chunk_size)
            if part.done:
                self.log(f"weights: {job.label}: resuming, {human(part.done_bytes())} already on disk")
            progress.skip(part.done_bytes())
            try:
                sha, git_sha1 = self._transfer(job, part, chunks_pool, progress)
            except BaseException:
                part.close()
                if not part.done:
                    part.discard()  # nothing a later run could resume
                raise
            part.close()
            bad = _unvouched(job, sha, git_sha1)
            if bad is None and (job.sha256 is None or sha == job.sha256):
                job.dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(job.partial, job.dest)
                part.forget()
                return sha
            part.discard()
            if bad is None and job.probe and job.probe.evidence:  # the Hub's own file: the pin is what is wrong
                raise PinMismatch(
                    [
                        Mismatch(
                            job.label,
                            job.sha256,
                            job.pinned_size,
                            sha,
                            job.size,
                            job.probe.evidence,
                            job.probe.commit,
                            job.repin,
                        )
                    ]
                )
            progress.unskip(job.size)
            if attempt == 1:
                self.log(f"weights: {job.label}: {bad or f'sha256 mismatch (got {sha})'}, fetching it again")
        if bad:
            raise WeightsError(
                f"{job.label}: twice from {job.url}, the bytes received do not match what the server "
                f"says of the file: {bad}. The transfer is corrupted on the way (a proxy?); try again "
                "or from another network"
            )
        raise WeightsError(
            f"{job.label}: sha256 mismatch twice from {job.url}: got {sha}, expected "
            f"{job.sha256}. The server's file is not the pinned one (upstream changed, or a "
            "bad mirror); if the new file is trusted, re-pin it in the manifest"
        )

    def _transfer(self, job: Transfer, part: "_Partial", pool: ThreadPoolExecutor, progress: "_Progress") -> str:
        abort, route = threading.Event(), {}
        frontier = _Frontier(part)

        def chunk(i: int, start: int, end: int) -> None:
            self._fetch_range(job, route, part.fd, start, end, progress, abort, lambda off: frontier.advance(i, off))
            part.mark(i)

        futures = {i: pool.submit(chunk, i, s, e) for i, (s, e) in enumerate(part.chunks) if i not in part.done}
        flusher = _Flusher(part.fd) if len(part.chunks) > 1 else None
        h, buf = hashlib.sha256(), memoryview(bytearray(max(1, min(8 << 20, job.size))))
        # A regular file's git blob SHA-1 (the Hub's ETag) covers a header, then the content.
        g = hashlib.sha1(b"blob %d\0" % job.size) if job.probe and job.probe.git_sha1 else None
        try:
            # The hash follows the bytes in file order as they land (read back from the page cache), so
            # it runs alongside the transfer and little is left to hash when the last byte arrives.
            for i, (s, e) in enumerate(part.chunks):
                pos = s
                while pos < e:
                    upto = frontier.wait(i, pos, futures.get(i))
                    _hash_range((h, g) if g else (h,), part.fd, pos, upto, buf)
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
        return h.hexdigest(), g.hexdigest() if g else None

    # -- many files -----------------------------------------------------------------------------------------
    def fetch_all(self, jobs: list[Transfer], on_done: Callable[[Transfer, str], None]) -> int:
        """Fetch jobs, several at once, biggest first; on_done(job, sha256) runs in this thread as each lands.

        The first error stops the others (their partials stay for a resume) and is raised; pin mismatches do not
        stop the others and are raised together at the end. Returns bytes transferred."""
        self._cancel.clear()
        s = self.tuning
        jobs = sorted(jobs, key=lambda j: -j.size)
        with (
            _Progress(sum(j.size for j in jobs), len(jobs), self.log, s.progress_seconds) as progress,
            ThreadPoolExecutor(s.connections, thread_name_prefix="chunk") as chunks,
            ThreadPoolExecutor(s.files, thread_name_prefix="file") as files,
        ):
            futures = {files.submit(self._fetch_file, j, chunks, progress): j for j in jobs}
            error, mismatches = None, []
            try:
                for f in as_completed(futures):
                    try:
                        on_done(futures[f], f.result())
                        progress.files_done += 1
                    except _Aborted:
                        pass
                    except PinMismatch as e:
                        mismatches += e.mismatches
                    except Exception as e:
                        error = error or e
                        self._cancel.set()
            except BaseException:  # Ctrl-C: the pools' exit waits for their threads, so stop them first
                self._cancel.set()
                raise
            if error:
                raise error
            if mismatches:
                raise PinMismatch(sorted(mismatches, key=lambda m: m.label))
            return progress.fetched


class _Partial:
    """The partial file of a job and its sidecar listing the chunks already written."""

    def __init__(self, job: Transfer, chunk_size: int):
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
        if not self.done and job.size and hasattr(os, "posix_fallocate"):  # not on macOS: files grow as written
            # Reserving the blocks up front makes the writeback of the parallel chunks sequential (fsync
            # then costs far less: docs/benchmarks.md) and turns a full disk into an error now, not later.
            try:
                os.posix_fallocate(self.fd, 0, job.size)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    self.close()
                    self.discard()
                    where = job.partial.parent
                    raise WeightsError(f"{job.label}: no space left for {human(job.size)} in {where}") from None

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
            FDATASYNC(self.fd)

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
        return (
            f"weights: {human(self.done)} of {human(self.total)} ({pct:.0f}%), {self.files_done} of "
            f"{self.files} files, {human(rate)}/s{eta}"
        )

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


def _check_range(r: requests.Response, job: Transfer, off: int) -> None:
    """The body must be the bytes asked for, of a file of the expected size."""
    if r.status_code == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
        if not m or int(m[1]) != off:
            raise _Transient(f"bad Content-Range {r.headers.get('Content-Range')!r} for offset {off}")
        if m[2] != "*" and int(m[2]) != job.size:
            raise WeightsError(f"{job.label}: the server's file has {m[2]} bytes, expected {job.size} ({job.url})")
    elif off:
        raise WeightsError(
            f"{job.label}: the server ignored a Range request ({job.url}): resume and "
            "parallel download need a server with Range support"
        )
    elif int(r.headers.get("Content-Length", job.size)) != job.size:
        raise WeightsError(
            f"{job.label}: the server's file has {r.headers['Content-Length']} bytes, expected {job.size} ({job.url})"
        )


def _hash_range(hashes, fd: int, start: int, end: int, buf: memoryview) -> None:
    while start < end:
        n = os.preadv(fd, [buf[: min(len(buf), end - start)]], start)  # into one buffer: no allocations
        if not n:
            raise WeightsError(f"partial file ended early at byte {start}")
        for h in hashes:
            h.update(buf[:n])
        start += n


def git_blob_sha1(data: bytes) -> str:
    """The git blob SHA-1 of `data`: what the Hub sends as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _unvouched(job: Transfer, sha256: str, git_sha1: str | None) -> str | None:
    """How the bytes received differ from what the server vouches for (None: they match, or it vouches for nothing)."""
    p = job.probe
    if p and p.lfs_sha256 and sha256 != p.lfs_sha256:
        return f"sha256 {sha256}, but the Hub's X-Linked-Etag says {p.lfs_sha256}"
    if p and p.git_sha1 and git_sha1 != p.git_sha1:
        return f"git blob SHA-1 {git_sha1}, but the Hub's ETag says {p.git_sha1}"
    return None


def _first(headers: list, name: str) -> str | None:
    return next((h[name] for h in headers if h.get(name)), None)


def _origin(url: str) -> tuple[str, str]:
    u = urlsplit(url)
    return u.scheme, u.netloc


def _unquote(etag: str | None) -> str | None:
    return etag.removeprefix("W/").strip('"').lower() or None if etag else None


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _reason(e: BaseException) -> str:
    """A short, stable reason for a failure worth retrying (the same for every file a dead host fails)."""
    if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return "stalled (no data within WEIGHTS_TIMEOUT)"
    chain, seen = e, set()
    while chain is not None and id(chain) not in seen:  # requests wraps urllib3 wraps the socket error
        seen.add(id(chain))
        if isinstance(chain, urllib3.exceptions.NameResolutionError):
            return "the host name does not resolve (no DNS, or no network)"
        if isinstance(chain, ConnectionRefusedError) or "Connection refused" in str(chain):
            return "connection refused"
        chain = (
            getattr(chain, "reason", None)
            or chain.__cause__
            or next((a for a in chain.args if isinstance(a, BaseException)), None)
        )
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    return (e.args[0] if e.args and isinstance(e.args[0], str) else str(e)) or type(e).__name__
