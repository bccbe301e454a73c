"""The cost of ControlNet per denoising step: one and two ControlNets against the same mode without, in one process.

  python scripts/bench_controlnet.py                      # CPU: full-size random lcm-lora-sd15 at 256px
  python scripts/bench_controlnet.py --device cuda --size 512 --modes sdxl-turbo lcm-lora-sd15 lcm-lora-sdxl

Models are full size with random weights (lib/testkit/models.py; speed does not depend on weight values), the
ControlNets those of lib/engine/modes.py. Each case runs through the engine (prompt encoding, the pipeline call with
its ControlNet arguments, the decode) at the mode's default steps and guidance; the figure is the median time of a
denoising step (the engine's per-step timings), over `--repeats` runs after one warm-up run, the cases taking
turns. The maps are ready-made
(edge_map, depth_map): the preprocessing is not part of the per-step cost. The GPU check runs `measure` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from PIL import Image

from lib.bench.device import device_info

CASES = {  # name -> the controls' kinds
    "none": (),
    "one ControlNet (canny)": ("edge_map",),
    "two ControlNets (canny + depth)": ("edge_map", "depth_map"),
}


def measure(engine, mode_name: str, size: int, repeats: int) -> dict:
    """Median ms per denoising step for each case, and its ratio to the mode without a control."""
    from lib.engine.inputs import resolve_request

    picture = Image.effect_mandelbrot((size, size), (-2, -1.5, 1, 1.5), 60).convert("RGB")  # something with edges
    requests = {}
    for name, kinds in CASES.items():
        specs = [
            {"name": prefix, "kind": kind, "size": (size, size)}
            for prefix, kind in zip(("control", "control_2"), kinds, strict=False)
        ]
        requests[name] = resolve_request(
            enabled=engine.enabled,
            prompt="a lighthouse at dusk",
            mode=mode_name,
            seed=0,
            width=size,
            height=size,
            controls=specs,
            controlnet=bool(specs),
            disable_safety_checker=True,
        )
    steps: dict = {name: [] for name in CASES}
    # The cases take turns, run after run: a machine busy with other work slows them alike.
    for run in range(repeats + 1):
        for name, kinds in CASES.items():
            metrics: dict = {}
            with tempfile.TemporaryDirectory() as tmp:
                job = engine.job(requests[name], tmp, metrics.__setitem__, control_pictures=[picture] * len(kinds))
                for _ in engine.run_batch([job]):
                    pass
            if run:  # the first run warms up
                steps[name] += metrics["timings.steps"]
    results = {
        name: {"step_ms": round(statistics.median(steps[name]) * 1000, 2), "steps": requests[name].num_inference_steps}
        for name in CASES
    }
    base = results["none"]["step_ms"]
    for r in results.values():
        r["ratio"] = round(r["step_ms"] / base, 3)
    return results


def build_engine(mode_names, device: torch.device, dtype: torch.dtype):
    """The engine around full-size random modes and their ControlNets, built in memory."""
    from lib.engine.engine import Engine
    from lib.engine.modes import MODES
    from lib.testkit.models import Scale, build_controlnet, build_modes

    modes = build_modes(mode_names, device=device, dtype=dtype)
    built: dict = {}
    for name, loaded in modes.items():
        for net in ("canny", "depth"):
            repo = MODES[name].controlnets.repo(net)
            if repo.repo_id not in built:
                built[repo.repo_id] = build_controlnet(repo, Scale(full=True, device=str(device)), dtype)
            loaded.controlnets[net] = built[repo.repo_id]
    return Engine(modes, device, dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["lcm-lora-sd15"])
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    report = {"device": device_info(device), "size": args.size, "date": time.strftime("%Y-%m-%d"), "modes": {}}
    for name in args.modes:
        engine = build_engine([name], device, dtype)
        report["modes"][name] = measure(engine, name, args.size, args.repeats)
        del engine
        print(f"| {name} {args.size}px | " + " | ".join(
            f"{r['step_ms']} ms ({r['ratio']}x)" for r in report["modes"][name].values()
        ) + " |", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0
