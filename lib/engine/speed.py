"""The fast path: optimisations applied to the loaded pipelines once, after loading (Engine.load calls
`optimize`), and the warm-up that records CUDA graphs and compiles before the first request (`warm_up`, on the
serving thread). Each is switchable by an environment variable (lib/settings.py); the defaults are on for CUDA where
they are safe and pay, and off on the CPU (where the tests run in fp32 and check that each gives the plain path's
images).

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
- SPEED_CHANNELS_LAST (1/0): UNet weights in channels_last (NHWC), the layout tensor cores want. Not the VAEs:
  their GroupNorms give NCHW back, and each norm then costs two layout copies (a VAE block measured 3.08 ms in
  channels_last against 2.75 ms without, on an H200).
The ControlNets (CONTROLNET=1) run every denoising step beside the UNet and get what it gets: channels_last, fused QKV
where they have attention (diffusers fuses per attention layer), and compiling and CUDA graphs with the `unet` target.
- SPEED_FUSE_QKV (1/0): one fused QKV (self-attention) / KV (cross-attention) projection per attention; the
  separate projections are dropped (diffusers keeps both: about 2.9 GB more for all modes), and rebuilt as
  views of the fused weights only while a style LoRA needs them (lib/loras/).
- SPEED_VAE_DTYPE (auto/auto): auto runs a VAE whose own config forces an upcast (SDXL's: fp16 overflows) in
  bfloat16 where the GPU has it natively (compute capability 8.0+), else float32; the others in the model
  dtype (lib/engine/precision.py). keep: as diffusers loads it (fp32 for SDXL's). Or float32, bfloat16, float16.
- SPEED_CUDA_GRAPHS (unet,vae,text/-): CUDA graphs (lib/engine/graphs.py) for the UNets, the autoencoders'
  decoders and encoders and the text encoders, per batch-size bucket (SPEED_GRAPH_BATCHES), recorded at setup.
  They take away the launch overhead that dominates few-step models at these sizes (an SD 2.1 UNet step: 35 ms
  eager on an H200, about 1 ms of arithmetic), cost seconds to record, not minutes, and need no compiler: the
  CUDA default. A bucket whose activations exceed SPEED_GRAPH_MEMORY runs without a graph (at that size the
  kernels are long and launches matter little).
- SPEED_COMPILE (-/-): torch.compile (SPEED_COMPILE_MODE, default inductor mode; SPEED_COMPILE_BACKEND), compiled at
  setup for the same buckets (the batch dimension dynamic from bucket 2, so two compiles per model and size), its
  kernels recorded in the graphs. Off by default: it fuses kernels (diffusers' documentation: SDXL 1024, 30
  steps, A100: 23% with max-autotune, its CUDA graphs included), but a cold compile of every mode takes many
  minutes, and Replicate boots each container without the compile cache unless WEIGHTS_DIR persists;
  scripts/gpu_check.sh measures its gain and its cold and warm compile times on sd-turbo. The inductor and Triton
  caches live in SPEED_COMPILE_CACHE (beside the weights), so a setup after the first reuses them.
- SPEED_WARMUP (1/0): each mode the memory plan keeps on the device, run at its default size (and
  SPEED_WARMUP_SIZES) on the thread that serves predictions, then its remaining buckets recorded; within
  SPEED_WARMUP_SECONDS, after which the rest runs without graphs or compiled code (a log line says what), never
  failing setup. Modes kept in host memory are not warmed and run as loaded: a graph holds its weights' device
  addresses, which a move changes, and the move itself (seconds) outweighs what graphs save. After the warm-up
  exactly the planned modes are on the device, and torch never compiles on a request (`graphs.seal`).
- SPEED_ENCODE_THREADS (min(16, cores)): image files are encoded in these threads, a batch's images at once, off
  the critical path (0: inline). SPEED_WEBP_METHOD (0): libwebp effort; 0 is 4x faster than 4 at 512px, same PSNR,
  +12% bytes.
  (Both read by lib/engine/images.py.)

On MPS (Apple silicon) the defaults are the CPU's, and what only CUDA has (TF32, cuDNN autotuning, CUDA graphs, the
autotuning compile modes) is turned off even where asked for, with one line in the log (`without_cuda_only`).

LoRA fusing is not a switch: the modes' own LoRAs (LCM-LoRA, SDXL-Lightning) are always fused at load
(lib/engine/loading.fuse_lora). A style LoRA (a request's lora_url) runs with graphs and compiled code off for its
batch (`graphs.eager`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from time import monotonic

import torch

from lib.engine import graphs
from lib.engine.precision import Precision, needs_upcast
from lib.engine.precision import choose as choose_precision
from lib.settings import COMPILE_TARGETS, Settings

log = logging.getLogger(__name__)


# The switches only CUDA has, by the variable that sets each; and the compile modes that autotune with Triton or
# capture CUDA graphs.
CUDA_ONLY = {"tf32": "SPEED_TF32", "cudnn_benchmark": "SPEED_CUDNN_BENCHMARK", "cuda_graphs": "SPEED_CUDA_GRAPHS"}
CUDA_COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Switches:
    sdpa: bool
    tf32: bool
    cudnn_benchmark: bool
    channels_last: bool
    fuse_qkv: bool
    vae_dtype: str
    cuda_graphs: tuple[str, ...]  # targets: unet, vae, text
    graph_batches: tuple[int, ...]
    graph_memory: int | None
    compile: tuple[str, ...]
    compile_mode: str
    compile_backend: str
    compile_cache: Path | None
    warmup: bool
    warmup_seconds: float
    warmup_sizes: tuple[tuple[int, int], ...]

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
            "cuda_graphs": default(s.speed_cuda_graphs, COMPILE_TARGETS if fast and cuda else ()),
            "graph_batches": s.speed_graph_batches,
            "graph_memory": s.speed_graph_memory,
            "compile": s.speed_compile,
            "compile_mode": s.speed_compile_mode,
            "compile_backend": s.speed_compile_backend,
            "compile_cache": s.speed_compile_cache,
            "warmup": default(s.speed_warmup, fast and cuda),
            "warmup_seconds": s.speed_warmup_seconds,
            "warmup_sizes": s.speed_warmup_sizes,
        }
        values.update(overrides)
        if torch.device(device).type == "mps":
            values = without_cuda_only(values)
        return cls(**values)

    def describe(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name) is True]
        extra = [f"vae_dtype={self.vae_dtype}"]
        if self.cuda_graphs:
            extra.append(f"cuda_graphs={','.join(self.cuda_graphs)} (batches {','.join(map(str, self.graph_batches))})")
        if self.compile:
            extra.append(f"compile={','.join(self.compile)} ({self.compile_mode}, {self.compile_backend})")
        return ", ".join(on + extra)


def graph_shapes(switches: Switches, mode_names) -> dict[str, list[tuple[int, int, int]]]:
    """The (batch entries, width, height) the warm-up records CUDA graphs for, per mode: every batch bucket at the
    mode's size and SPEED_WARMUP_SIZES (what the memory plan counts for the graphs' pool)."""
    if not switches.cuda_graphs:
        return {}
    from lib.engine.modes import MODES

    sizes = {n: ((MODES[n].size, MODES[n].size), *switches.warmup_sizes) for n in mode_names}
    return {n: [(b, w, h) for b in switches.graph_batches for w, h in sizes[n]] for n in mode_names}


def without_cuda_only(values: dict) -> dict:
    """On MPS: the switch values with what only CUDA has turned off, and one line in the log saying so (not an
    error: the same settings serve a GPU box and a Mac). Pinned host memory and CUDA-event timings need no switch:
    the code that uses them runs on CUDA only."""
    off = {name: () if name == "cuda_graphs" else False for name in CUDA_ONLY if values[name]}
    if values["compile_mode"] in CUDA_COMPILE_MODES:
        off["compile_mode"] = "default"  # torch.compile's default mode
    shown = {True: "1"}
    asked = [
        f"{CUDA_ONLY.get(k, 'SPEED_COMPILE_MODE')}="
        + (",".join(values[k]) if isinstance(values[k], tuple) else shown.get(values[k], str(values[k])))
        for k in off
    ]
    log.info(
        "fast path on mps: CUDA graphs, TF32, cuDNN autotuning, the autotuning compile modes, pinned host memory and "
        "CUDA-event timings are CUDA's only, so off (stage timings wait for the device instead)%s",
        f"; asked for and turned off: {', '.join(asked)}" if asked else "",
    )
    return {**values, **off}


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
    keeps on the device (default: all), the only ones compiled and graphed. Returns what was done."""
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
    texts = _unique(e for lm in loaded for e in text_encoders(lm))
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
        for m in unets + controlnets:
            m.to(memory_format=torch.channels_last)
    report["attention"] = attention_report(unets + controlnets + vaes + texts)

    resident = list(modes) if resident is None else [name for name in modes if name in set(resident)]
    report["static"] = install_static(modes, resident, device, switches)
    report["compiled"] = list(switches.compile)
    return report


def text_encoders(loaded) -> list:
    pipe = loaded.txt2img
    return _unique([pipe.text_encoder, getattr(pipe, "text_encoder_2", None)])


def static_targets(loaded) -> list[tuple[str, str, torch.nn.Module, int | None]]:
    """(target, label, module, largest batch it is called with; None: any) for each module of a mode that graphs
    and compile apply to. The engine encodes each prompt and each img2img input alone: batch 1."""
    name = loaded.mode.name
    found = [("unet", f"{name} UNet", loaded.txt2img.unet, None)]
    found += [("unet", f"{name} {net} ControlNet", module, None) for net, module in loaded.controlnets.items()]
    for decoder in decoders(loaded):
        kind = "TAESD" if decoder is loaded.tiny_vae else "VAE"
        found.append(("vae", f"{name} {kind} decoder", decoder.decoder, None))
        found.append(("vae", f"{name} {kind} encoder", decoder.encoder, 1))
    for i, encoder in enumerate(text_encoders(loaded)):
        found.append(("text", f"{name} text encoder{f' {i + 1}' if i else ''}", encoder, 1))
    return found


def install_static(modes: dict, resident: list[str], device: torch.device, switches: Switches) -> list[str]:
    """torch.compile and the graph dispatcher (lib/engine/graphs.py) on the resident modes' modules that
    SPEED_COMPILE / SPEED_CUDA_GRAPHS name (a module shared by several modes once). Returns their labels."""
    if not (switches.compile or switches.cuda_graphs):
        return []
    if switches.compile:
        configure_compile(switches)
    pool = torch.cuda.graph_pool_handle() if device.type == "cuda" and switches.cuda_graphs else None
    done: dict[int, str] = {}
    for name in resident:
        for target, label, module, largest in static_targets(modes[name]):
            compiled, graphed = target in switches.compile, target in switches.cuda_graphs
            if not (compiled or graphed) or id(module) in done:
                continue
            if compiled:
                options = {"backend": switches.compile_backend}
                if switches.compile_backend == "inductor":
                    options["mode"] = switches.compile_mode
                module.forward = torch.compile(module.forward, **options)
            buckets = tuple(b for b in switches.graph_batches if largest is None or b <= largest) or (1,)
            graphs.install(
                module,
                label,
                buckets=buckets,
                graphs=graphed,
                compiled=compiled,
                pool=pool,
                memory_limit=switches.graph_memory,
            )
            done[id(module)] = label
    return list(done.values())


def statics(loaded) -> list[graphs.Static]:
    """The graph dispatchers installed on a mode's modules."""
    found = (graphs.installed(module) for _, _, module, _ in static_targets(loaded))
    return _unique(found)


def configure_compile(switches: Switches) -> None:
    """Process-wide compile settings: the persisted cache, dynamo's limits, inductor's flags."""
    if switches.compile_cache is not None:
        Path(switches.compile_cache).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(switches.compile_cache)  # Triton's cache goes inside it
    dynamo = torch._dynamo.config
    # The batch dimension is marked dynamic where it should be (graphs.Static); other dimensions stay static, also
    # where models of several modes share one forward (SD and SDXL UNets: other widths, not other shapes of one).
    dynamo.automatic_dynamic_shapes = False
    # Every UNet shares UNet2DConditionModel.forward: its compiled versions (per model, size and bucket kind) all
    # count against one limit.
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
    dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 512)
    if switches.compile_backend == "inductor":
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True  # diffusers' recommendation for its UNets and VAEs
        # Autotuning each kernel's launch configuration is the max-autotune modes' (minutes per model).
        autotune = switches.compile_mode.startswith("max-autotune")
        inductor.coordinate_descent_tuning = autotune
        inductor.coordinate_descent_check_all_directions = autotune


def compile_stats() -> dict:
    """Seconds spent compiling and the persisted cache's hits and misses so far in this process."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {
        "compile_s": round(sum(compilation_time_metrics.get("_compile.compile_inner", [])), 2),
        "fx_graph_cache": {k: counters["inductor"].get(f"fxgraph_cache_{k}", 0) for k in ("hit", "miss")},
        "graphs_compiled": counters["stats"].get("unique_graphs", 0),
    }


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


def warm_up(engine, img2img: bool = False) -> dict:
    """Before the first request, on the thread that will serve predictions (lib/engine/batcher.py runs it there):
    every mode the memory plan keeps on the device, once at its default size (and SPEED_WARMUP_SIZES) per decoder,
    at batch 1, which compiles (SPEED_COMPILE) and records the CUDA graphs of those shapes; then each model's other
    batch-size buckets, recorded from the same call with its rows repeated. With `img2img` (the realtime server),
    img2img too, from a grey picture, encoded and decoded with the tiny autoencoder where the mode has one (the
    realtime default). Within SPEED_WARMUP_SECONDS: what would start past it is left out (logged), and runs without
    graphs or compiled code; a model whose warm-up fails runs as loaded. Modes kept in host memory are left as they
    are (see the module docstring), so exactly the planned modes are on the device after it. The safety checker runs
    once on a blank image, to load its kernels, but judges none of the warm-up's own images (a flagged noise image
    must not fail setup). Returns seconds per mode warmed."""
    from PIL import Image

    switches = engine.switches or Switches.from_env(engine.device)
    started = monotonic()
    deadline = started + switches.warmup_seconds
    cuda = engine.device.type == "cuda"
    reserved = torch.cuda.memory_reserved(engine.device) if cuda else 0
    compiled_before = compile_stats()
    graphs.unseal()  # compiling is allowed while warming up (an earlier engine of this process may have sealed)
    seconds: dict[str, float] = {}
    left_out: dict[str, str] = {}
    last = 0.0  # the last mode's first pass: what the next one is expected to take
    for name, loaded in engine.modes.items():
        if not engine.residency.is_resident(name):
            left_out[name] = "kept in host memory by the memory plan: runs as loaded"
            continue
        if monotonic() + last > deadline:
            left_out[name] = "warm-up budget spent: runs without graphs or compiled code"
            continue
        mode_started = monotonic()
        try:
            with graphs.recording(), tempfile.TemporaryDirectory() as tmp:
                for job in _warm_up_jobs(engine, name, img2img, switches.warmup_sizes, Image, tmp):
                    for _ in engine.run_batch([job]):
                        pass
            last = monotonic() - mode_started
            for static in statics(loaded):
                later = static.expand(deadline, monotonic)
                if later:
                    left_out[static.name] = f"batches {','.join(map(str, later))}: warm-up budget spent"
        except Exception as e:  # noqa: BLE001 - setup goes on: the mode runs as loaded
            log.warning("warm-up of mode %s failed (%s): it runs without graphs or compiled code", name, e)
            left_out[name] = f"warm-up failed: {type(e).__name__}: {str(e)[:300]}"
            for static in statics(loaded):
                static.disable()
        for static in statics(loaded):
            static.exemplars.clear()
        seconds[name] = round(monotonic() - mode_started, 3)
        log.info("warm-up %s: %.1f s", name, seconds[name])
    if engine.safety is not None:
        engine.safety.flagged([Image.new("RGB", (224, 224))])
    graphs.seal()
    report = {
        "seconds": round(monotonic() - started, 2),
        "budget_s": switches.warmup_seconds,
        "modes_s": seconds,
        "left_out": left_out,
        "models": {st.name: st.report() for lm in engine.modes.values() for st in statics(lm)},
        "reserved_growth_gb": round((torch.cuda.memory_reserved(engine.device) - reserved) / 1e9, 3) if cuda else None,
    }
    after = compile_stats()
    if switches.compile:
        report["compile"] = {
            "compile_s": round(after["compile_s"] - compiled_before["compile_s"], 2),
            "graphs_compiled": after["graphs_compiled"] - compiled_before["graphs_compiled"],
            "fx_graph_cache": {
                k: after["fx_graph_cache"][k] - compiled_before["fx_graph_cache"][k] for k in ("hit", "miss")
            },
            "cache_dir": str(switches.compile_cache),
        }
    for what, why in left_out.items():
        log.info("warm-up: %s: %s", what, why)
    log.info(
        "warm-up: %.1f s (budget %.0f s)%s%s",
        report["seconds"],
        switches.warmup_seconds,
        f"; compiling {report['compile']['compile_s']:.1f} s" if "compile" in report else "",
        f"; device memory reserved grew by {report['reserved_growth_gb']:.2f} GB" if cuda else "",
    )
    engine.speed["warmup_s"] = seconds
    engine.speed["warmup"] = report
    return seconds


def _warm_up_jobs(engine, name: str, img2img: bool, sizes, image_module, tmp: str) -> list:
    """The warm-up's requests for one mode: txt2img per decoder at the mode's size and each of `sizes`; img2img."""
    from lib.engine.inputs import resolve_request

    loaded = engine.modes[name]
    size = loaded.mode.size
    jobs = []
    for width, height in dict.fromkeys([(size, size), *sizes]):
        for fast_decode in [False, True] if loaded.tiny_vae is not None else [False]:
            extra = {"fast_decode": True} if fast_decode else {}
            request = engine.request(
                prompt="warm-up",
                mode=name,
                seed=0,
                width=width,
                height=height,
                output_format="webp",
                disable_safety_checker=True,
                **extra,
            )
            jobs.append(engine.job(request, tmp))
    grey = image_module.new("RGB", (size, size), (128, 128, 128))

    def at_size(**extra):  # a request at the mode's size, as a picture or a control brings it
        return resolve_request(
            enabled=engine.enabled,
            prompt="warm-up",
            mode=name,
            seed=0,
            width=size,
            height=size,
            disable_safety_checker=True,
            **extra,
        )

    if img2img:
        tiny = loaded.tiny_vae is not None
        request = at_size(image_size=(size, size), fast_decode=tiny, fast_encode=tiny)
        jobs.append(engine.job(request, tmp, picture=grey))
    # CONTROLNET=1: the ControlNet paths too, one control and two (each ControlNet's own graphs, and the batches the
    # two-control path calls them with), recorded before a request.
    controls = [("control", "edge_map"), ("control_2", "depth_map")] if loaded.controlnets else []
    for n in range(1, len(controls) + 1):
        specs = [{"name": c, "kind": kind, "size": (size, size)} for c, kind in controls[:n]]
        jobs.append(engine.job(at_size(controls=specs, controlnet=True), tmp, control_pictures=[grey] * n))
    return jobs


def optimize(engine, switches: Switches | None = None, dtypes: Precision | None = None, resident=None):
    """Engine.load's last step: apply the switches from the environment (warm-up is separate: `warm_up`, on the
    serving thread). The report is kept in engine.speed (and the benchmark records it)."""
    switches = switches or Switches.from_env(engine.device)
    started = monotonic()
    report = apply(engine.modes, engine.device, engine.dtype, switches, dtypes, resident)
    report["apply_s"] = round(monotonic() - started, 3)
    report["warmup_s"] = {}
    engine.speed = report
    engine.switches = switches
    if report["static"] and not switches.warmup:
        log.warning("SPEED_WARMUP is off: no shape is recorded or compiled at setup, so every call runs as loaded")
    log.info(
        "fast path on %s: %s; attention: %s; applied in %.1f s",
        engine.device,
        switches.describe(),
        report["attention"],
        report["apply_s"],
    )
    return engine
