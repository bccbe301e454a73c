"""The weights manifest and its lock: which files each Hub repo must provide, and what is known of them.

weights/manifest.json (tracked) lists per Hub repo a revision and every file the modes load, with size and sha256
(null where not known) and, where the exact size is not known, `approx_size`: the Hub's rounded display, for boot
estimates only (lib/boot_plan.py), never for verification. weights/manifest.lock.json beside it records what first
downloads learned: the commit a revision resolved to (X-Repo-Commit) and the hashes the manifest leaves null.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from lib.atomic import write_atomically
from lib.engine.modes import MODES, all_repos, repo_files
from lib.settings import Settings
from lib.weights.download import SHA256_RE, WeightsError

DEFAULT_MANIFEST = Settings({}).weights_manifest  # what WEIGHTS_MANIFEST defaults to

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
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("revision"), str)
            or not isinstance(spec.get("files"), dict)
        ):
            raise WeightsError(f"{path}: repo {repo_id} needs a 'revision' string and a 'files' object")
        for name, f in spec["files"].items():
            size, sha = (f.get("size"), f.get("sha256")) if isinstance(f, dict) else ("?", "?")
            approx = f.get("approx_size") if isinstance(f, dict) else None
            if (
                not (size is None or isinstance(size, int) and size >= 0)
                or not (sha is None or isinstance(sha, str) and SHA256_RE.match(sha))
                or not (approx is None or isinstance(approx, int) and approx > 0)
            ):
                raise WeightsError(
                    f"{path}: repo {repo_id}, file {name}: 'size' must be a byte count or null, "
                    "'sha256' 64 lowercase hex digits or null, and 'approx_size' (optional) a byte count"
                )
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
    text = re.sub(
        r'\{\n\s*"approx_size": (\S+),\n\s*"sha256": (\S+),\n\s*"size": (\S+)\n\s*\}',
        r'{"approx_size": \1, "sha256": \2, "size": \3}',
        text,
    )
    return re.sub(r'\{\n\s*"sha256": (\S+),\n\s*"size": (\S+)\n\s*\}', r'{"sha256": \1, "size": \2}', text) + "\n"


def write_manifest(path: Path, data: dict) -> None:
    write_atomically(path, manifest_text(data))


def manifest_for_tree(root: Path, revision: str = "main") -> dict:
    """A manifest of every mode's repos (the safety checker's files and the ControlNets too) from files laid out as
    root/<repo_id>/<path>, measured."""
    repos = {}
    for repo in all_repos(MODES, safety_checker=True, controlnet=True):
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


def manifest_entries(repo_ids, manifest: dict, lock: Lock) -> list[Entry]:
    out = []
    for repo_id in repo_ids:
        spec = manifest["repos"][repo_id]
        pinned = lock.repo(repo_id, spec["revision"])
        learned = pinned.get("files") or {}
        for path, f in spec["files"].items():
            seen = learned.get(path) or {}
            out.append(
                Entry(
                    repo_id,
                    path,
                    spec["revision"],
                    pinned.get("commit"),
                    f["size"] if f["size"] is not None else seen.get("size"),
                    f["sha256"] or seen.get("sha256"),
                )
            )
    return out


def plan(
    mode_names, manifest: dict, lock: Lock, manifest_path: Path, safety_checker: bool = False, controlnet: bool = False
) -> list[Entry]:
    """The files the given modes need (their repos only; with `safety_checker`, also the checker's files but not
    the rest of its repo; with `controlnet`, their ControlNets and the depth estimator), checking the manifest covers
    what the engine loads."""
    unknown = [m for m in mode_names if m not in MODES]
    if unknown:
        raise WeightsError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    repos = all_repos(mode_names, safety_checker, controlnet)
    for repo in repos:
        spec = manifest["repos"].get(repo.repo_id)
        lacking = [f for f in repo_files(repo) if spec is None or f not in spec["files"]]
        if lacking:
            raise WeightsError(
                f"the weights manifest {manifest_path} lacks repo {repo.repo_id} files "
                f"{', '.join(lacking)}; regenerate it (python scripts/weights.py manifest)"
            )
    wanted = {(r.repo_id, f) for r in repos for f in repo_files(r)}
    return [e for e in manifest_entries([r.repo_id for r in repos], manifest, lock) if (e.repo_id, e.path) in wanted]


def repin_command(repo_id: str, manifest_path: Path) -> str:
    where = "" if Path(manifest_path).resolve() == DEFAULT_MANIFEST.resolve() else f"WEIGHTS_MANIFEST={manifest_path} "
    return f"{where}python scripts/weights.py pin {repo_id}"


def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
