"""Full-size random-weight models built from the real configs in lib/configs/, for the benchmark: speed does
not depend on weight values. (Tiny models for tests are scripts/make_tiny_weights.py, written to disk.)

Full-size models are built fast: parameters are created on the `meta` device (no default init, which takes
~26 s for the SDXL UNet on a 2-core CPU), then materialised directly on the target device and dtype and
filled from a small pool of normal random values scaled by 1/sqrt(fan_in) (norm weights 1, biases 0), so
activations stay in range in fp16. Buffers (e.g. CLIP's position ids) are built normally.

Tokenizers: no real CLIP vocab is available offline. A byte-level vocab (every byte, alone and word-final,
plus the special tokens at their real ids) with the real tokenizer configs encodes any text; prompts are
padded to 77 tokens as with the real vocab, so the text encoders do the same work.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch

from lib import CONFIGS
from lib.engine.modes import MODES, Mode
from lib.engine.precision import needs_upcast

log = logging.getLogger(__name__)

PROVENANCE_KEYS = ("_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version")

def real_config(repo_id: str, path: str) -> dict:
    return json.loads((CONFIGS / repo_id / path).read_text())


def text_encoder_config(repo_id: str, component: str):
    """(transformers class, CLIPTextConfig) of a text encoder."""
    import transformers

    config = real_config(repo_id, f"{component}/config.json")
    cls = getattr(transformers, config["architectures"][0])
    for key in PROVENANCE_KEYS:
        config.pop(key, None)
    return cls, transformers.CLIPTextConfig(**config)


def byte_level_vocab() -> dict[str, int]:
    """The first 512 entries of the real CLIP vocab (every byte, alone and word-final) plus the special tokens at
    their real ids, so the real tokenizer configs apply unchanged and any text encodes without unknowns."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    return vocab


def write_tokenizer(repo_id: str, component: str, folder: Path) -> None:
    """The real tokenizer configs with the byte-level vocab, in the Hub layout."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(CONFIGS / repo_id / component / name, folder / name)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tokenizer(repo_id: str, component: str):
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(repo_id, component, Path(tmp))
        return transformers.CLIPTokenizer.from_pretrained(tmp)


# --- fast random init --------------------------------------------------------------------------------------

POOL = 1 << 20
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)


def construct(factory):
    """factory() -> module, its parameters left on the meta device (no init: that is the slow part)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


@torch.no_grad()
def materialize(module: torch.nn.Module, device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Parameters (on meta) get storage on `device`/`dtype` and random values; buffers are moved there."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 * POOL, generator=g).to(device=device, dtype=dtype)
    made: dict[int, torch.nn.Parameter] = {}
    for index, mod in enumerate(module.modules()):
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, device=device, dtype=dtype if p.is_floating_point() else p.dtype)
                if name == "bias" or p.ndim == 0:
                    t.zero_()
                elif isinstance(mod, NORMS) or (p.ndim == 1 and "norm" in type(mod).__name__.lower()):
                    t.fill_(1.0)
                else:
                    # One pass over memory: the pool (from a per-tensor offset) tiled and scaled.
                    scale = 1.0 / math.sqrt(max(p[0].numel() if p.ndim >= 2 else p.numel(), 1))
                    src = pool[(index * 7919 + zlib.crc32(name.encode())) % POOL:][:POOL]
                    flat = t.view(-1)
                    rows, rest = divmod(flat.numel(), POOL)
                    if rows:
                        torch.mul(src.expand(rows, POOL), scale, out=flat[:rows * POOL].view(rows, POOL))
                    if rest:
                        torch.mul(src[:rest], scale, out=flat[rows * POOL:])
                made[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            mod._parameters[name] = made[id(p)]
    return module.to(device).eval().requires_grad_(False)


# --- components and modes ----------------------------------------------------------------------------------


def model_index(repo_id: str) -> dict:
    return real_config(repo_id, "model_index.json")


def build_component(repo_id: str, component: str, *, device, dtype, seed: int | None = None):
    """One model of repo `repo_id` at full size: a subfolder's `unet`, `vae`, `text_encoder*`, or `taesd` for a
    TAESD repo (madebyollin/taesd, its config at the repo's root)."""
    import diffusers

    seed = zlib.crc32(f"{repo_id}/{component}".encode()) if seed is None else seed
    if component.startswith("text_encoder"):
        cls, config = text_encoder_config(repo_id, component)
        module = construct(lambda: cls(config))
    else:
        config = real_config(repo_id, "config.json" if component == "taesd" else f"{component}/config.json")
        cls = getattr(diffusers, config["_class_name"])
        module = construct(lambda: cls.from_config(config))
    return materialize(module, device, dtype, seed)


def build_components(mode: Mode, *, device, dtype, shared: dict | None = None) -> dict:
    """The components `loading.assemble` takes for `mode`. Text encoders with equal configs are built once
    across calls sharing `shared` (the SDXL ones are one file in reality, and the loader shares them too).
    The LCM-LoRA modes get their base UNet: a fused LoRA changes weights, not work."""
    import diffusers

    shared = {} if shared is None else shared
    repo, index = mode.weights.repo, model_index(mode.weights.repo.repo_id)
    components: dict = {}
    for component in repo.components:
        if component == "scheduler":
            cls = getattr(diffusers, mode.weights.scheduler or index["scheduler"][1])
            components[component] = cls.from_config(real_config(repo.repo_id, "scheduler/scheduler_config.json"))
            continue
        if component.startswith("tokenizer"):
            components[component] = tokenizer(repo.repo_id, component)
            continue
        key: tuple = (repo.repo_id, component)
        if component.startswith("text_encoder"):
            cls, config = text_encoder_config(repo.repo_id, component)
            key = (cls.__name__, config.to_json_string())
        if key not in shared:
            # An upcast VAE (SDXL's) is built as diffusers loads it, in fp32; lib/speed.py may change that.
            upcast = component == "vae" and needs_upcast(real_config(repo.repo_id, "vae/config.json"))
            shared[key] = build_component(repo.repo_id, component, device=device,
                                          dtype=torch.float32 if upcast else dtype)
        components[component] = shared[key]
    return components


def build_modes(mode_names, *, device, dtype) -> dict:
    """{name: LoadedMode} assembled as loading.load_modes assembles them, from full-size random weights."""
    from lib.engine.loading import assemble

    shared: dict = {}
    modes = {}
    for name in mode_names:
        mode = MODES[name]
        started = time.perf_counter()
        components = build_components(mode, device=device, dtype=dtype, shared=shared)
        force_zeros = model_index(mode.weights.repo.repo_id).get("force_zeros_for_empty_prompt", True)
        modes[name] = assemble(mode, components, force_zeros)
        if mode.weights.tiny_vae:  # TAESD / TAESDXL, shared like the loader shares it
            key = ("AutoencoderTiny", mode.weights.tiny_vae.repo_id)
            if key not in shared:
                shared[key] = build_component(mode.weights.tiny_vae.repo_id, "taesd", device=device, dtype=dtype)
            modes[name].tiny_vae = shared[key]
        log.info("built %s (full size, random weights) in %.1f s", name, time.perf_counter() - started)
    return modes


def build_safety_checker(*, device, dtype):
    """The SD safety checker (CLIP ViT-L/14 image tower + concept embeddings) at full size with random weights
    and thresholds no cosine similarity reaches (<= 1), so nothing is flagged: every image is checked and saved,
    as predict() does by default."""
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from lib.engine.modes import SAFETY_CHECKER
    from lib.engine.safety import SafetyChecker

    config = real_config(SAFETY_CHECKER.repo_id, "safety_checker/config.json")
    clip = transformers.CLIPConfig.from_dict({k: v for k, v in config.items() if k not in PROVENANCE_KEYS})
    model = materialize(construct(lambda: StableDiffusionSafetyChecker(clip)), device, dtype,
                        zlib.crc32(b"safety_checker"))
    with torch.no_grad():
        model.concept_embeds_weights.fill_(2.0)
        model.special_care_embeds_weights.fill_(2.0)
    folder = Path(tempfile.mkdtemp())
    try:
        shutil.copyfile(CONFIGS / SAFETY_CHECKER.repo_id / "feature_extractor/preprocessor_config.json",
                        folder / "preprocessor_config.json")
        processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return SafetyChecker(model, processor, device, dtype)
