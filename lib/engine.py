"""The engine: loads the enabled modes once, then turns a validated Request into image files, one at a time."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import images, speed, vae
from .env import env_flag
from .inputs import InputError, Request, resolve_request
from .loading import LoadedMode, choose_device_and_dtype, load_modes
from .lora import LoraFile, fetch as fetch_lora, style_lora
from .modes import MODES, safety_checker_enabled
from .safety import AllImagesFlagged, SafetyChecker, load_from_env as load_safety_checker
from .weights import ensure_weights, weights_dir_from_env

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
    lora: LoraFile | None = None  # the request's style LoRA, fetched and verified


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
            uses_negative_prompt(request), request.lora_url, request.lora_scale if request.lora_url else None,
            request.fast_decode)


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
    def __init__(self, modes: dict[str, LoadedMode], device: torch.device, dtype: torch.dtype,
                 safety: SafetyChecker | None = None):
        self.modes, self.device, self.dtype = modes, device, dtype
        self.enabled = tuple(modes)
        self.safety = safety  # None: SAFETY_CHECKER=0

    @classmethod
    def load(cls, weights_dir: Path, mode_names: tuple[str, ...], device=None, dtype=None) -> Engine:
        default_device, default_dtype = choose_device_and_dtype()
        device, dtype = device or default_device, dtype or default_dtype
        started = time.perf_counter()
        modes = load_modes(Path(weights_dir), tuple(mode_names), device, dtype)
        log.info("loaded %s on %s (%s) in %.1f s", ", ".join(mode_names), device, str(dtype).removeprefix("torch."),
                 time.perf_counter() - started)
        safety = load_safety_checker(Path(weights_dir), device, dtype)
        return speed.optimize(cls(modes, device, dtype, safety))  # the fast-path switches (SPEED_*) and warm-up

    @classmethod
    def from_env(cls) -> Engine:
        """setup(): make sure the enabled modes' weights are cached and verified, then load them.
        WEIGHTS_OFFLINE=1 skips the manifest and any download and loads WEIGHTS_DIR as it is."""
        weights_dir, names = weights_dir_from_env(), enabled_modes_from_env()
        if not env_flag("WEIGHTS_OFFLINE", False):
            ensure_weights(names, weights_dir, log=log.info, safety_checker=safety_checker_enabled())
        return cls.load(weights_dir, names)

    def request(self, **inputs) -> Request:
        """Validate raw inputs (including reading the input image's size) into a Request."""
        image = inputs.get("image")
        image_size = None if image is None else images.input_image_size(image)
        return resolve_request(enabled=self.enabled, image_size=image_size, **inputs)

    def job(self, request: Request, out_dir: Path, record: Record = lambda k, v: None) -> Job:
        """A request made ready to run, alone or in a batch: the img2img input is decoded and fitted and the
        style LoRA fetched (network; the cache usually has it) here, so that a bad file fails its own request only."""
        picture = None
        if request.image_path:
            picture = images.fit_image(images.open_input_image(request.image_path), request.width, request.height)
        lora = None
        if request.lora_url:
            lora = fetch_lora(request.lora_url)
            record("timings.lora_fetch", round(lora.seconds, 4))
            record("lora_cache_hit", lora.cached)
        return Job(request, Path(out_dir), record, picture, lora=lora)

    def run(self, request: Request, out_dir: Path, record: Record = lambda k, v: None) -> Iterator[Output]:
        """Generate request.num_outputs images; yields each file as soon as it is written."""
        for _, output in self.run_batch([self.job(request, out_dir, record)]):
            if isinstance(output, BaseException):
                raise output
            yield output

    def run_batch(self, jobs: list[Job]) -> Iterator[tuple[Job, Output | Exception]]:
        """Run jobs that share a batch_key as one pipeline call; yields (job, output) per image as it is written.
        Each image depends only on its own seed and prompt, so a job's images are those of a solo run.
        A job that fails on its own (the safety checker flagged all its images) gets (job, the exception)."""
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
        try:
            clock.lap()
            # The style LoRA is on for this call only: removed on the way out, also on an error or a cancel.
            with style_lora(pipe, jobs[0].lora, first.lora_scale, mode.name) if jobs[0].lora \
                    else contextlib.nullcontext():
                if jobs[0].lora:
                    shared["lora_load"] = clock.lap()
                latents = self._denoise(pipe, jobs, scheduled, runs, kwargs, clock, shared)
                clock.lap()
            if jobs[0].lora:
                shared["lora_load"] += clock.lap()  # and its removal
        finally:
            for job in jobs:
                if job.lora:
                    job.lora.close()
        checked = self._check_safety(pipe, jobs, latents, clock, shared)

        index = 0
        for job in jobs:
            r = job.request
            timings = dict(shared, vae_decode=0.0, image_encoding=0.0)
            saving: list = []  # image i is encoded in a worker thread while image i+1 decodes; yielded in order
            flagged = 0
            for i, seed in enumerate(r.seeds):
                clock.lap()
                if index in checked:  # decoded already, for the safety checker
                    image, seconds, nsfw = checked.pop(index)
                else:
                    image, seconds, nsfw = self._decode(pipe, first, latents, index), None, False
                index += 1
                timings["vae_decode"] += clock.lap() if seconds is None else seconds
                flagged += nsfw
                if job.cancelled or nsfw:  # a flagged image is dropped
                    continue
                settings = {"mode": mode.name, "model": mode.repo.repo_id, "prompt": r.prompt,
                            "negative_prompt": r.negative_prompt if uses_negative_prompt(r) else None, "seed": seed,
                            "num_inference_steps": r.num_inference_steps, "denoising_steps": runs,
                            "guidance_scale": r.guidance_scale, "width": r.width, "height": r.height,
                            "strength": r.strength if r.image_path else None, "fast_decode": r.fast_decode}
                saving.append((images.save_in_background(image, job.out_dir / f"out-{i}-{seed}.{r.output_format}",
                                                         r.output_format, r.output_quality, settings), seed, settings))
                while saving and saving[0][0].done():
                    yield job, self._saved(saving.pop(0), timings)
            while saving:
                yield job, self._saved(saving.pop(0), timings)
            for stage, seconds in timings.items():
                job.record(f"timings.{stage}", [round(s, 4) for s in seconds] if isinstance(seconds, list)
                           else round(seconds, 4))
            if flagged and flagged == r.num_outputs and not job.cancelled:
                yield job, AllImagesFlagged(flagged)

    def _check_safety(self, pipe, jobs: list[Job], latents: torch.Tensor, clock: Stopwatch,
                      timings: dict) -> dict[int, tuple]:
        """Run the safety checker once on every image of the batch whose request keeps it on (those images are
        decoded here, before any is saved). Returns image index -> (image, decode seconds, flagged)."""
        if self.safety is None:
            return {}
        spans, index = [], 0
        for job in jobs:
            if not job.request.disable_safety_checker and not job.cancelled:
                spans.append((job, range(index, index + job.request.num_outputs)))
            index += job.request.num_outputs
        if not spans:
            return {}
        decoded = {}
        for _, span in spans:
            for k in span:
                clock.lap()
                decoded[k] = (self._decode(pipe, jobs[0].request, latents, k), clock.lap())
        clock.lap()
        flags = dict(zip(decoded, self.safety.flagged([image for image, _ in decoded.values()])))
        timings["safety_checker"] = clock.lap()
        for job, span in spans:
            seeds = [seed for k, seed in zip(span, job.request.seeds) if flags[k]]
            job.record("nsfw_flagged", len(seeds))
            if seeds:
                log.warning("safety checker: %d of %d image(s) flagged as possibly NSFW and dropped (seeds %s)",
                            len(seeds), len(span), seeds)
        return {k: (image, seconds, flags[k]) for k, (image, seconds) in decoded.items()}

    def _decode(self, pipe, request: Request, latents: torch.Tensor, index: int) -> Image.Image:
        """Image `index` of the batch, decoded by the request's decoder."""
        return vae.decode(self._decoder(pipe, request), latents[index: index + 1])[0]

    def _decoder(self, pipe, request: Request):
        """The mode's VAE, or with fast_decode its TAESD / TAESDXL (same latents, a much smaller decoder)."""
        if not request.fast_decode:
            return pipe.vae
        tiny = self.modes[request.mode.name].tiny_vae
        if tiny is None:
            raise InputError(f"fast_decode: mode {request.mode.name} has no fast decoder loaded on this server")
        return tiny

    @staticmethod
    def _saved(saving: tuple, timings: dict) -> Output:
        future, seed, settings = saving
        path, seconds = future.result()
        timings["image_encoding"] += seconds  # encoder time, mostly off the critical path
        return Output(path, seed, settings)

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
