"""The realtime server's frames per second and latency, for 1 and 4 clients, against the engine called directly
in the same process (the baseline: what the server's protocol, sessions and batcher cost or gain).

  python scripts/bench_realtime.py --tiny                  # CPU, tiny random weights
  python scripts/bench_realtime.py                         # real weights in WEIGHTS_DIR (a GPU box)

The case is the realtime default: sd-turbo at its size, 1 step, img2img from a painted picture at strength 0.5
with TAESD encoding and decoding, JPEG frames, the safety checker as configured. Each client is a WebSocket that
sends a picture, waits for its frame, and sends the next one at once (a painter who never pauses): latency is
send -> frame received. "direct" runs the same request through Engine.run_batch back to back, batch 1 and batch
4, and batch 1 with the prompt cache off and with the full VAE (what those parts of the fast path gain). Prints
a Markdown table (ratios against direct at the same batch size, or batch 1) and writes JSON (--json).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time

from PIL import Image, ImageDraw

from lib.stats import stats_ms

GOALS = {"fps_1_client": 60, "fps_4_clients_total": 150, "p95_ms": 50}  # on a GPU, sd-turbo 512, 1 step


def painting(size: int, k: int) -> bytes:
    """A picture as the page sends it: a white canvas with strokes (JPEG), a little different each time."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i in range(6):
        x = (k * 7 + i * 61) % size
        draw.line([(x, 20), (size - x, size - 20)], fill=(30 + 30 * i, 110, 235), width=18)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


ROUNDS = 3  # the direct cases take turns, so that a drift in the machine's speed spreads over all of them


def direct(engine, params: dict, size: int, batch: int, seconds: float, prompts=None) -> tuple[int, list, float]:
    """The engine alone: the same frames through run_batch, back to back (with `prompts` as its prompt cache).
    Returns (frames, seconds per batch, seconds in all)."""
    from lib.realtime import protocol

    pictures = [protocol.decode_picture(painting(size, k)) for k in range(8)]
    latencies, frames, k = [], 0, 0
    saved = engine.prompts
    engine.prompts = prompts or saved
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or frames == 0:
            t = time.perf_counter()
            jobs = []
            for i in range(batch):
                settings = {**params, "prompt": f"client {i}", "seed": i}
                request = protocol.build_request(settings, engine.enabled, "jpg", 85)
                jobs.append(engine.job(request, None, picture=pictures[k % len(pictures)], quiet=True))
                k += 1
            outputs = [o for _, o in engine.run_batch(jobs)]
            assert all(o.data for o in outputs)
            latencies.append(time.perf_counter() - t)
            frames += len(outputs)
        return frames, latencies, time.perf_counter() - started
    finally:
        engine.prompts = saved


async def client(url: str, number: int, params: dict, size: int, deadline: float, latencies: list) -> int:
    from lib.testkit.realtime import RealtimeClient

    pictures = [painting(size, k) for k in range(8)]
    frames = 0
    async with RealtimeClient.connect(url) as c:
        await c.settings(**params, prompt=f"client {number}", seed=number)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            answer = await c.answer(await c.send(pictures[frames % len(pictures)]))
            if answer["type"] != "frame":
                raise RuntimeError(f"client {number}: {answer}")
            latencies.append(time.perf_counter() - t)
            frames += 1
    return frames


async def through_server(url: str, params: dict, size: int, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    started = time.perf_counter()
    frames = await asyncio.gather(*(client(url, i, params, size, started + seconds, latencies) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "frames": sum(frames),
        "fps_total": round(sum(frames) / elapsed, 2),
        "fps_per_client": round(sum(frames) / elapsed / clients, 2),
        "latency_ms": stats_ms(latencies),
    }


def measure(engine, batcher, settings, mode: str, steps: int, clients: list[int], seconds: float) -> dict:
    """Direct (batch 1 and each client count) and through the server (each client count), with the goals met or
    not where the engine runs on a GPU."""
    from lib.engine.modes import MODES
    from lib.engine.prompts import PromptCache
    from lib.testkit.realtime import serve_in_thread

    size = MODES[mode].size
    params = {"mode": mode, "num_inference_steps": steps, "strength": 0.5, "img2img": True}
    params["fast_decode"] = engine.modes[mode].tiny_vae is not None
    results: dict = {"mode": mode, "size": size, "steps": steps, "direct": {}, "variants": {}, "server": {}}
    cases = {("direct", batch): (params, batch, None) for batch in sorted({1, *clients})}
    # What parts of the fast path gain, batch 1: each one off in turn.
    cases["variants", "prompt cache off"] = (params, 1, PromptCache(0))
    if params["fast_decode"]:
        cases["variants", "full VAE (fast decode off)"] = ({**params, "fast_decode": False}, 1, None)
    runs = {case: [0, [], 0.0] for case in cases}
    for _ in range(ROUNDS):
        for case, (case_params, batch, prompts) in cases.items():
            frames, latencies, elapsed = direct(engine, case_params, size, batch, seconds / ROUNDS, prompts)
            runs[case][0] += frames
            runs[case][1] += latencies
            runs[case][2] += elapsed
    for (group, name), (frames, latencies, elapsed) in runs.items():
        results[group][name] = {"frames": frames, "fps": round(frames / elapsed, 2), "latency_ms": stats_ms(latencies)}
    url, server = serve_in_thread(engine, batcher, settings)
    try:
        for n in clients:
            results["server"][n] = asyncio.run(through_server(url, params, size, n, seconds))
    finally:
        server.should_exit = True
    if engine.device.type == "cuda":
        one, four = results["server"].get(1), results["server"].get(4)
        results["goals_met"] = {
            "fps_1_client": one is not None and one["fps_total"] >= GOALS["fps_1_client"],
            "fps_4_clients_total": four is not None and four["fps_total"] >= GOALS["fps_4_clients_total"],
            "p95_ms": one is not None and one["latency_ms"]["p95"] <= GOALS["p95_ms"],
        }
    return results


def table(results: dict) -> str:
    rows = [
        "| path | clients | frames/s in all | frames/s per client | latency p50 ms | p95 ms | vs direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, r in results["direct"].items():
        lat = r["latency_ms"]
        rows.append(f"| engine direct, batch {batch} | - | {r['fps']} | - | {lat['p50']} | {lat['p95']} | 1.00x |")
    for name, r in results["variants"].items():
        lat, ratio = r["latency_ms"], r["fps"] / results["direct"][1]["fps"]
        rows.append(
            f"| engine direct, batch 1, {name} | - | {r['fps']} | - | {lat['p50']} | {lat['p95']} | {ratio:.2f}x |"
        )
    for n, r in results["server"].items():
        lat, base = r["latency_ms"], results["direct"][n]["fps"]
        rows.append(
            f"| realtime server | {n} | {r['fps_total']} | {r['fps_per_client']} | {lat['p50']} | {lat['p95']} | "
            f"{r['fps_total'] / base:.2f}x |"
        )
    return "\n".join(rows)


def main() -> None:
    from lib.bench.throughput import clients_parser

    parser = clients_parser(__doc__, "1,4")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    args = parser.parse_args()

    os.environ["ENABLED_MODES"] = args.mode
    if args.tiny:
        from lib.testkit.models import use_tiny_weights

        use_tiny_weights()
    from lib.bench.device import device_info
    from lib.engine.engine import Engine
    from lib.realtime.cli import use_fast_path
    from lib.realtime.server import new_batcher
    from lib.settings import Settings

    use_fast_path()  # as the realtime server runs
    settings = Settings()
    engine = Engine.from_env()
    batcher = new_batcher(engine, settings)
    batcher.warm_up(img2img=True)
    clients = [int(c) for c in args.clients.split(",")]
    results = measure(engine, batcher, settings, args.mode, args.steps, clients, args.seconds)
    info = device_info(engine.device)
    header = (
        f"{info['date']} · {info['device']} · {args.mode} {results['size']}px, {args.steps} step, img2img "
        f"strength 0.5, TAESD · {'tiny random' if args.tiny else 'real'} weights · torch {info['torch']} · "
        f"safety checker {'on' if engine.safety else 'off'}"
    )
    print(f"\n{header}\n\n{table(results)}")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "device": info, "goals": GOALS, **results}, indent=1))
