"""VAE (or TAESD) encode (img2img input) and decode (output), done by the engine rather than inside the pipelines so
that a batch's images are decoded in as few calls as memory allows, each stage timed, and the pixels handed to the
host without blocking the device thread."""

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
    encoded = vae.encode(pixels)
    # The VAE's distribution's mode, not a sample: img2img noise comes from the per-image seeds alone. TAESD
    # (AutoencoderTiny) gives its latents directly.
    latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mode()
    scaling, shift = _scale(vae)
    return ((latents - shift) * scaling).to(dtype)


@torch.inference_mode()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> N images as uint8 (N, H, W, 3) on the latents' device, in one call."""
    scaling, shift = _scale(vae)
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / scaling + shift).sample
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_host(pixels: torch.Tensor) -> torch.Tensor:
    """The pixels copied to host memory without waiting (pinned memory; a CUDA event says when they are there).
    Elsewhere a plain copy: MPS has neither pinned memory nor events (the copy waits for the decode)."""
    if pixels.device.type != "cuda":
        return pixels.cpu()  # the same tensor where it is on the CPU already
    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    return host


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Host uint8 (N, H, W, 3) -> N PIL images."""
    return [Image.fromarray(a) for a in pixels.numpy()]


def decode_bytes(vae, width: int, height: int) -> int:
    """About how much memory decoding one image of this size takes (lib/engine/memory.py's estimate)."""
    from lib.engine.memory import vae_bytes

    channels = (
        vae.config.block_out_channels[0]
        if hasattr(vae.config, "block_out_channels")
        else vae.config.decoder_block_out_channels[0]
    )
    return vae_bytes(width, height, channels, vae.dtype)
