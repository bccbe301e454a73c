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
# With a control (lib/engine/controls.py). diffusers' ControlNet img2img pipelines never pass LCM's guidance embedding
# (timestep_cond) to the UNet and run classifier-free guidance instead: the LCM family has no img2img with a control.
CONTROL_PIPELINE_CLASSES = {
    SD: ("StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline"),
    SDXL: ("StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline"),
    LCM: ("StableDiffusionControlNetPipeline", None),
}


# The file a diffusers LoRA repo holds (the LCM-LoRAs).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Repo:
    """A Hugging Face model repo as setup() reads it: WEIGHTS_DIR/<repo_id>/<path_in_repo>."""

    repo_id: str
    # Weight-file variant: "fp16" selects model.fp16.safetensors; None the plain files.
    variant: str | None
    # Subfolders the engine loads (a mode's pipeline has no safety checker: that is SAFETY_CHECKER, below).
    components: tuple[str, ...]
    licence: str
    # A LoRA repo (no components): the LoRA files the engine reads from it, () for the diffusers name alone. One repo
    # may hold several (ByteDance's 2-, 4- and 8-step LoRAs): a mode names its own file, and all_repos gathers the
    # files of the enabled modes.
    lora_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Steps:
    default: int
    range: tuple[int, int]

    def describe(self) -> str:
        if self.range[0] == self.range[1]:  # a checkpoint distilled for one step count
            return f"{self.default} (only {self.default})"
        return f"{self.default} ({self.range[0]}-{self.range[1]})"


@dataclass(frozen=True)
class Guidance:
    default: float
    values: tuple[float, ...] = ()  # allowed exact values
    range: tuple[float, float] | None = None  # and/or one closed interval
    embedded: bool = False  # an embedding the UNet reads (LCM), not classifier-free guidance

    def allows(self, value: float) -> bool:
        return value in self.values or (self.range is not None and self.range[0] <= value <= self.range[1])

    def describe(self) -> str:
        """What is allowed, for messages: 'exactly 0', '1 to 15', 'exactly 0 or 1 to 2'."""
        parts = [f"exactly {v:g}" for v in self.values]
        if self.range:
            parts.append(f"{self.range[0]:g} to {self.range[1]:g}")
        return " or ".join(parts)

    def short(self) -> str:
        """For summaries and tables: 'only 0', '1-15, an embedding in the UNet', '0, or 1-2'."""
        if not self.range:
            return "only " + ", ".join(f"{v:g}" for v in self.values)
        interval = f"{self.range[0]:g}-{self.range[1]:g}"
        if self.embedded:
            return f"{interval}, an embedding in the UNet"
        return ", ".join(f"{v:g}" for v in self.values) + f", or {interval}"


@dataclass(frozen=True)
class Weights:
    repo: Repo
    lora: Repo | None = None  # fused into the UNet at setup
    scheduler: str | None = None  # replaces the repo's scheduler class (keeping its config); None keeps it
    # The tiny autoencoder (TAESD / TAESDXL) that decodes the same latents ~10x faster: the `fast_decode` input.
    tiny_vae: Repo | None = None
    # Scheduler config values that replace the repo's (as `Scheduler.from_config(config, **these)` does).
    scheduler_config: tuple[tuple[str, object], ...] = ()

    @property
    def lora_file(self) -> str | None:
        """The file of `lora` this mode fuses."""
        return None if self.lora is None else (self.lora.lora_files or (LORA_WEIGHT_NAME,))[0]


@dataclass(frozen=True)
class Mode:
    name: str
    title: str  # what the weights are called: "SDXL Turbo", "SDXL base + LCM-LoRA"
    family: str  # which pipeline classes run it
    base_model: str  # what its UNet was trained from (a style LoRA must be made for it): "SDXL", "SD 1.5"
    steps: Steps
    guidance: Guidance
    size: int  # default width and height; img2img keeps this many pixels at the input's aspect ratio
    weights: Weights
    # Loaded only where ENABLED_MODES names it (each costs a full UNet of memory): not in the default set.
    opt_in: bool = False

    @property
    def summary(self) -> str:
        guidance = (
            "guidance embedded in the UNet"
            if self.guidance.embedded
            else "no guidance"
            if not self.guidance.range
            else f"guidance {self.guidance.short()}"
        )
        lo, hi = self.steps.range
        steps = f"{lo} steps" if lo == hi else f"{lo}-{hi} steps"
        return f"{self.title}: {steps}, {guidance}, {self.size}px"

    def uses_cfg(self, guidance: float) -> bool:
        """Classifier-free guidance runs at guidance > 1 (where the guidance is not embedded); a negative prompt
        acts only through it."""
        return not self.guidance.embedded and guidance > 1

    @property
    def repos(self) -> tuple[Repo, ...]:
        w = self.weights
        return tuple(r for r in (w.repo, w.lora, w.tiny_vae) if r is not None)

    @property
    def controlnets(self) -> ControlNets | None:
        """The mode's ControlNets (CONTROLNETS, below), or None where it has none."""
        return CONTROLNETS.get(self.name)


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
# The standard SD safety checker (CLIP ViT-L/14 image tower + concept embeddings), one for every mode. Only these
# two folders of the SD 1.5 repo: enabling an SDXL mode fetches them, not the SD 1.5 UNet (lib/engine/safety.py).
SAFETY_CHECKER = Repo(SD15.repo_id, "fp16", ("safety_checker", "feature_extractor"), SD15.licence)
# TAESD / TAESDXL: an AutoencoderTiny in the diffusers layout at the repo's root (config.json +
# diffusion_pytorch_model.safetensors); TINY_VAE names that root component.
TINY_VAE = "taesd"
TAESD = Repo("madebyollin/taesd", None, (TINY_VAE,), "MIT")
TAESDXL = Repo("madebyollin/taesdxl", None, (TINY_VAE,), "MIT")

# The turbo models are distilled for 1-4 steps without classifier-free guidance; the LCM-LoRAs for 2-8 steps at
# guidance 1 (1-2 sharpens, 0 also works).
TURBO_STEPS, TURBO_GUIDANCE = Steps(default=1, range=(1, 4)), Guidance(default=0.0, values=(0.0,))
LCM_LORA_STEPS = Steps(default=4, range=(2, 8))
LCM_LORA_GUIDANCE = Guidance(default=1.0, values=(0.0,), range=(1.0, 2.0))

# The table, one mode each.
# fmt: off
MODES: dict[str, Mode] = {m.name: m for m in (
    Mode(name="sdxl-turbo", title="SDXL Turbo", family=SDXL, base_model="SDXL", size=512,
         steps=TURBO_STEPS, guidance=TURBO_GUIDANCE, weights=Weights(repo=SDXL_TURBO, tiny_vae=TAESDXL)),
    Mode(name="sd-turbo", title="SD Turbo", family=SD, base_model="SD 2.1", size=512,
         steps=TURBO_STEPS, guidance=TURBO_GUIDANCE, weights=Weights(repo=SD_TURBO, tiny_vae=TAESD)),
    Mode(name="lcm", title="LCM Dreamshaper v7", family=LCM, base_model="SD 1.5", size=768,
         steps=Steps(default=4, range=(1, 8)), guidance=Guidance(default=8.0, range=(1.0, 15.0), embedded=True),
         weights=Weights(repo=LCM_DREAMSHAPER, tiny_vae=TAESD)),
    Mode(name="lcm-lora-sdxl", title="SDXL base + LCM-LoRA", family=SDXL, base_model="SDXL", size=1024,
         steps=LCM_LORA_STEPS, guidance=LCM_LORA_GUIDANCE,
         weights=Weights(repo=SDXL_BASE, lora=LCM_LORA_SDXL, scheduler="LCMScheduler", tiny_vae=TAESDXL)),
    Mode(name="lcm-lora-sd15", title="SD 1.5 + LCM-LoRA", family=SD, base_model="SD 1.5", size=512,
         steps=LCM_LORA_STEPS, guidance=LCM_LORA_GUIDANCE,
         weights=Weights(repo=SD15, lora=LCM_LORA_SD15, scheduler="LCMScheduler", tiny_vae=TAESD)),
)}
# fmt: on

# SDXL-Lightning (ByteDance): SDXL base distilled for exactly 2, 4 or 8 steps, each published as a full UNet
# (5.14 GB) and as a LoRA (394 MB) of SDXL base. The LoRAs are used, fused at load: in memory a fused UNet is a full
# UNet either way, but a LoRA downloads in 394 MB beside the SDXL base files the lcm-lora-sdxl mode already fetches
# (docs/serving.md, "Modes and what a model downloads at boot"). The model card's settings: Euler with "trailing"
# timesteps, guidance 0. The 1-step checkpoint (an x0-predicting UNet, no LoRA, marked experimental by its authors)
# is left out. Only the 4-step mode is in the default set; the 2- and 8-step ones are enabled by naming them in
# ENABLED_MODES.
SDXL_LIGHTNING = Repo("ByteDance/SDXL-Lightning", None, (), "CreativeML Open RAIL++-M")
LIGHTNING_SCHEDULER = (("timestep_spacing", "trailing"),)


def lightning_mode(steps: int, opt_in: bool) -> Mode:
    lora = replace(SDXL_LIGHTNING, lora_files=(f"sdxl_lightning_{steps}step_lora.safetensors",))
    return Mode(
        name=f"sdxl-lightning-{steps}step",
        title=f"SDXL base + SDXL-Lightning {steps}-step LoRA",
        family=SDXL,
        base_model="SDXL",
        size=1024,
        steps=Steps(default=steps, range=(steps, steps)),
        guidance=TURBO_GUIDANCE,
        weights=Weights(
            repo=SDXL_BASE,
            lora=lora,
            scheduler="EulerDiscreteScheduler",
            scheduler_config=LIGHTNING_SCHEDULER,
            tiny_vae=TAESDXL,
        ),
        opt_in=opt_in,
    )


MODES.update((m.name, m) for m in (lightning_mode(2, True), lightning_mode(4, False), lightning_mode(8, True)))
DEFAULT_MODE = "sdxl-turbo"
# What ENABLED_MODES means when unset: every mode but the opt-in ones.
DEFAULT_ENABLED = tuple(name for name, m in MODES.items() if not m.opt_in)


# -- ControlNet: loaded only where the operator enables it (CONTROLNET=1) ---------------------------------------------
# A ControlNet repo is one diffusers model at the repo's root (config.json + diffusion_pytorch_model*.safetensors), as
# TAESD's; the depth estimator is a transformers model with its image processor's config.
CONTROLNET = "controlnet"
DEPTH_ESTIMATOR = "depth_estimator"
CANNY_NET, DEPTH_NET = "canny", "depth"


@dataclass(frozen=True)
class ControlNets:
    """A base model's ControlNets, by the net a control kind drives (CONTROL_KINDS)."""

    canny: Repo
    depth: Repo

    def repo(self, net: str) -> Repo:
        return {CANNY_NET: self.canny, DEPTH_NET: self.depth}[net]

    @property
    def repos(self) -> tuple[Repo, ...]:
        return (self.canny, self.depth)


# The kinds of control a request may ask for: what the image is, and which net it drives.
CONTROL_KINDS = {
    "canny": CANNY_NET,  # a picture: its edges, found in-process by OpenCV's Canny, guide the image
    "depth": DEPTH_NET,  # a picture: its depth, estimated in-process by Depth Anything V2 Small
    "scribble": CANNY_NET,  # lines drawn on a light background (a sketch, the realtime canvas): the lines are the edges
    "edge_map": CANNY_NET,  # already an edge map: white lines on black
    "depth_map": DEPTH_NET,  # already a depth map: near is bright
}
# The SDXL ones are the distilled "-small" ControlNets (160M parameters: an eighth of the full SDXL ControlNet's size).
# The canny one's fp16 file is not on the repo's main branch: its fp32 file is fetched and loaded in the model dtype.
SDXL_CANNY = Repo("diffusers/controlnet-canny-sdxl-1.0-small", None, (CONTROLNET,), "Open RAIL++-M")
SDXL_DEPTH = Repo("diffusers/controlnet-depth-sdxl-1.0-small", "fp16", (CONTROLNET,), "Open RAIL++-M")
SD15_CANNY = Repo("lllyasviel/control_v11p_sd15_canny", "fp16", (CONTROLNET,), "OpenRAIL")
SD15_DEPTH = Repo("lllyasviel/control_v11f1p_sd15_depth", "fp16", (CONTROLNET,), "OpenRAIL")
DEPTH_ANYTHING = Repo("depth-anything/Depth-Anything-V2-Small-hf", None, (DEPTH_ESTIMATOR,), "Apache-2.0")
DEPTH_ESTIMATOR_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
SDXL_CONTROLNETS = ControlNets(canny=SDXL_CANNY, depth=SDXL_DEPTH)
SD15_CONTROLNETS = ControlNets(canny=SD15_CANNY, depth=SD15_DEPTH)
# sd-turbo has none: no ControlNet for SD 2.1-base comes as safetensors under an open licence.
CONTROLNETS: dict[str, ControlNets] = {
    "sdxl-turbo": SDXL_CONTROLNETS,
    "lcm-lora-sdxl": SDXL_CONTROLNETS,
    "lcm": SD15_CONTROLNETS,
    "lcm-lora-sd15": SD15_CONTROLNETS,
}


def control_modes() -> list[str]:
    """The modes that take a control, in table order."""
    return [name for name in MODES if name in CONTROLNETS]


def control_repos(mode_names) -> list[Repo]:
    """What CONTROLNET=1 adds for the given modes: their ControlNets and (where any has one) the depth estimator."""
    repos = [r for name in mode_names if MODES[name].controlnets for r in MODES[name].controlnets.repos]
    return list(dict.fromkeys(repos)) + ([DEPTH_ANYTHING] if repos else [])


# -- what the table says, for the predictor's inputs and the README ------------------------------------------------
def steps_bounds() -> tuple[int, int]:
    return min(m.steps.range[0] for m in MODES.values()), max(m.steps.range[1] for m in MODES.values())


def guidance_bounds() -> tuple[float, float]:
    ends = [v for m in MODES.values() for v in (*m.guidance.values, *(m.guidance.range or ()))]
    return min(ends), max(ends)


def mode_help() -> str:
    """The `mode` input's description: each mode's summary, with the licence notice on the non-commercial ones (the
    model page on Replicate shows it)."""
    notice = " (non-commercial use only: Stability AI Non-Commercial Research Community License)"
    return "; ".join(
        f"{m.name}: {m.summary}" + (notice if m.weights.repo.licence == NON_COMMERCIAL else "") for m in MODES.values()
    )


def steps_help() -> str:
    return "Denoising steps; default (allowed) per mode: " + "; ".join(
        f"{m.name} {m.steps.describe()}" for m in MODES.values()
    )


def guidance_help() -> str:
    return "Default (allowed) per mode: " + "; ".join(
        f"{m.name} {m.guidance.default:g} ({m.guidance.short()})" for m in MODES.values()
    )


def markdown_table() -> str:
    """The README's table of modes."""

    def link(repo: Repo) -> str:
        return f"[{repo.repo_id}](https://huggingface.co/{repo.repo_id})"

    def lora(m: Mode) -> str:
        w = m.weights
        if not w.lora:
            return ""
        named = f" `{w.lora_file}`" if w.lora_file != LORA_WEIGHT_NAME else ""  # one of several files in the repo
        return f" + {link(w.lora)}{named}, fused"

    rows = [
        "| `mode` | weights | steps: default (allowed) | guidance: default (allowed) | default size | licence |",
        "|---|---|---|---|---|---|",
    ]
    for m in MODES.values():
        licences = " + ".join(dict.fromkeys(r.licence for r in (m.weights.repo, m.weights.lora) if r))
        name = f"`{m.name}`" + (" (default)" if m.name == DEFAULT_MODE else "") + (" (opt-in)" if m.opt_in else "")
        rows.append(
            f"| {name} | {link(m.weights.repo)}{lora(m)} | {m.steps.describe()} | {m.guidance.default:g} "
            f"({m.guidance.short()}) | {m.size}x{m.size} | {licences} |"
        )
    return "\n".join(rows) + "\n"


def all_repos(mode_names, safety_checker: bool = False, controlnet: bool = False) -> list[Repo]:
    """The repos the given modes need, each once, in table order; with `safety_checker`, plus the checker's
    folders (merged into the SD 1.5 repo's components where a mode loads that repo too); with `controlnet`, plus
    the modes' ControlNets and the depth estimator."""
    seen: dict[str, Repo] = {}
    extra = ([SAFETY_CHECKER] if safety_checker else []) + (control_repos(mode_names) if controlnet else [])
    for repo in [r for name in mode_names for r in MODES[name].repos] + extra:
        had = seen.setdefault(repo.repo_id, repo)
        if had is not repo and not set(repo.components) <= set(had.components):
            seen[repo.repo_id] = replace(
                had, components=had.components + tuple(c for c in repo.components if c not in had.components)
            )
        had = seen[repo.repo_id]
        if not set(repo.lora_files) <= set(had.lora_files):  # LoRA files of one repo, several modes
            added = tuple(f for f in repo.lora_files if f not in had.lora_files)
            seen[repo.repo_id] = replace(had, lora_files=had.lora_files + added)
    return list(seen.values())


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def weight_file(repo: Repo, component: str) -> str:
    """A component's safetensors file as the Hub repo names it (fp16 variants: `model.fp16.safetensors`)."""
    stem = (
        "model" if component.startswith("text_encoder") or component == "safety_checker" else "diffusion_pytorch_model"
    )  # transformers / diffusers naming
    return f"{component}/{stem}{f'.{repo.variant}' if repo.variant else ''}.safetensors"


def repo_files(repo: Repo) -> list[str]:
    """Files (relative to the repo) the engine reads from `repo`: what setup() checks and the manifest lists."""
    if not repo.components:  # a LoRA repo
        return list(repo.lora_files or (LORA_WEIGHT_NAME,))
    if repo.components in ((TINY_VAE,), (CONTROLNET,)):  # TAESD, a ControlNet: one diffusers model at the root
        return ["config.json", f"diffusion_pytorch_model{f'.{repo.variant}' if repo.variant else ''}.safetensors"]
    if repo.components == (DEPTH_ESTIMATOR,):
        return list(DEPTH_ESTIMATOR_FILES)
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
