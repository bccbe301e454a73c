"""The weights cache: which files the enabled modes need, whether WEIGHTS_DIR holds them verified, and
fetching what is missing or wrong (the transfer itself is lib/download.py).

- weights/manifest.json (tracked) lists per Hub repo a revision and every file the modes load, with size
  and sha256 (null where not known). weights/manifest.lock.json beside it records what first downloads
  learned: the commit a revision resolved to (X-Repo-Commit) and the hashes the manifest leaves null.
- WEIGHTS_DIR/<repo_id>/<path_in_repo> is what the engine loads. Bookkeeping lives in WEIGHTS_DIR/.cache/:
  verified/ (a marker per file: size, mtime, inode and sha256 when it was verified; the warm check costs a
  stat and a marker read), partial/ (resumable downloads), tmp/, and lock (one process fills it at a time).
- Files with the same sha256 are stored once, as hard links (the engine shares modules by inode).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from lib.atomic import write_atomically, write_json
from lib.settings import Settings
from lib.weights.download import (SHA256_RE, Downloader, Mismatch, PinMismatch, Probe, Transfer, Tuning, WeightsError,
                       git_blob_sha1, human)
from lib.engine.modes import MODES, all_repos, repo_files

__all__ = ["WeightsError", "PinMismatch", "ensure_weights", "verify_weights", "pin", "repo_files", "load_manifest",
           "Tuning"]

DEFAULT_MANIFEST = Settings({}).weights_manifest  # what WEIGHTS_MANIFEST defaults to
FREE_MARGIN = 100_000_000  # left free after a download: logs, outputs and the OS need some room too

Log = Callable[[str], None]


@dataclass(frozen=True)
class Entry:
    """One file the cache must hold, with what is known of it (manifest first, then the lock)."""

    repo_id: str
    path: str
    revision: str  # as the manifest asks
    commit: str | None  # what the lock pinned that revision to
    size: int | None
    sha256: str | None

    @property
    def label(self) -> str:
        return f"repo {self.repo_id}, file {self.path}"

    def url(self, base: str) -> str:
        rev = quote(self.commit or self.revision, safe="")
        return f"{base}/{quote(self.repo_id)}/resolve/{rev}/{quote(self.path)}"


# -- manifest and lock ------------------------------------------------------------------------------------
def manifest_path_from_env(path: str | Path | None = None) -> Path:
    return Path(path or Settings().weights_manifest)


def hub_from_env(base_url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """(base URL, token) as given, else from WEIGHTS_BASE_URL and HF_TOKEN."""
    settings = Settings()
    base = (base_url or settings.weights_base_url).rstrip("/")
    return base, token if token is not None else settings.hf_token


def lock_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.name.removesuffix(".json") + ".lock.json")


def load_manifest(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise WeightsError(f"cannot read the weights manifest {path}: {e}") from None
    except ValueError as e:
        raise WeightsError(f"the weights manifest {path} is not valid JSON: {e}") from None
    repos = data.get("repos") if isinstance(data, dict) else None
    if not isinstance(repos, dict):
        raise WeightsError(f"the weights manifest {path} has no 'repos' object")
    for repo_id, spec in repos.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("revision"), str) \
                or not isinstance(spec.get("files"), dict):
            raise WeightsError(f"{path}: repo {repo_id} needs a 'revision' string and a 'files' object")
        for name, f in spec["files"].items():
            size, sha = (f.get("size"), f.get("sha256")) if isinstance(f, dict) else ("?", "?")
            if not (size is None or isinstance(size, int) and size >= 0) \
                    or not (sha is None or isinstance(sha, str) and SHA256_RE.match(sha)):
                raise WeightsError(f"{path}: repo {repo_id}, file {name}: 'size' must be a byte count or null "
                                   "and 'sha256' 64 lowercase hex digits or null")
    return data


class Lock:
    """manifest.lock.json: commits and hashes learned on first download ("trust on first download").

    Entries are kept per repo with the manifest revision they were learned for: changing the revision in
    the manifest forgets them. Saving re-reads the file and replays this run's changes, so processes that
    share the manifest do not erase each other's entries."""

    def __init__(self, path: Path):
        self.path = path
        self.data = self._read()
        self.ops: list[tuple] = []

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data.get("repos"), dict) else {"version": 1, "repos": {}}
        except (OSError, ValueError, AttributeError):
            return {"version": 1, "repos": {}}

    def repo(self, repo_id: str, revision: str) -> dict:
        r = self.data["repos"].get(repo_id) or {}
        return r if r.get("revision") == revision else {}

    def pin(self, repo_id: str, revision: str, commit: str) -> None:
        self._do(("commit", repo_id, revision, commit))

    def learn(self, e: Entry, size: int, sha256: str) -> None:
        self._do(("file", e.repo_id, e.revision, e.path, {"size": size, "sha256": sha256}))

    def _do(self, op: tuple) -> None:
        self.ops.append(op)
        _apply(self.data, op)

    def save(self, log: Log) -> None:
        if not self.ops:
            return
        data = self._read()
        for op in self.ops:
            _apply(data, op)
        try:
            write_manifest(self.path, data)
            self.ops.clear()
        except OSError as e:
            log(f"weights: cannot write {self.path} ({e}); what this run learned stays in the cache markers only")


def manifest_text(data: dict) -> str:
    """JSON with one line per file (readable diffs of the tracked manifest and lock)."""
    text = json.dumps(data, indent=1, sort_keys=True)
    return re.sub(r'\{\n\s*"sha256": (\S+),\n\s*"size": (\S+)\n\s*\}', r'{"sha256": \1, "size": \2}', text) + "\n"


def write_manifest(path: Path, data: dict) -> None:
    write_atomically(path, manifest_text(data))


def manifest_for_tree(root: Path, revision: str = "main") -> dict:
    """A manifest of every mode's repos (and the safety checker's files) from files laid out as
    root/<repo_id>/<path>, measured."""
    repos = {}
    for repo in all_repos(MODES, safety_checker=True):
        files = {}
        for path in repo_files(repo):
            f = Path(root) / repo.repo_id / path
            if not f.is_file():
                raise WeightsError(f"repo {repo.repo_id}, file {path}: not found at {f}")
            files[path] = {"size": f.stat().st_size, "sha256": hash_file(f)}
        repos[repo.repo_id] = {"revision": revision, "files": files}
    return {"version": 1, "repos": repos}


def _apply(data: dict, op: tuple) -> None:
    kind, repo_id, revision, *rest = op
    r = data["repos"].get(repo_id)
    if not r or r.get("revision") != revision:
        r = data["repos"][repo_id] = {"revision": revision, "commit": None, "files": {}}
    if kind == "commit":
        r["commit"] = rest[0]
    else:
        r["files"][rest[0]] = rest[1]


def _entries(repo_ids, manifest: dict, lock: Lock) -> list[Entry]:
    out = []
    for repo_id in repo_ids:
        spec = manifest["repos"][repo_id]
        pinned = lock.repo(repo_id, spec["revision"])
        learned = pinned.get("files") or {}
        for path, f in spec["files"].items():
            seen = learned.get(path) or {}
            out.append(Entry(repo_id, path, spec["revision"], pinned.get("commit"),
                             f["size"] if f["size"] is not None else seen.get("size"),
                             f["sha256"] or seen.get("sha256")))
    return out


def plan(mode_names, manifest: dict, lock: Lock, manifest_path: Path, safety_checker: bool = False) -> list[Entry]:
    """The files the given modes need (their repos only; with `safety_checker`, also the checker's files but not
    the rest of its repo), checking the manifest covers what the engine loads."""
    unknown = [m for m in mode_names if m not in MODES]
    if unknown:
        raise WeightsError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    repos = all_repos(mode_names, safety_checker)
    for repo in repos:
        spec = manifest["repos"].get(repo.repo_id)
        lacking = [f for f in repo_files(repo) if spec is None or f not in spec["files"]]
        if lacking:
            raise WeightsError(f"the weights manifest {manifest_path} lacks repo {repo.repo_id} files "
                               f"{', '.join(lacking)}; regenerate it (python scripts/weights.py manifest)")
    wanted = {(r.repo_id, f) for r in repos for f in repo_files(r)}
    return [e for e in _entries([r.repo_id for r in repos], manifest, lock) if (e.repo_id, e.path) in wanted]


def pin(repo_ids, *, manifest_path=None, base_url=None, token=None, revision: str | None = None, log: Log = print,
        tuning: Tuning | None = None) -> dict:
    """Pin each repo in the manifest to the commit its revision (or `revision`) resolves to on the Hub, with the
    size and sha256 the Hub vouches for of every file the manifest lists: LFS files from their X-Linked-Etag
    (HEAD only), regular files downloaded (they are small) and checked against their git blob SHA-1 ETag.
    Writes the manifest; returns per repo the old revision, the commit and the files whose pins changed."""
    manifest_path = manifest_path_from_env(manifest_path)
    manifest = load_manifest(manifest_path)
    unknown = [r for r in repo_ids if r not in manifest["repos"]]
    if unknown:
        raise WeightsError(f"{manifest_path} has no repo {', '.join(unknown)}; it has {', '.join(manifest['repos'])}")
    base, token = hub_from_env(base_url, token)
    entries = [Entry(r, path, revision or manifest["repos"][r]["revision"], None, None, None)
               for r in repo_ids for path in manifest["repos"][r]["files"]]
    downloader = Downloader(tuning or Tuning.from_env(), token=token, log=log)
    commits, values = {}, {}
    try:
        for e, p in zip(entries, downloader.probe_all([(e.url(base), e.label) for e in entries])):
            if not (p.evidence and p.commit):
                raise WeightsError(f"{e.label}: {base} does not vouch for its files as the Hub does (no X-Repo-Commit "
                                   "and ETags); pin needs the Hub. For a mirror, `scripts/weights.py mirror` measures "
                                   "the files instead")
            if commits.setdefault(e.repo_id, p.commit) != p.commit:
                raise WeightsError(f"repo {e.repo_id} moved from commit {commits[e.repo_id]} to {p.commit} while "
                                   "pinning; run pin again")
            if p.lfs_sha256:
                values[e.repo_id, e.path] = {"sha256": p.lfs_sha256, "size": p.size}
                continue
            data = downloader.fetch_bytes(replace(e, commit=p.commit).url(base), e.label, p.size)
            if git_blob_sha1(data) != p.git_sha1:
                raise WeightsError(f"{e.label}: the bytes received do not match the Hub's ETag {p.git_sha1}; try again")
            values[e.repo_id, e.path] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    finally:
        downloader.close()
    report = {}
    for repo_id in repo_ids:
        spec = manifest["repos"][repo_id]
        files = {path: values[repo_id, path] for path in spec["files"]}
        report[repo_id] = {"revision": spec["revision"], "commit": commits[repo_id],
                           "changed": [path for path in files if files[path] != spec["files"][path]]}
        spec.update(revision=commits[repo_id], files=files)
        log(f"weights: pinned {repo_id} ({report[repo_id]['revision']}) to commit {commits[repo_id]}; "
            f"{len(report[repo_id]['changed'])} of {len(files)} file pins changed")
    write_manifest(manifest_path, manifest)
    return report


# -- the cache directory ----------------------------------------------------------------------------------
def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
        write_json(self.marker(e), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                                    "sha256": sha256})

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
def ensure_weights(mode_names, weights_dir, *, manifest_path=None, base_url=None, token=None, log: Log = print,
                   tuning: Tuning | None = None, safety_checker: bool = False) -> dict:
    """Make weights_dir hold every file the modes need, verified; fetch what is missing or wrong.

    Defaults: WEIGHTS_MANIFEST, WEIGHTS_BASE_URL (else the Hub), HF_TOKEN. With WEIGHTS_OFFLINE=1 nothing is
    fetched: the files must be present (with the manifest's sizes). Returns a small report; raises
    WeightsError with the repo, file and URL in the message."""
    t0 = time.monotonic()
    mode_names = list(mode_names)
    manifest_path = manifest_path_from_env(manifest_path)
    manifest, lock = load_manifest(manifest_path), Lock(lock_path(manifest_path))
    cache = Cache(weights_dir)
    entries = plan(mode_names, manifest, lock, manifest_path, safety_checker)
    report = {"files": len(entries), "downloaded": 0, "linked": 0, "rehashed": 0, "bytes": 0}
    if Settings().weights_offline:
        _check_present(entries, cache)
    elif not all(cache.verified(e) for e in entries):
        with cache.locked(log):  # re-checks inside: a process we waited for may have fetched it all
            base, token = hub_from_env(base_url, token)
            _fill(entries, cache, manifest, manifest_path, lock, base, token, log, tuning or Tuning.from_env(),
                  report)
    _learn(entries, cache, lock)
    lock.save(log)
    report["seconds"] = round(time.monotonic() - t0, 3)
    what = (f"fetched {report['downloaded']} files ({human(report['bytes'])}), linked {report['linked']}, "
            if report["downloaded"] + report["linked"] + report["rehashed"] else "")
    log(f"weights: {what}{len(entries)} files of {', '.join(mode_names)} ready in {cache.root} "
        f"({report['seconds']:.2f} s)")
    return report


def verify_weights(mode_names, weights_dir, full: bool = False, *, manifest_path=None,
                   safety_checker: bool = False) -> dict:
    """Check the modes' files without fetching. Cheap (markers) by default; full=True rehashes every file
    and re-marks those that match (or unmarks those that do not). Returns {"files", "bytes", "problems"}."""
    manifest_path = manifest_path_from_env(manifest_path)
    manifest, lock = load_manifest(manifest_path), Lock(lock_path(manifest_path))
    cache = Cache(weights_dir)
    entries = plan(list(mode_names), manifest, lock, manifest_path, safety_checker)
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
    bad = [f"{e.repo_id}/{e.path}" for e in entries
           if not cache.path(e).is_file() or e.size not in (None, cache.path(e).stat().st_size)]
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise WeightsError(f"WEIGHTS_OFFLINE is set and {cache.root} lacks (or has a wrong size of) "
                           f"{len(bad)} file(s): {', '.join(bad[:10])}{more}")


def _learn(entries: list[Entry], cache: Cache, lock: Lock) -> None:
    """Record in the lock what verified files taught us that the manifest and lock do not say yet."""
    for e in entries:
        if e.sha256 is None and (sha := cache.verified(e)):
            lock.learn(e, cache.path(e).stat().st_size, sha)


def _fill(entries, cache: Cache, manifest: dict, manifest_path: Path, lock: Lock, base: str, token, log: Log,
          tuning: Tuning, report: dict) -> None:
    todo = []
    for e in entries:
        if cache.verified(e):
            continue
        p = cache.path(e)
        # A file without a valid marker (placed by hand, marker lost): hashing it beats downloading it.
        if e.sha256 and p.is_file() and e.size in (None, p.stat().st_size):
            log(f"weights: checking existing {p}")
            if hash_file(p) == e.sha256:
                cache.mark(e, e.sha256)
                report["rehashed"] += 1
                continue
        todo.append(e)
    if not todo:
        return
    # Same sha256, one copy: link from a verified file anywhere in the cache, or from this run's download.
    sources = {sha: cache.path(e) for e in _entries(manifest["repos"], manifest, lock) if (sha := cache.verified(e))}
    leaders, followers = {}, []
    for e in todo:
        if e.sha256 and e.sha256 in sources:
            cache.link(sources[e.sha256], e)
            cache.mark(e, e.sha256)
            report["linked"] += 1
        elif e.sha256 and e.sha256 in leaders:
            followers.append(e)
        else:
            leaders[e.sha256 or id(e)] = e
    if not leaders:
        return
    downloader = Downloader(tuning, token=token, log=log)
    try:
        jobs, resolved = [], {}
        probed, mismatches = resolve(list(leaders.values()), base, downloader, manifest_path)
        for e, probe in probed:
            if e.commit and lock.repo(e.repo_id, e.revision).get("commit") != e.commit:
                lock.pin(e.repo_id, e.revision, e.commit)
            job = Transfer(e.label, e.url(base), cache.path(e), cache.partial(e), probe.size, e.sha256, probe, e.size,
                      repin_command(e.repo_id, manifest_path))
            jobs.append(job)
            resolved[job] = e
        lock.save(log)  # a run killed from here on still fetches the rest from the same commit
        need = sum(j.size - _allocated(j.partial, j.size) for j in jobs)
        free = free_bytes(cache.root)
        if free < need + FREE_MARGIN:
            raise WeightsError(f"not enough disk space in {cache.root}: {len(jobs)} files need {human(need)} "
                               f"(+{human(FREE_MARGIN)} headroom), {human(free)} free; free some space or point "
                               "WEIGHTS_DIR at a bigger disk")
        log(f"weights: fetching {len(jobs)} files ({human(need)}) from {base} into {cache.root}")

        def done(job: Transfer, sha: str) -> None:
            e = resolved[job]
            cache.mark(e, sha)
            report["downloaded"] += 1
            for f in followers:
                if f.sha256 == sha:
                    cache.link(job.dest, f)
                    cache.mark(f, sha)
                    report["linked"] += 1

        try:
            report["bytes"] = downloader.fetch_all(jobs, done)
        except PinMismatch as e:
            mismatches += e.mismatches
        if mismatches:
            raise PinMismatch(sorted(mismatches, key=lambda m: m.label))
    finally:
        downloader.close()


def resolve(todo: list[Entry], base: str, downloader: Downloader,
            manifest_path: Path) -> tuple[list[tuple[Entry, Probe]], list[Mismatch]]:
    """HEAD every file before any download: sizes (for the disk check), early 404/401s, what the Hub vouches
    for (the sha256 of LFS files, the git blob SHA-1 of the others), and the commit a revision resolves to
    (X-Repo-Commit), which the GETs then pin: one commit per repo. Returns the entries completed with what
    the server said, and the LFS files whose pins the Hub already contradicts (not to be downloaded)."""
    probes = downloader.probe_all([(e.url(base), e.label) for e in todo])
    commits, out, mismatches = {}, [], []
    for e, p in zip(todo, probes):
        commit = e.commit or commits.setdefault(e.repo_id, p.commit)
        if p.lfs_sha256 and (e.sha256 not in (None, p.lfs_sha256) or e.size not in (None, p.size)):
            mismatches.append(Mismatch(e.label, e.sha256, e.size, p.lfs_sha256, p.size, p.evidence, commit,
                                       repin_command(e.repo_id, manifest_path)))
            continue
        if not p.evidence and e.size not in (None, p.size):  # a plain mirror: its size is all it says
            raise WeightsError(f"{e.label}: {e.url(base)} has {p.size} bytes but the manifest says {e.size}: the "
                               "server's file is not the pinned one; re-pin it in the manifest if trusted")
        out.append((replace(e, commit=commit), p))
    return out, mismatches


def repin_command(repo_id: str, manifest_path: Path) -> str:
    where = "" if Path(manifest_path).resolve() == DEFAULT_MANIFEST.resolve() else f"WEIGHTS_MANIFEST={manifest_path} "
    return f"{where}python scripts/weights.py pin {repo_id}"


def _allocated(path: Path, size: int) -> int:
    """Bytes a partial download already holds on disk (its blocks are reserved when it starts)."""
    try:
        return min(os.stat(path).st_blocks * 512, size)
    except OSError:
        return 0
