#!/usr/bin/env python
"""Benchmark of the weights downloader (results: docs/benchmarks.md, "Weights download").

1. Transfer: a generated file (default 1 GiB) served by nginx on loopback, fetched by lib/weights/download.py
   (parallel ranges, sha256 and fsync included) and by `curl -o` (no hashing, no fsync), alternating,
   several repetitions, medians; also curl followed by `sync` (durable on disk, as ours is before it is
   marked verified) and by `sha256sum` and `sync` (all the guarantees ours gives).
2. Warm setup: ensure_weights() on a verified cache (stat + markers) plus from_pretrained, against a bare
   from_pretrained of the same files (the tiny models of scripts/make_tiny_weights.py, sd-turbo).

Needs nginx and curl (apt-get install -y nginx-light curl). The big file is deleted afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from lib.settings import Settings
from lib.testkit.servers import NGINX, Nginx
from lib.weights.download import Downloader, Transfer, Tuning, human


def make_file(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(0, size, 64 << 20):
            block = os.urandom(min(64 << 20, size - f.tell()))
            h.update(block)
            f.write(block)
    return h.hexdigest()


def timed(fn) -> float:
    os.sync()  # earlier runs' dirty pages must not be flushed on this run's clock
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_transfer(
    size: int, reps: int, connections: list[int], chunk: int, out_dir: str | None
) -> list[tuple[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="bench-download-", dir=Settings().bench_tmp))
    try:
        sha = make_file(work / "www/bench/big/resolve/main/blob.safetensors", size)
        dest = Path(tempfile.mkdtemp(prefix="bench-out-", dir=out_dir)) if out_dir else work
        out = dest / "out.bin"
        with Nginx(work / "www", work / "nginx") as nginx:
            url = f"{nginx.url}/bench/big/resolve/main/blob.safetensors"
            subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)  # warm nginx and the page cache

            def ours(n: int):
                d = Downloader(Tuning(connections=n, chunk_size=chunk), log=lambda line: None)
                job = Transfer("bench", url, out, dest / "partial/blob.part", size, sha)
                d.fetch_all([job], lambda job, got: None)
                d.close()

            def curl():
                subprocess.run(["curl", "-sf", "-o", str(out), url], check=True)

            def curl_synced():
                curl()
                subprocess.run(["sync", str(out)], check=True)

            def curl_verified():
                curl()
                got = subprocess.run(["sha256sum", str(out)], check=True, capture_output=True, text=True).stdout
                assert got.split()[0] == sha
                subprocess.run(["sync", str(out)], check=True)

            runs = {
                f"lib/weights/download.py, {n} connections (sha256 + fsync)": (lambda n=n: ours(n)) for n in connections
            }
            runs["curl -o"] = curl
            runs["curl -o, then sync (durable, like ours)"] = curl_synced
            runs["curl -o, then sha256sum and sync (our guarantees)"] = curl_verified
            times = {name: [] for name in runs}
            for _ in range(reps):
                for name, fn in runs.items():
                    out.unlink(missing_ok=True)
                    times[name].append(timed(fn))
            out.unlink(missing_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
        return [(name, statistics.median(t)) for name, t in times.items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_warm(reps: int) -> dict[str, float]:
    """Median seconds: ensure_weights on a warm cache (one mode, every mode), bare from_pretrained, and both."""
    import diffusers
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()

    from lib.engine.modes import MODES
    from lib.testkit.models import write_mirror
    from lib.weights.cache import ensure_weights

    with tempfile.TemporaryDirectory() as tmp:
        write_mirror(Path(tmp) / "mirror")
        with Nginx(Path(tmp) / "mirror", Path(tmp) / "nginx") as nginx:
            kw = dict(manifest_path=f"{tmp}/mirror/manifest.json", base_url=nginx.url, log=lambda line: None)
            ensure_weights(list(MODES), f"{tmp}/cache", **kw)  # cold, not timed
            check = lambda modes=("sd-turbo",): ensure_weights(modes, f"{tmp}/cache", **kw)
            repo = f"{tmp}/cache/stabilityai/sd-turbo"
            load = lambda: StableDiffusionPipeline.from_pretrained(
                repo, variant="fp16", dtype=torch.float32, local_files_only=True
            )
            load()  # imports and caches warmed
            runs = {
                "check": check,
                "check all": lambda: check(tuple(MODES)),
                "bare": load,
                "both": lambda: (check(), load()),
            }
            times = {name: [] for name in runs}
            for _ in range(reps):
                for name, fn in runs.items():
                    times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--connections", type=int, nargs="+", default=list(dict.fromkeys([Tuning().connections, 8])))
    p.add_argument("--chunk-mib", type=int, default=Tuning.chunk_size >> 20)
    p.add_argument(
        "--out-dir",
        help="where downloads are written (default: beside the served file); "
        "/dev/shm takes the disk out of the measure",
    )
    p.add_argument("--skip-warm", action="store_true")
    args = p.parse_args(argv)

    import requests

    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[1]
    nginx = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    print(
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"loopback; Python {platform.python_version()}, requests {requests.__version__}, curl {curl}, "
        f"nginx {nginx}; {args.reps} repetitions, medians\n"
    )
    size = args.size_mib << 20
    results = bench_transfer(size, args.reps, args.connections, args.chunk_mib << 20, args.out_dir)
    curl_s = dict(results)["curl -o"]
    where = args.out_dir or tempfile.gettempdir()
    print(f"| download of {human(size)} from loopback nginx into {where} | seconds | MB/s | vs curl -o |")
    print("|---|---|---|---|")
    for name, s in results:
        print(f"| {name} | {s:.2f} | {size / s / 1e6:.0f} | {curl_s / s:.2f}x |")
    if not args.skip_warm:
        t = bench_warm(args.reps)
        print("\n| warm setup (tiny models, sd-turbo) | seconds | vs bare from_pretrained |")
        print("|---|---|---|")
        print(
            "| ensure_weights, verified cache, sd-turbo (12 files) | "
            f"{t['check']:.4f} | {t['check'] / t['bare']:.3f}x |"
        )
        print(f"| ensure_weights, verified cache, every mode (74 files) | {t['check all']:.4f} | |")
        print(f"| bare from_pretrained | {t['bare']:.3f} | 1.00x |")
        print(f"| ensure_weights + from_pretrained (warm setup) | {t['both']:.3f} | {t['both'] / t['bare']:.2f}x |")
    return 0
