"""The engine: loads the enabled modes once, then turns validated Requests into image files.

A batch (requests that share one pipeline call) runs in two stages, which lib/engine/batcher.py puts on two threads so
that the next batch's denoising overlaps this one's files:
- `Batch.generate`, on the device thread: the mode moved onto the device if the memory plan kept it in host
  memory (lib/engine/memory.py), text encoding, denoising, and the decode, one VAE call per chunk of images that fits
  in memory; the pixels go to host memory asynchronously;
- `Batch.finish` / `Batch.end`, anywhere else: PIL images, the safety checker (its preprocessing there, its
  forward on the device), the image files, the metrics.
Timings are CUDA events (lib/engine/timeline.py), read after the work: nothing waits for the device on the way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from lib.engine import controls, decoding, images, memory, precision, prompts, speed
from lib.engine.inputs import InputError, Request, control_specs, resolve_request
from lib.engine.loading import ComponentLoader, LoadedMode, check_present, choose_device, load_modes, mode_parts
from lib.engine.memory import Residency
from lib.engine.modes import MODES
from lib.engine.prompts import PromptCache
from lib.engine.safety import AllImagesFlagged, SafetyChecker
from lib.engine.safety import check_present as check_safety_weights
from lib.engine.safety import load_from_env as load_safety_checker
from lib.engine.safety import weights_path as safety_file
from lib.engine.timeline import Timeline
from lib.loras.apply import style_lora
from lib.loras.cache import LoraFile
from lib.loras.cache import fetch as fetch_lora
from lib.settings import Settings
from lib.weights.cache import ensure_weights

log = logging.getLogger(__name__)

Record = Callable[[str, object], None]


@dataclass(frozen=True)
class Output:
    path: Path | None  # the image file; None for a job without out_dir, whose image is `data`
    seed: int
    settings: dict
    data: bytes | None = None  # the encoded image, for a job without out_dir (the realtime server's frames)


@dataclass
class Job:
    request: Request
    out_dir: Path | None  # where its image files go; None: encoded in memory (Output.data)
    record: Record
    picture: Image.Image | None  # the img2img input, fitted to the output size
    cancelled: bool = False  # set from another thread; the batch skips this job's remaining work
    lora: LoraFile | None = None  # the request's style LoRA, fetched and verified
    quiet: bool = False  # no log line of its own (the realtime server's frames: it logs per session)
    control_maps: list[Image.Image] = field(default_factory=list)  # one per request.controls, at the output size


class Cancelled(Exception):
    """Every request of a running batch was canceled: the denoising loop stops early."""


def uses_negative_prompt(request: Request) -> bool:
    return request.negative_prompt is not None and request.mode.uses_cfg(request.guidance_scale)


def batch_key(request: Request) -> tuple:
    """Requests with equal keys can share one pipeline call: everything that shapes the computation but the
    prompts, seeds and output settings. Whether a negative prompt acts is part of it, since a CFG batch
    either has negative prompts for every image or for none."""
    return (
        request.mode.name,
        request.width,
        request.height,
        request.num_inference_steps,
        request.guidance_scale,
        request.img2img,
        request.strength if request.img2img else None,
        request.fast_encode if request.img2img else None,
        uses_negative_prompt(request),
        request.lora_url,
        request.lora_scale if request.lora_url else None,
        request.fast_decode,
        tuple((c.net, c.scale, c.start, c.end) for c in request.controls),  # the maps themselves may differ
    )


class Engine:
    def __init__(
        self,
        modes: dict[str, LoadedMode],
        device: torch.device,
        dtype: torch.dtype,
        safety: SafetyChecker | None = None,
        residency: Residency | None = None,
    ):
        self.modes, self.device, self.dtype = modes, torch.device(device), dtype
        self.enabled = tuple(modes)
        self.safety = safety  # None: SAFETY_CHECKER=0
        self.residency = residency or Residency.everything(modes, self.device, safety)
        self.speed: dict = {}  # what lib/engine/speed.py applied
        self.switches: speed.Switches | None = None
        self.prompts = PromptCache(Settings().prompt_cache_size)
        self.depth: controls.DepthEstimator | None = None  # with ControlNet on, where a mode has ControlNets
        self.controlnet = any(m.controlnets for m in modes.values())  # ControlNets loaded (CONTROLNET=1)

    @classmethod
    def load(
        cls,
        weights_dir: Path,
        mode_names: tuple[str, ...],
        device=None,
        dtype=None,
        switches: speed.Switches | None = None,
    ) -> Engine:
        """Plan the device memory, load the modes (each module where the plan puts it), apply the fast path."""
        device = torch.device(device or choose_device())
        dtypes = precision.choose(device, requested=Settings().model_dtype)
        dtype = dtype or dtypes.model
        switches = switches or speed.Switches.from_env(device)
        weights_dir, mode_names = Path(weights_dir), tuple(mode_names)
        loader = ComponentLoader(
            device, dtype, vae_dtype=lambda config: speed.vae_dtype(config, switches, dtypes, dtype)
        )
        controlnet = Settings().controlnet
        plan = plan_memory(loader, weights_dir, mode_names, Settings().safety_checker, controlnet)
        log.info("%s", plan.describe())
        resident = {k for name in plan.resident for k in plan.mode_modules[name]}
        loader.on_device = resident.__contains__
        started = time.perf_counter()
        modes = load_modes(weights_dir, mode_names, device, dtype, loader, controlnet)
        log.info(
            "loaded %s on %s (%s) in %.1f s",
            ", ".join(mode_names),
            device,
            str(dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        safety = load_safety_checker(weights_dir, device, dtype)
        engine = cls(modes, device, dtype, safety, None)
        if engine.controlnet:
            engine.depth = controls.DepthEstimator.load(weights_dir, device, dtype)
        speed.optimize(engine, switches, dtypes, plan.resident)  # the SPEED_* switches; warm-up: Engine.warm_up
        always = [safety.model] if safety else []
        engine.residency = Residency(
            plan,
            {name: m.modules() for name, m in modes.items()},
            device,
            always + ([engine.depth.model] if engine.depth else []),
        )
        engine.residency.pin_host()
        return engine

    @classmethod
    def from_env(cls) -> Engine:
        """setup(): check every setting, make sure the enabled modes' weights are cached and verified, then load
        them. WEIGHTS_OFFLINE=1 skips the manifest and any download and loads WEIGHTS_DIR as it is."""
        settings = Settings()
        settings.check()  # a bad value of any variable fails setup now, naming it
        weights_dir, names = settings.weights_dir, settings.enabled_modes
        if not settings.weights_offline:
            ensure_weights(
                names,
                weights_dir,
                log=log.info,
                safety_checker=settings.safety_checker,
                controlnet=settings.controlnet,
            )
        return cls.load(weights_dir, names)

    def request(self, **inputs) -> Request:
        """Validate raw inputs (including reading the input and control images' sizes) into a Request. The control
        inputs come flat, as the predictor's (control_image, control_type, control_2_scale, ...)."""
        image = inputs.get("image")
        image_size = None if image is None else images.input_image_size(image)
        specs = control_specs(**{k: inputs.pop(k) for k in list(inputs) if k.startswith("control_")})
        for spec in specs:
            if spec["image"] is not None:
                spec["size"] = images.input_image_size(spec["image"], f"{spec['name']}_image")
        return resolve_request(
            enabled=self.enabled, image_size=image_size, controls=specs, controlnet=self.controlnet, **inputs
        )

    def job(
        self,
        request: Request,
        out_dir: Path | None,
        record: Record = lambda k, v: None,
        picture: Image.Image | None = None,
        quiet: bool = False,
        control_pictures: list[Image.Image] | None = None,
    ) -> Job:
        """A request made ready to run, alone or in a batch: the img2img input (request.image_path, or a
        `picture` already decoded) is fitted, the control maps made (from each control's file, or from
        `control_pictures`), and the style LoRA fetched (network; the cache usually has it) here, so that a bad file
        fails its own request only. Without `out_dir` the images are encoded in memory."""
        if request.image_path:
            picture = images.open_input_image(request.image_path)
        if request.img2img != (picture is not None):
            raise ValueError("an img2img request needs its picture, and only an img2img request takes one")
        if picture is not None:
            rgb = picture if picture.mode == "RGB" else picture.convert("RGB")  # convert() copies even RGB
            picture = images.fit_image(rgb, request.width, request.height)
        maps = self._control_maps(request, control_pictures, record)
        lora = None
        if request.lora_url:
            lora = fetch_lora(request.lora_url)
            record("timings.lora_fetch", round(lora.seconds, 4))
            record("lora_cache_hit", lora.cached)
        out = None if out_dir is None else Path(out_dir)
        return Job(request, out, record, picture, lora=lora, quiet=quiet, control_maps=maps)

    def _control_maps(self, request: Request, pictures, record: Record) -> list[Image.Image]:
        """Each control's map at the output size: its image fitted as the img2img input is, then made into the map
        its kind asks for (lib/engine/controls.py)."""
        if not request.controls:
            return []
        started = time.perf_counter()
        maps = []
        for k, control in enumerate(request.controls):
            if control.image_path is not None:
                source = images.open_input_image(control.image_path, f"{control.name}_image")
            elif pictures is not None and k < len(pictures):
                source = pictures[k] if pictures[k].mode == "RGB" else pictures[k].convert("RGB")
            else:
                raise ValueError("a control without an image file needs its picture")
            fitted = images.fit_image(source, request.width, request.height)
            maps.append(controls.control_map(control.kind, fitted, self.depth))
        record("timings.control_maps", round(time.perf_counter() - started, 4))
        return maps

    def run(self, request: Request, out_dir: Path, record: Record = lambda k, v: None) -> Iterator[Output]:
        """Generate request.num_outputs images; yields each file as soon as it is written."""
        for _, output in self.run_batch([self.job(request, out_dir, record)]):
            if isinstance(output, BaseException):
                raise output
            yield output

    def run_batch(self, jobs: list[Job]) -> Iterator[tuple[Job, Output | Exception]]:
        """Both stages of a batch in the calling thread; yields (job, output) per image as it is written, or
        (job, the exception) for a job that failed on its own (the safety checker flagged all its images)."""
        batch = Batch(self, jobs)
        for chunk in batch.generate():
            yield from batch.finish(chunk)
        yield from batch.end()

    def warm_up(self, img2img: bool = False) -> dict:
        """Each mode once at its default size (lib/engine/speed.py), on the thread that will serve predictions."""
        return speed.warm_up(self, img2img)

    def decoder(self, request: Request):
        """The mode's VAE, or with fast_decode its TAESD / TAESDXL (same latents, a much smaller decoder)."""
        return self._autoencoder(request, "fast_decode", request.fast_decode)

    def encoder(self, request: Request):
        """The img2img input's encoder: the mode's VAE, or with fast_encode its TAESD / TAESDXL."""
        return self._autoencoder(request, "fast_encode", request.fast_encode)

    def _autoencoder(self, request: Request, switch: str, tiny: bool):
        loaded = self.modes[request.mode.name]
        if not tiny:
            return loaded.txt2img.vae
        if loaded.tiny_vae is None:
            raise InputError(f"{switch}: mode {request.mode.name} has no tiny autoencoder loaded on this server")
        return loaded.tiny_vae


def plan_memory(
    loader: ComponentLoader, weights_dir: Path, mode_names, safety_checker: bool, controlnet: bool = False
) -> memory.Plan:
    """The memory plan from the files' sizes, before anything is loaded (lib/engine/memory.py). With `controlnet`,
    each mode's ControlNets count as its modules and the depth estimator as a module every mode uses."""
    check_present(weights_dir, mode_names, controlnet)  # one message for every missing file, before any is read
    if safety_checker:
        check_safety_weights(weights_dir)
    device = loader.device
    budget = Settings().device_memory_budget
    if budget is not None:
        source = "DEVICE_MEMORY_BUDGET"
    elif device.type == "cuda":
        budget, source = torch.cuda.mem_get_info(device)[0], f"free memory of {torch.cuda.get_device_name(device)}"
    else:
        budget, source = None, "the CPU"
    sizes, mode_modules, working = {}, {}, {}
    for name in mode_names:
        mode, parts = MODES[name], mode_parts(loader, weights_dir, MODES[name], controlnet)
        for part in parts.values():
            sizes.setdefault(part.key, memory.file_bytes(part.weights, loader.dtype_of(part)))
        mode_modules[name] = frozenset(p.key for p in parts.values())
        working[name] = memory.working_bytes(
            parts["unet"].config(),
            parts["vae"].config(),
            mode.size,
            loader.dtype,
            loader.dtype_of(parts["vae"]),
            cfg=mode.uses_cfg(mode.guidance.default),
        )
    always = frozenset()
    if safety_checker:
        sizes["safety_checker"] = memory.file_bytes(safety_file(weights_dir), loader.dtype)
        always = frozenset({"safety_checker"})
    if controlnet and any(MODES[name].controlnets for name in mode_names):
        sizes["depth_estimator"] = memory.file_bytes(controls.depth_estimator_file(weights_dir), loader.dtype)
        always = always | {"depth_estimator"}
    return memory.make_plan(mode_modules, sizes, always, working, budget, source)


@dataclass
class Chunk:
    """Images [start, stop) of a batch, decoded in one call: host pixels, ready when `ready` has run."""

    start: int
    stop: int
    pixels: torch.Tensor
    began: object  # timeline marks
    ready: object


@dataclass
class Batch:
    """One pipeline call for jobs that share a batch_key (see the module docstring for its two stages)."""

    engine: Engine
    jobs: list[Job]
    timeline: Timeline = field(init=False)
    marks: dict = field(default_factory=dict)  # stage -> (start mark, end mark), read in end()
    host_seconds: dict = field(default_factory=dict)  # stages timed on the host (moves, LoRA, safety checker)
    steps: list = field(default_factory=list)  # marks at the end of each denoising step (steps[0]: its start)
    logged_steps: int = 0

    def __post_init__(self) -> None:
        first = self.jobs[0].request
        assert all(batch_key(j.request) == batch_key(first) for j in self.jobs), "jobs of one batch must share a key"
        self.first, self.mode = first, first.mode
        self.loaded = self.engine.modes[first.mode.name]
        if first.controls:  # the same modules, with the requests' ControlNets
            self.pipe = self.loaded.control_pipeline(tuple(c.net for c in first.controls), first.img2img)
        else:
            self.pipe = self.loaded.img2img if first.img2img else self.loaded.txt2img
        self.scheduled, self.runs = first.schedule
        self.timeline = Timeline(self.engine.device)
        # Batch image k: (job, index within the job, seed).
        self.images = [(job, i, seed) for job in self.jobs for i, seed in enumerate(job.request.seeds)]
        self.decode_seconds = [0.0] * len(self.images)
        self.flags: dict[int, bool] = {}
        self.pictures: dict[int, Image.Image] = {}  # decoded, waiting for the safety checker
        self.saving: list = []  # (future, job, seed, settings): written in encoder threads, yielded in order
        self.encode_seconds: dict[int, float] = {}

    # -- stage 1: the device thread ------------------------------------------------------------------------------
    def generate(self) -> Iterator[Chunk]:
        self._log_requests()
        seconds, _ = self.engine.residency.ensure(self.mode.name)
        if seconds:
            self.host_seconds["mode_load"] = seconds
        latents = self._denoise_with_retry()
        decoder = self.engine.decoder(self.first)
        n = len(self.images)
        size = self._chunk_size(decoder, n)
        for start in range(0, n, size):
            began = self.timeline.mark()
            pixels = decoding.to_host(decoding.decode(decoder, latents[start : start + size]))
            yield Chunk(start, min(n, start + size), pixels, began, self.timeline.mark())

    def _log_requests(self) -> None:
        mode, jobs = self.mode, self.jobs
        images_total = len(self.images)
        for job in jobs:
            r = job.request
            job.record("seeds", r.seeds)
            job.record("batch.requests", len(jobs))
            job.record("batch.images", images_total)
            if job.quiet:
                continue
            log.info(
                "mode %s, %d image(s) %dx%d, %d step(s), guidance %g, seeds %s%s",
                mode.name,
                r.num_outputs,
                r.width,
                r.height,
                self.runs,
                r.guidance_scale,
                r.seeds,
                f" (in a batch of {len(jobs)} requests)" if len(jobs) > 1 else "",
            )
            if r.negative_prompt and not uses_negative_prompt(r):
                log.warning(
                    "negative_prompt ignored: mode %s at guidance_scale %g runs without classifier-free "
                    "guidance, where a negative prompt has no effect%s",
                    mode.name,
                    r.guidance_scale,
                    ""
                    if mode.guidance.embedded or mode.guidance.range is None
                    else f" (use guidance_scale above 1, up to {mode.guidance.range[1]:g})",
                )

    def _denoise_with_retry(self) -> torch.Tensor:
        """_denoise, once more if the device ran out of memory and other modes can make room; the style LoRA
        files are closed after both attempts (the retry applies the LoRA again)."""
        try:
            try:
                return self._denoise()
            except torch.cuda.OutOfMemoryError:
                if not self.engine.residency.evict_all_but(self.mode.name):
                    raise
                torch.cuda.empty_cache()  # the other modes' weights are in host memory now: try once more
                self.logged_steps = 0  # the retry's steps are logged as they run
                return self._denoise()
        finally:
            for job in self.jobs:
                if job.lora:
                    job.lora.close()

    def _denoise(self) -> torch.Tensor:
        """img2img encoding, the style LoRA, text encoding and the denoising loop; returns the latents."""
        first, jobs, pipe = self.first, self.jobs, self.pipe
        kwargs: dict = {"height": first.height, "width": first.width}
        if first.img2img:
            start = self.timeline.mark()
            encoder = self.engine.encoder(first)
            latents = [
                decoding.encode(encoder, j.picture, self.engine.dtype).expand(j.request.num_outputs, -1, -1, -1)
                for j in jobs
            ]
            kwargs = {"image": torch.cat(latents), "strength": first.strength}
            if first.controls:  # the control images' size
                kwargs.update(height=first.height, width=first.width)
            self.marks["vae_encode"] = (start, self.timeline.mark())
        if first.controls:  # each control's map for every image of the batch
            maps = [[j.control_maps[k] for j in jobs for _ in j.request.seeds] for k in range(len(first.controls))]
            kwargs.update(controls.pipeline_kwargs(first.controls, maps, first.img2img))
        lora = jobs[0].lora
        started = time.perf_counter()
        # The style LoRA is on for this call only: removed on the way out, also on an error or a cancel.
        with style_lora(pipe, lora, first.lora_scale, self.mode.name) if lora else contextlib.nullcontext():
            applied = time.perf_counter()
            result = self._pipeline_call(kwargs)
            removing = time.perf_counter()
        if lora:
            self.host_seconds["lora_load"] = applied - started + time.perf_counter() - removing
        return result

    def _pipeline_call(self, kwargs: dict) -> torch.Tensor:
        jobs, pipe, timeline, first = self.jobs, self.pipe, self.timeline, self.first
        start = timeline.mark()
        embeds = prompts.embeddings(
            pipe,
            self.mode.family,
            self.mode.name,
            [j.request.prompt for j in jobs for _ in j.request.seeds],
            [j.request.negative_prompt for j in jobs for _ in j.request.seeds],
            uses_negative_prompt(first),
            None if first.lora_url else self.engine.prompts,  # a style LoRA may change the text encoders
        )
        end = timeline.mark()
        self.marks["text_encoding"] = (start, end)
        self.steps[:] = [end]  # denoising starts here

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            if all(job.cancelled for job in jobs):
                raise Cancelled("every request of this batch was canceled")
            self.steps.append(timeline.mark())
            self._log_steps(wait=False)
            return callback_kwargs

        return pipe(
            num_inference_steps=self.scheduled,
            guidance_scale=first.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for j in jobs for s in j.request.seeds],
            output_type="latent",
            callback_on_step_end=on_step_end,
            **embeds,
            **kwargs,
        ).images

    def _log_steps(self, wait: bool) -> None:
        """Log the steps that have run (all of them with `wait`): the logs follow the device, without stalling it."""
        while self.logged_steps + 1 < len(self.steps):
            k = self.logged_steps + 1
            if not wait and not self.timeline.done(self.steps[k]):
                return
            ms = self.timeline.seconds(self.steps[k - 1], self.steps[k]) * 1000
            if not all(job.quiet for job in self.jobs):
                log.info("step %d/%d: %.0f ms", k, self.runs, ms)
            self.logged_steps = k

    def _chunk_size(self, decoder, n: int) -> int:
        """Images per VAE call: on CUDA as many as fit in the free memory. On a CPU, where a decode is already
        parallel per image and batching gains nothing, one at a time, so that each image streams as soon as it
        is decoded."""
        device = self.engine.device
        if device.type != "cuda":
            return 1
        free = (
            torch.cuda.mem_get_info(device)[0]
            + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device)
        )
        return max(1, min(n, int(free * 0.8) // decoding.decode_bytes(decoder, self.first.width, self.first.height)))

    # -- stage 2: host work, on any thread -------------------------------------------------------------------------
    def finish(self, chunk: Chunk) -> Iterator[tuple[Job, Output]]:
        """A decoded chunk's images: written (encoder threads) and yielded in order as they are written. Where the
        safety checker runs, the batch's images wait until all are decoded: it checks them in one call."""
        self._log_steps(wait=True)
        seconds = self.timeline.seconds(chunk.began, chunk.ready)  # waits until the pixels are on the host
        for k in range(chunk.start, chunk.stop):
            self.decode_seconds[k] = seconds / (chunk.stop - chunk.start)
        self.pictures.update(zip(range(chunk.start, chunk.stop), decoding.to_images(chunk.pixels), strict=True))
        if self._checked() and chunk.stop < len(self.images):
            return
        pictures, self.pictures = self.pictures, {}
        if self._checked():
            self._check_safety(pictures)
        mode, runs = self.mode, self.runs
        for k, picture in pictures.items():
            job, i, seed = self.images[k]
            r = job.request
            if job.cancelled or self.flags.get(k):  # a flagged image is dropped
                continue
            settings = {
                "mode": mode.name,
                "model": mode.weights.repo.repo_id,
                "prompt": r.prompt,
                "negative_prompt": r.negative_prompt if uses_negative_prompt(r) else None,
                "seed": seed,
                "num_inference_steps": r.num_inference_steps,
                "denoising_steps": runs,
                "guidance_scale": r.guidance_scale,
                "width": r.width,
                "height": r.height,
                "strength": r.strength if r.img2img else None,
                "fast_decode": r.fast_decode,
            }
            if r.controls:
                settings["controls"] = [
                    {"type": c.kind, "scale": c.scale, "start": c.start, "end": c.end} for c in r.controls
                ]
            if r.fast_encode and r.img2img:
                settings["fast_encode"] = True
            path = None if job.out_dir is None else job.out_dir / f"out-{i}-{seed}.{r.output_format}"
            future = images.save_in_background(picture, path, r.output_format, r.output_quality, settings)
            self.saving.append((future, job, seed, settings))
        while self.saving and self.saving[0][0].done():
            yield self._saved()

    def _checked(self) -> bool:
        return self.engine.safety is not None and any(not j.request.disable_safety_checker for j in self.jobs)

    def _check_safety(self, pictures: dict[int, Image.Image]) -> None:
        """The safety checker on the images whose request keeps it on, in one batched call."""
        checker = self.engine.safety
        wanted = [
            k
            for k in pictures
            if not self.images[k][0].request.disable_safety_checker and not self.images[k][0].cancelled
        ]
        if not wanted:
            return
        started = time.perf_counter()
        self.flags.update(zip(wanted, checker.flagged([pictures[k] for k in wanted]), strict=True))
        self.host_seconds["safety_checker"] = (
            self.host_seconds.get("safety_checker", 0.0) + time.perf_counter() - started
        )

    def _saved(self) -> tuple[Job, Output]:
        future, job, seed, settings = self.saving.pop(0)
        written, seconds = future.result()
        self.encode_seconds[id(job)] = self.encode_seconds.get(id(job), 0.0) + seconds
        if isinstance(written, bytes):
            return job, Output(None, seed, settings, data=written)
        return job, Output(written, seed, settings)

    def end(self) -> Iterator[tuple[Job, Output | Exception]]:
        """The images still being written, then each job's metrics (and its failure, if all its images were
        flagged)."""
        while self.saving:
            yield self._saved()
        yield from self._control_map_outputs()
        shared = self._stage_seconds()
        for job in self.jobs:
            mine = [k for k, (j, _, _) in enumerate(self.images) if j is job]
            timings = dict(
                shared,
                vae_decode=sum(self.decode_seconds[k] for k in mine),
                image_encoding=self.encode_seconds.get(id(job), 0.0),
            )
            flagged = [self.images[k][2] for k in mine if self.flags.get(k)]
            if any(k in self.flags for k in mine):  # checked
                job.record("nsfw_flagged", len(flagged))
                if flagged:
                    log.warning(
                        "safety checker: %d of %d image(s) flagged as possibly NSFW and dropped (seeds %s)",
                        len(flagged),
                        len(mine),
                        flagged,
                    )
            else:
                timings.pop("safety_checker", None)
            for stage, seconds in timings.items():
                job.record(
                    f"timings.{stage}",
                    [round(s, 4) for s in seconds] if isinstance(seconds, list) else round(seconds, 4),
                )
            if flagged and len(flagged) == len(mine) and not job.cancelled:
                yield job, AllImagesFlagged(len(flagged))

    def _control_map_outputs(self) -> Iterator[tuple[Job, Output]]:
        """With return_control_maps, each control's map as a PNG after the request's images: what guided them."""
        for job in self.jobs:
            r = job.request
            if not r.return_control_maps or job.cancelled or job.out_dir is None:
                continue
            for k, (control, picture) in enumerate(zip(r.controls, job.control_maps, strict=True)):
                settings = {
                    "control": control.kind,
                    "input": f"{control.name}_image",
                    "width": r.width,
                    "height": r.height,
                }
                path = job.out_dir / f"control-{k}-{control.kind}.png"
                yield job, Output(images.save_image(picture, path, "png", 100, settings), r.seed, settings)

    def _stage_seconds(self) -> dict:
        """Every stage's duration, from the marks (the device has finished the batch by now)."""
        t = self.timeline
        out: dict = dict(self.host_seconds)
        for stage in ("vae_encode", "text_encoding"):
            if stage in self.marks:
                out[stage] = t.seconds(*self.marks[stage])
        steps = [t.seconds(a, b) for a, b in zip(self.steps, self.steps[1:], strict=False)]
        out["denoising"], out["steps"] = sum(steps), steps
        return out


__all__ = ["Engine", "InputError", "Output"]
