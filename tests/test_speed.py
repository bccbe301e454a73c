"""The fast path (lib/engine/speed.py) on the CPU in fp32: every switch gives the plain path's images within a stated
tolerance; the encode thread keeps files and order; the benchmark's tiny smoke runs (not timed here)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib.engine import graphs, images, speed
from lib.engine.engine import Engine, InputError
from lib.engine.loading import load_modes
from lib.engine.modes import MODES as MODES_TABLE
from lib.testkit import models

CPU, FP32 = torch.device("cpu"), torch.float32
MODES = ("sd-turbo", "sdxl-turbo")  # SD 2 (linear projections), SDXL (two text encoders, an upcast VAE)
SIZE = 256
# Max abs difference per 8-bit pixel channel against the plain path. fp32 reorderings (fused matmuls, NHWC
# convolutions, another attention kernel) move values by ~1e-6 and so may flip a rounding: 2 levels allowed.
# A bfloat16 VAE keeps 8 mantissa bits: a few levels on these noise images.
TOLERANCE = {"fp32": 2, "bf16-vae": 12}

SWITCHES = {
    "channels_last": ({"SPEED": "0", "SPEED_CHANNELS_LAST": "1"}, "fp32"),
    "fuse_qkv": ({"SPEED": "0", "SPEED_FUSE_QKV": "1"}, "fp32"),
    "classic-attention": ({"SPEED": "0", "SPEED_SDPA": "0"}, "fp32"),
    "vae-bfloat16": ({"SPEED": "0", "SPEED_VAE_DTYPE": "bfloat16"}, "bf16-vae"),  # bf16 convs are slow on CPU
    # The inductor backend compiles for minutes on 2 cores: the eager backend checks the plumbing (the modules
    # compiled in place and still shared, outputs unchanged).
    "compile": ({"SPEED": "0", "SPEED_COMPILE": "unet,vae", "SPEED_COMPILE_BACKEND": "eager"}, "fp32"),
    "all": (
        {"SPEED_CHANNELS_LAST": "1", "SPEED_FUSE_QKV": "1", "SPEED_TF32": "1", "SPEED_CUDNN_BENCHMARK": "1"},
        "fp32",
    ),
}
# Where a switch's check costs the most, one mode stands for both.
ONLY = {"vae-bfloat16": ("sdxl-turbo",), "compile": ("sd-turbo",)}


def engine_with(tiny_weights, env: dict, modes=MODES) -> Engine:
    """A fresh engine (own modules: the switches change them in place) with `env`'s switches applied."""
    engine = Engine(load_modes(tiny_weights, modes, CPU, FP32), CPU, FP32)
    return speed.optimize(engine, speed.Switches.from_env(CPU, env))


def pixels(engine: Engine, tmp_path) -> dict:
    """{(mode, decoder): pixels}, through the VAE and through the TAESD (fast_decode)."""
    out = {}
    for mode in engine.modes:
        for fast_decode in (False, True):
            request = engine.request(
                prompt="a lighthouse at dusk",
                mode=mode,
                width=SIZE,
                height=SIZE,
                seed=7,
                output_format="png",
                fast_decode=fast_decode,
            )
            folder = tmp_path / f"{mode}-{fast_decode}"
            folder.mkdir(exist_ok=True)
            for output in engine.run(request, folder):
                key = (mode, "taesd" if fast_decode else "vae")
                out[key] = np.asarray(Image.open(output.path).convert("RGB"), dtype=np.int16)
    return out


@pytest.fixture(scope="module")
def plain(tiny_weights, tmp_path_factory):
    return pixels(engine_with(tiny_weights, {"SPEED": "0"}), tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_gives_the_plain_path_images(tiny_weights, plain, tmp_path, name):
    env, tolerance = SWITCHES[name]
    modes = ONLY.get(name, MODES)
    engine = engine_with(tiny_weights, env, modes)
    got = pixels(engine, tmp_path)
    assert got.keys() == {key for key in plain if key[0] in modes}
    diffs = {key: int(np.abs(got[key] - plain[key]).max()) for key in got}
    assert max(diffs.values()) <= TOLERANCE[tolerance], diffs
    report = engine.speed
    if "SPEED_COMPILE" in env:
        assert report["compiled"] == ["unet", "vae"]
        unet = engine.modes["sd-turbo"].txt2img.unet
        assert graphs.installed(unet).compiled and engine.modes["sd-turbo"].img2img.unet is unet


def test_fast_decode_uses_the_tiny_autoencoder(tiny_weights, plain, tmp_path):
    """fast_decode: same latents, the mode's TAESD / TAESDXL decodes them (other pixels), recorded in the file;
    requests with and without it never share a batch."""
    from lib.engine.engine import batch_key
    from lib.engine.images import read_settings
    from lib.engine.modes import TAESD, TAESDXL

    modes = (*MODES, "sdxl-lightning-4step")  # SDXL-Lightning decodes with sdxl-turbo's TAESDXL, the same module
    engine = Engine(load_modes(tiny_weights, modes, CPU, FP32), CPU, FP32)
    assert engine.modes["sd-turbo"].tiny_vae is not engine.modes["sdxl-turbo"].tiny_vae
    assert engine.modes["sdxl-lightning-4step"].tiny_vae is engine.modes["sdxl-turbo"].tiny_vae
    assert (MODES_TABLE["sd-turbo"].weights.tiny_vae, MODES_TABLE["sdxl-turbo"].weights.tiny_vae) == (TAESD, TAESDXL)
    lightning = Engine({"sdxl-lightning-4step": engine.modes["sdxl-lightning-4step"]}, CPU, FP32)
    both = {**plain, **pixels(lightning, tmp_path)}
    for mode in modes:
        assert np.abs(both[(mode, "taesd")] - both[(mode, "vae")]).max() > 0
        request = engine.request(prompt="x", mode=mode, width=SIZE, height=SIZE + 64, seed=1, fast_decode=True)
        assert batch_key(request) != batch_key(
            engine.request(prompt="x", mode=mode, width=SIZE, height=SIZE + 64, seed=1)
        )
        metrics = {}
        (tmp_path / mode).mkdir()
        [output] = engine.run(request, tmp_path / mode, metrics.__setitem__)
        assert Image.open(output.path).size == (SIZE, SIZE + 64)
        assert read_settings(output.path)["fast_decode"] is True and metrics["timings.vae_decode"] > 0
    with pytest.raises(InputError, match="fast_decode"):
        engine.request(prompt="x", mode="sd-turbo", fast_decode="yes")


def test_attention_runs_sdpa_by_default_and_fused_when_asked(tiny_weights):
    """diffusers' default processor calls torch SDPA; fused QKV keeps SDPA; the text encoders use sdpa too."""
    default = engine_with(tiny_weights, {}).speed["attention"]
    assert default["UNet2DConditionModel"] == {"AttnProcessor2_0": sum(default["UNet2DConditionModel"].values())}
    assert default["AutoencoderKL"].keys() == {"AttnProcessor2_0"}
    assert default["CLIPTextModel"].keys() == {"transformers:sdpa"}
    fused = engine_with(tiny_weights, {"SPEED_FUSE_QKV": "1"})
    assert fused.speed["attention"]["UNet2DConditionModel"].keys() == {"FusedAttnProcessor2_0"}
    unet = fused.modes["sd-turbo"].txt2img.unet
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    inner = attn.attn2.to_q.weight.shape[0]  # cross-attention keeps its own query projection
    assert attn.attn1.to_qkv.weight.shape[0] == 3 * inner  # self-attention: QKV
    assert attn.attn2.to_kv.weight.shape[0] == 2 * inner  # cross-attention: KV


def test_fused_projections_hold_each_weight_once(tiny_weights):
    """diffusers' fuse keeps the separate projections beside the fused one; the fast path drops them, so the
    fused models hold exactly the plain models' bytes (and give their images: test_switch_gives_...)."""
    from lib.engine.memory import module_bytes

    plain, fused = engine_with(tiny_weights, {"SPEED": "0"}), engine_with(tiny_weights, {"SPEED_FUSE_QKV": "1"})
    for mode in MODES:
        for a, b in zip(plain.modes[mode].modules(), fused.modes[mode].modules(), strict=True):
            assert module_bytes(a) == module_bytes(b), (mode, type(a).__name__)
    unet = fused.modes["sd-turbo"].txt2img.unet
    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
    assert "to_qkv" in names and "to_kv" in names and "to_k" not in names and "to_v" not in names
    assert fused.speed["projections_dropped"] > 0


def test_settings_defaults_and_errors():
    cpu = speed.Switches.from_env(CPU, {})
    assert (cpu.sdpa, cpu.channels_last, cpu.fuse_qkv, cpu.tf32, cpu.warmup, cpu.compile, cpu.cuda_graphs) == (
        True,
        False,
        False,
        False,
        False,
        (),
        (),
    )
    cuda = speed.Switches.from_env(torch.device("cuda"), {})
    assert (cuda.channels_last, cuda.fuse_qkv, cuda.tf32, cuda.warmup) == (True,) * 4
    # Prediction sizes are free-form: cuDNN autotuning per new size would cost more than it saves.
    assert not cuda.cudnn_benchmark and speed.Switches.from_env(CPU, {"SPEED_CUDNN_BENCHMARK": "1"}).cudnn_benchmark
    # CUDA graphs for every model, per bucket; compiling is asked for (minutes per mode on a cold boot).
    assert cuda.cuda_graphs == ("unet", "vae", "text") and cuda.graph_batches == (1, 2, 4, 8, 16)
    assert cuda.vae_dtype == "auto" and cuda.compile == () and cuda.compile_mode == "default"
    assert cuda.warmup_seconds == 300 and cuda.graph_memory == 2 * 10**9 and cuda.warmup_sizes == ()
    plain = speed.Switches.from_env(torch.device("cuda"), {"SPEED": "0"})
    assert (plain.channels_last, plain.fuse_qkv, plain.tf32, plain.warmup, plain.vae_dtype, plain.cuda_graphs) == (
        False,
        False,
        False,
        False,
        "keep",
        (),
    )
    assert plain.sdpa  # diffusers' own default stays
    assert speed.Switches.from_env(CPU, {"SPEED_COMPILE": "1"}).compile == ("unet", "vae")
    assert speed.Switches.from_env(CPU, {"SPEED_CUDA_GRAPHS": "unet,text"}).cuda_graphs == ("unet", "text")
    assert speed.Switches.from_env(torch.device("cuda"), {"SPEED_CUDA_GRAPHS": "0"}).cuda_graphs == ()
    sized = speed.Switches.from_env(CPU, {"SPEED_WARMUP_SIZES": "768x512, 512X768", "SPEED_GRAPH_BATCHES": "4,1,2"})
    assert sized.warmup_sizes == ((768, 512), (512, 768)) and sized.graph_batches == (1, 2, 4)
    for env, name in (
        ({"SPEED_FUSE_QKV": "maybe"}, "SPEED_FUSE_QKV"),
        ({"SPEED_VAE_DTYPE": "int8"}, "SPEED_VAE_DTYPE"),
        ({"SPEED_COMPILE": "unet,everything"}, "SPEED_COMPILE"),
        ({"SPEED_CUDA_GRAPHS": "unet,safety"}, "SPEED_CUDA_GRAPHS"),
        ({"SPEED_COMPILE_MODE": "reduce-overhead"}, "SPEED_COMPILE_MODE"),
        ({"SPEED_GRAPH_BATCHES": "0,4"}, "SPEED_GRAPH_BATCHES"),
        ({"SPEED_GRAPH_BATCHES": "two"}, "SPEED_GRAPH_BATCHES"),
        ({"SPEED_WARMUP_SIZES": "500x512"}, "SPEED_WARMUP_SIZES"),
        ({"SPEED_WARMUP_SECONDS": "-1"}, "SPEED_WARMUP_SECONDS"),
        ({"SPEED_GRAPH_MEMORY": "lots"}, "SPEED_GRAPH_MEMORY"),
    ):
        with pytest.raises(ValueError, match=name):
            speed.Switches.from_env(CPU, env)


def test_vae_dtypes_follow_the_vaes_own_config_and_the_gpus_compute_capability(tiny_weights):
    """Only SDXL's VAE (its config says force_upcast: true) is upcast: to bfloat16 from compute capability 8.0,
    to float32 below (T4, V100: bf16 there is emulated); SD 1.5 / SD Turbo's VAEs (no such key, whatever
    AutoencoderKL's default says) run in the model dtype."""
    from lib.engine import precision

    engine = Engine(load_modes(tiny_weights, ("sdxl-turbo", "sd-turbo"), CPU, FP32), CPU, FP32)
    sdxl, sd = (engine.modes[m].txt2img.vae.config for m in ("sdxl-turbo", "sd-turbo"))
    assert sdxl.force_upcast and sd.force_upcast  # AutoencoderKL's default fills the key in for SD's
    assert precision.needs_upcast(sdxl) and not precision.needs_upcast(sd)
    auto, keep = speed.Switches.from_env(CPU, {}), speed.Switches.from_env(CPU, {"SPEED": "0"})
    fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
    cuda = torch.device("cuda")
    for capability, upcast in (((7, 0), fp32), ((7, 5), fp32), ((8, 0), bf16), ((8, 9), bf16), ((9, 0), bf16)):
        dtypes = precision.choose(cuda, capability)
        assert (dtypes.model, dtypes.upcast_vae, dtypes.native_bf16) == (fp16, upcast, upcast == bf16)
        assert speed.vae_dtype(sdxl, auto, dtypes, fp16) == upcast
        assert speed.vae_dtype(sd, auto, dtypes, fp16) == fp16
        assert speed.vae_dtype(sdxl, keep, dtypes, fp16) == fp32  # the plain path: as diffusers loads it
        assert speed.vae_dtype(sd, keep, dtypes, fp16) == fp16
    assert precision.choose(cuda, (8, 0), "bfloat16").model == bf16
    with pytest.raises(ValueError, match=r"MODEL_DTYPE: bfloat16 needs compute capability 8\.0.*7\.5"):
        precision.choose(cuda, (7, 5), "bfloat16")
    with pytest.raises(ValueError, match="MODEL_DTYPE: 'half'"):
        precision.choose(CPU, None, "half")
    cpu = precision.choose(CPU)
    assert (cpu.model, cpu.upcast_vae) == (fp32, fp32)
    assert speed.vae_dtype(sdxl, speed.Switches.from_env(CPU, {"SPEED_VAE_DTYPE": "bfloat16"}), cpu, fp32) == bf16


def test_tf32_is_set_through_one_api_and_stays_readable():
    """torch.compile's inductor reads the legacy TF32 flags; after the fast path sets TF32 they must still read."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for on in (True, False, True):
            speed.set_tf32(on)
            assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
            assert torch.get_float32_matmul_precision() == ("high" if on else "highest")
    finally:
        speed.set_tf32(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_encoding_in_threads_keeps_files_and_order(tiny_weights, tmp_path, monkeypatch):
    engine = Engine(load_modes(tiny_weights, ("sd-turbo",), CPU, FP32), CPU, FP32)
    runs = {}
    for threads in ("0", "3"):
        monkeypatch.setenv("SPEED_ENCODE_THREADS", threads)
        images._encoder_pool.cache_clear()
        metrics = {}
        request = engine.request(
            prompt="a cat", mode="sd-turbo", width=SIZE, height=SIZE, seed=11, num_outputs=3, output_format="webp"
        )
        (tmp_path / threads).mkdir()
        outputs = list(engine.run(request, tmp_path / threads, metrics.__setitem__))
        runs[threads] = [(o.seed, o.path.name, hashlib.sha256(o.path.read_bytes()).hexdigest()) for o in outputs]
        assert metrics["timings.image_encoding"] > 0
    images._encoder_pool.cache_clear()
    assert runs["0"] == runs["3"]
    assert [seed for seed, _, _ in runs["3"]] == [11, 12, 13]


def test_random_models_materialise_on_the_device_without_init():
    """Full-size TAESD from its real config: every parameter real (not meta), finite, in the asked dtype."""
    taesd = models.build_component("madebyollin/taesd", "taesd", device=CPU, dtype=FP32)
    params = list(taesd.parameters())
    assert params and all(p.device == CPU and p.dtype == FP32 and torch.isfinite(p).all() for p in params)
    assert sum(p.numel() for p in params) > 2_000_000  # encoder + decoder, full size
    with torch.inference_mode():
        out = taesd.decode(torch.randn(1, 4, 8, 8)).sample
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    tokenizer = models.tokenizer("stabilityai/sd-turbo", "tokenizer")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and max(ids) <= 49407


def test_bench_tiny_smoke(tiny_weights, tmp_path):
    """The benchmark's --tiny mode end to end (predict() vs a bare diffusers call): it runs and reports; the
    timings are not checked here (CI machines are shared)."""
    from lib.bench import suite as bench

    data = bench.main(
        [
            "--tiny",
            "--weights",
            str(tiny_weights),
            "--modes",
            "sd-turbo",
            "--sizes",
            "256",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
            "--doc",
            str(tmp_path / "b.md"),
        ]
    )
    result = data["tiny"]["sd-turbo"]
    assert result["predict_ms"]["n"] == 1 and result["ratio_vs_bare"] > 0
    written = json.loads(next(tmp_path.glob("*-tiny-cpu.json")).read_text())
    assert written["tiny"]["sd-turbo"]["size"] == 256
    assert "<!-- bench:tiny-cpu -->" in (tmp_path / "b.md").read_text()
