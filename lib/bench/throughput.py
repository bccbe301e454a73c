"""Throughput of concurrent predictions with cross-request batching, against sequential, in one process.

  python scripts/bench_throughput.py --tiny                     # CPU smoke on tiny random weights
  python scripts/bench_throughput.py --mode sd-turbo --size 512  # real weights in WEIGHTS_DIR (GPU box)

Each of C clients sends R requests back to back through Predictor.run (the same path Cog's server calls,
with the batcher); "sequential" is one client. Prints a Markdown row per client count and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import date
from pathlib import Path

from lib.stats import stats_ms


async def client(predictor, inputs: dict, requests: int, latencies: list[float]) -> int:
    from lib.local import outputs

    images = 0
    for _ in range(requests):
        started = time.perf_counter()
        async for _path in outputs(predictor, **inputs):
            images += 1
        latencies.append(time.perf_counter() - started)
    return images


async def measure(predictor, inputs: dict, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    started = time.perf_counter()
    images = sum(await asyncio.gather(*(client(predictor, inputs, requests, latencies) for _ in range(clients))))
    seconds = time.perf_counter() - started
    return {
        "clients": clients,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2),
        "p50_latency_s": round(stats_ms(latencies)["p50"] / 1000, 4),
    }


def clients_parser(doc: str, clients: str) -> argparse.ArgumentParser:
    """The options of a benchmark of concurrent clients (this one, lib/bench/realtime.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="build tiny random weights and run on them")
    parser.add_argument("--mode", default="sd-turbo")
    parser.add_argument("--clients", default=clients, help=f"comma-separated client counts (default {clients})")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main() -> None:
    parser = clients_parser(__doc__, "1,4,8,16")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    args = parser.parse_args()

    clients = [int(c) for c in args.clients.split(",")]
    os.environ["COG_MAX_CONCURRENCY"] = str(max(clients))  # the batcher's window is on only with concurrency
    os.environ["ENABLED_MODES"] = args.mode
    if args.tiny:
        from lib.testkit.models import use_tiny_weights

        use_tiny_weights()

    from lib.local import run_inputs
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    inputs = run_inputs(
        predictor,
        prompt="a lighthouse at dusk",
        mode=args.mode,
        width=args.size,
        height=args.size,
        seed=1,
        output_format="webp",
    )

    async def all_runs():
        await measure(predictor, inputs, 1, 2)  # warm-up
        return [await measure(predictor, inputs, c, args.requests) for c in clients]

    results = asyncio.run(all_runs())
    base = next(r for r in results if r["clients"] == 1)["images_per_s"] if 1 in clients else None
    import torch

    from lib.bench.device import device_info

    device = device_info(predictor.engine.device)["device"]
    print(
        f"\n{date.today()} · {device} · mode {args.mode} {args.size}px · {'tiny random' if args.tiny else 'real'} "
        f"weights · torch {torch.__version__}\n"
    )
    print("| clients | images/s | vs sequential | p50 latency (s) |\n|---|---|---|---|")
    for r in results:
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['clients']} | {r['images_per_s']} | {ratio} | {r['p50_latency_s']} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": str(date.today()),
                    "device": device,
                    "mode": args.mode,
                    "size": args.size,
                    "tiny": args.tiny,
                    "results": results,
                },
                indent=1,
            )
        )
