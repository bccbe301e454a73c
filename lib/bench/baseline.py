"""The peer baseline: each model card's own diffusers code, on the same weight files the engine loads, timed per
call and per stage (the GPU check compares every case with it).

The cards' code, with the local folder in place of the Hub id:
- sdxl-turbo, sd-turbo: `AutoPipelineForText2Image.from_pretrained(dir, torch_dtype=torch.float16, variant="fp16")`,
  `.to("cuda")`, then `pipe(prompt=..., num_inference_steps=1, guidance_scale=0.0)`;
- lcm (LCM Dreamshaper v7, which ships fp32 files and its own safety checker: the SD safety checker, here from the
  SD 1.5 folder): `num_inference_steps=4, guidance_scale=8.0`;
- lcm-lora-sdxl: SDXL base, `LCMScheduler.from_config(pipe.scheduler.config)`, `load_lora_weights(lora dir)`,
  `fuse_lora()`, then `num_inference_steps=4, guidance_scale=1`;
- TAESD cases: `pipe.vae = AutoencoderTiny.from_pretrained(taesd dir, torch_dtype=torch.float16)` (its card);
- more images: `num_images_per_prompt`.
Stages are timed with CUDA events in forward hooks on the pipeline's modules (the call itself is unchanged).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib.engine.modes import MODES, SAFETY_CHECKER

STAGES = {  # pipeline attribute -> stage name (the engine's metric names where they match)
    "text_encoder": "text_encoding",
    "text_encoder_2": "text_encoding",
    "unet": "denoising",
    "vae": "vae_decode",
    "safety_checker": "safety_checker",
}


@dataclass
class Baseline:
    mode: str
    pipe: object
    steps: int
    guidance: float
    load_s: float
    marks: list = field(default_factory=list)  # (stage, start event, end event) of the current call

    def __post_init__(self) -> None:
        self._hooks = []
        self.decoder = "vae"
        self._hook_modules()

    def _hook_modules(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for name, stage in STAGES.items():
            module = getattr(self.pipe, name, None)
            if module is None:
                continue
            target = module.decoder if name == "vae" else module  # the decode, not the whole autoencoder
            self._hooks.append(target.register_forward_pre_hook(lambda m, a, stage=stage: self._start(stage)))
            self._hooks.append(target.register_forward_hook(lambda m, a, o, stage=stage: self._end(stage)))

    def _event(self):
        if not torch.cuda.is_available() or self.pipe.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, stage: str) -> None:
        self.marks.append([stage, self._event(), None])

    def _end(self, stage: str) -> None:
        for mark in reversed(self.marks):
            if mark[0] == stage and mark[2] is None:
                mark[2] = self._event()
                return

    def use_taesd(self, weights_dir: Path) -> None:
        """The TAESD card's line: the tiny autoencoder decodes."""
        from diffusers import AutoencoderTiny

        repo = MODES[self.mode].weights.tiny_vae
        self.pipe.vae = AutoencoderTiny.from_pretrained(weights_dir / repo.repo_id, torch_dtype=self.pipe.dtype).to(
            self.pipe.device
        )
        self.decoder = "taesd"
        self._hook_modules()

    def __call__(self, prompt: str, size: int, images: int = 1, seed: int = 0) -> tuple[float, dict]:
        """One call of the card's code: (seconds, {stage: seconds}); the call ends with PIL images on the host."""
        self.marks = []
        started = time.perf_counter()
        out = self.pipe(
            prompt=prompt,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            num_images_per_prompt=images,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        seconds = time.perf_counter() - started
        assert len(out.images) == images
        stages: dict[str, float] = {}
        for stage, start, end in self.marks:
            elapsed = start.elapsed_time(end) / 1000 if hasattr(start, "elapsed_time") else end - start
            stages[stage] = stages.get(stage, 0.0) + elapsed
        stages["other"] = max(0.0, seconds - sum(stages.values()))
        return seconds, stages


def load(mode: str, weights_dir: Path, device: torch.device, dtype: torch.dtype) -> Baseline:
    """The card's pipeline for `mode` from `weights_dir` (the Hub layout), on `device` in `dtype`."""
    import diffusers
    import transformers
    from diffusers import AutoPipelineForText2Image, LCMScheduler

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    weights_dir = Path(weights_dir)
    spec = MODES[mode]
    repo = spec.weights.repo
    options: dict = {"torch_dtype": dtype}
    if repo.variant:
        options["variant"] = repo.variant
    if mode == "lcm":  # the real repo's own safety checker folders: the SD safety checker
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker = weights_dir / SAFETY_CHECKER.repo_id
        options["safety_checker"] = StableDiffusionSafetyChecker.from_pretrained(
            checker / "safety_checker", torch_dtype=dtype, variant=SAFETY_CHECKER.variant
        )
        options["feature_extractor"] = CLIPImageProcessor.from_pretrained(checker / "feature_extractor")
    started = time.perf_counter()
    pipe = AutoPipelineForText2Image.from_pretrained(weights_dir / repo.repo_id, **options).to(device)
    steps, guidance = spec.steps.default, spec.guidance.default
    if spec.weights.lora is not None:  # the LCM-LoRA card
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(weights_dir / spec.weights.lora.repo_id)
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Baseline(mode, pipe, steps, guidance, round(time.perf_counter() - started, 2))
