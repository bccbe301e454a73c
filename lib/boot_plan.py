"""What a cold boot on Replicate costs for a set of modes: bytes to download, an estimated setup time against
Replicate's 600 s boot limit, and whether every weights revision is pinned to a commit.

From the weights manifest (and its lock): each file's size, or its `approx_size` (the Hub's rounded display) where the
exact size is not known yet; files with the same sha256 count once (the cache stores and fetches them once). setup()
downloads, loads and warms up every enabled mode, so the estimate is

    download (bytes / bandwidth) + load (bytes / LOAD_RATE) + warm-up (WARMUP_SECONDS per mode, at most the
    warm-up's own budget, SPEED_WARMUP_SECONDS as the image has it: past it setup stops warming up)

and a plan fits when it leaves BOOT_MARGIN of the limit free. scripts/push.py refuses a plan that does not fit, with
these numbers (docs/serving.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lib.engine.modes import MODES, all_repos
from lib.settings import Settings
from lib.weights.manifest import Lock, load_manifest, lock_path, manifest_path_from_env, plan

BOOT_LIMIT_S = 600  # Replicate fails a boot whose setup() has not finished by then
BOOT_MARGIN = 0.25  # of the limit, kept free: the bandwidth varies, and a retried download costs time
DEFAULT_BANDWIDTH = 100e6  # bytes/s sustained from the Hub's CDN: a stated assumption (push.py --bandwidth)
LOAD_RATE = 1e9  # bytes/s from local disk into device memory (safetensors, fp16)
# setup()'s warm-up per mode (compiles and autotunes on CUDA): an upper estimate until the GPU check records the
# measured figure for each mode (docs/benchmarks.md).
WARMUP_SECONDS = 60
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RepoPin:
    repo_id: str
    revision: str  # as the manifest asks
    commit: str | None  # the commit it is pinned to: the revision itself, or what the lock recorded

    @property
    def floating(self) -> bool:
        return self.commit is None


@dataclass(frozen=True)
class BootPlan:
    modes: tuple[str, ...]
    files: int
    download_bytes: int  # exact and approximate sizes together
    approximate_bytes: int  # of which only the Hub's rounded size is known
    unknown: tuple[str, ...]  # files with neither (counted as 0)
    repos: tuple[RepoPin, ...]
    bandwidth: float
    baked: bool  # weights in the image: nothing to download at boot

    @property
    def download_s(self) -> float:
        return 0.0 if self.baked else self.download_bytes / self.bandwidth

    @property
    def load_s(self) -> float:
        return self.download_bytes / LOAD_RATE

    @property
    def warmup_s(self) -> float:
        return min(WARMUP_SECONDS * len(self.modes), Settings({}).speed_warmup_seconds)

    @property
    def boot_s(self) -> float:
        return self.download_s + self.load_s + self.warmup_s

    @property
    def allowed_s(self) -> float:
        return BOOT_LIMIT_S * (1 - BOOT_MARGIN)

    @property
    def fits(self) -> bool:
        return self.boot_s <= self.allowed_s

    @property
    def floating(self) -> list[RepoPin]:
        return [r for r in self.repos if r.floating]

    def estimate(self) -> str:
        fetch = (
            "weights in the image, nothing to download"
            if self.baked
            else f"download {gb(self.download_bytes)} at {self.bandwidth / 1e6:.0f} MB/s: {self.download_s:.0f} s"
        )
        return (
            f"{fetch}; load {self.load_s:.0f} s; warm-up {self.warmup_s:.0f} s ({WARMUP_SECONDS} s per mode, at most "
            f"{Settings({}).speed_warmup_seconds:g} s): "
            f"about {self.boot_s:.0f} s of Replicate's {BOOT_LIMIT_S} s boot limit "
            f"(a plan must stay under {self.allowed_s:.0f} s, {BOOT_MARGIN:.0%} kept free)"
        )

    def lines(self) -> list[str]:
        """The plan as the push script prints it."""
        size = gb(self.download_bytes) + (
            f" (of which {gb(self.approximate_bytes)} from the Hub's rounded sizes)" if self.approximate_bytes else ""
        )
        out = [
            f"modes: {', '.join(self.modes)} (ENABLED_MODES in the image)",
            f"weights: {self.files} files, {size}"
            + (f"; size unknown: {', '.join(self.unknown)}" if self.unknown else ""),
            f"estimated boot: {self.estimate()}",
            "revisions:",
        ]
        out += [f"  {r.repo_id}: {r.commit or f'{r.revision} (floating: not pinned to a commit)'}" for r in self.repos]
        return out


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def make(
    mode_names,
    bandwidth: float = DEFAULT_BANDWIDTH,
    safety_checker: bool = True,
    baked: bool = False,
    manifest_path: Path | None = None,
) -> BootPlan:
    """The plan for serving `mode_names` (validated against the mode table by the manifest's plan)."""
    path = manifest_path_from_env(manifest_path)
    manifest, lock = load_manifest(path), Lock(lock_path(path))
    entries = plan(list(mode_names), manifest, lock, path, safety_checker)
    files = {(e.repo_id, e.path): e for e in entries}
    approx = {
        (repo_id, p): f.get("approx_size")
        for repo_id, spec in manifest["repos"].items()
        for p, f in spec["files"].items()
    }
    seen, total, approximate, unknown = set(), 0, 0, []
    for key, e in files.items():
        if e.sha256 and e.sha256 in seen:
            continue  # stored and fetched once
        if e.sha256:
            seen.add(e.sha256)
        if e.size is not None:
            total += e.size
        elif approx.get(key):
            total += approx[key]
            approximate += approx[key]
        else:
            unknown.append(f"{e.repo_id}/{e.path}")
    repos = []
    for repo in all_repos(mode_names, safety_checker):
        revision = manifest["repos"][repo.repo_id]["revision"]
        commit = revision if COMMIT.fullmatch(revision) else lock.repo(repo.repo_id, revision).get("commit")
        repos.append(RepoPin(repo.repo_id, revision, commit))
    return BootPlan(tuple(mode_names), len(files), total, approximate, tuple(unknown), tuple(repos), bandwidth, baked)


def families_table(bandwidth: float = DEFAULT_BANDWIDTH) -> str:
    """docs/serving.md's table: one model per mode, its download and estimated boot."""
    rows = [
        "| `--modes` | weights to download | estimated boot at "
        f"{bandwidth / 1e6:.0f} MB/s | fits in {BOOT_LIMIT_S} s with margin |",
        "|---|---|---|---|",
    ]
    for name in MODES:
        p = make([name], bandwidth)
        rows.append(f"| `{name}` | {gb(p.download_bytes)} | {p.boot_s:.0f} s | {'yes' if p.fits else 'no'} |")
    p = make(list(MODES), bandwidth)
    rows.append(f"| all modes | {gb(p.download_bytes)} | {p.boot_s:.0f} s | {'yes' if p.fits else 'no'} |")
    return "\n".join(rows) + "\n"
