"""The fast path: optimisations applied to the loaded pipelines once, after loading (Engine.load calls
`optimize`). Each one is switchable by an environment variable; the defaults are on for CUDA where they are
safe and off on the CPU (where the tests run in fp32 and check that each gives the plain path's images).

Variable (default on CUDA / on the CPU): what it does.
- SPEED (1/1): 0 turns every default below off (the plain diffusers path); single switches still override.
- SPEED_SDPA (1/1): attention through torch's scaled_dot_product_attention, diffusers' default processor
  (checked and reported); 0 puts the classic processor back, for before/after.
- SPEED_TF32 (1/-): TF32 for fp32 matmuls and convolutions (acts only on fp32 parts). Set through torch's legacy
  flags only: torch 2.13 refuses to read them once the newer `fp32_precision` API has been used, and
  torch.compile's inductor reads them (pytorch issue 166387).
- SPEED_CUDNN_BENCHMARK (0/-): cuDNN times its convolution algorithms per new shape and keeps the fastest. Off
  for predictions: their sizes are free-form (any multiple of 8), and every new size would pay the autotuning.
  On where shapes are fixed: the realtime server (one size per session) and the benchmark's fixed cases.
- SPEED_CHANNELS_LAST (1/0): UNet and VAE weights in channels_last (NHWC), the layout tensor cores want.
The ControlNets (CONTROLNET=1) run every denoising step beside the UNet and get what it gets: channels_last, fused QKV
where they have attention (diffusers fuses per attention layer), and compiling and CUDA graphs with the `unet` target.
- SPEED_FUSE_QKV (1/0): one fused QKV (self-attention) / KV (cross-attention) projection per attention; the
  separate projections are dropped (diffusers keeps both: about 2.9 GB more for all modes), and rebuilt as
  views of the fused weights only while a style LoRA needs them (lib/loras/).
- SPEED_VAE_DTYPE (auto/auto): auto runs a VAE whose own config forces an upcast (SDXL's: fp16 overflows) in
  bfloat16 where the GPU has it natively (compute capability 8.0+), else float32; the others in the model
  dtype (lib/engine/precision.py). keep: as diffusers loads it (fp32 for SDXL's). Or float32, bfloat16, float16.
- SPEED_COMPILE (0/0): torch.compile; 1 = unet,vae, or a list of unet, vae (the decoders), text.
- SPEED_COMPILE_MODE (max-autotune-no-cudagraphs, or max-autotune with CUDA graphs / default).
- SPEED_COMPILE_BACKEND (inductor): eager or aot_eager check the plumbing quickly.
- SPEED_CUDA_GRAPHS (0/-): CUDA graphs for the static shapes via torch.compile (implies compiling the UNet).
  Only for the modes the memory plan keeps resident: a graph holds the device addresses of its weights, which a
  move out and back would change; modes kept in host memory are compiled without graphs.
- SPEED_WARMUP (1/0): each mode once at its default size (compiles, autotunes), on the thread that serves
  predictions (graph trees are per thread), with the safety checker off for its own images.
- SPEED_ENCODE_THREADS (min(4, cores)): image files are encoded in these threads, off the critical path
  (0: inline). SPEED_WEBP_METHOD (0): libwebp effort; 0 is 4x faster than 4 at 512px, same PSNR, +12% bytes.
  (Both read by lib/engine/images.py.)

LoRA fusing is not a switch: the LCM-LoRAs are always fused at load (lib/engine/loading.fuse_lora).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields

import torch

from lib.engine.precision import Precision, needs_upcast
from lib.engine.precision import choose as choose_precision
from lib.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Switches:
    sdpa: bool
    tf32: bool
    cudnn_benchmark: bool
    channels_last: bool
    fuse_qkv: bool
    vae_dtype: str
    compile: tuple[str, ...]
    compile_mode: str
    compile_backend: str
    cuda_graphs: bool
    warmup: bool

    @classmethod
    def from_env(cls, device: torch.device, env=None, **overrides) -> Switches:
        """The switches from `env` (default os.environ, through lib/settings.py) and `overrides`, with the
        device's defaults: on for CUDA unless SPEED=0."""
        s = Settings(env)
        cuda = torch.device(device).type == "cuda"
        fast = s.speed

        def default(value, on):
            return on if value is None else value

        values = {
            "sdpa": s.speed_sdpa,
            "tf32": default(s.speed_tf32, fast and cuda),
            "cudnn_benchmark": s.speed_cudnn_benchmark,
            "channels_last": default(s.speed_channels_last, fast and cuda),
            "fuse_qkv": default(s.speed_fuse_qkv, fast and cuda),
            "vae_dtype": s.speed_vae_dtype or ("auto" if fast else "keep"),
            "compile": s.speed_compile,
            "compile_mode": s.speed_compile_mode or "",
            "compile_backend": s.speed_compile_backend,
            "cuda_graphs": s.speed_cuda_graphs,
            "warmup": default(s.speed_warmup, fast and cuda),
        }
        values.update(overrides)
        if values["cuda_graphs"] and "unet" not in values["compile"]:
            values["compile"] = ("unet", *values["compile"])  # CUDA graphs come through torch.compile
        if not values["compile_mode"]:
            values["compile_mode"] = (
                "default" if not cuda else "max-autotune" if values["cuda_graphs"] else "max-autotune-no-cudagraphs"
            )
        return cls(**values)

    def describe(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name) is True]
        extra = [f"vae_dtype={self.vae_dtype}"]
        if self.compile:
            extra.append(f"compile={','.join(self.compile)} ({self.compile_mode}, {self.compile_backend})")
        return ", ".join(on + extra)


def _unique(modules) -> list:
    seen: dict[int, object] = {}
    for m in modules:
        if m is not None:
            seen.setdefault(id(m), m)
    return list(seen.values())


def decoders(loaded) -> list:
    """The image decoders of a LoadedMode: its VAE, and its TAESD where the mode has one (fast_decode)."""
    return _unique([loaded.txt2img.vae, loaded.tiny_vae])


def vae_dtype(config, switches: Switches, dtypes: Precision, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a decoder (VAE or TAESD) with this config runs in."""
    if switches.vae_dtype == "keep":  # as diffusers loads it: an upcast VAE in fp32
        return torch.float32 if needs_upcast(config) else model_dtype
    if switches.vae_dtype != "auto":
        return getattr(torch, switches.vae_dtype)
    return dtypes.upcast_vae if needs_upcast(config) else model_dtype


def attention_report(modules) -> dict:
    """Which attention implementation each kind of module runs: diffusers processors by class name (the
    *2_0 ones call torch SDPA), transformers' attn_implementation for the text encoders."""
    report: dict = {}
    for m in modules:
        kind = type(m).__name__
        if hasattr(m, "attn_processors"):
            counts = Counter(type(p).__name__ for p in m.attn_processors.values())
        elif getattr(m.config, "_attn_implementation", None):
            counts = Counter({f"transformers:{m.config._attn_implementation}": 1})
        else:  # no attention (TAESD)
            continue
        report.setdefault(kind, Counter()).update(counts)
    return {k: dict(v) for k, v in report.items()}


@torch.no_grad()
def apply(
    modes: dict,
    device: torch.device,
    dtype: torch.dtype,
    switches: Switches,
    dtypes: Precision | None = None,
    resident=None,
) -> dict:
    """Apply `switches` to every mode's modules (each shared module once); `resident`: the modes the memory plan
    keeps on the device (default: all). Returns what was done."""
    from diffusers.models.attention_processor import AttnProcessor

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtypes = dtypes or choose_precision(device)
    if cuda:  # process-wide flags: set both ways
        set_tf32(switches.tf32)
        torch.backends.cudnn.benchmark = switches.cudnn_benchmark
    loaded = list(modes.values())
    unets = _unique(lm.txt2img.unet for lm in loaded)
    controlnets = _unique(net for lm in loaded for net in lm.controlnets.values())  # CONTROLNET=1: as the UNets
    vaes = _unique(d for lm in loaded for d in decoders(lm))
    texts = _unique(e for lm in loaded for e in (lm.txt2img.text_encoder, getattr(lm.txt2img, "text_encoder_2", None)))
    report: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "switches": asdict(switches)}

    report["vae_dtype"] = {}
    for v in vaes:
        target = vae_dtype(v.config, switches, dtypes, dtype)
        if v.dtype != target:
            v.to(target)
        report["vae_dtype"][type(v).__name__] = str(target).removeprefix("torch.")

    attention_modules = [m for m in unets + controlnets + vaes if hasattr(m, "set_attn_processor")]
    report["projections_dropped"] = 0
    if not switches.sdpa:
        for m in attention_modules:
            m.set_attn_processor(AttnProcessor())
    elif switches.fuse_qkv:
        for m in attention_modules:
            if m.attn_processors:
                report["projections_dropped"] += fuse_projections(m)
    if switches.channels_last:
        for m in unets + controlnets + vaes:
            m.to(memory_format=torch.channels_last)
    report["attention"] = attention_report(unets + controlnets + vaes + texts)

    if switches.compile:
        resident = set(modes) if resident is None else set(resident)
        on_device = {id(m) for name in resident for m in modes[name].modules()}
        _compile(switches, unets + controlnets, vaes, texts, on_device)
    report["compiled"] = list(switches.compile)
    return report


def fuse_projections(model) -> int:
    """Fused QKV (self-attention) / KV (cross-attention) projections, with the separate ones dropped: diffusers
    keeps both, which would hold every projection twice. Returns how many projections were dropped."""
    from diffusers import ControlNetModel

    if not isinstance(model, ControlNetModel):
        model.fuse_qkv_projections()  # sets FusedAttnProcessor2_0 (SDPA), which reads only the fused layers
    else:  # its inherited fuse_qkv_projections skips the classic Attention layers: fuse them one by one
        from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

        layers = [m for m in model.modules() if isinstance(m, Attention)]
        for layer in layers:
            layer.fuse_projections(fuse=True)
        if layers:
            model.set_attn_processor(FusedAttnProcessor2_0())
    dropped = 0
    for attn in fused_attentions(model):
        for name in separate_projections(attn):
            delattr(attn, name)
            dropped += 1
    return dropped


def fused_attentions(model) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention) and getattr(m, "fused_projections", False)]


def separate_projections(attn) -> tuple[str, ...]:
    """The layers a fused attention replaces (cross-attention keeps its own query projection)."""
    return ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")


def restore_projections(model) -> list[tuple]:
    """The separate projections of each fused attention back, as views of the fused weights (no copy), for as
    long as something needs them (a style LoRA's adapters). Returns what drop_projections takes."""
    rebuilt = []
    for attn in fused_attentions(model):
        names = separate_projections(attn)
        if all(hasattr(attn, n) for n in names):
            continue
        fused = attn.to_kv if attn.is_cross_attention else attn.to_qkv
        width = fused.out_features // len(names)
        for i, name in enumerate(names):
            layer = torch.nn.Linear(fused.in_features, width, bias=fused.bias is not None, device="meta")
            rows = slice(i * width, (i + 1) * width)
            layer.weight = torch.nn.Parameter(fused.weight[rows], requires_grad=False)
            if fused.bias is not None:
                layer.bias = torch.nn.Parameter(fused.bias[rows], requires_grad=False)
            setattr(attn, name, layer)
        rebuilt.append((attn, names))
    return rebuilt


def drop_projections(rebuilt: list[tuple]) -> None:
    for attn, names in rebuilt:
        for name in names:
            delattr(attn, name)


def set_tf32(on: bool) -> None:
    """TF32 for fp32 matmuls and convolutions, through the legacy flags only (see the module docstring)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _compile(switches: Switches, unets, vaes, texts, on_device: set[int]) -> None:
    if switches.compile_backend == "inductor":
        import torch._inductor.config as inductor

        # diffusers' recommended inductor switches for its UNets/VAEs (docs: "Accelerate inference").
        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.epilogue_fusion = False
        inductor.coordinate_descent_check_all_directions = True
    targets = {"unet": unets, "vae": vaes, "text": texts}
    for target in switches.compile:
        for module in targets[target]:
            options = {"backend": switches.compile_backend}
            if switches.compile_backend == "inductor":
                # A module that the memory plan may move out and back must not hold CUDA graphs.
                options["mode"] = (
                    switches.compile_mode
                    if id(module) in on_device or not switches.cuda_graphs
                    else "max-autotune-no-cudagraphs"
                )
            getattr(module, "decoder", module).compile(**options)  # in place: the pipelines share the module


def warm_up(engine, img2img: bool = False) -> dict:
    """Run every mode once at its default size (batch 1, each decoder): compiles and autotunes before the first
    request. With `img2img` (the realtime server), img2img too, from a grey picture, encoded and decoded with the
    tiny autoencoder where the mode has one (the realtime default). Call it on the thread that will serve
    predictions (lib/engine/batcher.py does). The safety checker runs once on a blank image, to load its kernels,
    but judges none of the warm-up's own images (a flagged noise image must not fail setup). Returns seconds per
    mode."""
    from PIL import Image

    from lib.engine.inputs import resolve_request

    seconds = {}
    for name in engine.modes:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            jobs = []
            for fast_decode in _decode_variants(engine, name):
                extra = {"fast_decode": True} if fast_decode else {}
                request = engine.request(
                    prompt="warm-up", mode=name, seed=0, output_format="webp", disable_safety_checker=True, **extra
                )
                jobs.append(engine.job(request, tmp))
            if img2img:
                size, tiny = engine.modes[name].mode.size, engine.modes[name].tiny_vae is not None
                request = resolve_request(
                    enabled=engine.enabled,
                    prompt="warm-up",
                    mode=name,
                    seed=0,
                    width=size,
                    height=size,
                    image_size=(size, size),
                    fast_decode=tiny,
                    fast_encode=tiny,
                    disable_safety_checker=True,
                )
                jobs.append(engine.job(request, tmp, picture=Image.new("RGB", (size, size), (128, 128, 128))))
            if engine.modes[name].controlnets:  # CONTROLNET=1: the ControlNet path too, compiled before a request
                size = engine.modes[name].mode.size
                request = resolve_request(
                    enabled=engine.enabled,
                    prompt="warm-up",
                    mode=name,
                    seed=0,
                    width=size,
                    height=size,
                    controls=[{"name": "control", "kind": "edge_map", "size": (size, size)}],
                    controlnet=True,
                    disable_safety_checker=True,
                )
                grey = Image.new("RGB", (size, size), (128, 128, 128))
                jobs.append(engine.job(request, tmp, control_pictures=[grey]))
            for job in jobs:
                for _ in engine.run_batch([job]):
                    pass
        seconds[name] = round(time.perf_counter() - started, 3)
        log.info("warm-up %s: %.1f s", name, seconds[name])
    if engine.safety is not None:
        engine.safety.flagged([Image.new("RGB", (224, 224))])
    engine.speed["warmup_s"] = seconds
    return seconds


def _decode_variants(engine, name: str) -> list[bool]:
    return [False, True] if engine.modes[name].tiny_vae is not None else [False]


def optimize(engine, switches: Switches | None = None, dtypes: Precision | None = None, resident=None):
    """Engine.load's last step: apply the switches from the environment (warm-up is separate: `warm_up`, on the
    serving thread). The report is kept in engine.speed (and the benchmark records it)."""
    switches = switches or Switches.from_env(engine.device)
    started = time.perf_counter()
    report = apply(engine.modes, engine.device, engine.dtype, switches, dtypes, resident)
    report["apply_s"] = round(time.perf_counter() - started, 3)
    report["warmup_s"] = {}
    engine.speed = report
    engine.switches = switches
    log.info(
        "fast path on %s: %s; attention: %s; applied in %.1f s",
        engine.device,
        switches.describe(),
        report["attention"],
        report["apply_s"],
    )
    return engine
