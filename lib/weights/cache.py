"""The weights cache: whether WEIGHTS_DIR holds the files the enabled modes need, verified, and fetching what is
missing or wrong (the manifest: lib/weights/manifest.py; the transfer: lib/weights/download.py).

- WEIGHTS_DIR/<repo_id>/<path_in_repo> is what the engine loads. Bookkeeping lives in WEIGHTS_DIR/.cache/:
  verified/ (a marker per file: size, mtime, inode and sha256 when it was verified; the warm check costs a
  stat and a marker read), partial/ (resumable downloads), tmp/, and lock (one process fills it at a time).
- Files with the same sha256 are stored once, as hard links (the engine shares modules by inode).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from lib.atomic import write_json
from lib.settings import Settings
from lib.weights.download import Downloader, Mismatch, PinMismatch, Probe, Transfer, Tuning, WeightsError, human
from lib.weights.manifest import (
    Entry,
    Lock,
    Log,
    hash_file,
    hub_from_env,
    load_manifest,
    lock_path,
    manifest_entries,
    manifest_path_from_env,
    plan,
    repin_command,
)

FREE_MARGIN = 100_000_000  # left free after a download: logs, outputs and the OS need some room too


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class Cache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.meta = self.root / ".cache"

    def path(self, e: Entry) -> Path:
        return self.root / e.repo_id / e.path

    def marker(self, e: Entry) -> Path:
        return self.meta / "verified" / e.repo_id / f"{e.path}.json"

    def partial(self, e: Entry) -> Path:
        return self.meta / "partial" / e.repo_id / f"{e.path}.part"

    def verified(self, e: Entry) -> str | None:
        """sha256 of e's file if its marker says it verified and it is unchanged since: stat + marker read."""
        try:
            st = os.stat(self.path(e))
            m = json.loads(self.marker(e).read_text())
        except (OSError, ValueError):
            return None
        if [m.get("size"), m.get("mtime_ns"), m.get("ino")] != [st.st_size, st.st_mtime_ns, st.st_ino]:
            return None
        if e.sha256 not in (None, m.get("sha256")) or e.size not in (None, st.st_size):
            return None
        return m.get("sha256")

    def mark(self, e: Entry, sha256: str) -> None:
        st = os.stat(self.path(e))
        self.marker(e).parent.mkdir(parents=True, exist_ok=True)
        write_json(self.marker(e), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "sha256": sha256})

    def unmark(self, e: Entry) -> None:
        self.marker(e).unlink(missing_ok=True)

    def link(self, src: Path, e: Entry) -> None:
        """Place e's file as a hard link to src (same bytes), or a copy where linking fails."""
        dst = self.path(e)
        if dst.exists() and os.path.samefile(src, dst):
            return  # rename() between links to one inode would do nothing and leave tmp behind
        tmp = self.meta / "tmp" / f"{os.getpid()}-{dst.name}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dst)

    @contextmanager
    def locked(self, log: Log):
        """One process fills the cache at a time; others wait, then find the files there (flock: a killed
        holder releases it)."""
        self.meta.mkdir(parents=True, exist_ok=True)
        with open(self.meta / "lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"weights: another process is filling {self.root}; waiting for it")
                fcntl.flock(f, fcntl.LOCK_EX)
            shutil.rmtree(self.meta / "tmp", ignore_errors=True)  # leftovers of a killed run
            yield


# -- public API -------------------------------------------------------------------------------------------
def ensure_weights(
    mode_names,
    weights_dir,
    *,
    manifest_path=None,
    base_url=None,
    token=None,
    log: Log = print,
    tuning: Tuning | None = None,
    safety_checker: bool = False,
    controlnet: bool = False,
) -> dict:
    """Make weights_dir hold every file the modes need, verified; fetch what is missing or wrong.

    Defaults: WEIGHTS_MANIFEST, WEIGHTS_BASE_URL (else the Hub), HF_TOKEN. With WEIGHTS_OFFLINE=1 nothing is
    fetched: the files must be present (with the manifest's sizes). Returns a small report; raises
    WeightsError with the repo, file and URL in the message."""
    t0 = time.monotonic()
    mode_names = list(mode_names)
    manifest_path = manifest_path_from_env(manifest_path)
    manifest, lock = load_manifest(manifest_path), Lock(lock_path(manifest_path))
    cache = Cache(weights_dir)
    entries = plan(mode_names, manifest, lock, manifest_path, safety_checker, controlnet)
    report = {"files": len(entries), "downloaded": 0, "linked": 0, "rehashed": 0, "bytes": 0}
    if Settings().weights_offline:
        _check_present(entries, cache)
    elif not all(cache.verified(e) for e in entries):
        with cache.locked(log):  # re-checks inside: a process we waited for may have fetched it all
            base, token = hub_from_env(base_url, token)
            Fill(cache, manifest, manifest_path, lock, base, token, log, tuning or Tuning.from_env(), report).run(
                entries
            )
    _learn(entries, cache, lock)
    lock.save(log)
    report["seconds"] = round(time.monotonic() - t0, 3)
    what = (
        f"fetched {report['downloaded']} files ({human(report['bytes'])}), linked {report['linked']}, "
        if report["downloaded"] + report["linked"] + report["rehashed"]
        else ""
    )
    log(
        f"weights: {what}{len(entries)} files of {', '.join(mode_names)} ready in {cache.root} "
        f"({report['seconds']:.2f} s)"
    )
    return report


def verify_weights(
    mode_names,
    weights_dir,
    full: bool = False,
    *,
    manifest_path=None,
    safety_checker: bool = False,
    controlnet: bool = False,
) -> dict:
    """Check the modes' files without fetching. Cheap (markers) by default; full=True rehashes every file
    and re-marks those that match (or unmarks those that do not). Returns {"files", "bytes", "problems"}."""
    manifest_path = manifest_path_from_env(manifest_path)
    manifest, lock = load_manifest(manifest_path), Lock(lock_path(manifest_path))
    cache = Cache(weights_dir)
    entries = plan(list(mode_names), manifest, lock, manifest_path, safety_checker, controlnet)
    problems, total = [], 0
    for e in entries:
        p = cache.path(e)
        if not p.is_file():
            problems.append(f"{e.label}: missing ({p})")
            continue
        total += p.stat().st_size
        marked = cache.verified(e)
        if not full:
            if marked is None:
                problems.append(f"{e.label}: not verified since it was placed or changed (verify --full checks it)")
            continue
        expected = e.sha256 or marked
        sha = hash_file(p)
        if expected is None:
            problems.append(f"{e.label}: no known sha256 to check it against (fetch records one)")
        elif sha != expected or e.size not in (None, p.stat().st_size):
            problems.append(f"{e.label}: sha256 {sha} but expected {expected} ({p})")
            cache.unmark(e)
        else:
            cache.mark(e, sha)
    return {"files": len(entries), "bytes": total, "problems": problems}


# -- the work ---------------------------------------------------------------------------------------------
def _check_present(entries: list[Entry], cache: Cache) -> None:
    bad = [
        f"{e.repo_id}/{e.path}"
        for e in entries
        if not cache.path(e).is_file() or e.size not in (None, cache.path(e).stat().st_size)
    ]
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise WeightsError(
            f"WEIGHTS_OFFLINE is set and {cache.root} lacks (or has a wrong size of) "
            f"{len(bad)} file(s): {', '.join(bad[:10])}{more}"
        )


def _learn(entries: list[Entry], cache: Cache, lock: Lock) -> None:
    """Record in the lock what verified files taught us that the manifest and lock do not say yet."""
    for e in entries:
        if e.sha256 is None and (sha := cache.verified(e)):
            lock.learn(e, cache.path(e).stat().st_size, sha)


class Fill:
    """One run that makes the cache hold what it lacks, in stages: files on disk without a marker are rehashed,
    files stored under another name are linked, and the rest are resolved at the server (HEAD), checked against
    the free space and downloaded; equal files in one run are downloaded once and linked."""

    def __init__(
        self,
        cache: Cache,
        manifest: dict,
        manifest_path: Path,
        lock: Lock,
        base: str,
        token,
        log: Log,
        tuning: Tuning,
        report: dict,
    ):
        self.cache, self.manifest, self.manifest_path, self.lock = cache, manifest, manifest_path, lock
        self.base, self.token, self.log, self.tuning, self.report = base, token, log, tuning, report

    def run(self, entries: list[Entry]) -> None:
        todo = self.rehash_unmarked(entries)
        leaders, followers = self.link_known(todo)
        if not leaders:
            return
        downloader = Downloader(self.tuning, token=self.token, log=self.log)
        try:
            transfers, mismatches = self.resolve(leaders, downloader)
            self.check_space(transfers)
            mismatches += self.download(downloader, transfers, followers)
        finally:
            downloader.close()
        if mismatches:
            raise PinMismatch(sorted(mismatches, key=lambda m: m.label))

    def rehash_unmarked(self, entries: list[Entry]) -> list[Entry]:
        """The entries still to fetch. A file without a valid marker (placed by hand, marker lost) is hashed:
        that beats downloading it."""
        cache, todo = self.cache, []
        for e in entries:
            if cache.verified(e):
                continue
            p = cache.path(e)
            if e.sha256 and p.is_file() and e.size in (None, p.stat().st_size):
                self.log(f"weights: checking existing {p}")
                if hash_file(p) == e.sha256:
                    cache.mark(e, e.sha256)
                    self.report["rehashed"] += 1
                    continue
            todo.append(e)
        return todo

    def link_known(self, todo: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """Same sha256, one copy: link from a verified file anywhere in the cache. Returns the entries to download
        (one per sha256) and those to link from this run's downloads."""
        cache = self.cache
        sources = {
            sha: cache.path(e)
            for e in manifest_entries(self.manifest["repos"], self.manifest, self.lock)
            if (sha := cache.verified(e))
        }
        leaders, followers = {}, []
        for e in todo:
            if e.sha256 and e.sha256 in sources:
                cache.link(sources[e.sha256], e)
                cache.mark(e, e.sha256)
                self.report["linked"] += 1
            elif e.sha256 and e.sha256 in leaders:
                followers.append(e)
            else:
                leaders[e.sha256 or id(e)] = e
        return list(leaders.values()), followers

    def resolve(self, leaders: list[Entry], downloader: Downloader) -> tuple[dict[Transfer, Entry], list[Mismatch]]:
        """HEAD every file (see `resolve`); the lock pins each repo's commit before any byte is fetched, so a run
        killed from here on still fetches the rest from the same commit."""
        transfers = {}
        probed, mismatches = resolve(leaders, self.base, downloader, self.manifest_path)
        for e, probe in probed:
            if e.commit and self.lock.repo(e.repo_id, e.revision).get("commit") != e.commit:
                self.lock.pin(e.repo_id, e.revision, e.commit)
            transfer = Transfer(
                e.label,
                e.url(self.base),
                self.cache.path(e),
                self.cache.partial(e),
                probe.size,
                e.sha256,
                probe,
                e.size,
                repin_command(e.repo_id, self.manifest_path),
            )
            transfers[transfer] = e
        self.lock.save(self.log)
        return transfers, mismatches

    def check_space(self, transfers: dict[Transfer, Entry]) -> None:
        need = sum(t.size - _allocated(t.partial, t.size) for t in transfers)
        free = free_bytes(self.cache.root)
        if free < need + FREE_MARGIN:
            raise WeightsError(
                f"not enough disk space in {self.cache.root}: {len(transfers)} files need "
                f"{human(need)} (+{human(FREE_MARGIN)} headroom), {human(free)} free; free some space "
                "or point WEIGHTS_DIR at a bigger disk"
            )
        self.log(f"weights: fetching {len(transfers)} files ({human(need)}) from {self.base} into {self.cache.root}")

    def download(
        self, downloader: Downloader, transfers: dict[Transfer, Entry], followers: list[Entry]
    ) -> list[Mismatch]:
        """Every transfer; each file is marked as it lands, and its followers linked. Returns the pin mismatches."""
        cache, report = self.cache, self.report

        def done(transfer: Transfer, sha: str) -> None:
            cache.mark(transfers[transfer], sha)
            report["downloaded"] += 1
            for f in followers:
                if f.sha256 == sha:
                    cache.link(transfer.dest, f)
                    cache.mark(f, sha)
                    report["linked"] += 1

        try:
            report["bytes"] = downloader.fetch_all(list(transfers), done)
        except PinMismatch as e:
            return e.mismatches
        return []


def resolve(
    todo: list[Entry], base: str, downloader: Downloader, manifest_path: Path
) -> tuple[list[tuple[Entry, Probe]], list[Mismatch]]:
    """HEAD every file before any download: sizes (for the disk check), early 404/401s, what the Hub vouches
    for (the sha256 of LFS files, the git blob SHA-1 of the others), and the commit a revision resolves to
    (X-Repo-Commit), which the GETs then pin: one commit per repo. Returns the entries completed with what
    the server said, and the LFS files whose pins the Hub already contradicts (not to be downloaded)."""
    probes = downloader.probe_all([(e.url(base), e.label) for e in todo])
    commits, out, mismatches = {}, [], []
    for e, p in zip(todo, probes, strict=True):
        commit = e.commit or commits.setdefault(e.repo_id, p.commit)
        if p.lfs_sha256 and (e.sha256 not in (None, p.lfs_sha256) or e.size not in (None, p.size)):
            mismatches.append(
                Mismatch(
                    e.label,
                    e.sha256,
                    e.size,
                    p.lfs_sha256,
                    p.size,
                    p.evidence,
                    commit,
                    repin_command(e.repo_id, manifest_path),
                )
            )
            continue
        if not p.evidence and e.size not in (None, p.size):  # a plain mirror: its size is all it says
            raise WeightsError(
                f"{e.label}: {e.url(base)} has {p.size} bytes but the manifest says {e.size}: the "
                "server's file is not the pinned one; re-pin it in the manifest if trusted"
            )
        out.append((replace(e, commit=commit), p))
    return out, mismatches


def _allocated(path: Path, size: int) -> int:
    """Bytes a partial download already holds on disk (its blocks are reserved when it starts)."""
    try:
        return min(os.stat(path).st_blocks * 512, size)
    except OSError:
        return 0
