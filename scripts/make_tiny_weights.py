"""Write tiny random models for every mode, in exactly the layout of the real Hugging Face repos.

  python scripts/make_tiny_weights.py DIR     # DIR/<repo_id>/<path_in_repo>, as setup() reads WEIGHTS_DIR

Each model is built from the real config (lib/configs/) with only the size fields shrunk, so class names,
scheduler configs, structural flags (linear projections, LCM's guidance embedding, SDXL's micro-conditioning)
and weight file names (fp16 variants, the kohya-layout LCM-LoRA with `.alpha`) are the real ones.
Deterministic: the same bytes on every run. The images these models draw are noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.modes import LORA_WEIGHT_NAME, MODES, all_repos  # noqa: E402

CONFIGS = ROOT / "lib" / "configs"
TEXT_HIDDEN, TEXT_PROJECTION = 32, 32
LORA_RANK, LORA_ALPHA = 4, 2.0
# The LCM-LoRA target modules (the diffusers LCM-LoRA training scripts' list).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LORA_BASES = {"latent-consistency/lcm-lora-sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
              "latent-consistency/lcm-lora-sdv1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def real_config(repo_id: str, path: str) -> dict:
    return json.loads((CONFIGS / repo_id / path).read_text())


def seeded(repo_id: str, component: str) -> None:
    """A seed per (repo, component). The SDXL text encoders are seeded alike across repos: they are one file
    in reality (same sha256), and the engine must notice and load them once."""
    key = component if component.startswith("text_encoder") and "xl" in repo_id else f"{repo_id}/{component}"
    torch.manual_seed(zlib.crc32(key.encode()))


def first_and_last(blocks: list) -> list:
    return [blocks[0], blocks[-1]]


def tiny_unet(repo_id: str, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    config = real_config(repo_id, "unet/config.json")
    config.update(block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
                  transformer_layers_per_block=1, cross_attention_dim=cross_attention_dim,
                  down_block_types=first_and_last(config["down_block_types"]),
                  up_block_types=first_and_last(config["up_block_types"]))
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 micro-conditioning numbers
        config.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TEXT_PROJECTION)
    seeded(repo_id, "unet")
    return UNet2DConditionModel.from_config(config)


def tiny_vae(repo_id: str):
    from diffusers import AutoencoderKL

    config = real_config(repo_id, "vae/config.json")
    # Four blocks keep the real 8x spatial factor; few channels keep a 512px decode fast on a CPU.
    config.update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8)
    seeded(repo_id, "vae")
    return AutoencoderKL.from_config(config)


def tiny_text_encoder(repo_id: str, component: str):
    import transformers

    config = real_config(repo_id, f"{component}/config.json")
    cls = getattr(transformers, config["architectures"][0])
    config.update(hidden_size=TEXT_HIDDEN, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                  projection_dim=TEXT_PROJECTION)
    for key in ("_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version"):
        config.pop(key, None)
    seeded(repo_id, component)
    return cls(transformers.CLIPTextConfig(**config))


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
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(CONFIGS / repo_id / component / name, folder / name)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def save(module, folder: Path, variant: str | None) -> None:
    if variant == "fp16":
        module = module.half()
    module.save_pretrained(folder, variant=variant, safe_serialization=True)


def write_repo(out_dir: Path, repo) -> None:
    """One diffusers repo: model_index.json, scheduler config, tokenizers, and the tiny models."""
    target = out_dir / repo.repo_id
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONFIGS / repo.repo_id / "model_index.json", target / "model_index.json")
    encoders = {}
    for component in repo.components:
        if component == "scheduler":
            (target / "scheduler").mkdir(exist_ok=True)
            shutil.copyfile(CONFIGS / repo.repo_id / "scheduler/scheduler_config.json",
                            target / "scheduler/scheduler_config.json")
        elif component.startswith("tokenizer"):
            write_tokenizer(repo.repo_id, component, target / component)
        elif component.startswith("text_encoder"):
            encoders[component] = tiny_text_encoder(repo.repo_id, component)
            save(encoders[component], target / component, repo.variant)
    save(tiny_vae(repo.repo_id), target / "vae", repo.variant)
    save(tiny_unet(repo.repo_id, TEXT_HIDDEN * len(encoders)), target / "unet", repo.variant)


def write_lcm_lora(out_dir: Path, repo) -> None:
    """A kohya-layout LoRA (`lora_unet_<module_path>.lora_down/.lora_up/.alpha`, fp16) for the tiny base UNet."""
    from safetensors.torch import save_file

    base = LORA_BASES[repo.repo_id]
    unet = tiny_unet(base, TEXT_HIDDEN * (2 if "xl" in base else 1))
    seeded(repo.repo_id, "lora")
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith(LORA_TARGETS) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(LORA_RANK, module.in_features)
            up = torch.randn(module.out_features, LORA_RANK)
        else:
            down = torch.randn(LORA_RANK, module.in_channels, *module.kernel_size)
            up = torch.randn(module.out_channels, LORA_RANK, 1, 1)
        tensors[f"{key}.lora_down.weight"] = (down * 0.1).half()
        tensors[f"{key}.lora_up.weight"] = (up * 0.1).half()
        tensors[f"{key}.alpha"] = torch.tensor(LORA_ALPHA, dtype=torch.float16)
    (out_dir / repo.repo_id).mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / repo.repo_id / LORA_WEIGHT_NAME)


def write_tiny_weights(out_dir: Path) -> list[Path]:
    """Write every mode's repos under out_dir; returns the files written, relative to out_dir."""
    out_dir = Path(out_dir)
    transformers.utils.logging.disable_progress_bar()
    for repo in all_repos(MODES):
        (write_repo if repo.components else write_lcm_lora)(out_dir, repo)
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="where to write DIR/<repo_id>/...")
    args = parser.parse_args()
    files = write_tiny_weights(args.dir)
    print(f"wrote {len(files)} files under {args.dir}")


if __name__ == "__main__":
    main()
