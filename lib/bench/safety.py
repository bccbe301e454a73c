"""The safety checker on decoded pixels (lib/engine/safety.py) against diffusers' way, in one process.

  python scripts/bench_safety.py                    # the tiny checker: preprocessing and decision dominate
  python scripts/bench_safety.py --full --device cuda  # the full-size CLIP-L checker (random weights)

"diffusers" is what the engine did before and what a diffusers pipeline does: the decoded uint8 pixels to PIL
images, CLIPImageProcessor on them, StableDiffusionSafetyChecker.forward (its per-image loop of host reads).
"device" is SafetyChecker.check on the same pixels as one tensor on the device. Both give the same verdicts
(tests/test_safety.py); this measures ms per image and the ratio, per image size, and prints Markdown rows.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from lib.stats import stats_ms


def checker_for(full: bool, device: torch.device, dtype: torch.dtype):
    from lib.engine.safety import SafetyChecker
    from lib.testkit import models

    if full:
        return models.build_safety_checker(device=device, dtype=dtype)
    return SafetyChecker.load(models.use_tiny_weights(), device, dtype)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of fn() over `repeats` runs after one warm run (the device waited for each time)."""
    fn()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs.append(time.perf_counter() - started)
    return stats_ms(runs)["p50"]


def measure(checker, size: int, images: int, repeats: int) -> dict:
    device = checker.device
    rng = np.random.default_rng(0)
    host = torch.from_numpy(rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8))
    pixels = host.to(device)

    @torch.inference_mode()
    def diffusers_way():
        pictures = [Image.fromarray(a) for a in pixels.cpu().numpy()]
        clip_input = checker.processor(images=pictures, return_tensors="pt").pixel_values
        checker.model(clip_input=clip_input.to(device, checker.dtype), images=np.zeros((images, 1)))

    def device_way():
        checker.check(pixels).cpu()

    old, new = timed(diffusers_way, repeats, device), timed(device_way, repeats, device)
    return {
        "size": size,
        "images": images,
        "diffusers_ms_per_image": round(old / images, 2),
        "device_ms_per_image": round(new / images, 2),
        "ratio": round(old / new, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full-size checker (random weights), not the tiny one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    checker = checker_for(args.full, device, dtype)
    print("| size | images | diffusers ms/image | on the device ms/image | ratio |")
    print("|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        r = measure(checker, size, args.images, args.repeats)
        print(
            f"| {r['size']} | {r['images']} | {r['diffusers_ms_per_image']} | {r['device_ms_per_image']} "
            f"| {r['ratio']}x |"
        )
