"""The mode table: the one place that says what each mode loads and which settings it accepts.

Everything else (input validation, loading, the weights manifest, the docs) reads from here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    # Subfolders the engine loads (a mode's pipeline has no safety checker: that is SAFETY_CHECKER, below).
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
    # The tiny autoencoder (TAESD / TAESDXL) that decodes the same latents ~10x faster: the `fast_decode` input.
    tiny_vae: Repo | None = None

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
        return tuple(r for r in (self.repo, self.lora, self.tiny_vae) if r is not None)


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
# The standard SD safety checker (CLIP ViT-L/14 image tower + concept embeddings), one for every mode. Only these
# two folders of the SD 1.5 repo: enabling an SDXL mode fetches them, not the SD 1.5 UNet (lib/safety.py).
SAFETY_CHECKER = Repo(SD15.repo_id, "fp16", ("safety_checker", "feature_extractor"), SD15.licence)
# TAESD / TAESDXL: an AutoencoderTiny in the diffusers layout at the repo's root (config.json +
# diffusion_pytorch_model.safetensors); TINY_VAE names that root component.
TINY_VAE = "taesd"
TAESD = Repo("madebyollin/taesd", None, (TINY_VAE,), "MIT")
TAESDXL = Repo("madebyollin/taesdxl", None, (TINY_VAE,), "MIT")

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("sdxl-turbo", SDXL, SDXL_TURBO, None, None, 1, (1, 4), 0.0, (0.0,), None, False, 512,
             "SDXL Turbo: 1-4 steps, no guidance, 512px", TAESDXL),
        Mode("sd-turbo", SD, SD_TURBO, None, None, 1, (1, 4), 0.0, (0.0,), None, False, 512,
             "SD Turbo: 1-4 steps, no guidance, 512px", TAESD),
        Mode("lcm", LCM, LCM_DREAMSHAPER, None, None, 4, (1, 8), 8.0, (), (1.0, 15.0), True, 768,
             "LCM Dreamshaper v7: 4-8 steps, guidance embedded in the UNet, 768px", TAESD),
        Mode("lcm-lora-sdxl", SDXL, SDXL_BASE, LCM_LORA_SDXL, "LCMScheduler", 4, (2, 8), 1.0, (0.0,), (1.0, 2.0),
             False, 1024, "SDXL base + LCM-LoRA: 2-8 steps, guidance 0 or 1-2, 1024px", TAESDXL),
        Mode("lcm-lora-sd15", SD, SD15, LCM_LORA_SD15, "LCMScheduler", 4, (2, 8), 1.0, (0.0,), (1.0, 2.0),
             False, 512, "SD 1.5 + LCM-LoRA: 2-8 steps, guidance 0 or 1-2, 512px", TAESD),
    )
}
DEFAULT_MODE = "sdxl-turbo"


def all_repos(mode_names, safety_checker: bool = False) -> list[Repo]:
    """The repos the given modes need, each once, in table order; with `safety_checker`, plus the checker's
    folders (merged into the SD 1.5 repo's components where a mode loads that repo too)."""
    seen: dict[str, Repo] = {}
    for repo in [r for name in mode_names for r in MODES[name].repos] + ([SAFETY_CHECKER] if safety_checker else []):
        had = seen.setdefault(repo.repo_id, repo)
        if had is not repo and not set(repo.components) <= set(had.components):
            seen[repo.repo_id] = replace(had, components=had.components + tuple(
                c for c in repo.components if c not in had.components))
    return list(seen.values())


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def weight_file(repo: Repo, component: str) -> str:
    """A component's safetensors file as the Hub repo names it (fp16 variants: `model.fp16.safetensors`)."""
    stem = "model" if component.startswith("text_encoder") or component == "safety_checker" \
        else "diffusion_pytorch_model"  # transformers / diffusers naming
    return f"{component}/{stem}{f'.{repo.variant}' if repo.variant else ''}.safetensors"


def repo_files(repo: Repo) -> list[str]:
    """Files (relative to the repo) the engine reads from `repo`: what setup() checks and the manifest lists."""
    if not repo.components:  # a LoRA repo
        return [LORA_WEIGHT_NAME]
    if repo.components == (TINY_VAE,):  # TAESD / TAESDXL: one diffusers model at the repo's root
        return ["config.json", "diffusion_pytorch_model.safetensors"]
    files = ["model_index.json"]
    for c in repo.components:
        if c == "scheduler":
            files.append(f"{c}/scheduler_config.json")
        elif c.startswith("tokenizer"):
            files += [f"{c}/{name}" for name in TOKENIZER_FILES]
        elif c == "feature_extractor":
            files.append(f"{c}/preprocessor_config.json")
        else:
            files += [f"{c}/config.json", weight_file(repo, c)]
    return files
