"""The standard Stable Diffusion safety checker, run on every batch's decoded images.

One checker for every mode: `StableDiffusionSafetyChecker` (a CLIP ViT-L/14 image tower and 17 + 3 concept
embeddings with thresholds) and its `CLIPImageProcessor`, from the SD 1.5 repo's `safety_checker/`
(model.fp16.safetensors) and `feature_extractor/` folders (`SAFETY_CHECKER` in lib/engine/modes.py, fetched with the
weights). It runs once per batch on all of the batch's images whose request did not set
`disable_safety_checker`; the engine drops flagged images (lib/engine/engine.py).

SAFETY_CHECKER=0 leaves it out entirely (not fetched, not loaded; `disable_safety_checker` then changes nothing).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from lib.engine.loading import WeightsMissingError, repo_dir
from lib.engine.modes import SAFETY_CHECKER, repo_files, weight_file
from lib.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["AllImagesFlagged", "SafetyChecker", "load_from_env", "weights_path"]


def check_present(weights_dir: Path) -> None:
    folder = repo_dir(weights_dir, SAFETY_CHECKER)
    missing = [f"{SAFETY_CHECKER.repo_id}/{f}" for f in repo_files(SAFETY_CHECKER) if not (folder / f).is_file()]
    if missing:
        raise WeightsMissingError(
            f"safety checker weights missing in {Path(weights_dir).resolve()}:\n  "
            + "\n  ".join(missing)
            + "\nFetch them with the other weights (setup does, unless WEIGHTS_OFFLINE=1), or set "
            "SAFETY_CHECKER=0 to run without the safety checker."
        )


def weights_path(weights_dir: Path) -> Path:
    """The checker's weight file (what the memory plan counts)."""
    return repo_dir(weights_dir, SAFETY_CHECKER) / weight_file(SAFETY_CHECKER, "safety_checker")


class AllImagesFlagged(RuntimeError):
    """Every image of a request was flagged: the request fails (the others of its batch go on)."""

    def __init__(self, count: int):
        super().__init__(
            f"all {count} image(s) were flagged by the safety checker as possibly not safe for work "
            "(NSFW) and dropped; try another prompt or seed"
        )


class SafetyChecker:
    """flagged(images) -> one bool per image, computed in one batched forward (chunks of `max_batch`)."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype, max_batch: int = 32):
        self.model, self.processor = model, processor
        self.device, self.dtype, self.max_batch = torch.device(device), dtype, max_batch
        # The CLIP preprocessing (PIL resize to 224 px, crop, normalise) runs on the CPU and, for a batch of large
        # images, costs more than the checker's forward on a GPU: it is split over a few threads (PIL releases
        # the GIL). Same pixels as one call: each image is processed on its own either way.
        self._threads = max(1, min(4, (os.cpu_count() or 1) // 2))
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="safety") if self._threads > 1 else None

    @classmethod
    def load(cls, weights_dir: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        folder = repo_dir(weights_dir, SAFETY_CHECKER)
        check_present(weights_dir)
        started = time.perf_counter()
        model = StableDiffusionSafetyChecker.from_pretrained(
            folder / "safety_checker", variant=SAFETY_CHECKER.variant, dtype=dtype
        )
        model.to(device).eval().requires_grad_(False)
        processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
        log.info("loaded the safety checker in %.1f s", time.perf_counter() - started)
        return cls(model, processor, device, dtype)

    @torch.inference_mode()
    def flagged(self, images: list[Image.Image]) -> list[bool]:
        """Whether each image shows a concept the checker flags (the real checker's forward decides)."""
        result: list[bool] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            pixels = self._pixels(chunk)
            # `images` is only blacked out in place by the checker; a placeholder of one value per image will do.
            _, nsfw = self.model(clip_input=pixels.to(self.device, self.dtype), images=torch.zeros(len(chunk), 1))
            result += [bool(x) for x in nsfw]
        return result

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        def run(part):
            return self.processor(images=part, return_tensors="pt").pixel_values

        if self._pool is None or len(images) < 4:
            return run(images)
        step = -(-len(images) // self._threads)
        return torch.cat(list(self._pool.map(run, [images[i : i + step] for i in range(0, len(images), step)])))


def load_from_env(weights_dir: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker | None:
    """The checker, or None where SAFETY_CHECKER=0."""
    if not Settings().safety_checker:
        log.info("safety checker off (SAFETY_CHECKER=0): images are not checked")
        return None
    return SafetyChecker.load(weights_dir, device, dtype)
