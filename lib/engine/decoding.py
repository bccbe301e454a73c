"""VAE (or TAESD) encode (img2img input) and decode (output), done by the engine rather than inside the pipelines so
that a batch's images are decoded in as few calls as memory allows (in tiles when one image does not fit), each
stage timed, and the pixels handed to the host without blocking the device thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from lib.engine.memory import LATENT_FACTOR, decoder_width, vae_bytes


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


TILE = 512  # pixels: the side of the tiled decode's tiles (the fallback when one image does not fit)


@torch.inference_mode()
def decode(vae, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> N images as uint8 (N, H, W, 3) on the latents' device, in one call. `tiled`:
    in overlapping TILE x TILE tiles, blended (diffusers' tiled decode): a fraction of the memory, seams smoothed
    over but not exactly the whole image's pixels."""
    scaling, shift = _scale(vae)
    latents = latents.to(vae.device, vae.dtype) / scaling + shift
    with tiles(vae) if tiled else contextlib.nullcontext():
        pixels = vae.decode(latents).sample
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@contextlib.contextmanager
def tiles(vae) -> Iterator[None]:
    """The decoder (AutoencoderKL or AutoencoderTiny) decodes in TILE-pixel tiles inside the block."""
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size")
    saved = {name: getattr(vae, name) for name in names}
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, TILE, TILE // LATENT_FACTOR
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


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
    return vae_bytes(width, height, decoder_width(vae.config), vae.dtype)
