"""The tiny weights are in the real repos' layout, deterministic, and shaped like the real files."""

import dataclasses
import hashlib
import json

import torch

from safetensors import safe_open

from lib.loading import ComponentLoader, load_mode, required_files
from lib.modes import LORA_WEIGHT_NAME, MODES, all_repos
from scripts.make_tiny_weights import write_tiny_weights


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_file_setup_reads_is_there_with_real_names(tiny_weights):
    for repo in all_repos(MODES):
        for name in required_files(repo):
            assert (tiny_weights / repo.repo_id / name).is_file(), f"{repo.repo_id}/{name}"
    turbo = tiny_weights / "stabilityai/sdxl-turbo"
    assert (turbo / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (turbo / "text_encoder_2/model.fp16.safetensors").is_file()
    assert (tiny_weights / "SimianLuo/LCM_Dreamshaper_v7/unet/diffusion_pytorch_model.safetensors").is_file()
    index = json.loads((turbo / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["scheduler"] == ["diffusers", "EulerAncestralDiscreteScheduler"]
    scheduler = json.loads((turbo / "scheduler/scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing"


def test_deterministic(tiny_weights, tmp_path):
    again = write_tiny_weights(tmp_path)
    assert again and all(sha256(tiny_weights / p) == sha256(tmp_path / p) for p in again)


def test_sdxl_text_encoders_identical_unets_differ(tiny_weights):
    turbo, base = tiny_weights / "stabilityai/sdxl-turbo", tiny_weights / "stabilityai/stable-diffusion-xl-base-1.0"
    for name in ("text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors"):
        assert sha256(turbo / name) == sha256(base / name)
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    assert sha256(turbo / unet) != sha256(base / unet)


def test_lcm_lora_has_the_kohya_layout(tiny_weights):
    with safe_open(tiny_weights / "latent-consistency/lcm-lora-sdxl" / LORA_WEIGHT_NAME, "pt") as f:
        keys = set(f.keys())
        assert all(k.startswith("lora_unet_") for k in keys)
        downs = {k.removesuffix(".lora_down.weight") for k in keys if k.endswith(".lora_down.weight")}
        assert downs and all(f"{m}.lora_up.weight" in keys and f"{m}.alpha" in keys for m in downs)
        assert any(m.endswith("_attn1_to_q") for m in downs) and any(m.endswith("_conv1") for m in downs)
        assert str(f.get_tensor(next(iter(keys))).dtype) == "torch.float16"


def test_every_lcm_lora_key_maps_to_a_unet_module(tiny_weights):
    """diffusers converts the kohya keys and injects one LoRA layer per module in the file: none unmatched."""
    for name in ("lcm-lora-sd15", "lcm-lora-sdxl"):
        mode = MODES[name]
        unfused = load_mode(ComponentLoader(torch.device("cpu"), torch.float32), tiny_weights,
                            dataclasses.replace(mode, lora=None))
        lora = tiny_weights / mode.lora.repo_id
        unfused.txt2img.load_lora_weights(lora, weight_name=LORA_WEIGHT_NAME, adapter_name="lcm")
        injected = [n for n, m in unfused.txt2img.unet.named_modules() if "lcm" in getattr(m, "lora_A", {})]
        with safe_open(lora / LORA_WEIGHT_NAME, "pt") as f:
            in_file = [k for k in f.keys() if k.endswith(".lora_down.weight")]
        assert len(injected) == len(in_file) > 0
