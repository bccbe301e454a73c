"""Validation of prediction inputs against the mode table.

Cog checks inputs against its schema only when the built image carries one, so every value can arrive
here unchecked: each check names the input, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass

from lib.engine.modes import CONTROL_KINDS, CONTROL_PIPELINE_CLASSES, DEFAULT_MODE, LCM, MODES, Mode, control_modes

OUTPUT_FORMATS = ("webp", "jpg", "png")
SIZE_RANGE = (256, 2048)
NUM_OUTPUTS_RANGE = (1, 8)
QUALITY_RANGE = (1, 100)
STRENGTH_RANGE = (0.02, 1.0)
SEED_RANGE = (0, 2**32 - 1)
MAX_PROMPT_CHARS = 10_000
LORA_SCALE_RANGE = (0.0, 2.0)
MAX_URL_CHARS = 4096
# LCMScheduler's distillation schedule has this many steps; img2img picks its steps from its first
# `strength` fraction (the LCM pipeline) or from a full schedule (the LCM-LoRA pipelines).
LCM_ORIGINAL_STEPS = 50
# ControlNet (lib/engine/controls.py): up to two controls, each with its own conditioning scale and window (the
# fractions of the denoising steps in which its ControlNet acts). 0.8 is diffusers' LCM ControlNet examples' scale.
CONTROL_SCALE_RANGE = (0.0, 2.0)
CONTROL_SCALE_DEFAULT = 0.8
CONTROL_WINDOW_RANGE = (0.0, 1.0)
CONTROL_PREFIXES = ("control", "control_2")  # the inputs' names: control_image, control_type, control_2_scale, ...
NO_CONTROL = "none"


class InputError(ValueError):
    """A prediction input is invalid; the message names the input, the value and what is allowed."""


def shown(value, limit: int = 80) -> str:
    """A value for an error message: its repr, cut to `limit` characters (a data URI can be megabytes)."""
    text = repr(os.fspath(value) if isinstance(value, os.PathLike) else value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


@dataclass(frozen=True)
class Control:
    """One control: what kind of image guides the output, how strongly, and in which part of the denoising."""

    kind: str  # CONTROL_KINDS
    image_path: str | None  # the control image's file (None: a picture handed to Engine.job)
    scale: float
    start: float  # fractions of the denoising steps that run
    end: float
    name: str = "control"  # the inputs' prefix, for messages

    @property
    def net(self) -> str:
        """The ControlNet it drives (canny, depth)."""
        return CONTROL_KINDS[self.kind]


@dataclass(frozen=True)
class Request:
    mode: Mode
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    image_path: str | os.PathLike | None  # the img2img input's file (None: txt2img, or a picture given to Engine.job)
    strength: float
    output_format: str
    output_quality: int
    lora_url: str | None = None  # a style LoRA (lib/loras/), fetched by Engine.job
    lora_scale: float = 1.0
    disable_safety_checker: bool = False
    fast_decode: bool = False  # decode with the mode's TAESD / TAESDXL instead of its VAE
    fast_encode: bool = False  # img2img: encode the input with TAESD / TAESDXL too (the realtime server)
    img2img: bool = False  # an input image comes with the request (a file, or a picture given to Engine.job)
    controls: tuple[Control, ...] = ()  # ControlNet guidance (lib/engine/controls.py)
    return_control_maps: bool = False  # the control maps are outputs too

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed + i (wrapping at 2**32, so every reported seed is a valid input)."""
        return [(self.seed + i) % 2**32 for i in range(self.num_outputs)]

    @property
    def schedule(self) -> tuple[int, int]:
        """(steps the scheduler is set to, denoising steps that run) for this request."""
        return denoising_schedule(self.mode, self.num_inference_steps, self.strength if self.img2img else 1.0)


def denoising_schedule(mode: Mode, steps: int, strength: float) -> tuple[int, int]:
    """How img2img turns (steps, strength) into work, without ever running zero steps.

    The LCM pipeline picks all `steps` from the first `strength` fraction of its 50-step distillation
    schedule, so at most int(50 * strength) steps exist. The other pipelines run the last
    int(steps * strength) steps of a `steps`-long schedule; where that is < 1, the schedule is lengthened
    to the shortest one in which exactly one step runs, at the noise level `strength` asks for.
    """
    if mode.family == LCM:  # the LCM pipeline: its own img2img schedule
        runs = max(1, min(steps, int(LCM_ORIGINAL_STEPS * strength)))
        return runs, runs
    scheduled = steps
    while int(scheduled * strength) < 1:
        scheduled = max(scheduled + 1, math.ceil(1 / strength))
    return scheduled, min(int(scheduled * strength), scheduled)


def steps_kept(start: float, end: float, steps: int) -> int:
    """How many of `steps` denoising steps a ControlNet acts in, by diffusers' rule (`controlnet_keep`): step i is
    kept unless i/steps < start or (i+1)/steps > end. With 1 step any window but 0-1 keeps none."""
    return sum(not (i / steps < start or (i + 1) / steps > end) for i in range(steps))


def _integer(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InputError(f"{name}: {value!r} is not a whole number; allowed: {lo} to {hi}")
    if not lo <= value <= hi:
        raise InputError(f"{name}: {int(value)} is out of range; allowed: {lo} to {hi}")
    return int(value)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name}: {value!r} is not a finite number")
    return float(value)


def _size(name: str, value) -> int:
    size = _integer(name, value, *SIZE_RANGE)
    if size % 8:
        raise InputError(
            f"{name}: {size} is not a multiple of 8; allowed: multiples of 8 from {SIZE_RANGE[0]} to {SIZE_RANGE[1]}"
        )
    return size


def _text(name: str, value, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(f"{name}: must not be empty")
        return None
    if not isinstance(value, str):
        raise InputError(f"{name}: {value!r} is not text")
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"{name}: {len(value)} characters is too long; allowed: up to {MAX_PROMPT_CHARS}")
    return value


def _lora_url(value) -> str | None:
    """Its form only; what the URL may point to is checked when it is fetched (lib/loras/)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise InputError(f"lora_url: {value!r} is not text")
    value = value.strip()
    if len(value) > MAX_URL_CHARS:
        raise InputError(f"lora_url: {len(value)} characters is too long; allowed: up to {MAX_URL_CHARS}")
    if not value.lower().startswith(("https://", "http://")):
        raise InputError(f"lora_url: {value[:100]!r} is not an https URL; allowed: https://... (a .safetensors file)")
    return value


def resolve_mode(name, enabled: tuple[str, ...]) -> Mode:
    if not isinstance(name, str) or name not in MODES:  # a JSON list or object is no mode (and not hashable)
        raise InputError(f"mode: {name!r} is not a mode; allowed: {', '.join(MODES)}")
    if name not in enabled:
        raise InputError(f"mode: {name!r} is not enabled on this server (ENABLED_MODES); enabled: {', '.join(enabled)}")
    return MODES[name]


def fit_to_area(width: int, height: int, area: int) -> tuple[int, int]:
    """The size with the aspect ratio of width x height and about `area` pixels, in multiples of 8."""
    scale = math.sqrt(area / (width * height))
    lo, hi = SIZE_RANGE
    return tuple(min(hi, max(lo, round(side * scale / 8) * 8)) for side in (width, height))


def resolve_request(
    *,
    enabled: tuple[str, ...],
    prompt,
    mode=None,
    negative_prompt=None,
    width=None,
    height=None,
    num_outputs=1,
    num_inference_steps=None,
    guidance_scale=None,
    seed=None,
    image=None,
    image_size: tuple[int, int] | None = None,
    strength=0.5,
    output_format="webp",
    output_quality=80,
    lora_url=None,
    lora_scale=1.0,
    disable_safety_checker=False,
    fast_decode=False,
    fast_encode=False,
    controls=(),
    controlnet: bool = False,
    return_control_maps=False,
) -> Request:
    """Check every input and fill in the mode's defaults. `image_size` is the input image's (w, h): given
    without `image`, the picture itself comes to Engine.job (the realtime server's canvas). `controls`: raw control
    specs (control_specs); `controlnet`: whether this server loaded its ControlNets (CONTROLNET=1)."""
    m = resolve_mode(DEFAULT_MODE if mode is None else mode, enabled)
    prompt = _text("prompt", prompt, required=True)
    negative_prompt = _text("negative_prompt", negative_prompt, required=False)
    img2img = image is not None or image_size is not None
    sizes = [spec["size"] for spec in controls if spec.get("size")]
    width, height = resolve_size(m, width, height, image_size or (sizes[0] if sizes else None))
    steps, guidance = resolve_steps(m, num_inference_steps), resolve_guidance(m, guidance_scale)
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output_format: {output_format!r} is not a format; allowed: {', '.join(OUTPUT_FORMATS)}")
    strength = _in_range("strength", strength, STRENGTH_RANGE)
    lora_scale = _in_range("lora_scale", lora_scale, LORA_SCALE_RANGE)
    disable_safety_checker = _switch("disable_safety_checker", disable_safety_checker)
    fast_decode = _switch("fast_decode", fast_decode)
    fast_encode = _switch("fast_encode", fast_encode)
    strength_for_schedule = strength if img2img else 1.0
    runs = denoising_schedule(m, steps, strength_for_schedule)[1]
    resolved_controls = resolve_controls(m, controls, controlnet, img2img, runs)
    return_control_maps = _switch("return_control_maps", return_control_maps)
    return Request(
        mode=m,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_outputs=_integer("num_outputs", num_outputs, *NUM_OUTPUTS_RANGE),
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=secrets.randbits(32) if seed is None else _integer("seed", seed, *SEED_RANGE),
        image_path=image,
        strength=strength,
        output_format=output_format,
        output_quality=_integer("output_quality", output_quality, *QUALITY_RANGE),
        lora_url=_lora_url(lora_url),
        lora_scale=lora_scale,
        disable_safety_checker=disable_safety_checker,
        fast_decode=fast_decode,
        fast_encode=fast_encode,
        img2img=img2img,
        controls=resolved_controls,
        return_control_maps=return_control_maps and bool(resolved_controls),
    )


def control_specs(
    control_image=None,
    control_type="canny",
    control_scale=CONTROL_SCALE_DEFAULT,
    control_start=0.0,
    control_end=1.0,
    control_2_image=None,
    control_2_type=NO_CONTROL,
    control_2_scale=CONTROL_SCALE_DEFAULT,
    control_2_start=0.0,
    control_2_end=1.0,
) -> list[dict]:
    """The predictor's flat control inputs as raw specs for resolve_request (checked there). The first control is on
    where `control_image` is given; the second where `control_2_type` is not "none", with `control_2_image`, or else
    the first control's image (canny and depth of one photo)."""
    specs = []
    if control_image is not None:
        specs.append(dict(name="control", kind=control_type, image=control_image, scale=control_scale,
                          start=control_start, end=control_end))  # fmt: skip
    if control_2_type != NO_CONTROL:
        specs.append(dict(name="control_2", kind=control_2_type, image=control_2_image or control_image,
                          scale=control_2_scale, start=control_2_start, end=control_2_end))  # fmt: skip
    return specs


def resolve_controls(mode: Mode, specs, controlnet: bool, img2img: bool, runs: int) -> tuple[Control, ...]:
    """Check the control specs against the mode, the server and the denoising steps that will run."""
    if not specs:
        return ()
    first = specs[0]["name"]
    if mode.controlnets is None:
        raise InputError(
            f"{first}_image: mode {mode.name} has no ControlNet; allowed: a control with modes "
            + ", ".join(control_modes())
        )
    if not controlnet:
        raise InputError(
            f"{first}_image: ControlNet is not enabled on this server; allowed: requests without a control (the "
            "operator enables ControlNet with CONTROLNET=1)"
        )
    if img2img and CONTROL_PIPELINE_CLASSES[mode.family][1] is None:
        others = [n for n in control_modes() if CONTROL_PIPELINE_CLASSES[MODES[n].family][1]]
        raise InputError(
            f"{first}_image: mode {mode.name} takes a control for text-to-image only (diffusers' ControlNet img2img "
            f"pipelines do not pass its guidance embedding); allowed: no image with a control, or img2img with a "
            f"control in modes {', '.join(others)}"
        )
    out = []
    for spec in specs:
        name = spec["name"]
        kind = spec.get("kind")
        if not isinstance(kind, str) or kind not in CONTROL_KINDS:
            raise InputError(f"{name}_type: {kind!r} is not a kind of control; allowed: {', '.join(CONTROL_KINDS)}")
        if spec.get("image") is None and spec.get("size") is None:
            raise InputError(f"{name}_image: missing; a control of type {kind} needs an image")
        scale = _in_range(f"{name}_scale", spec.get("scale", CONTROL_SCALE_DEFAULT), CONTROL_SCALE_RANGE)
        start = _in_range(f"{name}_start", spec.get("start", 0.0), CONTROL_WINDOW_RANGE)
        end = _in_range(f"{name}_end", spec.get("end", 1.0), CONTROL_WINDOW_RANGE)
        if start >= end:
            raise InputError(
                f"{name}_end: {end:g} is not after {name}_start {start:g}; allowed: {name}_end > {name}_start"
            )
        if not steps_kept(start, end, runs):
            raise InputError(
                f"{name}_end: the window {start:g}-{end:g} covers none of the {runs} denoising step(s) that run, so "
                f"the ControlNet would act in none; allowed: a window that covers at least one step (e.g. "
                f"{name}_start 0 and {name}_end 1)"
            )
        image = spec.get("image")
        out.append(Control(kind, None if image is None else str(image), scale, start, end, name))
    return tuple(out)


def resolve_size(mode: Mode, width, height, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """The output size: as given, else the mode's (img2img: the input's aspect ratio at the mode's pixel count)."""
    if width is None or height is None:
        default_w, default_h = fit_to_area(*image_size, mode.size**2) if image_size else (mode.size, mode.size)
        width = default_w if width is None else width
        height = default_h if height is None else height
    return _size("width", width), _size("height", height)


def resolve_steps(mode: Mode, value) -> int:
    steps = mode.steps.default if value is None else value
    lo, hi = mode.steps.range
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps != int(steps) or not lo <= steps <= hi:
        allowed = f"only {lo} (the mode's checkpoint is distilled for that many steps)" if lo == hi else f"{lo} to {hi}"
        raise InputError(f"num_inference_steps: {steps!r} is not allowed for mode {mode.name}; allowed: {allowed}")
    return int(steps)


def resolve_guidance(mode: Mode, value) -> float:
    guidance = mode.guidance.default if value is None else _number("guidance_scale", value)
    if not mode.guidance.allows(guidance):
        raise InputError(
            f"guidance_scale: {guidance:g} is not allowed for mode {mode.name}; allowed: {mode.guidance.describe()}"
        )
    return guidance


def _in_range(name: str, value, bounds: tuple[float, float]) -> float:
    value = _number(name, value)
    if not bounds[0] <= value <= bounds[1]:
        raise InputError(f"{name}: {value:g} is out of range; allowed: {bounds[0]:g} to {bounds[1]:g}")
    return value


def _switch(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}: {value!r} is not true or false")
    return value
