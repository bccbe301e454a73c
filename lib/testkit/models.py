"""Synthetic models for every mode, in exactly the real Hugging Face repos' layout: tiny ones for tests, full-size
ones with random weights for benchmarks and the GPU check (speed and memory do not depend on weight values).

  python scripts/make_tiny_weights.py DIR     # DIR/<repo_id>/<path_in_repo>, as setup() reads WEIGHTS_DIR
  python scripts/make_tiny_weights.py --mirror DIR   # a download mirror: DIR/<repo_id>/resolve/main/<path>
                                                     # + DIR/manifest.json (serve DIR, see docs/weights.md)
  python scripts/make_tiny_weights.py --full --device cuda DIR   # full size (the real configs), random weights:
                                                     # what scripts/gpu_check.sh loads on a machine with no Hub

Each model is the real config (lib/configs/) with, for tiny ones, only its size fields shrunk, so class names,
scheduler configs, tokenizer configs, structural flags (linear projections, LCM's guidance embedding, SDXL's
micro-conditioning), special-token ids and weight file names (fp16 variants; the kohya-layout LCM-LoRA with
`.alpha`) are the real ones. Tiny models are deterministic (the same bytes on every run); their images are noise.
Full-size models are built fast: parameters are created on the `meta` device (no default init, which takes ~26 s
for the SDXL UNet on a 2-core CPU), then materialised on the target device and dtype from a pool of normal random
values scaled by 1/sqrt(fan_in) (norm weights 1, biases 0), so activations stay in range in fp16. On disk:
`write_weights(DIR, Scale(full=True))`; in memory: `build_modes` (the benchmark).

Tokenizers: no real CLIP vocab is available offline. A byte-level vocab (every byte, alone and word-final, plus the
special tokens at their real ids) with the real tokenizer configs encodes any text; prompts are padded to 77 tokens
as with the real vocab, so the text encoders do the same work.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors.torch import save_file

from lib import CONFIGS
from lib.engine.modes import (
    CONTROLNET,
    CONTROLNETS,
    DEPTH_ESTIMATOR,
    LORA_WEIGHT_NAME,
    MODES,
    SAFETY_CHECKER,
    SDXL_BASE,
    SDXL_TURBO,
    TINY_VAE,
    Mode,
    Repo,
    all_repos,
)
from lib.engine.precision import needs_upcast

# Tiny sizes. The SDXL encoders get different widths, so mixing them up fails with a shape error.
TEXT_ENCODER_SIZES = {
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
    "text_encoder_2": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, projection_dim=64
    ),
}
UNET_SIZES = dict(block_out_channels=[32, 64], layers_per_block=1)
ADDITION_TIME_EMBED_DIM = 8  # SDXL: 6 micro-conditioning numbers, each embedded at this width
TIME_COND_PROJ_DIM = 32  # LCM: the guidance-scale embedding width
# Four blocks keep the real 8x spatial factor; few channels keep a 256px decode fast on a CPU.
VAE_SIZES = dict(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=8)
LORA_RANK, LORA_ALPHA = 4, 2.0  # alpha != rank, so a loader that ignores `.alpha` gives other weights
# The LCM-LoRA target modules (the diffusers LCM-LoRA training scripts' list).
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
WEIGHT_NAMES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
# SDXL-Turbo ships SDXL-base's text encoders unchanged (same sha256): seed them alike so the files match too.
SEED_OWNER = {(SDXL_TURBO.repo_id, te): SDXL_BASE.repo_id for te in ("text_encoder", "text_encoder_2")}


@dataclass(frozen=True)
class Scale:
    """Tiny (shrunk configs, initialised on the CPU: the tests' models) or full (the real configs, random values
    filled fast on `device` by `materialize`: speed and memory are the real models')."""

    full: bool = False
    device: str = "cpu"


TINY = Scale()
LORA_FULL_RANK, LORA_FULL_ALPHA = 64, 8.0  # the LCM-LoRAs are rank 64


log = logging.getLogger(__name__)


# -- fast random init (full size) ----------------------------------------------------------------------------
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
                    src = pool[(index * 7919 + zlib.crc32(name.encode())) % POOL :][:POOL]
                    flat = t.view(-1)
                    rows, rest = divmod(flat.numel(), POOL)
                    if rows:
                        torch.mul(src.expand(rows, POOL), scale, out=flat[: rows * POOL].view(rows, POOL))
                    if rest:
                        torch.mul(src[:rest], scale, out=flat[rows * POOL :])
                made[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            mod._parameters[name] = made[id(p)]
    return module.to(device).eval().requires_grad_(False)


def real_config(repo_id: str, path: str) -> dict:
    return json.loads((CONFIGS / repo_id / path).read_text())


def seed(repo_id: str, component: str) -> int:
    return zlib.crc32(f"{SEED_OWNER.get((repo_id, component), repo_id)}/{component}".encode())


def text_encoder_config(repo_id: str, component: str, scale: Scale = TINY) -> dict:
    config = real_config(repo_id, f"{component}/config.json")
    return config if scale.full else {**config, **TEXT_ENCODER_SIZES[component]}


def unet_config(repo: Repo, scale: Scale = TINY) -> dict:
    config = real_config(repo.repo_id, "unet/config.json")
    if scale.full:
        return config
    encoders = [text_encoder_config(repo.repo_id, c) for c in repo.components if c.startswith("text_encoder")]
    config.update(
        UNET_SIZES,
        # Two blocks, the real first and last: SD keeps cross-attention down / plain up first, SDXL the reverse.
        down_block_types=[config["down_block_types"][0], config["down_block_types"][-1]],
        up_block_types=[config["up_block_types"][0], config["up_block_types"][-1]],
        # Legacy name: this is the number of heads (an int, or one per block).
        attention_head_dim=[2, 4] if isinstance(config["attention_head_dim"], list) else 2,
        cross_attention_dim=sum(e["hidden_size"] for e in encoders),  # SDXL concatenates both encoders
    )
    if isinstance(config.get("transformer_layers_per_block"), list):
        config["transformer_layers_per_block"] = [1, 2]
    if config.get("time_cond_proj_dim"):
        config["time_cond_proj_dim"] = TIME_COND_PROJ_DIM
    if config.get("addition_embed_type") == "text_time":  # the pooled text_encoder_2 output + 6 numbers
        config.update(
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + encoders[-1]["projection_dim"],
        )
    return config


def component_config(repo: Repo, component: str, scale: Scale = TINY) -> dict:
    if component == "unet":
        return unet_config(repo, scale)
    if component == "vae":
        config = real_config(repo.repo_id, "vae/config.json")
        return config if scale.full else {**config, **VAE_SIZES}
    return text_encoder_config(repo.repo_id, component, scale)


def build(
    library: str,
    class_name: str,
    config: dict,
    seed_value: int,
    scale: Scale = TINY,
    factory=None,
    dtype: torch.dtype = torch.float16,
) -> torch.nn.Module:
    """A randomly initialised model; the seed fixes every weight."""
    if factory is None:
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        factory = (
            (lambda: cls.from_config(config))
            if library == "diffusers"
            else (lambda: cls(transformers.CLIPTextConfig.from_dict(config)))
        )
    if not scale.full:
        torch.manual_seed(seed_value)
        return factory()
    return materialize(construct(factory), scale.device, dtype, seed_value)


def save_model(model: torch.nn.Module, config: dict, folder: Path, library: str, variant: str | None) -> list[Path]:
    """config.json (the real keys, tiny sizes) + one safetensors file named as in the real repo (written in the
    background while write_weights builds the next model, for full-size models)."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    weights = folder / f"{WEIGHT_NAMES[library]}{f'.{variant}' if variant else ''}.safetensors"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = host_state(model, dtype)
    if _writes is None:
        save_file(tensors, weights, metadata={"format": "pt"})  # what save_pretrained writes
    else:
        _writes.append(_writes.pool.submit(save_file, tensors, weights, metadata={"format": "pt"}))
    return [folder / "config.json", weights]


def host_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict in `dtype`, in host memory. Off a GPU in one transfer: one per tensor waits for the
    device some 1,700 times for an SDXL UNet."""
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    if not state or next(iter(state.values())).device.type == "cpu":
        return {k: v.contiguous() for k, v in state.items()}
    return packed_to_host(state)


def packed_to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors (of one device) in host memory through one copy per dtype, packed end to end."""
    host = {}
    for dtype in dict.fromkeys(v.dtype for v in tensors.values()):
        group = {k: v for k, v in tensors.items() if v.dtype == dtype}
        flat = torch.cat([v.reshape(-1) for v in group.values()]).cpu()
        offset = 0
        for k, v in group.items():
            host[k] = flat[offset : offset + v.numel()].view(v.shape)
            offset += v.numel()
    return {k: host[k] for k in tensors}


class _Writes(list):
    """Files being written in the background (safetensors releases the GIL while it writes)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool


_writes: _Writes | None = None


def byte_level_vocab() -> dict[str, int]:
    """The first 512 entries of the real CLIP vocab (every byte, alone and word-final) plus the special tokens
    at their real ids (49406, 49407), so the real tokenizer configs apply unchanged and any text encodes
    with no unknown token."""
    # GPT-2/CLIP's byte -> printable character table, in its order: "!" is id 0 as in the real vocab.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    return vocab


def write_tokenizer(repo_id: str, component: str, repo_dir: Path) -> list[Path]:
    """The real tokenizer configs + a byte-level vocab.json / merges.txt (the classic CLIP BPE files)."""
    written = [
        copy_real(repo_id, f"{component}/{name}", repo_dir)
        for name in ("tokenizer_config.json", "special_tokens_map.json")
    ]
    folder = repo_dir / component
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")  # no merges: one token per byte
    return written + [folder / "vocab.json", folder / "merges.txt"]


def copy_real(repo_id: str, path: str, repo_dir: Path) -> Path:
    """A real config file, byte for byte."""
    (repo_dir / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONFIGS / repo_id / path, repo_dir / path)
    return repo_dir / path


def write_pipeline_repo(repo: Repo, repo_dir: Path, scale: Scale = TINY) -> list[Path]:
    """A diffusers repo: model_index.json, scheduler config, tokenizers and tiny models (no safety checker)."""
    index = real_config(repo.repo_id, "model_index.json")
    written = [copy_real(repo.repo_id, "model_index.json", repo_dir)]
    for component in repo.components:
        library, class_name = index[component]
        if component == "scheduler":
            written.append(copy_real(repo.repo_id, "scheduler/scheduler_config.json", repo_dir))
        elif component.startswith("tokenizer"):
            written += write_tokenizer(repo.repo_id, component, repo_dir)
        elif component in SAFETY_CHECKER.components:
            written += write_safety_checker(repo, component, repo_dir, scale)
        else:
            config = component_config(repo, component, scale)
            model = build(library, class_name, config, seed(repo.repo_id, component), scale)
            written += save_model(model, config, repo_dir / component, library, repo.variant)
            del model
    return written


# The tiny safety checker: CLIP's image tower shrunk (224 px input, the real preprocessor config, unchanged).
SAFETY_VISION_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, patch_size=32
)
SAFETY_TEXT_SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
SAFETY_PROJECTION_DIM = 32
# Cosine similarities are at most 1, so thresholds of 2 flag nothing: tests that need flagged images lower
# them on the loaded checker (tests/test_safety.py), and the real checker code decides.
SAFETY_TINY_THRESHOLD = 2.0


def write_safety_checker(repo: Repo, component: str, repo_dir: Path, scale: Scale = TINY) -> list[Path]:
    """The SD safety checker (StableDiffusionSafetyChecker, fp16 as in the real repo) or its feature extractor
    (the real preprocessor_config.json, byte for byte)."""
    if component == "feature_extractor":
        return [copy_real(repo.repo_id, "feature_extractor/preprocessor_config.json", repo_dir)]
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    config = real_config(repo.repo_id, "safety_checker/config.json")
    if not scale.full:
        for key, sizes in (("vision_config", SAFETY_VISION_SIZES), ("text_config", SAFETY_TEXT_SIZES)):
            for name in (key, f"{key}_dict"):  # the legacy *_dict copies win where transformers still reads them
                if isinstance(config.get(name), dict):
                    config[name].update(sizes)
        config["projection_dim"] = SAFETY_PROJECTION_DIM
    clip = transformers.CLIPConfig.from_dict(config)
    model = build(
        "transformers",
        "StableDiffusionSafetyChecker",
        config,
        seed(repo.repo_id, component),
        scale,
        factory=lambda: StableDiffusionSafetyChecker(clip),
    )
    with torch.no_grad():
        if not scale.full:
            model.concept_embeds.normal_()
            model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(SAFETY_TINY_THRESHOLD)
        model.special_care_embeds_weights.fill_(SAFETY_TINY_THRESHOLD)
    return save_model(model, config, repo_dir / component, "transformers", repo.variant)


def lora_base(repo: Repo) -> Repo:
    """The repo whose UNet a LoRA repo is fused into, from the mode table."""
    return next(m.weights.repo for m in MODES.values() if m.weights.lora and m.weights.lora.repo_id == repo.repo_id)


def write_lora_repo(repo: Repo, repo_dir: Path, scale: Scale = TINY) -> list[Path]:
    """Each LoRA file of the repo for its base UNet (`write_lora`)."""
    base = lora_base(repo)
    config = unet_config(base, scale)
    if scale.full:  # the module tree alone: shapes, no weights
        unet = construct(lambda: diffusers.UNet2DConditionModel.from_config(config))
    else:
        unet = build("diffusers", "UNet2DConditionModel", config, seed(base.repo_id, "unet"))
    repo_dir.mkdir(parents=True, exist_ok=True)
    if not repo.lora_files:  # the diffusers name: one LoRA in the repo
        return [write_lora(unet, repo_dir / LORA_WEIGHT_NAME, seed(repo.repo_id, "lora"), scale)]
    return [write_lora(unet, repo_dir / name, seed(repo.repo_id, name), scale) for name in repo.lora_files]


def write_lora(unet, path: Path, seed_value: int, scale: Scale = TINY) -> Path:
    """A LoRA for `unet` in the kohya layout (fp16): lora_unet_<module_path_with_underscores>.lora_down.weight /
    .lora_up.weight / .alpha. That is the real LCM-LoRA files' layout; ByteDance's SDXL-Lightning LoRAs are taken to
    share it (rank 64 on the same modules: the 4-step file is 393,854,592 bytes, 32 fewer than the LCM-LoRA SDXL
    file before metadata was added to it, so the same tensors under a slightly different header)."""
    rank, alpha = (LORA_FULL_RANK, LORA_FULL_ALPHA) if scale.full else (LORA_RANK, LORA_ALPHA)
    generator = torch.Generator().manual_seed(seed_value)
    tensors = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not any(
            name == t or name.endswith("." + t) for t in LORA_TARGETS
        ):
            continue
        if isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        else:  # kohya: the down conv has the layer's kernel, the up conv is 1x1
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        key = "lora_unet_" + name.replace(".", "_")
        # Non-zero up weights (training starts them at zero), so fusing visibly changes the UNet.
        tensors[f"{key}.lora_down.weight"] = (torch.randn(down_shape, generator=generator) * 0.1).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(up_shape, generator=generator) * 0.1).half()
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(tensors, path)
    return path


# TAESD / TAESDXL (AutoencoderTiny): the real block layout with few channels and one block per stage.
TAESD_SIZES = dict(
    encoder_block_out_channels=[8, 8, 8, 8],
    decoder_block_out_channels=[8, 8, 8, 8],
    num_encoder_blocks=[1, 1, 1, 1],
    num_decoder_blocks=[1, 1, 1, 1],
)


def write_tiny_vae_repo(repo: Repo, repo_dir: Path, scale: Scale = TINY) -> list[Path]:
    """TAESD / TAESDXL: config.json + diffusion_pytorch_model.safetensors at the repo's root (diffusers layout)."""
    config = real_config(repo.repo_id, "config.json")
    config = config if scale.full else {**config, **TAESD_SIZES}
    model = build("diffusers", "AutoencoderTiny", config, seed(repo.repo_id, TINY_VAE), scale)
    return save_model(model, config, repo_dir, "diffusers", repo.variant)


# ControlNets: the real config shrunk like the UNet they steer (same blocks, widths and cross-attention width, so that
# their residuals fit it); the conditioning embedding keeps its four stages (the image is 8x the latent).
CONTROLNET_CONDITIONING_CHANNELS = [4, 8, 8, 16]
CONTROLNET_ZERO_STD = 0.1  # the zero-initialised output convolutions get values, so that a control changes the image


def controlnet_base(repo: Repo) -> Repo:
    """The pipeline repo whose UNet a ControlNet repo steers, from the mode table."""
    return next(MODES[name].weights.repo for name, nets in CONTROLNETS.items() if repo in nets.repos)


def controlnet_config(repo: Repo, scale: Scale = TINY) -> dict:
    config = real_config(repo.repo_id, "config.json")
    if scale.full:
        return config
    unet = unet_config(controlnet_base(repo))
    config.update(
        block_out_channels=unet["block_out_channels"],
        layers_per_block=unet["layers_per_block"],
        down_block_types=[config["down_block_types"][0], config["down_block_types"][-1]],
        attention_head_dim=[2, 4] if isinstance(config["attention_head_dim"], list) else 2,
        cross_attention_dim=unet["cross_attention_dim"],
        conditioning_embedding_out_channels=CONTROLNET_CONDITIONING_CHANNELS,
    )
    if isinstance(config.get("transformer_layers_per_block"), list):
        layers = config["transformer_layers_per_block"]
        config["transformer_layers_per_block"] = [min(layers[0], 1), min(layers[-1], 2)]
    if config.get("addition_embed_type") == "text_time":
        config.update(
            addition_time_embed_dim=unet["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=unet["projection_class_embeddings_input_dim"],
        )
    return config


def build_controlnet(repo: Repo, scale: Scale = TINY, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    config = controlnet_config(repo, scale)
    model = build("diffusers", "ControlNetModel", config, seed(repo.repo_id, CONTROLNET), scale, dtype=dtype)
    if not scale.full:  # trained ControlNets have non-zero output convolutions; an untrained one has no effect
        generator = torch.Generator().manual_seed(seed(repo.repo_id, "zero-convs"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                    p.copy_(torch.randn(p.shape, generator=generator) * CONTROLNET_ZERO_STD)
    return model


def write_controlnet_repo(repo: Repo, repo_dir: Path, scale: Scale = TINY) -> list[Path]:
    """A ControlNet: config.json + diffusion_pytorch_model[.fp16].safetensors at the repo's root."""
    model = build_controlnet(repo, scale)
    return save_model(model, controlnet_config(repo, scale), repo_dir, "diffusers", repo.variant)


# Depth Anything V2 Small, shrunk: a 4-layer DINOv2 backbone of width 32 and a narrow DPT head (the real image
# processor config, unchanged: it resizes to 518 px, and the backbone interpolates its position embeddings).
DEPTH_BACKBONE_SIZES = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    out_indices=[1, 2, 3, 4],
    out_features=["stage1", "stage2", "stage3", "stage4"],
)
DEPTH_HEAD_SIZES = dict(
    reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 16, 32], fusion_hidden_size=16, head_hidden_size=8
)


def depth_estimator_config(repo: Repo, scale: Scale = TINY) -> dict:
    config = real_config(repo.repo_id, "config.json")
    if scale.full:
        return config
    return {**config, **DEPTH_HEAD_SIZES, "backbone_config": {**config["backbone_config"], **DEPTH_BACKBONE_SIZES}}


def build_depth_estimator(repo: Repo, scale: Scale = TINY, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = depth_estimator_config(repo, scale)
    return build(
        "transformers",
        "DepthAnythingForDepthEstimation",
        config,
        seed(repo.repo_id, DEPTH_ESTIMATOR),
        scale,
        factory=lambda: transformers.DepthAnythingForDepthEstimation(
            transformers.DepthAnythingConfig.from_dict(config)
        ),
        dtype=dtype,
    )


def write_depth_estimator_repo(repo: Repo, repo_dir: Path, scale: Scale = TINY) -> list[Path]:
    """Depth Anything: config.json, model.safetensors (fp32, as the real file) and the real preprocessor_config.json."""
    model = build_depth_estimator(repo, scale)
    written = save_model(model, depth_estimator_config(repo, scale), repo_dir, "transformers", repo.variant)
    return written + [copy_real(repo.repo_id, "preprocessor_config.json", repo_dir)]


def write_repo(repo: Repo, repo_dir: Path, scale: Scale = TINY) -> list[Path]:
    """One repo's files under repo_dir (= WEIGHTS_DIR/<repo_id>); returns the paths written (repo_dir/...)."""
    if repo.components == (TINY_VAE,):
        return write_tiny_vae_repo(repo, repo_dir, scale)
    if repo.components == (CONTROLNET,):
        return write_controlnet_repo(repo, repo_dir, scale)
    if repo.components == (DEPTH_ESTIMATOR,):
        return write_depth_estimator_repo(repo, repo_dir, scale)
    return (write_pipeline_repo if repo.components else write_lora_repo)(repo, repo_dir, scale)


def write_weights(out_dir: Path, scale: Scale = TINY, repos=None, background: bool | None = None) -> list[Path]:
    """Every mode's repos (or `repos`) under out_dir/<repo_id>/; returns the files written, relative to out_dir.
    With `background` (default: full size), weight files are written in threads while the next model is built."""
    global _writes
    from concurrent.futures import ThreadPoolExecutor

    out_dir = Path(out_dir)
    written = []
    repos = all_repos(MODES, safety_checker=True, controlnet=True) if repos is None else repos
    with ThreadPoolExecutor(2, thread_name_prefix="weights") as pool:
        _writes = _Writes(pool) if (scale.full if background is None else background) else None
        try:
            for repo in repos:
                written += write_repo(repo, out_dir / repo.repo_id, scale)
            for done in _writes or []:
                done.result()  # a failed write fails here
        finally:
            _writes = None
    return [p.relative_to(out_dir) for p in written]


def use_tiny_weights() -> Path:
    """Tiny weights for every mode in a fresh temporary folder, and this process's environment pointed at it
    (WEIGHTS_DIR, WEIGHTS_OFFLINE=1: loaded as they are): the `--tiny` of the entry points."""
    folder = Path(tempfile.mkdtemp(prefix="tiny-weights-"))
    write_weights(folder)
    os.environ["WEIGHTS_OFFLINE"] = "1"  # use the folder as it is: no manifest, no download
    os.environ["WEIGHTS_DIR"] = str(folder)
    return folder


def write_mirror(mirror: Path) -> dict:
    """The tiny repos as a mirror in the Hub's `resolve` layout plus their manifest: serving `mirror` over HTTP
    and setting WEIGHTS_BASE_URL and WEIGHTS_MANIFEST=mirror/manifest.json lets setup() download them."""
    from lib.weights.manifest import manifest_for_tree, write_manifest

    mirror = Path(mirror)
    with tempfile.TemporaryDirectory() as tmp:
        write_weights(Path(tmp))
        manifest = manifest_for_tree(Path(tmp))
        for repo_id, spec in manifest["repos"].items():
            for path in spec["files"]:
                target = mirror / repo_id / "resolve" / spec["revision"] / path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(Path(tmp) / repo_id / path, target)
    write_manifest(mirror / "manifest.json", manifest)
    return manifest


# -- full size, in memory (the benchmark) ---------------------------------------------------------------------------
def tokenizer(repo_id: str, component: str):
    """The real tokenizer config with the byte-level vocab, loaded as from the repo."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(repo_id, component, Path(tmp))
        return transformers.CLIPTokenizer.from_pretrained(Path(tmp) / component)


def build_component(repo_id: str, component: str, *, device, dtype, seed_value: int | None = None):
    """One model of repo `repo_id` at full size: a subfolder's `unet`, `vae`, `text_encoder*`, or `taesd` for a
    TAESD repo (its config at the repo's root)."""
    config = real_config(repo_id, "config.json" if component == TINY_VAE else f"{component}/config.json")
    library, class_name = (
        ("transformers", config["architectures"][0])
        if component.startswith("text_encoder")
        else ("diffusers", config["_class_name"])
    )
    seed_value = seed(repo_id, component) if seed_value is None else seed_value
    return build(library, class_name, config, seed_value, Scale(full=True, device=str(device)), dtype=dtype)


def build_components(mode: Mode, *, device, dtype, shared: dict | None = None) -> dict:
    """The components `loading.assemble` takes for `mode`. Components stored in equal files are built once across
    calls sharing `shared` (the SDXL text encoders are one file in reality, and the loader shares them too). The
    LoRA modes get their base UNet, one copy per mode as the loader fuses one (a fused LoRA changes weights, not
    work)."""
    shared = {} if shared is None else shared
    repo, index = mode.weights.repo, real_config(mode.weights.repo.repo_id, "model_index.json")
    components: dict = {}
    for component in repo.components:
        if component == "scheduler":
            cls = getattr(diffusers, mode.weights.scheduler or index["scheduler"][1])
            config = real_config(repo.repo_id, "scheduler/scheduler_config.json")
            components[component] = cls.from_config(config, **dict(mode.weights.scheduler_config))
            continue
        if component.startswith("tokenizer"):
            components[component] = tokenizer(repo.repo_id, component)
            continue
        key = (SEED_OWNER.get((repo.repo_id, component), repo.repo_id), component)
        if component == "unet" and mode.weights.lora:  # each fused UNet is its own copy, as the loader makes it
            key += (mode.weights.lora_file,)
        if key not in shared:
            # An upcast VAE (SDXL's) is built as diffusers loads it, in fp32; lib/engine/speed.py may change that.
            upcast = component == "vae" and needs_upcast(real_config(repo.repo_id, "vae/config.json"))
            shared[key] = build_component(
                repo.repo_id, component, device=device, dtype=torch.float32 if upcast else dtype
            )
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
        index = real_config(mode.weights.repo.repo_id, "model_index.json")
        modes[name] = assemble(mode, components, index.get("force_zeros_for_empty_prompt", True))
        if mode.weights.tiny_vae:  # TAESD / TAESDXL, shared like the loader shares it
            key = (mode.weights.tiny_vae.repo_id, TINY_VAE)
            if key not in shared:
                shared[key] = build_component(mode.weights.tiny_vae.repo_id, TINY_VAE, device=device, dtype=dtype)
            modes[name].tiny_vae = shared[key]
        log.info("built %s (full size, random weights) in %.1f s", name, time.perf_counter() - started)
    return modes


def build_safety_checker(*, device, dtype):
    """The SD safety checker (CLIP ViT-L/14 image tower + concept embeddings) at full size with random weights and
    thresholds no cosine similarity reaches (<= 1), so nothing is flagged: every image is checked and saved, as
    predict() does by default."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from lib.engine.safety import SafetyChecker

    config = real_config(SAFETY_CHECKER.repo_id, "safety_checker/config.json")
    clip = transformers.CLIPConfig.from_dict(config)
    model = build(
        "transformers",
        "StableDiffusionSafetyChecker",
        config,
        seed(SAFETY_CHECKER.repo_id, "safety_checker"),
        Scale(full=True, device=str(device)),
        factory=lambda: StableDiffusionSafetyChecker(clip),
        dtype=dtype,
    )
    with torch.no_grad():
        model.concept_embeds_weights.fill_(SAFETY_TINY_THRESHOLD)
        model.special_care_embeds_weights.fill_(SAFETY_TINY_THRESHOLD)
    with tempfile.TemporaryDirectory() as tmp:
        copy_real(SAFETY_CHECKER.repo_id, "feature_extractor/preprocessor_config.json", Path(tmp))
        processor = transformers.CLIPImageProcessor.from_pretrained(Path(tmp) / "feature_extractor")
    return SafetyChecker(model, processor, device, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, nargs="?", help="where to write DIR/<repo_id>/...")
    parser.add_argument("--mirror", type=Path, metavar="DIR", help="write a download mirror into DIR instead")
    parser.add_argument("--full", action="store_true", help="full size (the real configs), random weights")
    parser.add_argument("--device", default="cpu", help="--full: where the random values are made (cuda is fast)")
    args = parser.parse_args()
    if (args.dir is None) == (args.mirror is None):
        parser.error("give DIR, or --mirror DIR")
    if args.mirror:
        manifest = write_mirror(args.mirror)
        n = sum(len(spec["files"]) for spec in manifest["repos"].values())
        print(f"wrote a mirror of {n} files and {args.mirror / 'manifest.json'}")
        return
    files = write_weights(args.dir, Scale(args.full, args.device))
    print(f"wrote {len(files)} files under {args.dir}")


if __name__ == "__main__":
    main()
