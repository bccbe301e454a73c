"""Benchmark harness: the engine's own code path (Engine.run, as predict() runs it) on full-size models with
random weights (speed does not depend on weight values), per stage, end to end, images/s, memory, setup.

  python scripts/bench.py --suite gpu        # the GPU run (docs/benchmarks.md): the goals, then before/after
  python scripts/bench.py --modes sd-turbo --iters 2 --warmup 1 --batch 1    # e.g. on a CPU
  python scripts/bench.py --tiny             # CPU smoke: predict() vs a bare diffusers call, tiny weights
  python scripts/bench.py --encode           # image encoder settings at 512px

Results: docs/benchmarks/<date>-<device>.json (merged with earlier runs of the same day and device) and a
section per device in docs/benchmarks.md, with the goals and the public anchors beside ours.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lib import ROOT
from lib.bench.cases import GOALS, PROMPT, VARIANTS
from lib.bench.device import device_info, free, median_ms, peak_memory_gb, reset_peak, slug, sync
from lib.bench.render import DOC, load_json, render, render_all, write_outputs
from lib.settings import Settings
from lib.stats import stats_ms

log = logging.getLogger("bench")

OUT_DIR = ROOT / "docs" / "benchmarks"

# --- full size ------------------------------------------------------------------------------------------------


def measure(
    engine,
    mode: str,
    size: int,
    steps: int,
    batch: int,
    fast_decode: bool,
    iters: int,
    warmup: int,
    fmt: str,
    budget_s: float | None = None,
) -> dict:
    """`warmup` + `iters` runs of one request through Engine.run (fewer timed runs, at least 3, where they
    would take more than `budget_s`); end-to-end and per-stage figures."""
    from lib.engine.inputs import NUM_OUTPUTS_RANGE

    device = engine.device
    extra = {"fast_decode": True} if fast_decode else {}
    e2e, runs = [], []
    reset_peak(device)
    started_case = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for i in range(warmup + iters):
            if budget_s and len(e2e) >= 3 and time.perf_counter() - started_case > budget_s:
                break
            metrics: dict = {}
            sync(device)
            started = time.perf_counter()
            request = engine.request(
                prompt=PROMPT,
                mode=mode,
                width=size,
                height=size,
                num_inference_steps=steps,
                num_outputs=min(batch, NUM_OUTPUTS_RANGE[1]),
                seed=1234 + i,
                output_format=fmt,
                **extra,
            )
            if batch > NUM_OUTPUTS_RANGE[1]:  # past the API's limit: the same Engine.run, a wider request
                request = dataclasses.replace(request, num_outputs=batch)
            files = [o.path for o in engine.run(request, Path(out), lambda k, v: metrics.__setitem__(k, v))]
            elapsed = time.perf_counter() - started
            assert len(files) == batch and all(Path(f).stat().st_size > 0 for f in files)
            if i >= warmup:
                e2e.append(elapsed)
                runs.append(metrics)
    steps_ms = [median_ms(r["timings.steps"][k] for r in runs) for k in range(len(runs[0]["timings.steps"]))]
    result = {
        "e2e_ms": stats_ms(e2e),
        "images_per_s": round(batch / statistics.median(e2e), 2),
        "stages_ms": {
            "text_encoding": median_ms(r.get("timings.text_encoding") for r in runs),
            "steps": steps_ms,
            "denoising": median_ms(r.get("timings.denoising") for r in runs),
            "vae_decode": median_ms(r.get("timings.vae_decode") for r in runs),
            "safety_checker": median_ms(r.get("timings.safety_checker") for r in runs),
            "image_encoding": median_ms(r.get("timings.image_encoding") for r in runs),
        },
        "peak_memory_gb": peak_memory_gb(device),
    }
    return result


def run_full(args, device: torch.device, dtype: torch.dtype, results: dict, save) -> None:
    from lib.engine import speed
    from lib.engine.engine import Engine
    from lib.testkit import models

    plan = plan_runs(args)
    started_all = time.perf_counter()
    for (mode, variant), configs in plan.items():
        if args.resume:  # what an earlier run of today already measured (an error is tried again)
            configs = [c for c in configs if "error" in results.get(key(mode, variant, *c), {"error": ""})]
            if not configs:
                continue
        if args.max_minutes and time.perf_counter() - started_all > args.max_minutes * 60:
            log.warning("time budget of %s min spent: skipping %s / %s", args.max_minutes, mode, variant)
            continue
        env = {**os.environ, **VARIANTS[variant]}
        log.info("== %s, variant %s (%s)", mode, variant, VARIANTS[variant] or "defaults")
        engine = None
        try:
            if device.type == "cuda":
                torch._dynamo.reset()
            free(device)
            reset_peak(device)
            t0 = time.perf_counter()
            modes = models.build_modes([mode], device=device, dtype=dtype)
            # The safety checker is on in predict() by default: it is part of the path measured (--no-safety).
            safety = None if args.no_safety else models.build_safety_checker(device=device, dtype=dtype)
            engine = Engine(modes, device, dtype, safety)
            build_s = time.perf_counter() - t0
            # Warm-up in setup is measured here like setup() does it; the bench's own warm-up runs follow.
            settings = speed.Switches.from_env(device, env)
            speed.optimize(engine, settings)
            if settings.warmup:  # in this thread: the one that runs the measured predictions
                engine.warm_up()
            setup = {
                "build_s": round(build_s, 2),
                "apply_s": engine.speed["apply_s"],
                "warmup_s": sum(engine.speed["warmup_s"].values()),
                "memory_after_setup_gb": peak_memory_gb(device),
            }
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            log.error("setup of %s / %s failed: %s", mode, variant, e)
            for c in configs:
                results[key(mode, variant, *c)] = {**record_head(mode, variant, *c), "error": _error(e)}
            save()
            del engine
            continue
        for size, steps, batch, fast_decode in configs:
            if fast_decode and getattr(engine.modes[mode], "tiny_vae", None) is None:
                log.warning("%s has no fast_decode decoder: skipping", mode)
                continue
            head = record_head(mode, variant, size, steps, batch, fast_decode)
            log.info(
                "-- %s %dpx, %d step(s), batch %d%s", mode, size, steps, batch, ", fast_decode" if fast_decode else ""
            )
            try:
                res = measure(
                    engine,
                    mode,
                    size,
                    steps,
                    batch,
                    fast_decode,
                    args.iters,
                    args.warmup,
                    args.format,
                    args.case_seconds,
                )
                log.info(
                    "   e2e p50 %.1f ms, p95 %.1f ms, %.2f images/s; stages %s; peak %.2f GB",
                    res["e2e_ms"]["p50"],
                    res["e2e_ms"]["p95"],
                    res["images_per_s"],
                    res["stages_ms"],
                    res["peak_memory_gb"],
                )
                results[key(mode, variant, size, steps, batch, fast_decode)] = {
                    **head,
                    **res,
                    "safety_checker": safety is not None,
                    "setup": setup,
                    "speed": _jsonable(engine.speed),
                }
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at batch 12: record it and go on
                log.error("   failed: %s", e)
                results[key(mode, variant, size, steps, batch, fast_decode)] = {
                    **head,
                    "error": _error(e),
                    "setup": setup,
                }
                free(device)
            save()
        del engine, modes
        free(device)


def plan_runs(args) -> dict:
    """{(mode, variant): [(size, steps, batch, fast_decode), ...]}."""
    from lib.engine.modes import MODES

    plan: dict = {}
    if args.suite == "gpu":
        # In this order, so that a run cut short still has the most useful part: 1. every goal with the default
        # fast path, plus 4 and 12 images; 2. the plain path on every goal; 3. the switch-by-switch ladder on
        # sd-turbo and sdxl-turbo; 4. torch.compile on every goal at batch 1.
        ladder = [v for v in VARIANTS if v not in ("default", "plain") and not v.startswith("compile")]
        for variant in ("default", "plain", *ladder, "compile"):
            for g in GOALS:
                case = (g["size"], g["steps"], g["batch"], g["fast_decode"])
                if variant in ladder and (g["mode"] not in ("sd-turbo", "sdxl-turbo") or g["batch"] > 1):
                    continue
                if variant.startswith("compile") and g["batch"] > 1:
                    continue
                plan.setdefault((g["mode"], variant), []).append(case)
                if variant == "default":
                    plan[(g["mode"], variant)] += [(g["size"], g["steps"], b, g["fast_decode"]) for b in (4, 12)]
        return {k: list(dict.fromkeys(v)) for k, v in plan.items()}
    for mode in args.modes:
        m = MODES[mode]
        for variant in args.variants:
            for size in args.sizes or [m.size]:
                for batch in args.batch:
                    for fast_decode in [False, True] if args.fast_decode else [False]:
                        plan.setdefault((mode, variant), []).append(
                            (size, args.steps or m.steps.default, batch, fast_decode)
                        )
    return plan


def key(mode, variant, size, steps, batch, fast_decode) -> str:
    return f"{mode}|{variant}|{size}|{steps}|{batch}|{'taesd' if fast_decode else 'vae'}"


def record_head(mode, variant, size, steps, batch, fast_decode) -> dict:
    return {
        "mode": mode,
        "variant": variant,
        "switches": VARIANTS[variant],
        "size": size,
        "steps": steps,
        "batch": batch,
        "fast_decode": fast_decode,
    }


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500] + "\n" + traceback.format_exc(limit=-4)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# --- tiny: predict() vs a bare diffusers call --------------------------------------------------------------


def run_tiny(args) -> dict:
    """predict() end to end on tiny weights vs the same pipeline called bare (same components, same process).
    Two baselines: the call alone (PIL image out, no file) and the call plus saving the file with Pillow's
    defaults (what a script would do)."""
    from lib.local import Metrics, outputs, run_inputs

    weights = Path(args.weights) if args.weights else Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    if not args.weights:
        from lib.testkit.models import write_weights

        write_weights(weights)
    from lib.testkit.environment import environment

    # The bare pipeline runs no safety checker: neither does predict() here, so both do the same work.
    with environment(
        WEIGHTS_DIR=str(weights), WEIGHTS_OFFLINE="1", ENABLED_MODES=",".join(args.modes), SAFETY_CHECKER="0"
    ):
        from predict import Predictor

        predictor = Predictor()
        predictor.setup()
    predictor.record_metric = Metrics()
    loop = asyncio.new_event_loop()  # one loop for every call, as in the Cog server
    results = {}
    for mode in args.modes:
        engine_mode = predictor.engine.modes[mode]
        m = engine_mode.mode
        size = (args.sizes or [m.size])[0]
        pipe = engine_mode.txt2img
        times: dict[str, list[float]] = {"predict": [], "bare": [], "bare+save": []}
        with tempfile.TemporaryDirectory() as out:

            def predict_once(seed):
                inputs = run_inputs(
                    predictor, prompt=PROMPT, mode=mode, width=size, height=size, seed=seed, output_format=args.format
                )

                async def gather():  # as Cog drives Predictor.run
                    return [output async for output in outputs(predictor, **inputs)]

                return loop.run_until_complete(gather())

            def bare_once(seed, save):
                image = pipe(
                    prompt=PROMPT,
                    num_inference_steps=m.steps.default,
                    guidance_scale=m.guidance.default,
                    height=size,
                    width=size,
                    generator=torch.Generator("cpu").manual_seed(seed),
                ).images[0]
                if save:
                    image.save(Path(out) / f"bare-{seed}.{args.format}")
                return image

            for i in range(args.warmup):
                predict_once(i)
                bare_once(i, True)
            for i in range(args.iters):  # interleaved, so that drift hits all alike
                for name, call in (
                    ("predict", lambda: predict_once(i)),
                    ("bare", lambda: bare_once(i, False)),
                    ("bare+save", lambda: bare_once(i, True)),
                ):
                    started = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - started)
        # Ratios of the fastest runs: other load on the machine only ever adds time (medians are kept too).
        best = {k: min(v) for k, v in times.items()}
        p50 = {k: statistics.median(v) for k, v in times.items()}
        results[mode] = {
            "size": size,
            "steps": m.steps.default,
            "iters": args.iters,
            "format": args.format,
            "predict_ms": stats_ms(times["predict"]),
            "bare_ms": stats_ms(times["bare"]),
            "bare_save_ms": stats_ms(times["bare+save"]),
            "ratio_vs_bare": round(best["predict"] / best["bare"], 3),
            "ratio_vs_bare_save": round(best["predict"] / best["bare+save"], 3),
            "ratio_vs_bare_p50": round(p50["predict"] / p50["bare"], 3),
            "safety_checker": False,
        }
        log.info(
            "%s %dpx, fastest of %d: predict %.1f ms, bare call %.1f ms (x%.2f), bare call + save %.1f ms (x%.2f)",
            mode,
            size,
            args.iters,
            best["predict"] * 1000,
            best["bare"] * 1000,
            results[mode]["ratio_vs_bare"],
            best["bare+save"] * 1000,
            results[mode]["ratio_vs_bare_save"],
        )
    pending = asyncio.all_tasks(loop)  # the batcher's dispatcher
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    return results


# --- image encoding ----------------------------------------------------------------------------------------


def photo_like(size: int = 512, seed: int = 0):
    """A deterministic test image with a natural image's 1/f spectrum (octaves of smooth noise)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 3, size, size)
    for octave in range(1, 9):
        layer = torch.randn(1, 3, 2**octave, 2**octave, generator=g)
        img += torch.nn.functional.interpolate(layer, size=(size, size), mode="bicubic") * (0.75**octave) * 60
    return Image.fromarray((img + 128).clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy())


def run_encode(args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    image = photo_like(512)
    pixels = np.asarray(image, dtype=np.float64)

    def once(fmt, **options):
        buf = io.BytesIO()
        started = time.perf_counter()
        image.save(buf, fmt, **options)
        return time.perf_counter() - started, buf.getvalue()

    def row(label, fmt, **options):
        times = []
        for _ in range(args.iters):
            seconds, data = once(fmt, **options)
            times.append(seconds)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
        mse = float(((decoded - pixels) ** 2).mean())
        psnr = round(10 * np.log10(255**2 / mse), 2) if mse else None
        return {"setting": label, "ms": round(statistics.median(times) * 1000, 2), "bytes": len(data), "psnr_db": psnr}

    rows = [row(f"webp q80 method {m}", "WEBP", quality=80, method=m) for m in range(7)]
    rows += [row(f"webp q{q} method {m}", "WEBP", quality=q, method=m) for q in (60, 90, 100) for m in (0, 4)]
    rows += [row("jpg q80", "JPEG", quality=80), row("png level 1", "PNG", compress_level=1)]
    threads = {}
    for n in sorted({1, 2, min(4, os.cpu_count() or 1)}):
        with ThreadPoolExecutor(n) as pool:
            started = time.perf_counter()
            list(pool.map(lambda _: once("WEBP", quality=80, method=0), range(12)))
            threads[n] = round((time.perf_counter() - started) * 1000, 1)
    return {"image": "photo_like(512), 1/f noise", "rows": rows, "webp_m0_12_images_ms_by_threads": threads}


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["gpu"], help="gpu: the goals, before/after, batches, compile")
    parser.add_argument("--tiny", action="store_true", help="predict() vs a bare diffusers call on tiny weights")
    parser.add_argument("--encode", action="store_true", help="image encoder settings at 512px")
    parser.add_argument("--plan", action="store_true", help="print the cases a full-size run would measure, run none")
    parser.add_argument(
        "--render", action="store_true", help="measure nothing: rewrite the doc's sections from the JSON files in --out"
    )
    parser.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=None,
        help="comma-separated (default: sd-turbo; --tiny: sd-turbo,sdxl-turbo)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated image sizes (default: each mode's)",
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: each mode's)")
    parser.add_argument(
        "--batch",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1],
        help="num_outputs values, e.g. 1,4,12 (above 8 the request is widened past the API limit)",
    )
    parser.add_argument("--fast-decode", action="store_true", help="also measure with fast_decode (TAESD)")
    parser.add_argument(
        "--variants", type=lambda s: s.split(","), default=["default"], help=f"switch sets: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--iters", type=int, default=None, help="timed runs per case (default 20; CPU 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; CPU 1)")
    parser.add_argument("--format", default="webp", choices=["webp", "jpg", "png"])
    parser.add_argument("--no-safety", action="store_true", help="full size: leave the safety checker out")
    parser.add_argument("--weights", help="--tiny: an existing tiny weights dir (default: written to a temp dir)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new mode/variant once this much time is spent (results so far are written)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip cases today's JSON for this device already holds (run again after a cut-off)",
    )
    parser.add_argument(
        "--case-seconds",
        type=float,
        default=None,
        help="stop timing a case after this long, with at least 3 runs (default: GPU 20, CPU none)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of the JSON files")
    parser.add_argument("--doc", type=Path, default=DOC, help="the Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print, write no files")
    parser.add_argument("--note", help="a line to show under this run's heading")
    return parser, parser.parse_args(argv)


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    if args.render:
        return render_all(Path(args.out), Path(args.doc))
    device, dtype = choose_runtime(parser, args)
    if args.plan:
        plan = plan_runs(args)
        for (mode, variant), configs in plan.items():
            print(
                f"{mode} / {variant} ({VARIANTS[variant] or 'defaults'}): "
                + ", ".join(f"{c[0]}px {c[1]} step(s) x{c[2]}{' TAESD' if c[3] else ''}" for c in configs)
            )
        return {"plan": {f"{m}|{v}": c for (m, v), c in plan.items()}}
    return run(args, device, dtype)


def choose_runtime(parser, args) -> tuple[torch.device, torch.dtype]:
    """The device and dtype, and the defaults that depend on them, filled into `args`."""
    from lib.engine import devices
    from lib.engine.modes import MODES
    from lib.engine.precision import choose as choose_precision

    device = devices.choose_from_env()[0]
    dtype = choose_precision(device, requested=Settings().model_dtype).model
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    cpu = device.type == "cpu"
    if cpu and not (args.tiny or args.encode):
        torch.set_flush_denormal(True)  # random weights must not hit the CPU's slow denormal path
    args.modes = args.modes or (["sd-turbo", "sdxl-turbo"] if args.tiny else ["sd-turbo"])
    unknown = [m for m in args.modes if m not in MODES] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown mode or variant: {', '.join(unknown)}")
    args.iters = args.iters or (3 if cpu or args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu or args.tiny else 3)
    if args.case_seconds is None and not cpu:
        args.case_seconds = 20.0
    if device.type == "cuda":
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return device, dtype


def run(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Measure what `args` asks, write the JSON and this device's section of the doc; returns the data."""
    info = device_info(device)
    section = "tiny-cpu" if args.tiny else "encode" if args.encode else slug(device)
    json_path = Path(args.out) / f"{info['date']}-{section}.json"
    data = load_json(json_path) if not args.no_write else {}
    data.update(info=info, dtype=str(dtype).removeprefix("torch."))
    if args.note:
        data["note"] = args.note
    data.setdefault("results", {})

    def save():
        if not args.no_write:
            write_outputs(data, json_path, args.doc, section)

    if args.tiny:
        data["tiny"] = run_tiny(args)
    elif args.encode:
        data["encode"] = run_encode(args)
    else:
        run_full(args, device, dtype, data["results"], save)
    save()
    print(render(data, json_path))
    return data
