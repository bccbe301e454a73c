"""The GPU check: what only a GPU can show, end to end inside predict(), in one run of a few minutes.

  scripts/gpu_check.sh              on a GPU machine (no network needed; wheels from .whl/, scripts/gpu_wheels.sh)
  scripts/gpu_check.sh --dry-run    the same steps on the CPU with the tiny models at 256px (CI runs it)

Steps, each written to OUT/gpu_check.json as soon as it ends (a run cut short keeps what it measured):
1. env: device, compute capability, free memory, versions.
2. weights: every mode's repos at full size with random weights, in the Hub layout on disk
   (scripts/make_tiny_weights.py --full), so that setup() loads real-sized files as after a download.
3. budget: setup() with DEVICE_MEMORY_BUDGET=24GB (every mode, the safety checker on): setup time, the memory plan,
   then one prediction per mode in an order that makes it move modes, and the peak device memory.
4. goals: the default path with every mode resident: the performance goals, p50/p95 over repeated predictions.
5. realtime: the realtime server on sd-turbo 512 (1 and 4 clients, img2img with TAESD) against the engine direct.
6. plain: SPEED=0 (the plain diffusers path) on the sd-turbo and sdxl-turbo goals.
7. compiled: SPEED_COMPILE=unet,vae with CUDA graphs on the sd-turbo goals, if the time left allows.
8. controlnet: CONTROLNET=1, the cost per denoising step of one and two ControlNets against none, sdxl-turbo and
   lcm-lora-sd15 at 512px (lib/bench/controlnet.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lib.bench.cases import GOALS, PROMPT
from lib.bench.device import device_info, free, reset_peak
from lib.local import Metrics
from lib.settings import Settings
from lib.stats import stats_ms

BUDGET = "24GB"  # the consumer cards: RTX 4090, A10G, L4
PER_REQUEST = 4  # a goal of more images runs as concurrent requests of this many, batched
# The order of the budget step's predictions: the least recently used mode is the next one asked for.
BUDGET_ORDER = ["sdxl-turbo", "sd-turbo", "lcm", "lcm-lora-sdxl", "lcm-lora-sd15", "sdxl-turbo", "lcm-lora-sd15"]


class Check:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.started = time.monotonic()
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {
            "dry_run": self.dry,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "steps": {},
        }
        self.loop = asyncio.new_event_loop()

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.minutes * 60 - (time.monotonic() - self.started)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        path = self.out / "gpu_check.json"
        path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")

    def step(self, name: str, fn, need_s: float = 0) -> None:
        if self.left() < need_s:
            self.data["steps"][name] = {"skipped": f"{self.left():.0f} s left, {need_s:.0f} s needed"}
            print(f"== {name}: skipped ({self.left():.0f} s left)", flush=True)
            self.save()
            return
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - one failing step must not lose the others
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"[:2000]}
        result["seconds"] = round(time.monotonic() - t0, 1)
        self.data["steps"][name] = result
        self.save()

    def peak_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    def free(self) -> None:
        for task in asyncio.all_tasks(self.loop):  # the batcher's dispatcher of the last predictor
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        free(self.device)
        reset_peak(self.device)

    # -- the steps ---------------------------------------------------------------------------------------------
    def env(self) -> dict:
        info = device_info(self.device)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            info.update(capability=list(torch.cuda.get_device_capability(self.device)), free_gb=round(free / 2**30, 1))
        self.data["env"] = info
        return info

    def weights(self) -> dict:
        from lib.testkit.models import Scale, write_weights

        self.weights_dir = Path(self.args.weights or tempfile.mkdtemp(prefix="gpu-check-weights-"))
        files = write_weights(self.weights_dir, Scale(full=not self.dry, device=str(self.device)))
        size = sum((self.weights_dir / f).stat().st_size for f in files)
        return {"files": len(files), "gb": round(size / 1e9, 2), "full_size": not self.dry}

    def predictor(self, env: dict):
        """A Predictor set up as Cog does it, with `env` over the check's own settings."""
        from predict import Predictor

        base = {
            "WEIGHTS_DIR": str(self.weights_dir),
            "WEIGHTS_OFFLINE": "1",
            "COG_MAX_CONCURRENCY": "4",
            "ENABLED_MODES": "",
            "DEVICE_MEMORY_BUDGET": "",
            "SPEED": "",
            "SPEED_COMPILE": "",
            "SPEED_CUDA_GRAPHS": "",
            "SPEED_COMPILE_MODE": "",
            "SPEED_COMPILE_BACKEND": "",
            "SPEED_CUDNN_BENCHMARK": "",
            "CONTROLNET": "",
        }
        if self.dry:
            base["SPEED_COMPILE_BACKEND"] = "eager"  # inductor takes minutes on a CPU; eager checks the plumbing
        for k, v in {**base, **env}.items():
            os.environ[k] = v
        self.free()
        started = time.perf_counter()
        p = Predictor()
        p.setup()
        p.setup_s = round(time.perf_counter() - started, 1)
        return p

    def predict(self, p, metrics=None, **inputs) -> list:
        from lib.local import outputs, run_inputs

        p.record_metric = metrics if metrics is not None else Metrics()
        kwargs = run_inputs(p, **inputs)

        async def gather():
            return [o async for o in outputs(p, **kwargs)]

        return self.loop.run_until_complete(gather())

    def controlnet(self) -> dict:
        from lib.bench.controlnet import measure

        names = ("sdxl-turbo", "lcm-lora-sd15")
        p = self.predictor({"ENABLED_MODES": ",".join(names), "CONTROLNET": "1"})
        cases = {name: measure(p.engine, name, self.size(512), 1 if self.dry else 5) for name in names}
        return {"setup_s": p.setup_s, "cases": cases}

    def size(self, size: int) -> int:
        return 256 if self.dry else size

    def budget(self) -> dict:
        budget = BUDGET if not self.dry else self._dry_budget()
        p = self.predictor({"DEVICE_MEMORY_BUDGET": budget})
        plan = p.engine.residency.plan
        result = {
            "budget": budget,
            "setup_s": p.setup_s,
            "plan": plan.describe(),
            "resident": list(plan.resident),
            "peak_after_setup_gb": self.peak_gb(),
            "predictions": [],
        }
        for mode_name in BUDGET_ORDER:
            from lib.engine.modes import MODES

            mode = MODES[mode_name]
            metrics = Metrics()
            t0 = time.perf_counter()
            files = self.predict(
                p,
                metrics,
                prompt=PROMPT,
                mode=mode_name,
                width=self.size(mode.size),
                height=self.size(mode.size),
                seed=1,
            )
            result["predictions"].append(
                {
                    "mode": mode_name,
                    "ms": round((time.perf_counter() - t0) * 1000, 1),
                    "images": len(files),
                    "moved_s": metrics.get("timings.mode_load"),
                }
            )
        result["moves"] = p.engine.residency.moves
        result["peak_gb"] = self.peak_gb()
        result["within_budget"] = None if self.dry else result["peak_gb"] <= 24e9 / 2**30
        del p
        return result

    def _dry_budget(self) -> str:
        """On the tiny models: a budget that holds about three quarters of the weights (as 24 GB does for the real
        ones beside their working memory), so that the step moves modes too."""
        from lib.engine.engine import plan_memory
        from lib.engine.loading import ComponentLoader
        from lib.engine.memory import MARGIN
        from lib.engine.modes import MODES

        plan = plan_memory(ComponentLoader(self.device, torch.float32), self.weights_dir, tuple(MODES), True)
        return str(math.ceil((plan.working + 0.75 * plan.weights(MODES)) / (1 - MARGIN)))

    def goals(self, env: dict, names=None) -> dict:
        p = self.predictor(env)
        result = {"env": env, "setup_s": p.setup_s, "warmup_s": p.engine.speed.get("warmup_s"), "cases": {}}
        for goal in GOALS:
            if names and goal["mode"] not in names:
                continue
            result["cases"][goal["name"]] = self._measure(p, goal)
            self.save()
        result["peak_gb"] = self.peak_gb()
        del p
        return result

    def realtime(self) -> dict:
        """The realtime server on sd-turbo 512, 1 step, img2img with TAESD (lib/bench/realtime.py): frames/s and
        latency for 1 and 4 clients against the engine direct, with cuDNN autotuning on as the server has it
        (CUDA graphs are the compiled step's)."""
        from lib.bench import realtime
        from lib.realtime.server import new_batcher

        p = self.predictor({"ENABLED_MODES": "sd-turbo", "SPEED_CUDNN_BENCHMARK": "1"})
        batcher = new_batcher(p.engine, Settings())
        batcher.warm_up(img2img=True)
        result = realtime.measure(p.engine, batcher, Settings(), "sd-turbo", 1, [1, 4], 2 if self.dry else 8)
        result["goals"] = realtime.GOALS
        print(realtime.table(result), flush=True)
        del p
        return result

    def _measure(self, p, goal: dict) -> dict:
        size, images = self.size(goal["size"]), goal["batch"]
        inputs = dict(
            prompt=PROMPT,
            mode=goal["mode"],
            width=size,
            height=size,
            num_inference_steps=goal["steps"],
            fast_decode=goal["fast_decode"],
            output_format="webp",
        )
        iters, warm, budget_s = (1, 0, 60) if self.dry else (30, 3, 10)
        times, runs, started = [], [], time.perf_counter()
        for i in range(warm + iters):
            if i >= warm + 3 and time.perf_counter() - started > budget_s:
                break
            metrics = Metrics()
            t0 = time.perf_counter()
            if images == 1:
                files = self.predict(p, metrics, seed=i, **inputs)
            else:  # concurrent requests: the batcher runs them as one batch

                async def burst(i=i):
                    from lib.local import outputs, run_inputs

                    p.record_metric = Metrics()
                    calls = [
                        run_inputs(p, seed=100 * i + r, num_outputs=PER_REQUEST, **inputs)
                        for r in range(images // PER_REQUEST)
                    ]
                    lists = await asyncio.gather(*[_collect(outputs(p, **kw)) for kw in calls])
                    return [f for files in lists for f in files]

                files = self.loop.run_until_complete(burst())
            elapsed = time.perf_counter() - t0
            assert len(files) == images, (len(files), images)
            if i >= warm:
                times.append(elapsed)
                runs.append(metrics)
        latency = stats_ms(times)
        p50 = latency["p50"] / 1000
        out = {
            "p50_ms": latency["p50"],
            "p95_ms": latency["p95"],
            "n": latency["n"],
            "images_per_s": round(images / p50, 1),
        }
        if images == 1:
            out["stages_ms"] = {
                k.removeprefix("timings."): round(statistics.median(r[k] for r in runs) * 1000, 2)
                for k in runs[0]
                if k.startswith("timings.") and isinstance(runs[0][k], float)
            }
        if not self.dry:
            out["goal_met"] = (
                (p50 * 1000 <= goal["goal_ms"]) if "goal_ms" in goal else (images / p50 >= goal["goal_images_per_s"])
            )
        out.update({k: v for k, v in goal.items() if k.startswith("goal")})
        print(
            f"   {goal['name']}: p50 {out['p50_ms']} ms, p95 {out['p95_ms']} ms, {out['images_per_s']} images/s",
            flush=True,
        )
        return out


async def _collect(agen) -> list:
    return [x async for x in agen]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny models at 256px, one run per case")
    parser.add_argument("--out", default=str(Settings().out), help="folder of gpu_check.json")
    parser.add_argument("--minutes", type=float, default=8.0, help="stop starting steps after this long")
    parser.add_argument("--weights", help="an existing weights folder (default: written to a temp folder)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on a GPU machine, or with --dry-run")
    check = Check(args)
    check.step("env", check.env)
    check.step("weights", check.weights)
    if "error" in check.data["steps"]["weights"]:
        return 1
    check.step("budget", check.budget, need_s=60)
    check.step("goals", lambda: check.goals({}), need_s=60)
    check.step("realtime", check.realtime, need_s=60)
    check.step(
        "plain",
        lambda: check.goals({"SPEED": "0", "ENABLED_MODES": "sd-turbo,sdxl-turbo"}, {"sd-turbo", "sdxl-turbo"}),
        need_s=45,
    )
    check.step(
        "compiled",
        lambda: check.goals(
            {
                "ENABLED_MODES": "sd-turbo",
                "SPEED_COMPILE": "unet,vae",
                "SPEED_CUDA_GRAPHS": "1",
                "SPEED_COMPILE_MODE": "reduce-overhead",
            },
            {"sd-turbo"},
        ),
        need_s=150,
    )
    check.step("controlnet", check.controlnet, need_s=60)
    check.free()
    errors = [name for name, s in check.data["steps"].items() if "error" in s]
    print(
        json.dumps(
            {name: {k: v for k, v in s.items() if k != "cases"} for name, s in check.data["steps"].items()},
            indent=1,
            default=str,
        )
    )
    print(f"wrote {check.out / 'gpu_check.json'}" + (f"; steps with errors: {', '.join(errors)}" if errors else ""))
    return 1 if errors else 0
