"""Which dtypes run where: by what the device does natively, never by what it can emulate.

- CPU: float32 (fp16 and bf16 convolutions on a CPU are many times slower).
- CUDA: float16 for the UNets, text encoders, TAESDs, the safety checker and the VAEs that are fp16-safe (SD 1.5's,
  SD 2.1's / SD Turbo's). bfloat16 is native only at compute capability 8.0 and above (Ampere and later):
  `torch.cuda.is_bf16_supported()` also counts emulation, so the capability decides.
- Only a VAE whose own config says `force_upcast: true` (SDXL's: its fp16 activations overflow) is upcast:
  to bfloat16 where native (fp32's range at half the bytes and at tensor-core speed), else to float32.
  AutoencoderKL's *default* for that key is also true, so a config that does not mention it (SD 1.5's,
  SD Turbo's) is not taken as asking for it.
- T4-class cards (compute capability 7.x: T4, V100): float16 everywhere, the SDXL VAE in float32 (about
  twice the decode time of fp16); `fast_decode` (TAESDXL, fp16-safe) avoids that cost. MODEL_DTYPE=bfloat16 is
  refused there instead of running emulated.
- MPS (Apple silicon): float16, as diffusers' MPS guide runs it (fp32, as Replicate's LCM-on-Mac script ran it, is
  safe but twice the memory: MODEL_DTYPE=float32). The VAEs that force an upcast (SDXL's) in float32: fp16 SDXL VAEs
  give black or NaN images on Apple GPUs, and bfloat16 there is newer than what this package was checked against.
  (The other known MPS failure, NaN images from sliced attention in SDXL, cannot happen: the engine never slices
  attention; it runs torch's SDPA kernel, which MPS has.) Not measured on a Mac: docs/serving.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = ("float16", "bfloat16", "float32")
NATIVE_BF16 = (8, 0)


@dataclass(frozen=True)
class Precision:
    model: torch.dtype  # every module but the upcast VAEs
    upcast_vae: torch.dtype  # the VAEs whose config forces an upcast
    native_bf16: bool


def needs_upcast(config) -> bool:
    """The VAE's config itself asks for an upcast (diffusers records the keys it filled with defaults)."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    return bool(get("force_upcast", False)) and "force_upcast" not in (get("_use_default_values", None) or ())


def choose(device: torch.device, capability: tuple[int, int] | None = None, requested: str | None = None) -> Precision:
    """The dtypes for `device` (CUDA: of compute `capability`, read from the device when not given); `requested`
    is MODEL_DTYPE."""
    device = torch.device(device)
    if requested is not None and requested not in DTYPES:
        raise ValueError(f"MODEL_DTYPE: {requested!r} is not a dtype; allowed: {', '.join(DTYPES)}")
    if device.type == "mps":
        return Precision(getattr(torch, requested or "float16"), torch.float32, native_bf16=False)
    if device.type != "cuda":
        return Precision(getattr(torch, requested or "float32"), torch.float32, native_bf16=False)
    capability = capability or torch.cuda.get_device_capability(device)
    native = tuple(capability) >= NATIVE_BF16
    if requested == "bfloat16" and not native:
        raise ValueError(
            f"MODEL_DTYPE: bfloat16 needs compute capability {NATIVE_BF16[0]}.{NATIVE_BF16[1]} or above "
            f"(Ampere and later); this GPU's is {capability[0]}.{capability[1]}, where bfloat16 is only "
            "emulated; allowed here: float16, float32"
        )
    model = getattr(torch, requested or "float16")
    upcast = torch.float32 if model == torch.float32 else (torch.bfloat16 if native else torch.float32)
    return Precision(model, upcast, native)
