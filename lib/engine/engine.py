"""The engine: loads the enabled modes once, then turns validated Requests into image files.

A batch (requests that share one pipeline call) runs in two stages, which lib/engine/batcher.py puts on two threads so
that the next batch's denoising overlaps this one's files:
- `Batch.generate`, on the device thread: the mode moved onto the device if the memory plan kept it in host
  memory (lib/engine/memory.py), text encoding, denoising (lib/engine/schedulers.py: no host sync inside it), the
  decode, one VAE call per chunk of images that fits in memory, and the safety checker on the batch's decoded pixels
  in one call (lib/engine/safety.py); the pixels and the verdicts go to host memory asynchronously;
- `Batch.finish` / `Batch.end`, anywhere else: PIL images, the image files, the metrics.
Timings are CUDA events (lib/engine/timeline.py), read after the work: nothing waits for the device on the way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from lib.engine import controls, decoding, devices, images, memory, precision, prompts, schedulers, speed
from lib.engine.inputs import NUM_OUTPUTS_RANGE, SIZE_RANGE, InputError, Request, control_specs, resolve_request
from lib.engine.loading import ComponentLoader, LoadedMode, check_present, load_modes, mode_parts
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

    def cancel(self) -> None:
        """From any thread: the batch writes no more of this job's images (one being written may still fail)."""
        self.cancelled = True


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
        device, chosen_by = (torch.device(device), "the caller") if device else devices.choose_from_env()
        log.info("device %s, chosen by %s", devices.describe(device), chosen_by)
        dtypes = precision.choose(device, requested=Settings().model_dtype)
        dtype = dtype or dtypes.model
        switches = switches or speed.Switches.from_env(device)
        weights_dir, mode_names = Path(weights_dir), tuple(mode_names)
        loader = ComponentLoader(
            device, dtype, vae_dtype=lambda config: speed.vae_dtype(config, switches, dtypes, dtype)
        )
        controlnet = Settings().controlnet
        plan = plan_memory(
            loader,
            weights_dir,
            mode_names,
            Settings().safety_checker,
            speed.graph_shapes(switches, mode_names),
            switches.graph_memory,
            controlnet,
        )
        log.info("%s", plan.describe())
        # The budget holds: beyond it, allocations fail and are retried (without DEVICE_MEMORY_BUDGET: the device).
        memory.cap_allocator(device, plan.budget if plan.source == "DEVICE_MEMORY_BUDGET" else None)
        resident = {k for name in plan.resident for k in plan.mode_modules[name]}
        loader.on_device = resident.__contains__
        started = time.perf_counter()
        modes = load_modes(weights_dir, mode_names, device, dtype, loader, controlnet)
        log.info(
            "loaded %s on %s (%s) in %.1f s%s",
            ", ".join(mode_names),
            device,
            str(dtype).removeprefix("torch."),
            time.perf_counter() - started,
            f"; device memory: {devices.memory_line(device)}" if device.type != "cpu" else "",
        )
        safety = load_safety_checker(weights_dir, device, dtype)
        engine = cls(modes, device, dtype, safety, None)
        if engine.controlnet:
            engine.depth = controls.DepthEstimator.load(weights_dir, device, dtype)
        limit = switches.graph_memory
        if switches.cuda_graphs and plan.budget is not None and limit is not None and plan.graph_pool < limit:
            # The budget left the graphs less than SPEED_GRAPH_MEMORY: no graph may need more than that.
            log.info("memory: CUDA graphs up to %s each (what the budget leaves)", memory.human(plan.graph_pool))
            switches = dataclasses.replace(switches, graph_memory=plan.graph_pool)
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
        devices.choose_from_env()  # a MODEL_DEVICE this machine lacks fails now, not after the downloads
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

    def need(self, requests: list[Request]) -> int:
        """Working memory a batch of these (compatible) requests needs on the device (lib/engine/memory.py)."""
        first = requests[0]
        estimate = self.residency.plan.estimates.get(first.mode.name)
        if estimate is None:  # an engine built without a plan
            return 0
        images = sum(r.num_outputs for r in requests)
        checked = sum(r.num_outputs for r in requests if not r.disable_safety_checker) if self.safety else 0
        runs = first.schedule[1]
        cfg = first.mode.uses_cfg(first.guidance_scale)
        return estimate.need(first.width, first.height, images, runs, cfg, checked=checked)

    def fits(self, requests: list[Request]) -> bool:
        """Whether a batch of these requests fits the memory budget beside its mode's weights alone."""
        plan = self.residency.plan
        if plan.usable is None:
            return True
        return plan.weights([requests[0].mode.name]) + self.need(requests) <= plan.usable

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
    loader: ComponentLoader,
    weights_dir: Path,
    mode_names,
    safety_checker: bool,
    graph_shapes: dict | None = None,
    graph_memory: int | None = None,
    controlnet: bool = False,
) -> memory.Plan:
    """The memory plan from the files' sizes and the models' configs, before anything is loaded
    (lib/engine/memory.py). `graph_shapes`: per mode, the (batch entries, width, height) its UNet's CUDA graphs
    capture; the graphs share one pool, the size of the largest, and none larger than `graph_memory` is recorded
    (the pool is counted at that limit, or lower where the budget leaves less: Engine.load then lowers the limit).
    With `controlnet`, each mode's ControlNets count as its modules and the depth estimator as a module every mode
    uses."""
    check_present(weights_dir, mode_names, controlnet)  # one message for every missing file, before any is read
    if safety_checker:
        check_safety_weights(weights_dir)
    device = loader.device
    budget = Settings().device_memory_budget
    if budget is not None:
        source = "DEVICE_MEMORY_BUDGET"
    elif device.type == "cuda":
        budget, source = torch.cuda.mem_get_info(device)[0], f"free memory of {torch.cuda.get_device_name(device)}"
    else:  # the CPU, and MPS, whose unified memory is the host's: every mode stays where it is
        budget, source = None, "the CPU" if device.type == "cpu" else f"{device.type} (unified memory)"
    checker = safety_shape(weights_dir) if safety_checker else None
    sizes, mode_modules, largest, estimates = {}, {}, {}, {}
    for name in mode_names:
        mode, parts = MODES[name], mode_parts(loader, weights_dir, MODES[name], controlnet)
        for part in parts.values():
            sizes.setdefault(part.key, memory.file_bytes(part.weights, loader.dtype_of(part)))
        mode_modules[name] = frozenset(p.key for p in parts.values())
        vae = parts["vae"]
        estimate = memory.ModeMemory(
            parts["unet"].config(), memory.decoder_width(vae.config()), loader.dtype, loader.dtype_of(vae), checker
        )
        estimates[name] = estimate
        biggest, images = SIZE_RANGE[1], NUM_OUTPUTS_RANGE[1]
        cfg = mode.uses_cfg(max(mode.guidance.values + (mode.guidance.range or ())))
        largest[name] = estimate.need(biggest, biggest, images, mode.steps.range[1], cfg)
    # The pool holds the largest graph: up to `graph_memory` (no graph larger is recorded: the UNets', the decoders'
    # and the text encoders' alike); without that limit, the UNets' largest graph by estimate.
    pool = max((memory.graph_pool_bytes(estimates[n], shapes) for n, shapes in (graph_shapes or {}).items()), default=0)
    pool = pool if graph_memory is None or not graph_shapes else graph_memory
    always = frozenset()
    if safety_checker:
        sizes["safety_checker"] = memory.file_bytes(safety_file(weights_dir), loader.dtype)
        always = frozenset({"safety_checker"})
    if controlnet and any(MODES[name].controlnets for name in mode_names):
        sizes["depth_estimator"] = memory.file_bytes(controls.depth_estimator_file(weights_dir), loader.dtype)
        always = always | {"depth_estimator"}
    plan = memory.make_plan(mode_modules, sizes, always, largest, budget, source, pool)
    return replace(plan, estimates=estimates)


def safety_shape(weights_dir: Path) -> tuple[int, int]:
    """The safety checker's CLIP tower: (tokens, width), from its config (what its activations scale with)."""
    import json

    vision = json.loads((safety_file(weights_dir).parent / "config.json").read_text())["vision_config"]
    tokens = (vision.get("image_size", 224) // vision.get("patch_size", 14)) ** 2 + 1
    return tokens, vision.get("hidden_size", 1024)


@dataclass
class Chunk:
    """Images [start, stop) of a batch, decoded in one call: host pixels, ready when `ready` has run; the last chunk
    of a checked batch also brings the safety checker's verdicts on Batch.checked (host bools, ready with it)."""

    start: int
    stop: int
    pixels: torch.Tensor
    began: object  # timeline marks: the decode's start, its pixels copied, everything of this chunk done
    decoded: object
    ready: object
    verdicts: torch.Tensor | None = None


@dataclass
class Batch:
    """One pipeline call for jobs that share a batch_key (see the module docstring for its two stages)."""

    engine: Engine
    jobs: list[Job]
    timeline: Timeline = field(init=False)
    marks: dict = field(default_factory=dict)  # stage -> (start mark, end mark), read in end()
    host_seconds: dict = field(default_factory=dict)  # stages timed on the host (moves, LoRA)
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
        self.flags: dict[int, bool] = {}  # the safety checker's verdicts on the checked images
        self.checked: list[int] = []  # the images the checker judges (set by generate)
        self.safety_marks: list = []  # (start, end) of each check on the device
        self.pictures: dict[int, Image.Image] = {}  # decoded, waiting for the safety checker
        self.saving: list = []  # (future, job, seed, settings): written in encoder threads, yielded in order
        self.encode_seconds: dict[int, float] = {}

    # -- stage 1: the device thread ------------------------------------------------------------------------------
    def generate(self) -> Iterator[Chunk]:
        self._log_requests()
        checker = self.engine.safety
        if checker is not None:
            jobs = [job for job, _, _ in self.images]
            self.checked = [k for k, j in enumerate(jobs) if not (j.request.disable_safety_checker or j.cancelled)]
        seconds, _ = self.engine.residency.ensure(self.mode.name, self.engine.need([j.request for j in self.jobs]))
        if seconds:
            self.host_seconds["mode_load"] = seconds
        latents = self._denoise_with_retry()
        decoder = self.engine.decoder(self.first)
        n = len(self.images)
        to_check = []  # the checked images' pixels, on the device until the last chunk is decoded
        for start, stop, began, pixels in self._decode(decoder, latents):
            timeline = self.timeline
            host = decoding.to_host(pixels)
            decoded = timeline.mark()
            mine = [k - start for k in self.checked if start <= k < stop]
            if mine:
                to_check.append(pixels if len(mine) == stop - start else pixels[mine])
            verdicts = None
            if stop == n and to_check:  # the checker right after the last decode, on the device, in one call
                verdicts = decoding.to_host(checker.check(torch.cat(to_check)))  # one copy back per batch
                self.safety_marks.append((decoded, timeline.mark()))
                to_check.clear()
            yield Chunk(start, stop, host, began, decoded, timeline.mark(), verdicts)

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
        files are closed after both attempts (the retry applies the LoRA again). The retry runs after the `except`
        block: inside it the error's traceback still holds the failed attempt's frames, and their tensors."""
        try:
            try:
                return self._denoise()
            except torch.cuda.OutOfMemoryError:
                if not self.engine.residency.can_evict(self.mode.name):
                    raise
            self._make_room()
            self.logged_steps = 0  # the retry's steps are logged as they run
            return self._denoise()
        finally:
            for job in self.jobs:
                if job.lora:
                    job.lora.close()

    def _make_room(self) -> bool:
        """After an out-of-memory error: every other mode out, the allocator's cache emptied. Whether a mode went."""
        evicted = self.engine.residency.evict_all_but(self.mode.name)
        gc.collect()  # the failed attempt's tensors, should anything in its frames form a cycle
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        return bool(evicted)

    def _decode(self, decoder, latents: torch.Tensor) -> Iterator[tuple[int, int, object, torch.Tensor]]:
        """(start, stop, start mark, pixels) per chunk of images decoded in one call: as many per call as fit. Out of
        memory, a chunk is decoded again (after the `except` block, the failed call's tensors gone) with every other
        mode moved out, then in halves, then one image at a time in tiles (lib/engine/decoding.py)."""
        n, size, tiled, start = len(latents), self._chunk_size(decoder, len(latents)), False, 0
        while start < n:
            stop = min(n, start + size)
            began = self.timeline.mark()
            try:
                pixels = decoding.decode(decoder, latents[start:stop], tiled=tiled)
            except torch.cuda.OutOfMemoryError:
                if tiled:  # nothing smaller to try
                    raise
                pixels = None
            if pixels is None:
                if not self._make_room():
                    if stop - start > 1:
                        size = max(1, (stop - start) // 2)
                    else:
                        tiled = True
                        log.warning(
                            "out of device memory decoding a %dx%d image: decoding it in tiles",
                            self.first.width,
                            self.first.height,
                        )
                continue
            yield start, stop, began, pixels
            start = stop

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

        seeds = [s for j in jobs for s in j.request.seeds]
        scheduler = pipe.scheduler
        if isinstance(scheduler, schedulers.SyncFree):  # the noise drawn up front, copied once (schedulers.py)
            latent = pipe.vae_scale_factor
            shape = (pipe.unet.config.in_channels, first.height // latent, first.width // latent)
            dtype = embeds["prompt_embeds"].dtype
            initial, scheduler.noise = schedulers.draw(
                seeds, shape, dtype, self.engine.device, self.runs, scheduler.DRAWS_PER_STEP
            )
            if not first.img2img:  # img2img draws its initial noise itself (the same values: fresh generators)
                kwargs["latents"] = initial
        try:
            return pipe(
                num_inference_steps=self.scheduled,
                guidance_scale=first.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="latent",
                callback_on_step_end=on_step_end,
                **embeds,
                **kwargs,
            ).images
        finally:
            scheduler.noise = None

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
        """Images per VAE call: on CUDA as many as fit in the room left. On a CPU, where a decode is already
        parallel per image and batching gains nothing, one at a time, so that each image streams as soon as it
        is decoded."""
        room = memory.device_room(self.engine.device)  # within DEVICE_MEMORY_BUDGET where it is set
        if room is None:
            return 1
        return max(1, min(n, int(room * 0.8) // decoding.decode_bytes(decoder, self.first.width, self.first.height)))

    # -- stage 2: host work, on any thread -------------------------------------------------------------------------
    def finish(self, chunk: Chunk) -> Iterator[tuple[Job, Output]]:
        """A decoded chunk's images: written (encoder threads) and yielded in order as they are written. Where the
        safety checker runs, the batch's images wait for its verdicts, which come with the last chunk."""
        self._log_steps(wait=True)
        self.timeline.seconds(chunk.began, chunk.ready)  # waits until the pixels (and verdicts) are on the host
        seconds = self.timeline.seconds(chunk.began, chunk.decoded)
        for k in range(chunk.start, chunk.stop):
            self.decode_seconds[k] = seconds / (chunk.stop - chunk.start)
        self.pictures.update(zip(range(chunk.start, chunk.stop), decoding.to_images(chunk.pixels), strict=True))
        if self.checked and chunk.stop < len(self.images):
            return
        pictures, self.pictures = self.pictures, {}
        if chunk.verdicts is not None:
            self.flags.update(zip(self.checked, chunk.verdicts.tolist(), strict=True))
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
            yield from self._saved()

    def _saved(self) -> Iterator[tuple[Job, Output]]:
        """The oldest image being written, once written; nothing for a canceled job's image that could not be written
        (a canceled prediction's folder is removed at once: the other jobs of the batch go on)."""
        future, job, seed, settings = self.saving.pop(0)
        try:
            written, seconds = future.result()
        except OSError:
            if job.cancelled:
                return
            raise
        self.encode_seconds[id(job)] = self.encode_seconds.get(id(job), 0.0) + seconds
        if isinstance(written, bytes):
            yield job, Output(None, seed, settings, data=written)
        else:
            yield job, Output(written, seed, settings)

    def end(self) -> Iterator[tuple[Job, Output | Exception]]:
        """The images still being written, then each job's metrics (and its failure, if all its images were
        flagged)."""
        while self.saving:
            yield from self._saved()
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
        if self.safety_marks:
            out["safety_checker"] = sum(t.seconds(*marks) for marks in self.safety_marks)
        steps = [t.seconds(a, b) for a, b in zip(self.steps, self.steps[1:], strict=False)]
        out["denoising"], out["steps"] = sum(steps), steps
        return out


__all__ = ["Engine", "InputError", "Output"]
