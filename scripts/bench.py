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
import datetime
import gc
import io
import json
import logging
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path


import torch

from lib import ROOT
from lib.settings import Settings

log = logging.getLogger("bench")

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"
DOC = ROOT / "docs" / "benchmarks.md"
NEXT = "<!-- bench:next -->"  # in DOC: where sections of devices not yet there are inserted
OUT_DIR = ROOT / "docs" / "benchmarks"

# The goals (H100, fp16, batch 1, end to end inside predict()) and the public figures beside them.
GOALS = [
    {"name": "sd-turbo 512, 1 step, full VAE", "mode": "sd-turbo", "size": 512, "steps": 1, "batch": 1,
     "fast_decode": False, "goal_ms": 20, "anchor": "36 ms (A100, TensorRT)"},
    {"name": "sd-turbo 512, 1 step, TAESD", "mode": "sd-turbo", "size": 512, "steps": 1, "batch": 1,
     "fast_decode": True, "goal_ms": 8, "anchor": "9.4 ms (4090, StreamDiffusion)"},
    {"name": "sdxl-turbo 512, 1 step, full VAE", "mode": "sdxl-turbo", "size": 512, "steps": 1, "batch": 1,
     "fast_decode": False, "goal_ms": 35, "anchor": "207 ms (A100, Stability) / 45 ms (A100, TensorRT)"},
    {"name": "lcm 768, 4 steps", "mode": "lcm", "size": 768, "steps": 4, "batch": 1, "fast_decode": False,
     "goal_ms": 80, "anchor": "-"},
    {"name": "lcm-lora-sdxl 1024, 4 steps", "mode": "lcm-lora-sdxl", "size": 1024, "steps": 4, "batch": 1,
     "fast_decode": False, "goal_ms": 250, "anchor": "700 ms (4090, eager)"},
    {"name": "sd-turbo 512, TAESD, num_outputs 12", "mode": "sd-turbo", "size": 512, "steps": 1, "batch": 12,
     "fast_decode": True, "goal_images_per_s": 300, "anchor": "167 images/s (4090)"},
]

# Before/after: each variant is a set of SPEED_* switches (lib/speed.py) over the plain path.
PLAIN = {"SPEED": "0"}
VARIANTS = {
    "plain-no-sdpa": {**PLAIN, "SPEED_SDPA": "0"},
    "plain": PLAIN,
    "+tf32+cudnn": {**PLAIN, "SPEED_TF32": "1", "SPEED_CUDNN_BENCHMARK": "1"},
    "+channels_last": {**PLAIN, "SPEED_TF32": "1", "SPEED_CUDNN_BENCHMARK": "1", "SPEED_CHANNELS_LAST": "1"},
    "+fuse_qkv": {**PLAIN, "SPEED_TF32": "1", "SPEED_CUDNN_BENCHMARK": "1", "SPEED_CHANNELS_LAST": "1",
                  "SPEED_FUSE_QKV": "1"},
    "default": {},  # the defaults: on CUDA all of the above plus the bf16 SDXL VAE
    "compile": {"SPEED_COMPILE": "unet,vae,text"},
    "compile+cuda_graphs": {"SPEED_COMPILE": "unet,vae,text", "SPEED_CUDA_GRAPHS": "1"},
}


# --- environment ----------------------------------------------------------------------------------------------


def device_info(device: torch.device) -> dict:
    import diffusers
    import PIL
    import transformers

    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "pillow": PIL.__version__, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = f"CPU ({info['cpu']}, {os.cpu_count()} cores)"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # process peak RSS (KiB -> GiB)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stats_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, max(0, round(0.95 * len(ms) + 0.5) - 1))]
    return {"p50": round(statistics.median(ms), 2), "p95": round(p95, 2), "mean": round(statistics.fmean(ms), 2),
            "min": round(ms[0], 2), "n": len(ms)}


def median_ms(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values) * 1000, 2) if values else None


# --- full size ------------------------------------------------------------------------------------------------


def measure(engine, mode: str, size: int, steps: int, batch: int, fast_decode: bool, iters: int, warmup: int,
            fmt: str, budget_s: float | None = None) -> dict:
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
            request = engine.request(prompt=PROMPT, mode=mode, width=size, height=size, num_inference_steps=steps,
                                     num_outputs=min(batch, NUM_OUTPUTS_RANGE[1]), seed=1234 + i,
                                     output_format=fmt, **extra)
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
        "stages_ms": {"text_encoding": median_ms(r.get("timings.text_encoding") for r in runs),
                      "steps": steps_ms,
                      "denoising": median_ms(r.get("timings.denoising") for r in runs),
                      "vae_decode": median_ms(r.get("timings.vae_decode") for r in runs),
                      "safety_checker": median_ms(r.get("timings.safety_checker") for r in runs),
                      "image_encoding": median_ms(r.get("timings.image_encoding") for r in runs)},
        "peak_memory_gb": peak_memory_gb(device),
    }
    return result


def run_full(args, device: torch.device, dtype: torch.dtype, results: dict, save) -> None:
    from lib.testkit import models
    from lib.engine import speed
    from lib.engine.engine import Engine

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
            setup = {"build_s": round(build_s, 2), "apply_s": engine.speed["apply_s"],
                     "warmup_s": sum(engine.speed["warmup_s"].values()),
                     "memory_after_setup_gb": peak_memory_gb(device)}
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
            log.info("-- %s %dpx, %d step(s), batch %d%s", mode, size, steps, batch,
                     ", fast_decode" if fast_decode else "")
            try:
                res = measure(engine, mode, size, steps, batch, fast_decode, args.iters, args.warmup, args.format,
                              args.case_seconds)
                log.info("   e2e p50 %.1f ms, p95 %.1f ms, %.2f images/s; stages %s; peak %.2f GB",
                         res["e2e_ms"]["p50"], res["e2e_ms"]["p95"], res["images_per_s"], res["stages_ms"],
                         res["peak_memory_gb"])
                results[key(mode, variant, size, steps, batch, fast_decode)] = {
                    **head, **res, "safety_checker": safety is not None, "setup": setup,
                    "speed": _jsonable(engine.speed)}
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at batch 12: record it and go on
                log.error("   failed: %s", e)
                results[key(mode, variant, size, steps, batch, fast_decode)] = {**head, "error": _error(e),
                                                                               "setup": setup}
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
        # sd-turbo and sdxl-turbo; 4. torch.compile and CUDA graphs on every goal at batch 1.
        ladder = [v for v in VARIANTS if v not in ("default", "plain") and not v.startswith("compile")]
        for variant in ("default", "plain", *ladder, "compile", "compile+cuda_graphs"):
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
                    for fast_decode in ([False, True] if args.fast_decode else [False]):
                        plan.setdefault((mode, variant), []).append(
                            (size, args.steps or m.steps.default, batch, fast_decode))
    return plan


def key(mode, variant, size, steps, batch, fast_decode) -> str:
    return f"{mode}|{variant}|{size}|{steps}|{batch}|{'taesd' if fast_decode else 'vae'}"


def record_head(mode, variant, size, steps, batch, fast_decode) -> dict:
    return {"mode": mode, "variant": variant, "switches": VARIANTS[variant], "size": size, "steps": steps,
            "batch": batch, "fast_decode": fast_decode}


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
    with environment(WEIGHTS_DIR=str(weights), WEIGHTS_OFFLINE="1", ENABLED_MODES=",".join(args.modes),
                     SAFETY_CHECKER="0"):
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
                inputs = run_inputs(predictor, prompt=PROMPT, mode=mode, width=size, height=size, seed=seed,
                                    output_format=args.format)

                async def gather():  # as Cog drives Predictor.run
                    return [output async for output in outputs(predictor, **inputs)]

                return loop.run_until_complete(gather())

            def bare_once(seed, save):
                image = pipe(prompt=PROMPT, num_inference_steps=m.steps.default, guidance_scale=m.guidance.default,
                             height=size, width=size, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
                if save:
                    image.save(Path(out) / f"bare-{seed}.{args.format}")
                return image

            for i in range(args.warmup):
                predict_once(i)
                bare_once(i, True)
            for i in range(args.iters):  # interleaved, so that drift hits all alike
                for name, call in (("predict", lambda: predict_once(i)), ("bare", lambda: bare_once(i, False)),
                                   ("bare+save", lambda: bare_once(i, True))):
                    started = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - started)
        # Ratios of the fastest runs: other load on the machine only ever adds time (medians are kept too).
        best = {k: min(v) for k, v in times.items()}
        p50 = {k: statistics.median(v) for k, v in times.items()}
        results[mode] = {"size": size, "steps": m.steps.default, "iters": args.iters, "format": args.format,
                         "predict_ms": stats_ms(times["predict"]), "bare_ms": stats_ms(times["bare"]),
                         "bare_save_ms": stats_ms(times["bare+save"]),
                         "ratio_vs_bare": round(best["predict"] / best["bare"], 3),
                         "ratio_vs_bare_save": round(best["predict"] / best["bare+save"], 3),
                         "ratio_vs_bare_p50": round(p50["predict"] / p50["bare"], 3),
                         "safety_checker": False}
        log.info("%s %dpx, fastest of %d: predict %.1f ms, bare call %.1f ms (x%.2f), bare call + save %.1f ms "
                 "(x%.2f)", mode, size, args.iters, best["predict"] * 1000, best["bare"] * 1000,
                 results[mode]["ratio_vs_bare"], best["bare+save"] * 1000, results[mode]["ratio_vs_bare_save"])
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
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
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


# --- output ------------------------------------------------------------------------------------------------


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_outputs(data: dict, json_path: Path, doc: Path, section: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    update_doc(doc, section, render(data, json_path))


def update_doc(doc: Path, section: str, text: str) -> None:
    """Replace this device's section between its markers in docs/benchmarks.md (others' sections untouched)."""
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    body = f"{start}\n{text.rstrip()}\n{end}"
    current = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        new = before + body + rest.split(end, 1)[1]
    elif NEXT in current:  # a new device's section goes where the doc keeps them
        new = current.replace(NEXT, body + "\n\n" + NEXT, 1)
    else:
        new = current.rstrip() + "\n\n" + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def render_all(out: Path, doc: Path) -> dict:
    """Each section from its newest JSON file (<date>-<section>.json)."""
    newest: dict[str, Path] = {}
    for path in sorted(out.glob("????-??-??-*.json")):
        newest[path.stem[11:]] = path
    for section, path in newest.items():
        update_doc(doc, section, render(load_json(path), path))
        print(f"{doc}: section {section} from {path}")
    return {section: str(path) for section, path in newest.items()}


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def render(data: dict, json_path: Path) -> str:
    info = data["info"]
    rel = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
    kind = ("Tiny-model smoke" if data.get("tiny") else "Image encoding" if data.get("encode")
            else "Full-size models")
    lines = [f"#### {kind}: {info['device']}, {info['date']}", "",
             f"{data.get('dtype', '')}; torch {info['torch']}"
             + (f" (CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')})" if info.get("cuda") else "")
             + f", diffusers {info['diffusers']}, transformers {info['transformers']}, Pillow {info['pillow']}, "
             f"Python {info['python']}; CPU {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch "
             f"threads; load average {info.get('loadavg_at_start', ['?'])[0]} at the start). Raw figures: `{rel}`.", ""]
    if data.get("note"):
        lines += [data["note"], ""]
    results = data.get("results", {})
    if results:
        goal_rows = []
        for g in GOALS:
            cands = [r for r in results.values() if "error" not in r and all(
                r[k] == g[k] for k in ("mode", "size", "steps", "batch", "fast_decode"))]
            if not cands:
                continue
            if "goal_ms" in g:
                best = min(cands, key=lambda r: r["e2e_ms"]["p50"])
                ours, ok = f"{fmt_ms(best['e2e_ms']['p50'])} ms", best["e2e_ms"]["p50"] <= g["goal_ms"]
                goal = f"<= {g['goal_ms']} ms"
            else:
                best = max(cands, key=lambda r: r["images_per_s"])
                ours, ok = f"{best['images_per_s']:.0f} images/s", best["images_per_s"] >= g["goal_images_per_s"]
                goal = f">= {g['goal_images_per_s']} images/s"
            met = ("yes" if ok else "no") if "H100" in info["device"] else "- (goal is for an H100)"
            goal_rows.append(f"| {g['name']} | {goal} | {ours} ({best['variant']}) | {met} | {g['anchor']} |")
        if goal_rows:
            lines += ["Goals (end to end inside Engine.run, batch 1 unless said; best variant):", "",
                      "| case | goal | ours (variant) | met | anchor |", "|---|---|---|---|---|", *goal_rows, ""]
        lines += ["| mode | variant | size | steps | images | decode | e2e p50 ms | p95 ms | images/s | text ms | "
                  "step ms | decode ms | safety ms | encode ms | peak GB | setup s (build + apply + warm-up) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results.values():
            head = (f"| {r['mode']} | {r['variant']} | {r['size']} | {r['steps']} | {r['batch']} | "
                    f"{'TAESD' if r['fast_decode'] else 'VAE'} |")
            if "error" in r:
                lines.append(head + f" failed: {r['error'].splitlines()[0][:80]} |" + " |" * 9)
                continue
            s, setup = r["stages_ms"], r.get("setup", {})
            lines.append(head + f" {fmt_ms(r['e2e_ms']['p50'])} | {fmt_ms(r['e2e_ms']['p95'])} | "
                         f"{r['images_per_s']:.2f} | {fmt_ms(s['text_encoding'])} | "
                         f"{' / '.join(fmt_ms(x) for x in s['steps'])} | {fmt_ms(s['vae_decode'])} | "
                         f"{fmt_ms(s.get('safety_checker'))} | {fmt_ms(s['image_encoding'])} | {r['peak_memory_gb']} | "
                         f"{setup.get('build_s', 0):.1f} + {setup.get('apply_s', 0):.1f} + "
                         f"{setup.get('warmup_s', 0):.1f} |")
        lines.append("")
        attention = next((r["speed"]["attention"] for r in reversed(list(results.values())) if r.get("speed")),
                         None)
        if attention:
            lines += [f"Attention as run (default variant): `{json.dumps(attention)}`", ""]
    if data.get("tiny"):
        lines += ["Tiny-model smoke (CPU, fp32): predict() end to end vs the same pipeline called bare in the same "
                  "process (`--tiny`; goal <= 1.10x):", "",
                  "| mode | size | runs | predict() ms (fastest / p50) | bare call ms | ratio | "
                  "bare call + save ms | ratio |", "|---|---|---|---|---|---|---|---|"]
        for mode, t in data["tiny"].items():
            lines.append(f"| {mode} | {t['size']} | {t['iters']} | {fmt_ms(t['predict_ms']['min'])} / "
                         f"{fmt_ms(t['predict_ms']['p50'])} | {fmt_ms(t['bare_ms']['min'])} / "
                         f"{fmt_ms(t['bare_ms']['p50'])} | {t['ratio_vs_bare']:.2f}x | "
                         f"{fmt_ms(t['bare_save_ms']['min'])} / {fmt_ms(t['bare_save_ms']['p50'])} | "
                         f"{t['ratio_vs_bare_save']:.2f}x |")
        lines += ["", "Ratios compare the fastest runs (load from other processes only adds time). The bare call is "
                  "`pipe(prompt, ...)` on the engine's own pipeline (PIL image out); `+ save` also writes the file "
                  "with Pillow's defaults. Both sides run without the safety checker (SAFETY_CHECKER=0)."]
        lines.append("")
    if data.get("encode"):
        e = data["encode"]
        lines += [f"Image encoding, 512x512 ({e['image']}), Pillow {info['pillow']}, one thread:", "",
                  "| setting | ms | bytes | PSNR dB |", "|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['ms']} | {r['bytes']} | {r['psnr_db']} |" for r in e["rows"]]
        lines += ["", "12 images, webp q80 method 0, by encoder threads (ms): "
                  + ", ".join(f"{n}: {ms}" for n, ms in e["webp_m0_12_images_ms_by_threads"].items()), ""]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    from lib.engine.modes import MODES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["gpu"], help="gpu: the goals, before/after, batches, compile")
    parser.add_argument("--tiny", action="store_true", help="predict() vs a bare diffusers call on tiny weights")
    parser.add_argument("--encode", action="store_true", help="image encoder settings at 512px")
    parser.add_argument("--plan", action="store_true", help="print the cases a full-size run would measure, run none")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the doc's sections from the JSON files in --out")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=None,
                        help="comma-separated (default: sd-turbo; --tiny: sd-turbo,sdxl-turbo)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated image sizes (default: each mode's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: each mode's)")
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1],
                        help="num_outputs values, e.g. 1,4,12 (above 8 the request is widened past the API limit)")
    parser.add_argument("--fast-decode", action="store_true", help="also measure with fast_decode (TAESD)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["default"],
                        help=f"switch sets: {', '.join(VARIANTS)}")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per case (default 20; CPU 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; CPU 1)")
    parser.add_argument("--format", default="webp", choices=["webp", "jpg", "png"])
    parser.add_argument("--no-safety", action="store_true", help="full size: leave the safety checker out")
    parser.add_argument("--weights", help="--tiny: an existing tiny weights dir (default: written to a temp dir)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new mode/variant once this much time is spent (results so far are written)")
    parser.add_argument("--resume", action="store_true",
                        help="skip cases today's JSON for this device already holds (run again after a cut-off)")
    parser.add_argument("--case-seconds", type=float, default=None,
                        help="stop timing a case after this long, with at least 3 runs (default: GPU 20, CPU none)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of the JSON files")
    parser.add_argument("--doc", type=Path, default=DOC, help="the Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print, write no files")
    parser.add_argument("--note", help="a line to show under this run's heading")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    if args.render:
        return render_all(Path(args.out), Path(args.doc))

    from lib.engine.loading import choose_device
    from lib.engine.precision import choose as choose_precision

    device = choose_device()
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
    if args.plan:
        plan = plan_runs(args)
        for (mode, variant), configs in plan.items():
            print(f"{mode} / {variant} ({VARIANTS[variant] or 'defaults'}): "
                  + ", ".join(f"{c[0]}px {c[1]} step(s) x{c[2]}{' TAESD' if c[3] else ''}" for c in configs))
        return {"plan": {f"{m}|{v}": c for (m, v), c in plan.items()}}
    args.iters = args.iters or (3 if cpu or args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu or args.tiny else 3)
    if args.case_seconds is None and not cpu:
        args.case_seconds = 20.0
    if device.type == "cuda":
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

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


if __name__ == "__main__":
    main()
