"""The standard Stable Diffusion safety checker, run on every batch's decoded images.

One checker for every mode: `StableDiffusionSafetyChecker` (a CLIP ViT-L/14 image tower and 17 + 3 concept
embeddings with thresholds) and its `CLIPImageProcessor`, from the SD 1.5 repo's `safety_checker/`
(model.fp16.safetensors) and `feature_extractor/` folders (`SAFETY_CHECKER` in lib/engine/modes.py, fetched with the
weights). It runs on the device thread right after each decode, on the decoded pixels of the batch's images whose
request did not set `disable_safety_checker`, and its verdicts come back to the host in one copy per batch; the
engine drops flagged images (lib/engine/engine.py).

SAFETY_CHECKER=0 leaves it out entirely (not fetched, not loaded; `disable_safety_checker` then changes nothing).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
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
    """check(pixels) -> one verdict per image, on the device, from the decoded uint8 pixels (chunks of `max_batch`).

    The real checker's preprocessing and decision, on the device and vectorised:
    - CLIPImageProcessor's steps from its config: the shortest side resized to 224 (antialiased bicubic, PIL's
      kernel, in PIL's two passes, each rounded to 8 bits), the centre 224 x 224 crop, rescaled and normalised with
      its mean and std. PIL's fixed-point filter rounds differently on under 1% of the pixels, by a level or two;
    - the CLIP image tower, the projection, the cosine similarities to the 17 concepts and 3 special-care concepts;
    - StableDiffusionSafetyChecker.forward's rule: an image with any special-care score above 0 gets 0.01 added to
      its concept scores, and any concept score above 0 flags it, each score rounded to 3 decimals first (as its
      per-image loop does with `round(score, 3)`: above 0 when score x 1000 is above 0.5).
    Nothing waits for the device: the caller copies the verdicts to the host once per batch."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype, max_batch: int = 32):
        self.model, self.processor = model, processor
        self.device, self.dtype, self.max_batch = torch.device(device), dtype, max_batch
        p = processor
        if p.do_resize and int(p.resample) not in RESAMPLING:
            raise ValueError(f"safety checker: the feature extractor's resample {p.resample} is not supported")
        self.resize = p.size["shortest_edge"] if p.do_resize else None
        self.crop = (p.crop_size["height"], p.crop_size["width"]) if p.do_center_crop else None
        self.scale = p.rescale_factor if p.do_rescale else None
        channel = (1, 3, 1, 1)
        self.mean = torch.tensor(p.image_mean, device=self.device).view(channel) if p.do_normalize else None
        self.std = torch.tensor(p.image_std, device=self.device).view(channel) if p.do_normalize else None
        self.mode = RESAMPLING.get(int(p.resample), "bicubic")

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
    def check(self, pixels: torch.Tensor) -> torch.Tensor:
        """Decoded images as uint8 (N, H, W, 3) on the device -> whether each is flagged, bool (N,) on the device."""
        verdicts = [
            self.verdicts(self.preprocess(pixels[start : start + self.max_batch]))
            for start in range(0, len(pixels), self.max_batch)
        ]
        return torch.cat(verdicts) if verdicts else torch.zeros(0, dtype=torch.bool, device=pixels.device)

    def flagged(self, images: list[Image.Image]) -> list[bool]:
        """check() for PIL images (the warm-up, tools): each image's verdict, on the host."""
        import numpy as np

        verdicts = [self.check(torch.from_numpy(np.asarray(im.convert("RGB"))).to(self.device)[None]) for im in images]
        return [bool(v) for v in torch.cat(verdicts).cpu()] if verdicts else []

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> CLIP's input (N, 3, 224, 224) in the checker's dtype, as CLIPImageProcessor has it."""
        x = pixels.to(self.device).permute(0, 3, 1, 2).float()
        if self.resize is not None:
            height, width = x.shape[-2:]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.resize * long / short)  # transformers' get_resize_output_image_size
            size = (new_long, self.resize) if width <= height else (self.resize, new_long)
            # PIL resizes 8-bit images in two passes, the width first, each rounded and clipped to 8 bits.
            for step in ((height, size[1]), size):
                if step != tuple(x.shape[-2:]):
                    x = F.interpolate(x, size=step, mode=self.mode, antialias=True, align_corners=False)
                    x = x.round().clamp(0, 255)
        if self.crop is not None:
            x = center_crop(x, *self.crop)
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.to(self.dtype)

    def verdicts(self, clip_input: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        model = self.model
        image_embeds = model.visual_projection(model.vision_model(clip_input)[1])
        special = cosine_distance(image_embeds, model.special_care_embeds).float()
        concepts = cosine_distance(image_embeds, model.concept_embeds).float()
        special_care = above_zero(special - model.special_care_embeds_weights.float()).any(dim=1)
        adjustment = special_care.float()[:, None] * 0.01
        return above_zero(concepts - model.concept_embeds_weights.float() + adjustment).any(dim=1)


RESAMPLING = {2: "bilinear", 3: "bicubic"}  # PIL's resample codes that torch's antialiased interpolation matches


def above_zero(scores: torch.Tensor) -> torch.Tensor:
    """round(score, 3) > 0, as the checker's loop decides (NumPy rounds half to even: 0.0005 rounds to 0)."""
    return scores * 1000 > 0.5


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' center_crop: the middle (top and left rounded down), zero-padded where the image is smaller."""
    h, w = x.shape[-2:]
    if h < height or w < width:
        pad_h, pad_w = max(0, height - h), max(0, width - w)
        top, left = -(-pad_h // 2), -(-pad_w // 2)  # ceil, as transformers pads
        x = F.pad(x, (left, pad_w - left, top, pad_h - top))
        h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]


def load_from_env(weights_dir: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker | None:
    """The checker, or None where SAFETY_CHECKER=0."""
    if not Settings().safety_checker:
        log.info("safety checker off (SAFETY_CHECKER=0): images are not checked")
        return None
    return SafetyChecker.load(weights_dir, device, dtype)
