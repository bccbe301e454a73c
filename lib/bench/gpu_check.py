"""The GPU check: what only a GPU can show, in one run of at most 8 minutes, the most informative steps first.

  scripts/gpu_check.sh              on a GPU machine (no network needed; wheels from .whl/, scripts/gpu_wheels.sh)
  scripts/gpu_check.sh --dry-run    the same steps and code on the CPU, tiny models at 256px (CI runs it)
  python scripts/gpu_check.py --render OUT/gpu_check.json   a fetched run's section into docs/benchmarks.md

Each step has its own time cap and the run a deadline (--minutes): a step that reaches its cap stops measuring and
keeps what it has, a step that cannot start in the time left is skipped with a line, and OUT/gpu_check.json (and
OUT/benchmarks.md, docs/benchmarks.md with this run's dated section) is written after every case, so nothing
measured is lost. Every goal case is measured three ways in the same process on the same weight files: the model
card's own diffusers code (the peer baseline, lib/bench/baseline.py), our default serving path, and SPEED=0, each
in ms and as a ratio to the baseline, with per-stage timings for all three.

Steps (cap in seconds):
1. env (15): device, driver, compute capability, free memory, versions, the kernel (4.4.0: gVisor).
2. sd-turbo (150): its weights written (full size, random values, Hub layout, timed), then the baseline, the
   default path (setup and warm-up timed, what it recorded) and SPEED=0 on the sd-turbo goals (full VAE, TAESD,
   12 images as three batched requests of 4); the default path's CUDA graphs against the same request run as loaded
   (pixel difference).
3. profile (45): sd-turbo 512 full VAE per prediction on each path: kernels, launches, graph launches, host
   synchronisations, device busy time against wall time (torch.profiler).
4. sdxl-turbo (75), 5. lcm (60), 6. lcm-lora-sdxl (90): as step 2, their goals.
7. budget (90): every mode under DEVICE_MEMORY_BUDGET=24GB: setup, the plan, the residents after the warm-up, one
   prediction per mode in an order that moves modes, the peak device memory against the budget.
8. realtime (50): the realtime server on sd-turbo 512 (1 and 4 clients) against the engine direct.
9. controlnet (60): CONTROLNET=1, the cost per denoising step of one and two ControlNets against none, sdxl-turbo and
   lcm-lora-sd15 at 512 px (lib/bench/controlnet.py).
10. compile (120): SPEED_COMPILE=unet with the graphs at batches 1 and 2, on sd-turbo: a cold compile (fresh cache),
   its cases, then a second setup reusing the persisted cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lib import ROOT
from lib.bench.cases import GOALS, PROMPT
from lib.bench.device import device_info, free, reset_peak
from lib.local import Metrics
from lib.settings import Settings
from lib.stats import stats_ms

BUDGET = "24GB"  # the consumer cards: RTX 4090, A10G, L4
PER_REQUEST = 4  # a goal of more images runs as concurrent requests of this many, batched
# The order of the budget step's predictions: the least recently used mode is the next one asked for.
BUDGET_ORDER = [
    "sdxl-turbo",
    "sd-turbo",
    "lcm",
    "lcm-lora-sdxl",
    "lcm-lora-sd15",
    "sdxl-lightning-4step",
    "sdxl-turbo",
    "lcm-lora-sd15",
]
COMPARED = ["sd-turbo", "sdxl-turbo", "lcm", "lcm-lora-sdxl"]  # the modes with goals, most informative first
CAPS = {  # seconds per step
    "env": 15,
    "sd-turbo": 150,
    "profile": 45,
    "sdxl-turbo": 75,
    "lcm": 60,
    "lcm-lora-sdxl": 90,
    "budget": 90,
    "realtime": 50,
    "controlnet": 60,
    "compile": 120,
}
HARD_STOP_AFTER = 15  # seconds past its cap at which a step is interrupted (where it does not stop by itself)
MIN_START = 20  # a step starts only with at least this many seconds (or its cap, if less) left
CASE_SECONDS = 4.0  # timed runs of one case stop after this long (at least MIN_RUNS)
MIN_RUNS, MAX_RUNS, WARM_RUNS = 3, 20, 2
SECTION = "gpu-check"
DRY_RUN_SLOWER = 5  # the dry run's caps: a shared CPU runs the tiny models slower than a GPU the real ones


class StepOvertime(Exception):
    """The step reached its time cap."""


class Check:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.started = time.monotonic()
        self.deadline = self.started + args.minutes * 60 * (DRY_RUN_SLOWER if self.dry else 1)
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.dtype = torch.float32 if self.dry else torch.float16
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.weights_dir = Path(args.weights or tempfile.mkdtemp(prefix="gpu-check-weights-"))
        self.written: set[tuple[str, str]] = set()  # (repo id, component) on disk
        self.data: dict = {
            "dry_run": self.dry,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "minutes": args.minutes,
            "steps": {},
        }
        self.loop = asyncio.new_event_loop()
        self.kept: dict = {}  # predictors and baselines a later step reuses (the profile)

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        write_doc(self.data, self.out / "benchmarks.md", Path(self.args.doc))
        if not self.dry:  # the repository's copy too (on the GPU machine; OUT/benchmarks.md is what comes back)
            write_doc(self.data, Path(self.args.doc), Path(self.args.doc))

    def step(self, name: str, fn) -> None:
        cap = CAPS[name] * (DRY_RUN_SLOWER if self.dry else 1)
        left = self.left()
        if left < min(cap, MIN_START):
            self.data["steps"][name] = {"skipped": f"{left:.0f} s left of the run's {self.args.minutes:g} min"}
            print(f"== {name}: skipped ({left:.0f} s left)", flush=True)
            self.save()
            return
        budget = min(cap, left)
        print(f"== {name} (cap {budget:.0f} s)", flush=True)
        result: dict = {"cap_s": round(budget)}
        self.data["steps"][name] = result
        self.step_deadline = time.monotonic() + budget
        started = time.monotonic()

        def overtime(signum, frame):
            raise StepOvertime

        previous = signal.signal(signal.SIGALRM, overtime)
        signal.setitimer(signal.ITIMER_REAL, budget + HARD_STOP_AFTER)  # the step's own checks come first
        try:
            fn(result)
        except StepOvertime:
            result["cut"] = f"reached its cap of {budget:.0f} s: later cases of this step not measured"
            print(f"   {name}: cut at its cap", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing step must not lose the others
            traceback.print_exc()
            result["error"] = f"{type(e).__name__}: {e}"[:2000]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        result["seconds"] = round(time.monotonic() - started, 1)
        self.save()

    def step_left(self) -> float:
        return self.step_deadline - time.monotonic()

    def peak_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    def free(self, keep: bool = False) -> None:
        from lib.engine import graphs

        if not keep:
            self.kept.clear()
        for task in asyncio.all_tasks(self.loop):  # the batchers' dispatchers
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        graphs.unseal()
        free(self.device)
        reset_peak(self.device)

    def size(self, size: int) -> int:
        return 256 if self.dry else size

    # -- weights -----------------------------------------------------------------------------------------------
    def weights_for(self, modes, controlnet: bool = False) -> dict:
        """The repos `modes` need (and the safety checker's) written where not yet: full size on the GPU (built
        there in fp16, one copy off the device per model, files written in background threads), tiny on the CPU."""
        from dataclasses import replace

        from lib.engine.modes import all_repos
        from lib.testkit.models import Scale, write_weights

        todo = []
        for repo in all_repos(modes, safety_checker=True, controlnet=controlnet):
            missing = tuple(c for c in repo.components if (repo.repo_id, c) not in self.written)
            if (repo.repo_id, "") not in self.written and (missing or not repo.components):
                todo.append(replace(repo, components=missing) if repo.components else repo)
        started = time.monotonic()
        files = write_weights(self.weights_dir, Scale(full=not self.dry, device=str(self.device)), repos=todo)
        seconds = time.monotonic() - started
        for repo in todo:
            self.written.update((repo.repo_id, c) for c in repo.components or ("",))
        size = sum((self.weights_dir / f).stat().st_size for f in files)
        return {
            "repos": [r.repo_id for r in todo],
            "files": len(files),
            "gb": round(size / 1e9, 2),
            "seconds": round(seconds, 1),
            "gb_per_s": round(size / 1e9 / seconds, 2) if seconds else None,
            "full_size": not self.dry,
        }

    # -- running predictions ---------------------------------------------------------------------------------
    def predictor(self, env: dict, keep: bool = False):
        """A Predictor set up as Cog does it, with `env` over the check's own settings; setup and warm-up timed."""
        from predict import Predictor

        base = {
            "WEIGHTS_DIR": str(self.weights_dir),
            "WEIGHTS_OFFLINE": "1",
            "COG_MAX_CONCURRENCY": "4",
            "ENABLED_MODES": "",
            "DEVICE_MEMORY_BUDGET": "",
            "SPEED": "",
            "SPEED_COMPILE": "",
            "SPEED_COMPILE_CACHE": "",
            "SPEED_COMPILE_BACKEND": "eager" if self.dry else "",  # inductor takes minutes on a CPU
            "SPEED_CUDA_GRAPHS": "",
            "SPEED_CUDNN_BENCHMARK": "",
            "SPEED_WARMUP": "",
            # The warm-up's own budget stops it within the step (a step's hard stop would leave it running).
            "SPEED_WARMUP_SECONDS": str(max(10, int(self.step_left() - 30))),
            "SPEED_GRAPH_BATCHES": "",
            "CONTROLNET": "",
        }
        if self.dry and env.get("SPEED") != "0":  # the CPU warms up and runs the graph dispatcher's static buffers
            base.update(SPEED_WARMUP="1", SPEED_CUDA_GRAPHS="unet", SPEED_GRAPH_BATCHES="1,2")
        for k, v in {**base, **env}.items():
            os.environ[k] = v
        self.free(keep)
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

    def controlnet(self, result: dict) -> None:
        """CONTROLNET=1: ms per denoising step with one and two ControlNets against none (lib/bench/controlnet.py)."""
        from lib.bench.controlnet import measure

        names = ("sdxl-turbo", "lcm-lora-sd15")
        result["weights"] = self.weights_for(list(names), controlnet=True)
        p = self.predictor({"ENABLED_MODES": ",".join(names), "CONTROLNET": "1"})
        result["setup_s"] = p.setup_s
        result["cases"] = {}
        for name in names:
            result["cases"][name] = measure(p.engine, name, self.size(512), 1 if self.dry else 5)
            self.save()

    def inputs(self, goal: dict) -> dict:
        size = self.size(goal["size"])
        return dict(
            prompt=PROMPT,
            mode=goal["mode"],
            width=size,
            height=size,
            num_inference_steps=goal["steps"],
            fast_decode=goal["fast_decode"],
            output_format="webp",
        )

    def run_ours(self, p, goal: dict, seed: int, metrics: Metrics) -> list:
        inputs, images = self.inputs(goal), goal["batch"]
        if images == 1:
            return self.predict(p, metrics, seed=seed, **inputs)

        async def burst():  # concurrent requests: the batcher runs them as one batch
            from lib.local import outputs, run_inputs

            p.record_metric = metrics
            calls = [
                run_inputs(p, seed=100 * seed + r, num_outputs=PER_REQUEST, **inputs)
                for r in range(images // PER_REQUEST)
            ]
            lists = await asyncio.gather(*[_collect(outputs(p, **kw)) for kw in calls])
            return [f for files in lists for f in files]

        return self.loop.run_until_complete(burst())

    def timed(self, call) -> dict:
        """`call(i)` -> (seconds, {stage: seconds}) repeated: WARM_RUNS untimed, then up to MAX_RUNS for up to
        CASE_SECONDS (at least MIN_RUNS) and within the step's cap; p50/p95 and per-stage medians."""
        warm, most, case_s = (0, 1, 60.0) if self.dry else (WARM_RUNS, MAX_RUNS, CASE_SECONDS)
        for i in range(warm):
            call(i)
        times, stages, started = [], [], time.monotonic()
        for i in range(warm, warm + most):
            if len(times) >= (1 if self.dry else MIN_RUNS) and (
                time.monotonic() - started > case_s or self.step_left() < 5
            ):
                break
            seconds, parts = call(i)
            times.append(seconds)
            stages.append(parts)
        latency = stats_ms(times)
        names = dict.fromkeys(k for s in stages for k in s)
        return {
            "p50_ms": latency["p50"],
            "p95_ms": latency["p95"],
            "n": latency["n"],
            "stages_ms": {k: round(statistics.median(s.get(k, 0.0) for s in stages) * 1000, 2) for k in names},
        }

    def time_ours(self, p, goal: dict) -> dict:
        def call(i):
            metrics = Metrics()
            started = time.perf_counter()
            files = self.run_ours(p, goal, i, metrics)
            seconds = time.perf_counter() - started
            assert len(files) == goal["batch"], (len(files), goal["batch"])
            parts = {
                k.removeprefix("timings."): v
                for k, v in metrics.items()
                if k.startswith("timings.") and isinstance(v, float)
            }
            parts["other"] = max(0.0, seconds - sum(parts.values()))
            return seconds, parts

        return self.finish_case(self.timed(call), goal)

    def time_baseline(self, base, goal: dict) -> dict:
        size = self.size(goal["size"])
        return self.finish_case(self.timed(lambda i: base(PROMPT, size, goal["batch"], seed=i)), goal)

    def finish_case(self, out: dict, goal: dict) -> dict:
        out["images_per_s"] = round(goal["batch"] / (out["p50_ms"] / 1000), 1)
        return out

    # -- the steps ---------------------------------------------------------------------------------------------
    def env(self, result: dict) -> None:
        info = device_info(self.device)
        info["kernel"] = platform.release()
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            info.update(
                capability=list(torch.cuda.get_device_capability(self.device)),
                free_gb=round(free_bytes / 2**30, 1),
                driver=_driver(),
            )
        with contextlib.suppress(ImportError):
            import triton

            info["triton"] = triton.__version__
        self.data["env"] = info
        result.update(info)

    def compare(self, mode: str, result: dict) -> None:
        """Baseline, default path and SPEED=0 on `mode`'s goals (see the module docstring)."""
        from lib.bench import baseline

        result["weights"] = self.weights_for([mode])
        self.save()
        goals = [g for g in GOALS if g["mode"] == mode]
        cases = result["cases"] = {g["name"]: {} for g in goals}
        base = baseline.load(mode, self.weights_dir, self.device, self.dtype)
        result["baseline_load_s"] = base.load_s
        for goal in goals:
            if goal["fast_decode"] and base.decoder != "taesd":
                base.use_taesd(self.weights_dir)
            cases[goal["name"]]["baseline"] = self.time_baseline(base, goal)
            self.save()
        del base
        for path, env in (("default", {}), ("plain", {"SPEED": "0"})):
            p = self.predictor({"ENABLED_MODES": mode, **env}, keep=True)
            result[f"{path}_setup"] = {"setup_s": p.setup_s, **_warmup_summary(p.engine)}
            self.save()
            for goal in goals:
                cases[goal["name"]][path] = self.time_ours(p, goal)
                self.save()
            if path == "default":
                result["graphs_vs_as_loaded"] = self.graphs_vs_as_loaded(p, goals[0])
            if mode == "sd-turbo":
                self.kept[path] = p
            del p
        for name, case in cases.items():
            goal = next(g for g in goals if g["name"] == name)
            _ratios(case, goal, self.dry)

    def graphs_vs_as_loaded(self, p, goal: dict) -> dict:
        """The same request with the recorded graphs and with the models as loaded: their pixels' difference."""
        import numpy as np
        from PIL import Image

        from lib.engine import graphs

        def pixels():
            [path] = self.predict(p, seed=11, **{**self.inputs(goal), "output_format": "png"})
            return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

        with graphs.eager():
            loaded = pixels()
        replayed = pixels()
        diff = np.abs(replayed - loaded)
        return {"max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.mean()), 4)}

    def profile(self, result: dict) -> None:
        """The sd-turbo step's predictors (default path, SPEED=0) and the card's code, profiled."""
        from lib.bench import baseline
        from lib.bench.profile import profile

        goal = GOALS[0]  # sd-turbo 512, 1 step, full VAE
        calls = 1 if self.dry else 3
        for path in ("default", "plain", "baseline"):
            if self.step_left() < 8:
                result["cut"] = "step cap reached"
                break
            if path == "baseline":
                base = baseline.load("sd-turbo", self.weights_dir, self.device, self.dtype)
                result[path] = profile(lambda b=base: b(PROMPT, self.size(goal["size"])), calls, self.device)
                del base
            elif path in self.kept:
                p = self.kept[path]
                result[path] = profile(lambda p=p: self.run_ours(p, goal, 0, Metrics()), calls, self.device)
            self.save()
        self.free()

    def budget(self, result: dict) -> None:
        from lib.engine.modes import MODES

        result["weights"] = self.weights_for(list(MODES))
        budget = BUDGET if not self.dry else self._dry_budget()
        p = self.predictor({"DEVICE_MEMORY_BUDGET": budget})
        residency = p.engine.residency
        plan = residency.plan
        result.update(
            budget=budget,
            setup_s=p.setup_s,
            plan=plan.describe(),
            resident=list(plan.resident),
            resident_after_setup=list(residency.recent),
            moves_in_setup=residency.moves,
            warmup=_warmup_summary(p.engine),
            peak_after_setup_gb=self.peak_gb(),
            predictions=[],
        )
        self.save()
        for mode_name in BUDGET_ORDER:
            if self.step_left() < 10:
                result["cut"] = "step cap reached"
                break
            size = self.size(MODES[mode_name].size)
            metrics = Metrics()
            t0 = time.perf_counter()
            files = self.predict(p, metrics, prompt=PROMPT, mode=mode_name, width=size, height=size, seed=1)
            result["predictions"].append(
                {
                    "mode": mode_name,
                    "ms": round((time.perf_counter() - t0) * 1000, 1),
                    "images": len(files),
                    "moved_s": metrics.get("timings.mode_load"),
                }
            )
            result["peak_gb"] = self.peak_gb()
            self.save()
        result["moves"] = residency.moves
        result["peak_gb"] = self.peak_gb()
        result["within_budget"] = None if self.dry else result["peak_gb"] <= 24e9 / 2**30
        del p
        self.free()

    def _dry_budget(self) -> str:
        """On the tiny models: a budget that holds about three quarters of the weights (as 24 GB does for the real
        ones beside their working memory), so that the step moves modes too."""
        from lib.engine import speed
        from lib.engine.engine import plan_memory
        from lib.engine.loading import ComponentLoader
        from lib.engine.memory import MARGIN
        from lib.engine.modes import DEFAULT_ENABLED

        # The predictor's graph dispatcher on the CPU (see predictor()): its pool counts too.
        switches = speed.Switches.from_env(self.device, cuda_graphs=("unet",), graph_batches=(1, 2))
        shapes = speed.graph_shapes(switches, DEFAULT_ENABLED)
        loader = ComponentLoader(self.device, torch.float32)
        plan = plan_memory(loader, self.weights_dir, DEFAULT_ENABLED, True, shapes, switches.graph_memory)
        return str(math.ceil((plan.working + 0.75 * plan.weights(DEFAULT_ENABLED)) / (1 - MARGIN)))

    def realtime(self, result: dict) -> None:
        """The realtime server on sd-turbo 512, 1 step, img2img with TAESD (lib/bench/realtime.py): frames/s and
        latency for 1 and 4 clients against the engine direct, cuDNN autotuning on as the server has it."""
        from lib.bench import realtime
        from lib.realtime.server import new_batcher

        p = self.predictor({"ENABLED_MODES": "sd-turbo", "SPEED_CUDNN_BENCHMARK": "1", "SPEED_WARMUP": "0"})
        batcher = new_batcher(p.engine, Settings())
        batcher.warm_up(img2img=True)
        result["warmup"] = _warmup_summary(p.engine)
        # Four direct cases and two client counts, each `seconds` long, within what the step has left.
        seconds = 1 if self.dry else min(8, max(2, (self.step_left() - 10) / 6))
        result.update(realtime.measure(p.engine, batcher, Settings(), "sd-turbo", 1, [1, 4], seconds))
        result["goals"] = realtime.GOALS
        print(realtime.table(result), flush=True)
        del p
        self.free()

    def compile(self, result: dict) -> None:
        """SPEED_COMPILE=unet on sd-turbo with the graphs: a cold compile into a fresh cache folder, the
        cases, then a second setup that finds the compiled code in that folder (in this process: a new one also
        loads the code from disk, which this leaves out)."""
        cache = Path(tempfile.mkdtemp(prefix="compile-cache-"))
        env = {
            "ENABLED_MODES": "sd-turbo",
            # The UNet, where the time goes, at batches 1 (static) and 2 (the batch dimension dynamic: what every
            # larger bucket reuses): two cold compiles of an SD UNet fit the step; the rest would not.
            "SPEED_COMPILE": "unet",
            "SPEED_GRAPH_BATCHES": "1,2",
            "SPEED_COMPILE_CACHE": str(cache),
        }
        result["targets"] = env["SPEED_COMPILE"]
        goals = [g for g in GOALS if g["mode"] == "sd-turbo" and g["batch"] == 1]
        for boot in ("cold", "warm"):
            p = self.predictor(env)
            result[f"{boot}_setup"] = {"setup_s": p.setup_s, **_warmup_summary(p.engine)}
            self.save()
            if boot == "cold":
                result["cases"] = {}
                for goal in goals:
                    result["cases"][goal["name"]] = self.time_ours(p, goal)
                    self.save()
            del p
            if self.step_left() < 30:
                break
        self.free()
        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _warmup_summary(engine) -> dict:
    """What the warm-up did, short: its time, each model's recorded batches (and whether they are graphs)."""
    report = engine.speed.get("warmup") or {}
    models = {}
    for name, model in (report.get("models") or {}).items():
        for shape, entries in model["recorded"].items():
            models[f"{name} {shape}"] = {
                "batches": [e["batch"] for e in entries],
                "graphs": sum(e["graph"] for e in entries),
                "seconds": round(sum(e["seconds"] for e in entries), 2),
                "activations_gb": max((e["activations_gb"] for e in entries), default=0),
            }
        if model["failed"]:
            models[f"{name} failed"] = model["failed"]
    summary = {
        "warmup_s": report.get("seconds"),
        "left_out": report.get("left_out"),
        "models": models,
        "reserved_growth_gb": report.get("reserved_growth_gb"),
    }
    if report.get("compile"):
        summary["compile"] = report["compile"]
    return summary


def _ratios(case: dict, goal: dict, dry: bool) -> None:
    """Each path against the baseline (p50), the goals, and where SPEED=0 is slower than the baseline, by stage."""
    base = case.get("baseline")
    for path in ("default", "plain"):
        ours = case.get(path)
        if not ours:
            continue
        if base:
            ours["vs_baseline"] = round(ours["p50_ms"] / base["p50_ms"], 3)
        if not dry:
            ours["goal_met"] = (
                ours["p50_ms"] <= goal["goal_ms"]
                if "goal_ms" in goal
                else ours["images_per_s"] >= goal["goal_images_per_s"]
            )
    plain = case.get("plain")
    if base and plain and plain["p50_ms"] > base["p50_ms"]:
        theirs, mine = base["stages_ms"], plain["stages_ms"]
        case["plain_slower_by_stage_ms"] = {
            k: round(mine.get(k, 0.0) - theirs.get(k, 0.0), 2)
            for k in dict.fromkeys([*mine, *theirs])
            if k != "steps" and abs(mine.get(k, 0.0) - theirs.get(k, 0.0)) >= 0.5
        }
    case.update({k: v for k, v in goal.items() if k.startswith("goal")})


async def _collect(agen) -> list:
    return [x async for x in agen]


# -- the doc section ----------------------------------------------------------------------------------------------
def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def render(data: dict) -> str:
    """The run's dated section of docs/benchmarks.md."""
    env, steps = data.get("env", {}), data.get("steps", {})
    date = data.get("started", "")[:10]
    dry = data.get("dry_run")
    kind = "dry run: tiny models at 256px, the plumbing only, not figures" if dry else "full-size models"
    lines = [
        f"#### GPU check: {env.get('device', '?')}, {date} ({kind})",
        "",
        f"Driver {env.get('driver', '-')}, CUDA {env.get('cuda', '-')}, compute capability "
        f"{'.'.join(map(str, env.get('capability', []))) or '-'}; torch {env.get('torch', '?')}, diffusers "
        f"{env.get('diffusers', '?')}, transformers {env.get('transformers', '?')}, Triton {env.get('triton', '-')}, "
        f"Python {env.get('python', '?')}; kernel {env.get('kernel', '?')}; {env.get('cpu_count', '?')} CPU cores. "
        f"Run of {data.get('elapsed_s', '?')} s (deadline {data.get('minutes', '?')} min). "
        + ("Tiny random weights, one prediction per case. " if dry else "Random full-size weights loaded from disk; ")
        + ("" if dry else f"p50 over up to {MAX_RUNS} predictions per case ({CASE_SECONDS:g} s) after {WARM_RUNS}; ")
        + "the safety checker on as predict() has it (the LCM card's pipeline has its own; the others none).",
        "",
        "| case | goal | card code (baseline) | default | default / baseline | SPEED=0 | SPEED=0 / baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    stage_rows = []
    for mode in COMPARED:
        for name, case in (steps.get(mode, {}).get("cases") or {}).items():
            goal = f"≤ {case['goal_ms']} ms" if "goal_ms" in case else f"≥ {case.get('goal_images_per_s')} img/s"
            cells = []
            for path in ("baseline", "default", "plain"):
                r = case.get(path)
                if not r:
                    cells.append("-")
                    continue
                value = f"{r['images_per_s']} img/s" if "goal_images_per_s" in case else f"{_ms(r['p50_ms'])} ms"
                met = {True: " ✓", False: " ✗"}.get(r.get("goal_met"), "")
                cells.append(value + met)
                stage_rows.append(
                    f"| {name} | {path} | "
                    + " | ".join(
                        _ms(r["stages_ms"].get(k))
                        for k in (
                            "text_encoding",
                            "denoising",
                            "vae_decode",
                            "safety_checker",
                            "image_encoding",
                            "other",
                        )
                    )
                    + " |"
                )
            ratio = [
                f"{case[p]['vs_baseline']:.2f}" if case.get(p, {}).get("vs_baseline") else "-"
                for p in ("default", "plain")
            ]
            lines.append(f"| {name} | {goal} | {cells[0]} | {cells[1]} | {ratio[0]} | {cells[2]} | {ratio[1]} |")
            if case.get("plain_slower_by_stage_ms"):
                slower = ", ".join(f"{k} {v:+.1f}" for k, v in case["plain_slower_by_stage_ms"].items())
                stage_rows.append(f"| {name} | SPEED=0 minus baseline | {slower} ||||||")
    if stage_rows:
        lines += [
            "",
            "Stages, p50 ms (baseline: CUDA events around its modules; other = the rest of the call):",
            "",
            "| case | path | text encoding | denoising | decode | safety checker | image encoding | other |",
            "|---|---|---|---|---|---|---|---|",
            *stage_rows,
        ]
    setup_rows = []
    for mode in COMPARED:
        step = steps.get(mode, {})
        for path in ("default", "plain"):
            s = step.get(f"{path}_setup")
            if s:
                graphs = sum(m.get("graphs", 0) for m in s.get("models", {}).values() if isinstance(m, dict))
                setup_rows.append(
                    f"| {mode} | {path} | {s['setup_s']} | {s.get('warmup_s') or '-'} | {graphs} | "
                    f"{step.get('graphs_vs_as_loaded', {}).get('max_abs_diff', '-') if path == 'default' else '-'} |"
                )
        if step.get("weights"):
            w = step["weights"]
            setup_rows.append(
                f"| {mode} | weights written | {w['seconds']} ({w['gb']} GB, {w['gb_per_s']} GB/s) | | | |"
            )
    if setup_rows:
        lines += [
            "",
            "Setup, s (load + warm-up), CUDA graphs recorded, and the largest pixel difference between the graphs and "
            "the models as loaded on one request:",
            "",
            "| mode | path | setup s | warm-up s | graphs | graphs vs as loaded |",
            "|---|---|---|---|---|---|",
            *setup_rows,
        ]
    prof = steps.get("profile", {})
    rows = [
        f"| {path} | {r['wall_ms']} | {r['device_busy_ms']} | {r['device_busy_share']} | {r['kernels_per_call']} | "
        f"{r['kernel_launches_per_call']} | {r['graph_launches_per_call']} | "
        f"{sum(r['host_syncs_per_call'].values()):.0f} | {r['torch_reported_syncs_per_call']} |"
        for path, r in prof.items()
        if isinstance(r, dict) and "wall_ms" in r
    ]
    if rows:
        lines += [
            "",
            "Profile, sd-turbo 512 full VAE, per prediction (torch.profiler):",
            "",
            "| path | wall ms | device busy ms | busy share | kernels | kernel launches | graph launches | host syncs "
            "(CUDA API) | syncs torch reports |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    budget = steps.get("budget", {})
    if budget.get("predictions"):
        moved = [
            f"{p['mode']} {p['ms']:.0f} ms" + (f" (moved {p['moved_s']:.1f} s)" if p["moved_s"] else "")
            for p in budget["predictions"]
        ]
        lines += [
            "",
            f"Memory budget {_budget(budget['budget'])}: setup {budget['setup_s']} s, resident "
            f"{', '.join(budget['resident'])} "
            f"(after the warm-up: {', '.join(budget['resident_after_setup'])}); peak {budget.get('peak_gb')} GiB"
            + (f", within the budget: {budget['within_budget']}" if budget.get("within_budget") is not None else "")
            + f"; {budget.get('moves', '-')} moves; predictions: {'; '.join(moved)}.",
        ]
    realtime = steps.get("realtime", {})
    if realtime.get("server"):
        from lib.bench.realtime import table

        counts = {group: {int(k): v for k, v in realtime[group].items()} for group in ("direct", "server")}
        lines += ["", "Realtime, sd-turbo 512 img2img TAESD:", "", table({**realtime, **counts})]
    comp = steps.get("compile", {})
    if comp.get("cold_setup"):
        cold, warm = comp["cold_setup"], comp.get("warm_setup", {})
        cold_compile, warm_compile = cold.get("compile", {}), warm.get("compile", {})
        cases = ", ".join(f"{n} {_ms(c['p50_ms'])} ms" for n, c in comp.get("cases", {}).items())
        lines += [
            "",
            f"Compile (SPEED_COMPILE={comp.get('targets', '?')} with the graphs, sd-turbo): cold setup "
            f"{cold['setup_s']} s (compiling "
            f"{cold_compile.get('compile_s', '-')} s), warm-cache setup {warm.get('setup_s', '-')} s (compiling "
            f"{warm_compile.get('compile_s', '-')} s, FX graph cache {warm_compile.get('fx_graph_cache', '-')}); "
            f"{cases}.",
        ]
    notes = [
        f"{name}: {s.get('skipped') or s.get('cut') or s.get('error', '')[:200]}"
        for name, s in steps.items()
        if s.get("skipped") or s.get("cut") or s.get("error")
    ]
    timing = ", ".join(
        f"{name} {s.get('seconds', 0)}/{s.get('cap_s', '-')} s" for name, s in steps.items() if "cap_s" in s
    )
    lines += ["", f"Steps (time used / cap): {timing}."]
    if notes:
        lines += ["", "Not complete: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def _budget(text: str) -> str:
    from lib.engine.memory import human

    return human(int(text)) if text.isdigit() else text


def write_doc(data: dict, target: Path, source: Path) -> None:
    """`source` (docs/benchmarks.md) with this run's section replaced or added, written to `target`."""
    from lib.bench.render import update_doc

    if target != source and source.is_file():
        shutil.copyfile(source, target)
    name = f"{SECTION}-{'dry-run' if data.get('dry_run') else slug_of(data)}"
    update_doc(target, name, render(data))


def slug_of(data: dict) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", data.get("env", {}).get("device", "gpu").lower()).strip("-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny models at 256px, one run per case")
    parser.add_argument("--out", default=str(Settings().out), help="folder of gpu_check.json and benchmarks.md")
    parser.add_argument("--minutes", type=float, default=8.0, help="no step starts after this long")
    parser.add_argument("--weights", help="a folder for the weights (default: a temp folder)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="the doc the section goes in")
    parser.add_argument("--render", type=Path, metavar="JSON", help="write JSON's section into --doc, run nothing")
    args = parser.parse_args(argv)
    if args.render:
        write_doc(json.loads(args.render.read_text()), Path(args.doc), Path(args.doc))
        print(f"{args.doc}: section from {args.render}")
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on a GPU machine, or with --dry-run")
    check = Check(args)
    check.step("env", check.env)
    for mode in COMPARED[:1]:
        check.step(mode, lambda r, mode=mode: check.compare(mode, r))
    check.step("profile", check.profile)
    for mode in COMPARED[1:]:
        check.step(mode, lambda r, mode=mode: check.compare(mode, r))
    check.step("budget", check.budget)
    check.step("realtime", check.realtime)
    check.step("controlnet", check.controlnet)
    check.step("compile", check.compile)
    check.free()
    errors = [name for name, s in check.data["steps"].items() if "error" in s]
    print(render(check.data))
    print(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'benchmarks.md'}")
    if errors:
        print(f"steps with errors: {', '.join(errors)}")
    return 1 if errors else 0
