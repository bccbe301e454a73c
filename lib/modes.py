"""The mode table: the one place that says what each mode loads and which settings it accepts.

Everything else (input validation, loading, the weights manifest, the docs) reads from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Pipeline families: which diffusers pipeline classes run a mode.
SD = "sd"
SDXL = "sdxl"
LCM = "lcm"

PIPELINE_CLASSES = {
    # family: (txt2img class, img2img class)
    SD: ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    SDXL: ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    LCM: ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline"),
}


@dataclass(frozen=True)
class Repo:
    """A Hugging Face model repo as setup() reads it: WEIGHTS_DIR/<repo_id>/<path_in_repo>."""

    repo_id: str
    # Weight-file variant: "fp16" selects model.fp16.safetensors; None the plain files.
    variant: str | None
    # Subfolders the engine loads (the safety checker and feature extractor are not among them).
    components: tuple[str, ...]
    licence: str


@dataclass(frozen=True)
class Mode:
    name: str
    family: str
    repo: Repo
    lora: Repo | None  # fused into the UNet at setup
    scheduler: str | None  # replaces the repo's scheduler class (keeping its config); None keeps it
    steps_default: int
    steps_range: tuple[int, int]
    guidance_default: float
    # Allowed guidance: exact values, and/or one closed interval.
    guidance_values: tuple[float, ...]
    guidance_range: tuple[float, float] | None
    # Guidance is an embedding the UNet reads (LCM), not classifier-free guidance.
    guidance_embedded: bool
    default_size: int
    summary: str

    def guidance_allowed(self, value: float) -> bool:
        if value in self.guidance_values:
            return True
        return self.guidance_range is not None and self.guidance_range[0] <= value <= self.guidance_range[1]

    def describe_guidance(self) -> str:
        parts = [f"exactly {v:g}" for v in self.guidance_values]
        if self.guidance_range:
            parts.append(f"{self.guidance_range[0]:g} to {self.guidance_range[1]:g}")
        return " or ".join(parts)

    def negative_prompt_has_effect(self, guidance: float) -> bool:
        """A negative prompt only acts through classifier-free guidance, which runs at guidance > 1."""
        return not self.guidance_embedded and guidance > 1

    @property
    def repos(self) -> tuple[Repo, ...]:
        return (self.repo,) if self.lora is None else (self.repo, self.lora)


SDXL_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae")
SD_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "unet", "vae")
NON_COMMERCIAL = "Stability AI Non-Commercial Research Community License (non-commercial use only)"

SDXL_TURBO = Repo("stabilityai/sdxl-turbo", "fp16", SDXL_COMPONENTS, NON_COMMERCIAL)
SD_TURBO = Repo("stabilityai/sd-turbo", "fp16", SD_COMPONENTS, NON_COMMERCIAL)
LCM_DREAMSHAPER = Repo("SimianLuo/LCM_Dreamshaper_v7", None, SD_COMPONENTS, "MIT")
SDXL_BASE = Repo("stabilityai/stable-diffusion-xl-base-1.0", "fp16", SDXL_COMPONENTS, "CreativeML Open RAIL++-M")
SD15 = Repo("stable-diffusion-v1-5/stable-diffusion-v1-5", "fp16", SD_COMPONENTS, "CreativeML Open RAIL-M")
LCM_LORA_SDXL = Repo("latent-consistency/lcm-lora-sdxl", None, (), "Open RAIL++-M")
LCM_LORA_SD15 = Repo("latent-consistency/lcm-lora-sdv1-5", None, (), "Open RAIL++-M")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("sdxl-turbo", SDXL, SDXL_TURBO, None, None, 1, (1, 4), 0.0, (0.0,), None, False, 512,
             "SDXL Turbo: 1-4 steps, no guidance, 512px"),
        Mode("sd-turbo", SD, SD_TURBO, None, None, 1, (1, 4), 0.0, (0.0,), None, False, 512,
             "SD Turbo: 1-4 steps, no guidance, 512px"),
        Mode("lcm", LCM, LCM_DREAMSHAPER, None, None, 4, (1, 8), 8.0, (), (1.0, 15.0), True, 768,
             "LCM Dreamshaper v7: 4-8 steps, guidance embedded in the UNet, 768px"),
        Mode("lcm-lora-sdxl", SDXL, SDXL_BASE, LCM_LORA_SDXL, "LCMScheduler", 4, (2, 8), 1.0, (0.0,), (1.0, 2.0),
             False, 1024, "SDXL base + LCM-LoRA: 2-8 steps, guidance 0 or 1-2, 1024px"),
        Mode("lcm-lora-sd15", SD, SD15, LCM_LORA_SD15, "LCMScheduler", 4, (2, 8), 1.0, (0.0,), (1.0, 2.0),
             False, 512, "SD 1.5 + LCM-LoRA: 2-8 steps, guidance 0 or 1-2, 512px"),
    )
}
DEFAULT_MODE = "sdxl-turbo"


def all_repos(mode_names) -> list[Repo]:
    """The repos the given modes need, each once, in table order."""
    seen: dict[str, Repo] = {}
    for name in mode_names:
        for repo in MODES[name].repos:
            seen.setdefault(repo.repo_id, repo)
    return list(seen.values())
