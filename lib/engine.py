"""The engine: loads the enabled modes once, then turns a validated Request into image files, one at a time."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import images, vae
from .inputs import InputError, Request, resolve_request
from .loading import LoadedMode, choose_device_and_dtype, load_modes
from .modes import MODES
from .weights import ensure_weights

log = logging.getLogger(__name__)

Record = Callable[[str, object], None]


@dataclass(frozen=True)
class Output:
    path: Path
    seed: int
    settings: dict


def enabled_modes_from_env() -> tuple[str, ...]:
    value = os.environ.get("ENABLED_MODES", "").strip()
    if not value:
        return tuple(MODES)
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise ValueError(f"ENABLED_MODES: {', '.join(unknown)} not a mode; allowed: {', '.join(MODES)}")
    return names


class Stopwatch:
    """Wall-clock marks that wait for the device, so a stage's time is its own and not the next one's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self.now()
        elapsed, self.last = now - self.last, now
        return elapsed


class Engine:
    def __init__(self, modes: dict[str, LoadedMode], device: torch.device, dtype: torch.dtype):
        self.modes, self.device, self.dtype = modes, device, dtype
        self.enabled = tuple(modes)

    @classmethod
    def load(cls, weights_dir: Path, mode_names: tuple[str, ...], device=None, dtype=None) -> Engine:
        default_device, default_dtype = choose_device_and_dtype()
        device, dtype = device or default_device, dtype or default_dtype
        started = time.perf_counter()
        modes = load_modes(Path(weights_dir), tuple(mode_names), device, dtype)
        log.info("loaded %s on %s (%s) in %.1f s", ", ".join(mode_names), device, str(dtype).removeprefix("torch."),
                 time.perf_counter() - started)
        return cls(modes, device, dtype)

    @classmethod
    def from_env(cls) -> Engine:
        """setup(): make sure the enabled modes' weights are cached and verified, then load them.
        WEIGHTS_OFFLINE=1 skips the manifest and any download and loads WEIGHTS_DIR as it is."""
        weights_dir, names = Path(os.environ.get("WEIGHTS_DIR", "weights")), enabled_modes_from_env()
        if os.environ.get("WEIGHTS_OFFLINE", "").lower() not in ("1", "true", "yes"):
            ensure_weights(names, weights_dir, log=log.info)
        return cls.load(weights_dir, names)

    def request(self, **inputs) -> Request:
        """Validate raw inputs (including reading the input image's size) into a Request."""
        image = inputs.get("image")
        image_size = None if image is None else images.input_image_size(image)
        return resolve_request(enabled=self.enabled, image_size=image_size, **inputs)

    def run(self, request: Request, out_dir: Path, record: Record = lambda k, v: None) -> Iterator[Output]:
        """Generate request.num_outputs images; yields each file as soon as it is written."""
        mode = request.mode
        loaded = self.modes[mode.name]
        scheduled, runs = request.schedule
        record("seeds", request.seeds)
        log.info("mode %s, %d image(s) %dx%d, %d step(s), guidance %g, seeds %s", mode.name, request.num_outputs,
                 request.width, request.height, runs, request.guidance_scale, request.seeds)
        negative = request.negative_prompt
        if negative and not mode.negative_prompt_has_effect(request.guidance_scale):
            log.warning("negative_prompt ignored: mode %s at guidance_scale %g runs without classifier-free "
                        "guidance, where a negative prompt has no effect%s", mode.name, request.guidance_scale,
                        "" if mode.guidance_embedded or mode.guidance_range is None
                        else f" (use guidance_scale above 1, up to {mode.guidance_range[1]:g})")
            negative = None

        clock = Stopwatch(self.device)
        timings: dict[str, float | list[float]] = {}
        pipe = loaded.txt2img
        kwargs: dict = {"height": request.height, "width": request.width}
        if request.image_path:
            picture = images.fit_image(images.open_input_image(request.image_path), request.width, request.height)
            pipe = loaded.img2img
            kwargs = {"image": vae.encode(pipe.vae, picture, self.dtype), "strength": request.strength}
            timings["vae_encode"] = clock.lap()
        if negative:
            kwargs["negative_prompt"] = negative

        latents = self._denoise(pipe, request, scheduled, runs, kwargs, clock, timings)
        timings["vae_decode"] = timings["image_encoding"] = 0.0
        for i, seed in enumerate(request.seeds):
            clock.lap()
            image = vae.decode(pipe.vae, latents[i: i + 1])[0]
            timings["vae_decode"] += clock.lap()
            settings = {"mode": mode.name, "model": mode.repo.repo_id, "prompt": request.prompt,
                        "negative_prompt": negative, "seed": seed, "num_inference_steps": request.num_inference_steps,
                        "denoising_steps": runs, "guidance_scale": request.guidance_scale,
                        "width": request.width, "height": request.height,
                        "strength": request.strength if request.image_path else None}
            path = images.save_image(image, Path(out_dir) / f"out-{i}-{seed}.{request.output_format}",
                                     request.output_format, request.output_quality, settings)
            timings["image_encoding"] += clock.lap()
            yield Output(path, seed, settings)
        for stage, seconds in timings.items():
            record(f"timings.{stage}", [round(s, 4) for s in seconds] if isinstance(seconds, list)
                   else round(seconds, 4))

    def _denoise(self, pipe, request: Request, scheduled: int, runs: int, kwargs: dict, clock: Stopwatch,
                 timings: dict) -> torch.Tensor:
        """Text encoding and the denoising loop, timed per stage and per step; returns the latents."""
        steps: list[float] = []
        encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        timings["text_encoding"] = 0.0
        start = {}

        def before(module, args):
            start[module] = clock.now()

        def after(module, args, output):
            timings["text_encoding"] += clock.now() - start[module]
            clock.last = clock.now()  # denoising starts when the last text encoder finishes

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            steps.append(clock.lap())
            log.info("step %d/%d: %.0f ms", step + 1, runs, steps[-1] * 1000)
            return callback_kwargs

        hooks = [h for m in encoders for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
        try:
            result = pipe(
                prompt=request.prompt,
                num_images_per_prompt=request.num_outputs,
                num_inference_steps=scheduled,
                guidance_scale=request.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in request.seeds],
                output_type="latent",
                callback_on_step_end=on_step_end,
                **kwargs,
            )
        finally:
            for h in hooks:
                h.remove()
        timings["denoising"] = sum(steps)
        timings["steps"] = steps
        return result.images


__all__ = ["Engine", "InputError", "Output"]
