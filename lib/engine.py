"""The engine: loads the enabled modes once, then turns a validated Request into image files, one at a time."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

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


@dataclass
class Job:
    request: Request
    out_dir: Path
    record: Record
    picture: Image.Image | None  # the img2img input, fitted to the output size
    cancelled: bool = False  # set from another thread; the batch skips this job's remaining work


class Cancelled(Exception):
    """Every request of a running batch was canceled: the denoising loop stops early."""


def uses_negative_prompt(request: Request) -> bool:
    return request.negative_prompt is not None and request.mode.negative_prompt_has_effect(request.guidance_scale)


def batch_key(request: Request) -> tuple:
    """Requests with equal keys can share one pipeline call: everything that shapes the computation but the
    prompts, seeds and output settings. Whether a negative prompt acts is part of it, since a CFG batch
    either has negative prompts for every image or for none."""
    return (request.mode.name, request.width, request.height, request.num_inference_steps, request.guidance_scale,
            request.image_path is not None, request.strength if request.image_path else None,
            uses_negative_prompt(request))


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

    def job(self, request: Request, out_dir: Path, record: Record = lambda k, v: None) -> Job:
        """A request made ready to run, alone or in a batch: the img2img input is decoded and fitted here,
        so that a bad file fails its own request only."""
        picture = None
        if request.image_path:
            picture = images.fit_image(images.open_input_image(request.image_path), request.width, request.height)
        return Job(request, Path(out_dir), record, picture)

    def run(self, request: Request, out_dir: Path, record: Record = lambda k, v: None) -> Iterator[Output]:
        """Generate request.num_outputs images; yields each file as soon as it is written."""
        for _, output in self.run_batch([self.job(request, out_dir, record)]):
            yield output

    def run_batch(self, jobs: list[Job]) -> Iterator[tuple[Job, Output]]:
        """Run jobs that share a batch_key as one pipeline call; yields (job, output) per image as it is written.
        Each image depends only on its own seed and prompt, so a job's images are those of a solo run."""
        first = jobs[0].request
        assert all(batch_key(j.request) == batch_key(first) for j in jobs), "jobs of one batch must share a key"
        mode, loaded = first.mode, self.modes[first.mode.name]
        scheduled, runs = first.schedule
        images_total = sum(j.request.num_outputs for j in jobs)
        for job in jobs:
            r = job.request
            job.record("seeds", r.seeds)
            job.record("batch.requests", len(jobs))
            job.record("batch.images", images_total)
            log.info("mode %s, %d image(s) %dx%d, %d step(s), guidance %g, seeds %s%s", mode.name, r.num_outputs,
                     r.width, r.height, runs, r.guidance_scale, r.seeds,
                     f" (in a batch of {len(jobs)} requests)" if len(jobs) > 1 else "")
            if r.negative_prompt and not uses_negative_prompt(r):
                log.warning("negative_prompt ignored: mode %s at guidance_scale %g runs without classifier-free "
                            "guidance, where a negative prompt has no effect%s", mode.name, r.guidance_scale,
                            "" if mode.guidance_embedded or mode.guidance_range is None
                            else f" (use guidance_scale above 1, up to {mode.guidance_range[1]:g})")

        clock = Stopwatch(self.device)
        shared: dict[str, float | list[float]] = {}
        pipe = loaded.txt2img
        kwargs: dict = {"height": first.height, "width": first.width}
        if first.image_path:
            pipe = loaded.img2img
            latents = [vae.encode(pipe.vae, j.picture, self.dtype).expand(j.request.num_outputs, -1, -1, -1)
                       for j in jobs]
            kwargs = {"image": torch.cat(latents), "strength": first.strength}
            shared["vae_encode"] = clock.lap()
        if uses_negative_prompt(first):
            kwargs["negative_prompt"] = [j.request.negative_prompt for j in jobs for _ in j.request.seeds]
        latents = self._denoise(pipe, jobs, scheduled, runs, kwargs, clock, shared)

        index = 0
        for job in jobs:
            r = job.request
            timings = dict(shared, vae_decode=0.0, image_encoding=0.0)
            for i, seed in enumerate(r.seeds):
                clock.lap()
                image = vae.decode(pipe.vae, latents[index: index + 1])[0]
                index += 1
                timings["vae_decode"] += clock.lap()
                if job.cancelled:
                    continue
                settings = {"mode": mode.name, "model": mode.repo.repo_id, "prompt": r.prompt,
                            "negative_prompt": r.negative_prompt if uses_negative_prompt(r) else None, "seed": seed,
                            "num_inference_steps": r.num_inference_steps, "denoising_steps": runs,
                            "guidance_scale": r.guidance_scale, "width": r.width, "height": r.height,
                            "strength": r.strength if r.image_path else None}
                path = images.save_image(image, job.out_dir / f"out-{i}-{seed}.{r.output_format}",
                                         r.output_format, r.output_quality, settings)
                timings["image_encoding"] += clock.lap()
                yield job, Output(path, seed, settings)
            for stage, seconds in timings.items():
                job.record(f"timings.{stage}", [round(s, 4) for s in seconds] if isinstance(seconds, list)
                           else round(seconds, 4))

    def _denoise(self, pipe, jobs: list[Job], scheduled: int, runs: int, kwargs: dict, clock: Stopwatch,
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
            if all(job.cancelled for job in jobs):
                raise Cancelled("every request of this batch was canceled")
            steps.append(clock.lap())
            log.info("step %d/%d: %.0f ms", step + 1, runs, steps[-1] * 1000)
            return callback_kwargs

        hooks = [h for m in encoders for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
        try:
            result = pipe(
                prompt=[j.request.prompt for j in jobs for _ in j.request.seeds],
                num_inference_steps=scheduled,
                guidance_scale=jobs[0].request.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for j in jobs for s in j.request.seeds],
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
