"""The tiny weights: the real repos' layout and file names, deterministic, and loadable like the real files."""

import contextlib
import hashlib
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lib.engine.modes import (
    CONTROLNET,
    DEPTH_ESTIMATOR,
    LORA_WEIGHT_NAME,
    MODES,
    PIPELINE_CLASSES,
    SDXL_BASE,
    SDXL_LIGHTNING,
    SDXL_TURBO,
    TINY_VAE,
    all_repos,
)
from lib.testkit.models import CONFIGS, LORA_ALPHA, LORA_RANK, write_weights

# The SD 1.5 repo with the safety checker's folders too; the ControlNets and the depth estimator.
REPOS = all_repos(MODES, safety_checker=True, controlnet=True)
WEIGHTS = {
    "text_encoder": "model",
    "text_encoder_2": "model",
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "safety_checker": "model",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_files(repo) -> tuple[set[str], set[str]]:
    """(every file of the repo, those copied verbatim from lib/configs), as in the real repo."""
    if repo.repo_id == SDXL_LIGHTNING.repo_id:  # ByteDance's names, one LoRA per step count
        return {f"sdxl_lightning_{n}step_lora.safetensors" for n in (2, 4, 8)}, set()
    if not repo.components:
        return {LORA_WEIGHT_NAME}, set()
    if repo.components == (TINY_VAE,):  # TAESD / TAESDXL: one model at the repo's root
        return {"config.json", "diffusion_pytorch_model.safetensors"}, set()
    if repo.components == (CONTROLNET,):  # a ControlNet: one model at the repo's root, fp16 where the real one is
        return {"config.json", f"diffusion_pytorch_model{'.fp16' if repo.variant else ''}.safetensors"}, set()
    if repo.components == (DEPTH_ESTIMATOR,):  # Depth Anything: the real image processor config
        return {"config.json", "model.safetensors", "preprocessor_config.json"}, {"preprocessor_config.json"}
    verbatim = {"model_index.json", "scheduler/scheduler_config.json"}
    files = set(verbatim)
    for c in repo.components:
        if c == "feature_extractor":
            verbatim.add(f"{c}/preprocessor_config.json")
            files.add(f"{c}/preprocessor_config.json")
        elif c.startswith("tokenizer"):
            verbatim |= {f"{c}/tokenizer_config.json", f"{c}/special_tokens_map.json"}
            files |= {
                f"{c}/tokenizer_config.json",
                f"{c}/special_tokens_map.json",
                f"{c}/vocab.json",
                f"{c}/merges.txt",
            }
        elif c != "scheduler":
            suffix = f".{repo.variant}.safetensors" if repo.variant else ".safetensors"
            files |= {f"{c}/config.json", f"{c}/{WEIGHTS[c]}{suffix}"}
    return files, verbatim


@contextlib.contextmanager
def library_warnings():
    """Collects what diffusers, transformers and peft log at WARNING or above."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def load_pipeline(weights: Path, mode_name: str):
    import diffusers

    repo = MODES[mode_name].weights.repo
    cls = getattr(diffusers, PIPELINE_CLASSES[MODES[mode_name].family][0])
    no_checker = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    index = (weights / repo.repo_id / "model_index.json").read_text()
    pipe = cls.from_pretrained(
        weights / repo.repo_id,
        variant=repo.variant,
        dtype=torch.float32,
        local_files_only=True,
        **(no_checker if "safety_checker" in index else {}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layout_and_verbatim_configs(tiny_weights):
    on_disk = {p.relative_to(tiny_weights).as_posix() for p in tiny_weights.rglob("*") if p.is_file()}
    expected = set()
    for repo in REPOS:
        files, verbatim = expected_files(repo)
        expected |= {f"{repo.repo_id}/{f}" for f in files}
        for f in verbatim:
            assert (tiny_weights / repo.repo_id / f).read_bytes() == (CONFIGS / repo.repo_id / f).read_bytes(), f
    assert on_disk == expected  # nothing missing, nothing extra
    from lib.engine.modes import repo_files  # and the engine's own list of what it reads agrees

    assert {f"{r.repo_id}/{f}" for r in REPOS for f in repo_files(r)} <= on_disk
    assert "SimianLuo/LCM_Dreamshaper_v7/unet/diffusion_pytorch_model.safetensors" in on_disk  # variant None


def test_deterministic_and_returns_what_it_wrote(tiny_weights, tmp_path):
    written = write_weights(tmp_path)
    assert sorted(p.as_posix() for p in written) == sorted(
        p.relative_to(tiny_weights).as_posix() for p in tiny_weights.rglob("*") if p.is_file()
    )
    assert all(sha256(tmp_path / p) == sha256(tiny_weights / p) for p in written)


def test_full_size_writing_copies_off_the_device_once_and_writes_in_the_background(tiny_weights, tmp_path):
    """What the GPU check's full-size weights go through: every tensor of a model off the device in one packed copy
    (here from the CPU: the same bytes), and files written by background threads, a subset of repos at a time,
    giving the files a foreground write gives."""
    from lib.engine.modes import TAESD
    from lib.testkit import models

    tensors = {
        "w": torch.randn(3, 4, 5, dtype=torch.float16),
        "b": torch.randn(7),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "ids": torch.arange(6).view(2, 3),
        "t": torch.randn(4, 3).t(),  # not contiguous
    }
    host = models.packed_to_host(tensors)
    assert list(host) == list(tensors)
    for k, v in tensors.items():
        assert host[k].dtype == v.dtype and host[k].shape == v.shape and torch.equal(host[k], v), k
    written = write_weights(tmp_path, repos=[SDXL_TURBO, TAESD], background=True)
    assert {"/".join(p.parts[:2]) for p in written} == {SDXL_TURBO.repo_id, TAESD.repo_id}
    assert all(sha256(tmp_path / p) == sha256(tiny_weights / p) for p in written)


def test_only_the_sdxl_text_encoders_are_shared(tiny_weights):
    by_hash: dict[str, list[str]] = {}
    for p in tiny_weights.rglob("*.safetensors"):
        by_hash.setdefault(sha256(p), []).append(p.relative_to(tiny_weights).as_posix())
    shared = sorted(sorted(paths) for paths in by_hash.values() if len(paths) > 1)
    assert shared == [
        [f"{r.repo_id}/{te}/model.fp16.safetensors" for r in (SDXL_TURBO, SDXL_BASE)]
        for te in ("text_encoder", "text_encoder_2")
    ]


def test_tokenizers_use_the_real_special_ids_and_know_every_byte(tiny_weights):
    from transformers import CLIPTokenizer

    for repo in REPOS:
        for c in (c for c in repo.components if c.startswith("tokenizer")):
            with library_warnings() as warnings:
                tokenizer = CLIPTokenizer.from_pretrained(tiny_weights / repo.repo_id, subfolder=c)
            ids = tokenizer("A Photo, of a café 東京 🐱").input_ids
            assert not warnings
            assert ids[0] == 49406 and ids[-1] == 49407 and all(i < 512 for i in ids[1:-1])


def test_lcm_lora_has_the_kohya_layout(tiny_weights):
    with safe_open(tiny_weights / "latent-consistency/lcm-lora-sdxl" / LORA_WEIGHT_NAME, "pt") as f:
        keys = set(f.keys())
        modules = {k.removesuffix(".lora_down.weight") for k in keys if k.endswith(".lora_down.weight")}
        assert keys == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        assert all(m.startswith("lora_unet_") and "." not in m for m in modules)
        for suffix in (
            "_attn2_to_k",
            "_ff_net_0_proj",
            "_to_out_0",
            "_conv1",
            "_conv_shortcut",
            "_downsamplers_0_conv",
            "_upsamplers_0_conv",
            "_time_emb_proj",
            "_proj_in",
        ):
            assert any(m.endswith(suffix) for m in modules), suffix
        conv = next(m for m in modules if m.endswith("_resnets_0_conv1"))
        assert f.get_tensor(f"{conv}.lora_down.weight").shape[::2] == (LORA_RANK, 3)  # (rank, in, 3, 3)
        assert f.get_tensor(f"{conv}.lora_up.weight").shape[1:] == (LORA_RANK, 1, 1)
        alpha = f.get_tensor(f"{conv}.alpha")
        assert alpha.shape == () and alpha.item() == LORA_ALPHA and alpha.dtype == torch.float16
        assert f.get_tensor(f"{conv}.lora_up.weight").abs().sum() > 0


@pytest.mark.parametrize("mode_name", ["lcm-lora-sdxl", "lcm-lora-sd15", "sdxl-lightning-4step"])
def test_fused_loras_load_every_key_and_fusing_changes_the_unet(tiny_weights, mode_name):
    weights = MODES[mode_name].weights
    lora = tiny_weights / weights.lora.repo_id
    pipe = load_pipeline(tiny_weights, mode_name)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with library_warnings() as warnings:
        pipe.load_lora_weights(lora, weight_name=weights.lora_file, adapter_name="lcm")
    injected = [n for n, m in pipe.unet.named_modules() if "lcm" in getattr(m, "lora_A", {})]
    with safe_open(lora / weights.lora_file, "pt") as f:
        in_file = [k for k in f.keys() if k.endswith(".lora_down.weight")]
    assert len(injected) == len(in_file) > 0  # every key found its module
    # The only warning: the file has no text-encoder keys (nor has the real one). Unmatched keys would warn.
    assert all(w.startswith("No LoRA keys associated to CLIPTextModel") for w in warnings), warnings
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "down_blocks.0.resnets.0.conv1.weight" in changed and "conv_in.weight" not in changed


@pytest.mark.parametrize("mode_name", list(MODES))
def test_every_mode_draws_a_256px_image(tiny_weights, mode_name):
    import diffusers

    mode = MODES[mode_name]
    pipe = load_pipeline(tiny_weights, mode_name)
    if mode.weights.scheduler:
        pipe.scheduler = getattr(diffusers, mode.weights.scheduler).from_config(
            pipe.scheduler.config, **dict(mode.weights.scheduler_config)
        )
    image = pipe(
        "a photo of a cat",
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=mode.guidance.default,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (256, 256)
