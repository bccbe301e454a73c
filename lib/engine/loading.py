"""Build each mode's pipelines from a local weights directory in the Hub layout.

Components are loaded one by one (not with DiffusionPipeline.from_pretrained) so that
- every component gets an explicit dtype (transformers 5 otherwise follows each config's dtype),
- components that are the same files are loaded once and shared between modes, and
- only what the engine runs is loaded (no safety checker or feature extractor).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors import safe_open

from lib.engine.modes import (
    CONTROL_PIPELINE_CLASSES,
    CONTROLNET,
    LORA_WEIGHT_NAME,
    MODES,
    PIPELINE_CLASSES,
    TINY_VAE,
    Mode,
    Repo,
    control_repos,
    repo_files,
    weight_file,
)
from lib.engine.precision import needs_upcast
from lib.engine.schedulers import sync_free

log = logging.getLogger(__name__)
# Per-file progress bars flood the prediction logs; setup logs one line per mode instead.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()
# diffusers warns on every dtype cast inside from_pretrained, even with nothing to keep in fp32 ("[]").
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage()
)

# Config keys that record provenance only; two configs differing in these describe the same module.
PROVENANCE_KEYS = (
    "_name_or_path",
    "_diffusers_version",
    "transformers_version",
    "_commit_hash",
    "dtype",
    "torch_dtype",
)


DECODERS = ("AutoencoderKL", "AutoencoderTiny")
FUSED_ADAPTER = "fused"  # the name a mode's own LoRA has between loading and fusing


class WeightsMissingError(RuntimeError):
    """The weights directory lacks files a mode needs."""


@dataclass
class LoadedMode:
    mode: Mode
    txt2img: diffusers.DiffusionPipeline
    img2img: diffusers.DiffusionPipeline
    tiny_vae: diffusers.AutoencoderTiny | None = None  # TAESD / TAESDXL: the `fast_decode` decoder
    controlnets: dict[str, torch.nn.Module] = field(default_factory=dict)  # net (canny, depth) -> its ControlNet
    _control_pipes: dict = field(default_factory=dict)

    def modules(self) -> list[torch.nn.Module]:
        """The models this mode runs (each once): what must be on the device while it runs."""
        pipe = self.txt2img
        found = [getattr(pipe, name, None) for name in ("unet", "vae", "text_encoder", "text_encoder_2")]
        found += [self.tiny_vae, *self.controlnets.values()]
        return list({id(m): m for m in found if m is not None}.values())

    def control_pipeline(self, nets: tuple[str, ...], img2img: bool) -> diffusers.DiffusionPipeline:
        """The ControlNet pipeline for these nets (one, or several as a MultiControlNetModel), around the mode's own
        modules; built on first use and kept (a pipeline object is small: it holds references)."""
        key = (nets, img2img)
        if key not in self._control_pipes:
            name = CONTROL_PIPELINE_CLASSES[self.mode.family][1 if img2img else 0]
            modules = [self.controlnets[n] for n in nets]
            self._control_pipes[key] = derive(
                getattr(diffusers, name), self.txt2img, controlnet=modules[0] if len(modules) == 1 else modules
            )
        return self._control_pipes[key]


def repo_dir(weights_dir: Path, repo: Repo) -> Path:
    return Path(weights_dir) / repo.repo_id


def check_present(weights_dir: Path, mode_names, controlnet: bool = False) -> None:
    """Fail with one message listing every missing file, before any loading starts."""
    missing = []
    for name in mode_names:
        for repo in [*MODES[name].repos, *(control_repos([name]) if controlnet else [])]:
            missing += [
                f"{repo.repo_id}/{f}" for f in repo_files(repo) if not (repo_dir(weights_dir, repo) / f).is_file()
            ]
    if missing:
        shown = "\n  ".join(sorted(set(missing))[:20])
        more = f"\n  ... and {len(set(missing)) - 20} more" if len(set(missing)) > 20 else ""
        raise WeightsMissingError(
            f"weights missing in {Path(weights_dir).resolve()} for modes {', '.join(mode_names)}:\n  {shown}{more}\n"
            "Fetch them with `python scripts/weights.py fetch` (needs access to the Hugging Face Hub or a mirror "
            "set in WEIGHTS_BASE_URL), or try the package offline on tiny random models: "
            "`python scripts/make_tiny_weights.py /tmp/tiny && WEIGHTS_DIR=/tmp/tiny ...`."
        )


@dataclass(frozen=True)
class Part:
    """One model a mode runs, as the loader will build it, known before anything is loaded (the memory plan
    counts parts). Parts with equal keys are the same files and become one module."""

    key: tuple
    repo_path: Path
    subfolder: str | None  # None: the model sits at the repo's root (TAESD)
    library: str
    class_name: str
    variant: str | None
    weights: Path

    @property
    def folder(self) -> Path:
        return self.repo_path / self.subfolder if self.subfolder else self.repo_path

    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())


class ComponentLoader:
    """Loads components, handing out the same module for components stored in the same files. Each module goes
    to the device, or (where `on_device(key)` says no: the memory plan keeps its mode in host memory) stays on
    the CPU. The decoders (VAE, TAESD) run in `vae_dtype(config)` (by default as diffusers loads them: a VAE whose
    config forces an upcast in fp32, lib/engine/precision.py); the rest in `dtype`."""

    def __init__(self, device: torch.device, dtype: torch.dtype, vae_dtype=None, on_device=lambda key: True):
        self.device, self.dtype, self.on_device = torch.device(device), dtype, on_device
        self.vae_dtype = vae_dtype or (lambda config: torch.float32 if needs_upcast(config) else dtype)
        self.loaded: dict[tuple, object] = {}
        self._canonical: dict[tuple[int, int], tuple[int, int]] = {}
        self._seen: dict[tuple[int, int], tuple[Path, int]] = {}

    def part(
        self, repo_path: Path, repo: Repo, component: str, library: str, class_name: str, lora: str | None = None
    ) -> Part:
        if component in (TINY_VAE, CONTROLNET):  # TAESD / TAESDXL, a ControlNet: one model at the repo's root
            return Part(
                (class_name, repo.repo_id),
                repo_path,
                None,
                "diffusers",
                class_name,
                repo.variant,
                repo_path / repo_files(repo)[1],
            )
        weights = repo_path / weight_file(repo, component)
        # The UNet a LoRA is fused into is that mode's own.
        key = (class_name, self._config(repo_path / component), self._digest(weights), lora)
        return Part(key, repo_path, component, library, class_name, repo.variant, weights)

    def dtype_of(self, part: Part) -> torch.dtype:
        return self.vae_dtype(part.config()) if part.class_name in DECODERS else self.dtype

    def load(self, part: Part):
        if part.key in self.loaded:
            log.info(
                "%s/%s: sharing the identical component already loaded",
                part.repo_path.name,
                part.subfolder or part.class_name,
            )
            return self.loaded[part.key]
        cls = getattr(diffusers if part.library == "diffusers" else transformers, part.class_name)
        kwargs = {"subfolder": part.subfolder} if part.subfolder else {}
        module = cls.from_pretrained(part.repo_path, variant=part.variant, dtype=self.dtype_of(part), **kwargs)
        module.eval().requires_grad_(False)
        if self.on_device(part.key):
            module.to(self.device)
        self.loaded[part.key] = module
        return module

    @staticmethod
    def _config(folder: Path) -> str:
        config = json.loads((folder / "config.json").read_text())
        return json.dumps({k: v for k, v in config.items() if k not in PROVENANCE_KEYS}, sort_keys=True)

    def _digest(self, path: Path) -> tuple[int, int]:
        """Content identity of a weight file: the inode of the first file seen with the same bytes.

        Hard links (the cache stores equal files once) match by inode for free; otherwise files of equal
        size are compared by sha256, so only real candidates (e.g. the two SDXL text encoders) are hashed.
        """
        st = path.stat()
        inode = (st.st_dev, st.st_ino)
        if inode not in self._canonical:
            self._canonical[inode] = inode
            for other, (other_path, size) in self._seen.items():
                if size == st.st_size and _sha256(other_path) == _sha256(path):
                    self._canonical[inode] = self._canonical[other]
                    break
            self._seen[inode] = (path, st.st_size)
        return self._canonical[inode]


@functools.lru_cache(maxsize=None)
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def mode_parts(loader: ComponentLoader, weights_dir: Path, mode: Mode, controlnet: bool = False) -> dict[str, Part]:
    """The models `mode` runs (unet, vae, text encoders, its TAESD as `taesd`, and with `controlnet` its ControlNets
    as `controlnet_canny`, `controlnet_depth`), as parts."""
    path = repo_dir(weights_dir, mode.weights.repo)
    index = json.loads((path / "model_index.json").read_text())
    parts = {}
    for component in mode.weights.repo.components:
        if component == "scheduler" or component.startswith("tokenizer"):
            continue
        library, class_name = index[component]
        lora = (
            f"{mode.weights.lora.repo_id}/{mode.weights.lora_file}"
            if mode.weights.lora and component == "unet"
            else None
        )
        parts[component] = loader.part(path, mode.weights.repo, component, library, class_name, lora)
    if mode.weights.tiny_vae:
        parts[TINY_VAE] = loader.part(
            repo_dir(weights_dir, mode.weights.tiny_vae),
            mode.weights.tiny_vae,
            TINY_VAE,
            "diffusers",
            "AutoencoderTiny",
        )
    if controlnet and mode.controlnets:
        for net in ("canny", "depth"):
            repo = mode.controlnets.repo(net)
            parts[f"{CONTROLNET}_{net}"] = loader.part(
                repo_dir(weights_dir, repo), repo, CONTROLNET, "diffusers", "ControlNetModel"
            )
    return parts


def load_mode(loader: ComponentLoader, weights_dir: Path, mode: Mode, controlnet: bool = False) -> LoadedMode:
    path = repo_dir(weights_dir, mode.weights.repo)
    index = json.loads((path / "model_index.json").read_text())
    parts = mode_parts(loader, weights_dir, mode, controlnet)
    components = {}
    for component in mode.weights.repo.components:
        library, class_name = index[component]
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        if component == "scheduler":  # stateful during a run: every pipeline gets its own
            components[component] = getattr(diffusers, mode.weights.scheduler or class_name).from_pretrained(
                path, subfolder=component, **dict(mode.weights.scheduler_config)
            )  # a replacement class keeps the repo's betas and spacing config, but for the values the mode sets
        elif component.startswith("tokenizer"):
            key = (mode.weights.repo.repo_id, component)
            if key not in loader.loaded:
                loader.loaded[key] = cls.from_pretrained(path, subfolder=component)
            components[component] = loader.loaded[key]
        else:
            components[component] = loader.load(parts[component])
    pipes = assemble(mode, components, index.get("force_zeros_for_empty_prompt", True))
    if mode.weights.lora:
        fuse_lora(pipes.txt2img, repo_dir(weights_dir, mode.weights.lora), mode.weights.lora_file)
    if TINY_VAE in parts:
        pipes.tiny_vae = loader.load(parts[TINY_VAE])
    for key, part in parts.items():
        if key.startswith(f"{CONTROLNET}_"):
            pipes.controlnets[key.removeprefix(f"{CONTROLNET}_")] = loader.load(part)
    return pipes


def assemble(mode: Mode, components: dict, force_zeros_for_empty_prompt: bool) -> LoadedMode:
    """The mode's txt2img and img2img pipelines around already-built components (loaded, or random ones
    built from configs by the benchmark)."""
    txt2img_name, img2img_name = PIPELINE_CLASSES[mode.family]
    txt2img_cls = getattr(diffusers, txt2img_name)
    accepted = inspect.signature(txt2img_cls.__init__).parameters
    extras = {
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
    }
    components = dict(components, scheduler=sync_free(components["scheduler"]))  # lib/engine/schedulers.py
    txt2img = txt2img_cls(**components, **{k: v for k, v in extras.items() if k in accepted})
    txt2img.set_progress_bar_config(disable=True)
    img2img = derive(getattr(diffusers, img2img_name), txt2img)  # same modules, no second copy
    return LoadedMode(mode, txt2img, img2img)


def derive(cls, pipe, **modules) -> diffusers.DiffusionPipeline:
    """A `cls` pipeline around `pipe`'s modules (plus `modules`, e.g. a controlnet): what DiffusionPipeline.from_pipe
    does, without its closing `.to(dtype)`, which casts the shared modules in place (to float32 unless told, and to
    one dtype for all, while an upcast VAE runs in another)."""
    accepted = inspect.signature(cls.__init__).parameters
    given = {**pipe.components, **modules}
    kwargs = {k: v for k, v in given.items() if k in accepted}
    settings = {k: v for k, v in pipe.config.items() if k in accepted and k not in given and not k.startswith("_")}
    new = cls(**kwargs, **settings)
    new.set_progress_bar_config(disable=True)
    return new


def fuse_lora(pipe, lora_dir: Path, weight_name: str = LORA_WEIGHT_NAME) -> None:
    """Fuse a mode's LoRA (LCM-LoRA, SDXL-Lightning) into the UNet: its speed with no LoRA cost per step."""
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # else: a warning that the LoRA has no text-encoder keys
    try:
        pipe.load_lora_weights(lora_dir, weight_name=weight_name, adapter_name=FUSED_ADAPTER)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    # diffusers only warns about LoRA keys that match no module (silenced above): count instead.
    injected = sum(FUSED_ADAPTER in getattr(m, "lora_A", {}) for m in pipe.unet.modules())
    with safe_open(lora_dir / weight_name, "pt") as f:
        in_file = sum(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in f.keys())
    if injected != in_file:
        raise RuntimeError(
            f"{lora_dir / weight_name}: {in_file} LoRA modules in the file but {injected} "
            "matched the UNet; is it the LoRA for this base model?"
        )
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    pipe.unload_lora_weights()  # drops the adapter layers; the fused weights stay


def load_modes(
    weights_dir: Path,
    mode_names,
    device: torch.device,
    dtype: torch.dtype,
    loader: ComponentLoader | None = None,
    controlnet: bool = False,
) -> dict[str, LoadedMode]:
    """The modes' pipelines; with `controlnet`, each mode's ControlNets too (CONTROLNET=1)."""
    check_present(weights_dir, mode_names, controlnet)
    loader = loader or ComponentLoader(device, dtype)
    return {name: load_mode(loader, weights_dir, MODES[name], controlnet) for name in mode_names}
