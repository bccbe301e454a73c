"""Every environment variable the package reads, declared once: its name, type, default and a one-line meaning.

`Settings()` reads them from the environment (or from a given mapping) through one typed parser, when asked:
`Settings().weights_dir`. setup() calls `check()` first, so a bad value fails setup at once, with one message
naming each bad variable, its value and what is allowed. docs/configuration.md is generated from these
declarations (`python -m lib.settings > docs/configuration.md`; a test keeps it current).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib import ROOT

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
SWITCH_WORDS = "true or false (also 1/0, yes/no, on/off, in any case)"
UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class SettingsError(ValueError):
    """One or more environment variables have values that are not allowed; the message names each."""


def parse_bool(name: str, text: str) -> bool:
    """`text` as a boolean; anything but the words above is a ValueError naming `name`."""
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"{name}: {text!r} is not true or false; allowed: {SWITCH_WORDS}")


def parse_bytes(name: str, text: str) -> int:
    """'20GB', '20 GiB', '500MB', '123456' -> bytes; anything else is an error naming `name`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]|[bB])?\s*", text or "")
    if not m:
        raise ValueError(
            f"{name}: {text!r} is not a size; allowed: bytes, or a number with a unit (500MB, 20GB, 20GiB)"
        )
    return int(float(m[1]) * UNITS[(m[2] or "").lower()])


# -- kinds: how a variable's text parses --------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    label: str  # for the docs
    parse: Callable[[str, str], Any]  # (name, text) -> value; raises ValueError naming the variable


def switch() -> Kind:
    return Kind("switch: 1/0, true/false, yes/no, on/off", parse_bool)


def integer(lo: int, hi: int | None = None) -> Kind:
    def parse(name: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{name}: {value} is out of range; allowed: {lo} to {hi if hi is not None else 'any'}")
        return value

    return Kind(f"whole number, {lo} to {hi}" if hi is not None else f"whole number, at least {lo}", parse)


def number(lo: float = 0.0, above: bool = False) -> Kind:
    def parse(name: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a number") from None
        if not math.isfinite(value) or value < lo or (above and value == lo):
            raise ValueError(f"{name}: {text!r} is out of range; allowed: {'above' if above else 'at least'} {lo:g}")
        return value

    return Kind(f"number {'above' if above else 'at least'} {lo:g}", parse)


def batches() -> Kind:
    def parse(name: str, text: str) -> tuple[int, ...]:
        try:
            values = sorted({int(v) for v in text.split(",") if v.strip()})
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a list of whole numbers; allowed: e.g. 1,2,4,8,16") from None
        if not values or values[0] < 1:
            raise ValueError(f"{name}: {text!r}: batch sizes must be at least 1; allowed: e.g. 1,2,4,8,16")
        return tuple(values)

    return Kind("comma-separated whole numbers, at least 1", parse)


def sizes() -> Kind:
    def parse(name: str, text: str) -> tuple[tuple[int, int], ...]:
        from lib.engine.inputs import SIZE_RANGE

        lo, hi = SIZE_RANGE
        found = []
        for item in (v.strip() for v in text.split(",") if v.strip()):
            m = re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)", item)
            if not m or any(int(v) % 8 or not lo <= int(v) <= hi for v in m.groups()):
                raise ValueError(
                    f"{name}: {item!r} is not a size; allowed: WIDTHxHEIGHT, each {lo} to {hi} and a multiple of 8 "
                    "(e.g. 768x512)"
                )
            found.append((int(m[1]), int(m[2])))
        return tuple(dict.fromkeys(found))

    return Kind("comma-separated WIDTHxHEIGHT", parse)


def size() -> Kind:
    return Kind("bytes, or with a unit: 500MB, 20GB, 20GiB", parse_bytes)


def device() -> Kind:
    def parse(name: str, text: str) -> str:
        value = text.strip().lower()
        if not re.fullmatch(r"cuda(:\d+)?|mps|cpu", value):
            raise ValueError(f"{name}: {text!r} is not a device; allowed: cuda, cuda:N, mps, cpu")
        return value

    return Kind("`cuda`, `cuda:N`, `mps` or `cpu`", parse)


def text() -> Kind:
    return Kind("text", lambda name, value: value)


def path() -> Kind:
    return Kind("a path", lambda name, value: Path(value))


def choice(*values: str) -> Kind:
    def parse(name: str, text: str) -> str:
        value = text.lower()
        if value not in values:
            raise ValueError(f"{name}: {text!r} is not allowed; allowed: {', '.join(values)}")
        return value

    return Kind("one of " + ", ".join(f"`{v}`" for v in values), parse)


def names(allowed: Callable[[], tuple[str, ...]], what: str, aliases: Mapping[str, tuple[str, ...]] = {}) -> Kind:
    """A comma-separated list of names from `allowed()`; an alias word stands for a list."""

    def parse(name: str, text: str) -> tuple[str, ...]:
        if text.lower() in aliases:
            return aliases[text.lower()]
        items = tuple(dict.fromkeys(n.strip().lower() if aliases else n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in items if n not in allowed()]
        if unknown:
            extra = f"{', '.join(aliases)}, or a list of " if aliases else ""
            raise ValueError(f"{name}: {', '.join(unknown)} not {what}; allowed: {extra}{', '.join(allowed())}")
        return items

    return Kind(
        f"comma-separated {what.removeprefix('a ')}s" + (f", or {', '.join(aliases)}" if aliases else ""), parse
    )


# -- the variables ---------------------------------------------------------------------------------------------------
class Var:
    """One environment variable. As an attribute of Settings it reads itself (through its kind's parser) on access:
    unset or empty gives its default (a value, or a function of the Settings for defaults that depend on others)."""

    def __init__(self, name: str, group: str, kind: Kind, default: Any, meaning: str, *, shown: str | None = None):
        self.name, self.kind, self.default, self.meaning, self.group = name, kind, default, meaning, group
        if shown is None:
            shown = (
                "unset"
                if default is None
                else ("on" if default else "off")
                if isinstance(default, bool)
                else f"`{default}`"
            )
        self.shown = shown

    def read(self, settings: Settings) -> Any:
        value = settings.env.get(self.name, "").strip()
        if not value:
            return self.default(settings) if callable(self.default) else self.default
        return self.kind.parse(self.name, value)

    def __get__(self, settings, owner=None):
        return self if settings is None else self.read(settings)


def _modes() -> tuple[str, ...]:
    from lib.engine.modes import MODES

    return tuple(MODES)


def _default_modes() -> tuple[str, ...]:
    from lib.engine.modes import DEFAULT_ENABLED

    return DEFAULT_ENABLED


COMPILE_TARGETS = ("unet", "vae", "text")
COMPILE_SWITCH = {**{w: () for w in FALSE}, **{w: ("unet", "vae") for w in TRUE}}  # SPEED_COMPILE=1 / 0
GRAPH_SWITCH = {**{w: () for w in FALSE}, **{w: COMPILE_TARGETS for w in TRUE}}  # SPEED_CUDA_GRAPHS=1 / 0
GROUPS = {
    "engine": "Modes and the device",
    "weights": "Weights",
    "speed": "The fast path (lib/engine/speed.py)",
    "batching": "Batching concurrent predictions",
    "serving": "Serving under Cog",
    "realtime": "The realtime server (scripts/realtime.py)",
    "lora": "Style LoRAs",
    "jobs": "Async jobs, webhooks and pushing",
    "tools": "Benchmarks and checks",
}


class Settings:
    """The package's environment, typed. `Settings(env)` reads `env` instead of os.environ (tests, variants)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env = os.environ if env is None else env

    # The declarations are a table: one each, kept as written.
    # fmt: off
    # -- engine --
    enabled_modes = Var("ENABLED_MODES", "engine", names(_modes, "a mode"), lambda s: _default_modes(),
        "comma-separated modes to load (and fetch); requests for the others are refused with a clear error",
        shown="every mode but the opt-in ones (`sdxl-lightning-2step`, `sdxl-lightning-8step`)")
    safety_checker = Var("SAFETY_CHECKER", "engine", switch(), True,
        "`0`: no safety checker (not fetched, not loaded; `disable_safety_checker` then changes nothing)")
    model_device = Var("MODEL_DEVICE", "engine", device(), None, "the torch device",
        shown="`cuda` if available, else `mps` (Apple silicon) if available, else `cpu`")
    model_dtype = Var("MODEL_DTYPE", "engine", choice("float16", "bfloat16", "float32"), None,
        "the models' dtype (bfloat16 needs compute capability 8.0+); only the SDXL VAE is upcast",
        shown="`float16` on CUDA and MPS, `float32` on the CPU")
    device_memory_budget = Var("DEVICE_MEMORY_BUDGET", "engine", size(), None,
        "the memory plan's budget: modes that do not fit wait in host memory and move in when a request needs them",
        shown="the GPU's free memory")
    controlnet = Var("CONTROLNET", "engine", switch(), False,
        "`1`: fetch and load the ControlNets of the enabled modes that have them, and the depth estimator, so that "
        "requests may carry a control image (README, ControlNet); off, none is fetched or loaded and controls are "
        "refused")
    prompt_cache_size = Var("PROMPT_CACHE_SIZE", "engine", integer(0), 64,
        "prompt embeddings kept on the device (least recently used evicted): an unchanged prompt is not encoded again")

    # -- weights --
    weights_dir = Var("WEIGHTS_DIR", "weights", path(), lambda s: ROOT / "weights",
        "the weights cache, in the Hub layout `WEIGHTS_DIR/<repo_id>/<path>`", shown="the project's `weights/`")
    weights_manifest = Var("WEIGHTS_MANIFEST", "weights", path(), lambda s: ROOT / "weights" / "manifest.json",
        "the manifest (its lock file sits beside it)", shown="`weights/manifest.json`")
    weights_base_url = Var("WEIGHTS_BASE_URL", "weights", text(), "https://huggingface.co",
        "where files come from: `{base}/{repo_id}/resolve/{revision}/{path}` (the Hub, or any mirror with that layout)")
    hf_token = Var("HF_TOKEN", "weights", text(), None, "sent to the Hub (never to its CDN) for gated or private repos")
    weights_offline = Var("WEIGHTS_OFFLINE", "weights", switch(), False,
        "`1`: no manifest, no download; load `WEIGHTS_DIR` as it is")
    weights_connections = Var("WEIGHTS_CONNECTIONS", "weights", integer(1),
        lambda s: min(16, max(4, 2 * (os.cpu_count() or 2))),
        "parallel HTTP connections, all files together", shown="2 x CPU cores, 4 to 16")
    weights_timeout = Var("WEIGHTS_TIMEOUT", "weights", number(0, above=True), 30.0,
        "seconds without a byte before a connection counts as stalled")
    weights_retries = Var("WEIGHTS_RETRIES", "weights", integer(1), 5,
        "failed attempts in a row before giving up (for the HEADs: retry rounds)")
    weights_progress_seconds = Var("WEIGHTS_PROGRESS_SECONDS", "weights", number(0, above=True), 5.0,
        "seconds between progress lines in the logs")

    # -- speed --
    speed = Var("SPEED", "speed", switch(), True, "`0`: every fast-path default off (the plain diffusers path)")
    speed_sdpa = Var("SPEED_SDPA", "speed", switch(), True, "torch's scaled_dot_product_attention in every attention")
    speed_tf32 = Var("SPEED_TF32", "speed", switch(), None, "TF32 for fp32 matmuls and convolutions",
        shown="on for CUDA")
    speed_cudnn_benchmark = Var("SPEED_CUDNN_BENCHMARK", "speed", switch(), False,
        "cuDNN autotuning per new shape (off: prediction sizes are free-form)")
    speed_channels_last = Var("SPEED_CHANNELS_LAST", "speed", switch(), None, "UNet weights in channels_last",
        shown="on for CUDA")
    speed_fuse_qkv = Var("SPEED_FUSE_QKV", "speed", switch(), None, "fused QKV / KV attention projections",
        shown="on for CUDA")
    speed_vae_dtype = Var("SPEED_VAE_DTYPE", "speed", choice("auto", "keep", "float32", "bfloat16", "float16"), None,
        "`auto`: only the SDXL VAE upcast, to bfloat16 where native; `keep`: as diffusers loads",
        shown="`auto` (`keep` with SPEED=0)")
    speed_cuda_graphs = Var("SPEED_CUDA_GRAPHS", "speed", names(lambda: COMPILE_TARGETS, "a target", GRAPH_SWITCH),
        None, "CUDA graphs per batch-size bucket, recorded at setup for the modes the memory plan keeps on the device: "
        "`1` = unet,vae,text, or a list", shown="on for CUDA (`unet,vae,text`)")
    speed_graph_batches = Var("SPEED_GRAPH_BATCHES", "speed", batches(), (1, 2, 4, 8, 16),
        "the batch-size buckets graphed and compiled at setup; a batch runs at the next bucket up (padded)",
        shown="`1,2,4,8,16`")
    speed_graph_memory = Var("SPEED_GRAPH_MEMORY", "speed", size(), 2 * 10**9,
        "a bucket whose activations take more device memory runs without a CUDA graph (the graphs share one pool)",
        shown="2GB")
    speed_compile = Var("SPEED_COMPILE", "speed", names(lambda: COMPILE_TARGETS, "a target", COMPILE_SWITCH), (),
        "torch.compile at setup, for the modes the memory plan keeps on the device: `1` = unet,vae, or a list of "
        "unet, vae, text", shown="off")
    speed_compile_mode = Var("SPEED_COMPILE_MODE", "speed", choice("default", "max-autotune-no-cudagraphs"),
        "default", "the inductor mode (CUDA graphs are SPEED_CUDA_GRAPHS': they cover the uncompiled parts too)")
    speed_compile_backend = Var("SPEED_COMPILE_BACKEND", "speed", text(), "inductor", "the torch.compile backend")
    speed_compile_cache = Var("SPEED_COMPILE_CACHE", "speed", path(),
        lambda s: s.torchinductor_cache_dir or s.weights_dir / ".torch-compile",
        "inductor's and Triton's caches, beside the weights: a setup after the first reuses them",
        shown="TORCHINDUCTOR_CACHE_DIR if set, else `WEIGHTS_DIR/.torch-compile`")
    torchinductor_cache_dir = Var("TORCHINDUCTOR_CACHE_DIR", "speed", path(), None,
        "torch's own cache folder variable; setup sets it to SPEED_COMPILE_CACHE when compiling")
    speed_warmup = Var("SPEED_WARMUP", "speed", switch(), None,
        "setup runs each mode at its default size and records its buckets, on the serving thread", shown="on for CUDA")
    speed_warmup_seconds = Var("SPEED_WARMUP_SECONDS", "speed", number(0), 300.0,
        "the warm-up's time budget: past it, the remaining buckets and modes run without graphs or compiled code "
        "(download + load + this within Replicate's 600 s boot)")
    speed_warmup_sizes = Var("SPEED_WARMUP_SIZES", "speed", sizes(), (),
        "more image sizes to warm every mode at, besides its default: `768x512,512x768`", shown="none")
    speed_encode_threads = Var("SPEED_ENCODE_THREADS", "speed", integer(0), lambda s: min(16, os.cpu_count() or 1),
        "threads that encode image files, a batch's images at once (0: inline)", shown="min(16, CPU cores)")
    speed_webp_method = Var("SPEED_WEBP_METHOD", "speed", integer(0, 6), 0, "libwebp effort (0 is 4x faster than 4)")

    # -- batching --
    batch_window_ms = Var("BATCH_WINDOW_MS", "batching", number(0), 5.0,
        "longest a batch waits for a compatible request still being prepared (0 when concurrency is 1)")
    batch_max_images = Var("BATCH_MAX_IMAGES", "batching", integer(1), 16, "most images in one batch")
    cog_max_concurrency = Var("COG_MAX_CONCURRENCY", "batching", integer(1), 1,
        "predictions Cog runs at once (set by cog build from predict.py's @concurrent(max=...))")

    # -- serving --
    outputs_keep_seconds = Var("OUTPUTS_KEEP_SECONDS", "serving", number(0, above=True), 600.0,
        "an output file the Cog server has not read is removed this long after its prediction (read ones go at once)")

    # -- realtime --
    realtime_token = Var("REALTIME_TOKEN", "realtime", text(), None,
        "required to serve beyond loopback (`--host 0.0.0.0`); the page passes it on as `?token=`")
    realtime_allowed_origins = Var("REALTIME_ALLOWED_ORIGINS", "realtime", text(), None,
        "comma-separated Origins allowed besides the page's own (e.g. `https://app.example`)")
    realtime_max_sessions = Var("REALTIME_MAX_SESSIONS", "realtime", integer(1), 8, "sessions served at once")
    realtime_max_message_bytes = Var("REALTIME_MAX_MESSAGE_BYTES", "realtime", size(), 2 * 2**20,
        "the largest message a page may send (a painted frame)", shown="2 MiB")
    realtime_messages_per_second = Var("REALTIME_MESSAGES_PER_SECOND", "realtime", integer(1), 120,
        "messages per second a session may send (more are refused with an error)")
    realtime_frame_format = Var("REALTIME_FRAME_FORMAT", "realtime", choice("jpg", "webp"), "jpg",
        "the frames' encoding")
    realtime_frame_quality = Var("REALTIME_FRAME_QUALITY", "realtime", integer(1, 100), 85, "the frames' quality")
    realtime_batch_window_ms = Var("REALTIME_BATCH_WINDOW_MS", "realtime", number(0), 2.0,
        "longest a batch waits for another session's frame still being prepared")

    # -- lora --
    lora_cache_dir = Var("LORA_CACHE_DIR", "lora", path(), lambda s: s.weights_dir / ".loras", "the style-LoRA cache",
        shown="`WEIGHTS_DIR/.loras`")
    lora_cache_bytes = Var("LORA_CACHE_BYTES", "lora", size(), 5 * 2**30,
        "the style-LoRA cache's budget (least recently used evicted)", shown="5 GiB")
    lora_max_bytes = Var("LORA_MAX_BYTES", "lora", size(), 2**30, "the largest style LoRA accepted", shown="1 GiB")
    lora_download_timeout = Var("LORA_DOWNLOAD_TIMEOUT", "lora", number(0, above=True), 600.0,
        "seconds a style LoRA's download may take in all")
    lora_allow_http = Var("LORA_ALLOW_HTTP", "lora", switch(), False,
        "`1`: http and loopback/private addresses allowed (tests on loopback only)")

    # -- jobs --
    replicate_api_token = Var("REPLICATE_API_TOKEN", "jobs", text(), None, "the Replicate API token (jobs, push)")
    replicate_base_url = Var("REPLICATE_BASE_URL", "jobs", text(), "https://api.replicate.com",
        "the Replicate API's address (the `replicate` client reads it too)")
    replicate_webhook_secret = Var("REPLICATE_WEBHOOK_SECRET", "jobs", text(), None,
        "the receiver accepts webhooks signed with this `whsec_` secret")
    webhook_auth_token = Var("WEBHOOK_AUTH_TOKEN", "jobs", text(), None,
        "the receiver accepts a Cog server's webhooks carrying this bearer token")
    jobs_ledger = Var("JOBS_LEDGER", "jobs", path(), Path("jobs/ledger.sqlite"), "the jobs' SQLite ledger")
    jobs_outputs = Var("JOBS_OUTPUTS", "jobs", path(), Path("jobs/outputs"), "where the receiver saves images")
    docker_config = Var("DOCKER_CONFIG", "jobs", path(), lambda s: Path.home() / ".docker",
        "Docker's configuration folder (push checks `cog login`)", shown="`~/.docker`")

    # -- tools --
    bench_tmp = Var("BENCH_TMP", "tools", path(), None, "scratch folder of the download benchmark",
        shown="the system's temporary folder")
    out = Var("OUT", "tools", path(), Path("gpu-check-out"), "where scripts/gpu_check.sh writes gpu_check.json")
    # fmt: on

    @classmethod
    def variables(cls) -> list[Var]:
        return [v for v in vars(cls).values() if isinstance(v, Var)]

    def check(self) -> dict[str, Any]:
        """Every variable read at once; one SettingsError naming every bad one."""
        values, errors = {}, []
        for v in self.variables():
            try:
                values[v.name] = v.read(self)
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise SettingsError("; ".join(errors))
        return values


def markdown() -> str:
    """docs/configuration.md, from the declarations."""
    lines = [
        "# Configuration",
        "",
        "Every environment variable the package reads, generated from `lib/settings.py` "
        "(`python -m lib.settings > docs/configuration.md`). Unset or empty means the default. setup() checks "
        "them all first: a bad value fails setup with a message naming the variable, its value and what is "
        "allowed.",
        "",
    ]
    for group, title in GROUPS.items():
        lines += [f"## {title}", "", "| variable | type | default | meaning |", "|---|---|---|---|"]
        lines += [
            f"| `{v.name}` | {v.kind.label} | {v.shown} | {v.meaning} |"
            for v in Settings.variables()
            if v.group == group
        ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
