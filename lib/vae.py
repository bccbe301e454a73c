"""VAE encode (img2img input) and decode (output), done by the engine rather than inside the pipelines so
that each image can be decoded and handed out as soon as it is ready, and each stage can be timed."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _scale(vae) -> tuple[float, float]:
    config = vae.config
    return config.scaling_factor, getattr(config, "shift_factor", None) or 0.0


@torch.inference_mode()
def encode(vae, image: Image.Image, dtype: torch.dtype) -> torch.Tensor:
    """RGB image -> scaled latents (1, C, H/8, W/8), as the img2img pipelines take them directly."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    pixels = pixels.to(vae.device, vae.dtype) / 127.5 - 1.0
    # The distribution's mode, not a sample: img2img noise comes from the per-image seeds alone.
    latents = vae.encode(pixels).latent_dist.mode()
    scaling, shift = _scale(vae)
    return ((latents - shift) * scaling).to(dtype)


@torch.inference_mode()
def decode(vae, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents (N, C, h, w) -> N RGB images."""
    scaling, shift = _scale(vae)
    pixels = vae.decode(latents.to(vae.dtype) / scaling + shift).sample
    pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]
