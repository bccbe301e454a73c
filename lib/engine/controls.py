"""ControlNet: the control maps made in-process from a request's control image, the depth estimator, and the pipeline
keyword arguments that hand the maps to the mode's ControlNets.

A control image is first fitted to the output size as the img2img input is (scaled and centre-cropped, never
stretched), then turned into the map its kind asks for (lib/engine/modes.py, CONTROL_KINDS):
- canny: OpenCV's Canny edges (thresholds 100 and 200, as diffusers' ControlNet examples), white on black;
- depth: Depth Anything V2 Small through transformers, as its model card computes it (near is bright);
- scribble: lines drawn on a light background (a sketch, the realtime canvas) become white lines on black;
- edge_map, depth_map: the image already is the map, used as it is.
The ControlNets are the mode's own modules (lib/engine/loading.py loads them where CONTROLNET=1); their pipelines
share every other module with the mode's plain ones.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib.engine.loading import WeightsMissingError, repo_dir
from lib.engine.modes import DEPTH_ANYTHING, DEPTH_ESTIMATOR_FILES

log = logging.getLogger(__name__)

CANNY_THRESHOLDS = (100, 200)
# A scribble's line: a pixel at least this far (0-255, in any channel) from white. Pale colours stay background.
SCRIBBLE_INK = 64


def canny(picture: Image.Image) -> Image.Image:
    """The edges of an RGB picture, as diffusers' ControlNet examples compute them, in three channels."""
    edges = cv2().Canny(np.asarray(picture), *CANNY_THRESHOLDS)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def scribble(picture: Image.Image) -> Image.Image:
    """Lines drawn on a light background -> white lines on black, the edge map the canny ControlNet reads."""
    ink = (255 - np.asarray(picture, dtype=np.int16)).max(axis=2) >= SCRIBBLE_INK
    return Image.fromarray(np.repeat((ink * 255).astype(np.uint8)[:, :, None], 3, axis=2))


def cv2():
    import cv2 as opencv  # imported on first use: a server without ControlNet never loads it

    return opencv


def depth_estimator_file(weights_dir: Path) -> Path:
    """The depth estimator's weight file (what the memory plan counts)."""
    return repo_dir(weights_dir, DEPTH_ANYTHING) / "model.safetensors"


class DepthEstimator:
    """Depth Anything V2 Small: picture -> a depth map of the same size (near is bright), one call at a time."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        self.model, self.processor, self.device, self.dtype = model, processor, torch.device(device), dtype
        self._lock = threading.Lock()  # requests are prepared in threads; one forward at a time keeps memory bounded

    @classmethod
    def load(cls, weights_dir: Path, device: torch.device, dtype: torch.dtype) -> DepthEstimator:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        folder = repo_dir(weights_dir, DEPTH_ANYTHING)
        missing = [f"{DEPTH_ANYTHING.repo_id}/{f}" for f in DEPTH_ESTIMATOR_FILES if not (folder / f).is_file()]
        if missing:
            raise WeightsMissingError(
                f"depth estimator weights missing in {Path(weights_dir).resolve()}: {', '.join(missing)}; fetch them "
                "with the other weights (setup does where CONTROLNET=1, unless WEIGHTS_OFFLINE=1)"
            )
        started = time.perf_counter()
        model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=dtype)
        model.to(device).eval().requires_grad_(False)
        processor = AutoImageProcessor.from_pretrained(folder)
        log.info("loaded the depth estimator in %.1f s", time.perf_counter() - started)
        return cls(model, processor, device, dtype)

    @torch.inference_mode()
    def __call__(self, picture: Image.Image) -> Image.Image:
        inputs = self.processor(images=picture, return_tensors="pt")
        with self._lock:
            outputs = self.model(pixel_values=inputs.pixel_values.to(self.device, self.dtype))
        # The model card's post-processing: the predicted depth at the picture's size, scaled to 0-255.
        post = self.processor.post_process_depth_estimation(outputs, target_sizes=[(picture.height, picture.width)])
        depth = post[0]["predicted_depth"].float()
        span = depth.max() - depth.min()
        depth = (depth - depth.min()) / span if span > 0 else torch.zeros_like(depth)  # a flat scene: no depth cues
        gray = (depth.cpu().numpy() * 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def control_map(kind: str, picture: Image.Image, depth: DepthEstimator | None) -> Image.Image:
    """The map a control of `kind` hands its ControlNet, from an RGB picture already fitted to the output size."""
    if kind == "canny":
        return canny(picture)
    if kind == "scribble":
        return scribble(picture)
    if kind == "depth":
        if depth is None:
            raise RuntimeError("a depth control needs the depth estimator, which is not loaded")
        return depth(picture)
    return picture  # edge_map, depth_map: the picture is the map


def as_tensor(maps: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) float 0-1, as diffusers' image processor converts them."""
    return torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) / 255.0 for m in maps])).permute(0, 3, 1, 2)


def pipeline_kwargs(controls, maps: list[list[Image.Image]], img2img: bool) -> dict:
    """The ControlNet arguments of a pipeline call: `maps[k]` holds control k's map for every image of the batch. One
    control is passed as diffusers' single-ControlNet form, two as per-net lists (MultiControlNetModel). Each net's
    maps go as one (N, 3, H, W) tensor of 0-1 values, the pipelines' form of a batch of PIL images (and the only one
    they take for several nets)."""
    batches = [as_tensor(net_maps) for net_maps in maps]
    images = batches[0] if len(controls) == 1 else batches
    scale = [c.scale for c in controls]
    start = [c.start for c in controls]
    end = [c.end for c in controls]
    kwargs = {
        "control_image" if img2img else "image": images,
        "controlnet_conditioning_scale": scale[0] if len(controls) == 1 else scale,
        "control_guidance_start": start[0] if len(controls) == 1 else start,
        "control_guidance_end": end[0] if len(controls) == 1 else end,
    }
    return kwargs
