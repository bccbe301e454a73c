"""Device memory: a plan made before loading of which modes stay on the device, and moving the others in when
a request needs them.

The plan counts, per module, the bytes it will take on the device (from the safetensors headers of its files
and the dtype it will run in; modules stored in identical files count once, as the loader shares them), and
keeps working memory free for the largest request any enabled mode accepts (2048x2048, 8 images, classifier-free
guidance doubling the UNet's batch where the mode allows guidance above 1): the largest of its stages (the
denoising, the decode of one image, the safety checker) beside what lives through them all (the noise drawn up
front, the decoded pixels), from the estimates below, plus the one memory pool all CUDA graphs share (counted with
the weights; lib/engine/speed.py's `graph_shapes` says what they capture). The budget is the device's free memory,
or DEVICE_MEMORY_BUDGET where set (bytes, or with a unit: 500MB, 20GB, 20GiB); 5% of it is headroom. Every enabled
mode must serve its own largest request alone beside the modules every mode uses (the safety checker), or setup
fails saying what is needed; of the rest, modes stay resident in table order (the default mode first) while they
fit beside that working memory.

DEVICE_MEMORY_BUDGET also caps the CUDA allocator (`cap_allocator`), so the process never holds more: an
allocation beyond it fails, and the engine answers an out-of-memory error by moving the other modes out and
trying again (after the `except` block, the failed attempt's tensors released), a decode in smaller chunks and
then in tiles. A batch the estimates say needs more than the plan kept free (several requests together) moves
least recently used modes out first (`Residency.ensure`); the batcher never forms a batch that could not fit with
its mode alone.

Modes that do not fit wait in host memory and are moved to the device when a request needs them, least recently
used out first. Each module's tensors get a pinned host copy once and keep it (`Residency`): a move in copies
each tensor once, a move out copies nothing. The batcher groups requests by mode, so moves are rare; each one shows
in that prediction's metrics as `timings.mode_load` and in the logs. On a CPU device, host and device memory are
one: without DEVICE_MEMORY_BUDGET every mode is resident; with it the same plan and bookkeeping run, and a move
only updates the bookkeeping.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Activation estimates (bytes a stage needs at once beyond the weights), from the architecture: a stage's peak is
# where its widest tensors meet its largest resolution. Each constant counts live tensors in widths of the channels
# at that place; tests/test_memory.py holds them against the live peak measured on the CPU (lib/testkit/memtrace.py)
# on the tiny models, which keep the real architectures with fewer channels: every estimate is at or above it.
# - UNet, per batch entry (classifier-free guidance doubles the entries), at each level (latent resolution halved,
#   channels of block_out_channels): a level with attention holds about 26 widths at once (the feed-forward's GEGLU:
#   8 + 4 + 4 beside the residual stream, the block's norms and projections), a level of resnets only about 16 (the
#   up path's resnets take the skip concatenated: 3 widths in, norm and activation of those, the outputs), one more
#   per layer of the block, and the skip connections the levels above it keep for the up path (layers + 1 each).
#   The largest level decides. Measured on the tiny models at 768-1280 px: 25.3-25.8 widths where the first level
#   attends (SD), 14.7-16.5 where it does not (SDXL).
# - VAE (or TAESD) decoder, per image: 10 widths of its first block at full resolution (the last up block's resnets
#   on the upsampled input of twice that width).
# - Safety checker, per image: CLIP ViT-L/14 at 224 px (257 tokens of width 1024, about 40 widths with its 4x MLP),
#   plus the resize of the decoded pixels in float32 (the image's 3 channels, twice).
UNET_ATTENTION_LEVEL = 26
UNET_RESNET_LEVEL = 16
VAE_LIVE_TENSORS = 10
CLIP_TOKENS, CLIP_WIDTH, CLIP_LIVE_TENSORS = 257, 1024, 40
MARGIN = 0.05  # of the budget: the allocator's fragmentation, cuBLAS and cuDNN workspaces
LATENT_FACTOR = 8  # image pixels per latent pixel, each way (every mode's VAE)


class MemoryBudgetError(RuntimeError):
    """An enabled mode cannot fit on the device at all."""


def human(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def file_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the tensors of a safetensors file take once loaded with floating tensors in `dtype`."""
    from safetensors import safe_open

    size = dtype.itemsize
    total = 0
    with safe_open(path, "pt") as f:
        for key in f.keys():
            tensor = f.get_slice(key)
            numel = 1
            for d in tensor.get_shape():
                numel *= d
            kind = tensor.get_dtype()
            total += numel * (size if kind.startswith(("F", "BF")) else _INT_BYTES.get(kind, 8))
    return total


_INT_BYTES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def unet_bytes(config: dict, width: int, height: int, dtype: torch.dtype) -> int:
    """One batch entry's UNet activations at width x height (see UNET_ATTENTION_LEVEL)."""
    h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
    layers = config["layers_per_block"]
    layers = max(layers) if isinstance(layers, list) else layers
    peak = held = 0
    levels = zip(config["block_out_channels"], config["down_block_types"], strict=True)
    for level, (channels, kind) in enumerate(levels):
        size = (h >> level) * (w >> level) * channels
        widths = (UNET_ATTENTION_LEVEL if "CrossAttn" in kind else UNET_RESNET_LEVEL) + layers
        peak = max(peak, held + size * widths)
        held += size * (layers + 1)
    return peak * dtype.itemsize


def vae_bytes(width: int, height: int, channels: int, dtype: torch.dtype) -> int:
    """Decoding one image: VAE_LIVE_TENSORS full-resolution tensors of the decoder's first-block width."""
    return width * height * channels * dtype.itemsize * VAE_LIVE_TENSORS


def decoder_width(config) -> int:
    """The width of a decoder's first block (AutoencoderKL: block_out_channels; AutoencoderTiny: its decoder's)."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    return (get("decoder_block_out_channels") or get("block_out_channels"))[0]


def safety_bytes(width: int, height: int, images: int, dtype: torch.dtype, tokens=CLIP_TOKENS, hidden=CLIP_WIDTH):
    """The safety checker on `images` decoded images (see CLIP_LIVE_TENSORS): its CLIP tower has `tokens` tokens of
    width `hidden` (ViT-L/14 at 224 px: 257 of 1024)."""
    clip = tokens * hidden * CLIP_LIVE_TENSORS * dtype.itemsize
    return images * (clip + 2 * width * height * 3 * 4)


@dataclass(frozen=True)
class ModeMemory:
    """What a mode's batches need on the device beside its weights (estimates from its configs)."""

    unet: dict  # the UNet's config
    vae_width: int  # its decoder's first-block width (the VAE's: TAESD needs less)
    unet_dtype: torch.dtype
    vae_dtype: torch.dtype
    safety: tuple[int, int] | None  # the safety checker's CLIP tower (tokens, width), in unet_dtype; None: off

    def need(self, width: int, height: int, images: int, steps: int, cfg: bool, decode: int = 1, checked=None) -> int:
        """A batch of `images` at width x height: the largest stage (denoising with `cfg` doubling the entries, the
        decode of `decode` images per call, the safety checker on `checked` images: all by default) beside what
        lives through all of them (the noise drawn up front, the latents, the decoded pixels)."""
        checked = images if checked is None else checked
        unet = images * (2 if cfg else 1) * unet_bytes(self.unet, width, height, self.unet_dtype)
        decoding = decode * vae_bytes(width, height, self.vae_width, self.vae_dtype)
        safety = safety_bytes(width, height, checked, self.unet_dtype, *self.safety) if self.safety and checked else 0
        latent = (width // LATENT_FACTOR) * (height // LATENT_FACTOR) * self.unet["in_channels"]
        lives = images * ((2 + steps) * latent * self.unet_dtype.itemsize + width * height * 3)
        return max(unet, decoding, safety) + lives


def graph_pool_bytes(memory: ModeMemory, shapes) -> int:
    """The largest activations a mode's UNet graphs record (lib/engine/graphs.py): all graphs share one memory pool,
    which holds about the largest graph's. `shapes`: (batch entries, width, height) captured."""
    return max((n * unet_bytes(memory.unet, w, h, memory.unet_dtype) for n, w, h in shapes), default=0)


@dataclass(frozen=True)
class Plan:
    budget: int | None  # bytes the plan may use on the device; None: no limit
    source: str  # where the budget came from, for messages
    working: int  # kept free beside the resident weights: the largest request's working memory, and the headroom
    module_bytes: dict[Hashable, int]
    mode_modules: dict[str, frozenset]  # mode -> the modules it runs
    always: frozenset  # used by every mode (the safety checker): always resident
    resident: tuple[str, ...] = ()
    needs: dict[str, int] = field(default_factory=dict)  # mode -> device bytes it needs alone for its largest request
    largest: dict[str, int] = field(default_factory=dict)  # mode -> its largest request's working memory
    reserve: int = 0  # the largest of those: what a batch may use beside the resident weights
    graph_pool: int = 0  # the memory pool all CUDA graphs share (lib/engine/graphs.py), held from setup on
    estimates: dict[str, ModeMemory] = field(default_factory=dict)  # mode -> its batches' needs

    def weights(self, modes: Iterable[str]) -> int:
        """The modes' weights (each module once, the always-resident ones too) and the CUDA graphs' pool."""
        keys = set(self.always).union(*(self.mode_modules[m] for m in modes))
        return sum(self.module_bytes[k] for k in keys) + self.graph_pool

    @property
    def usable(self) -> int | None:
        """The budget less the headroom: what weights and activations may take together."""
        return None if self.budget is None else int(self.budget * (1 - MARGIN))

    @property
    def weights_budget(self) -> int | None:
        return None if self.budget is None else self.budget - self.working

    def describe(self) -> str:
        waiting = [m for m in self.mode_modules if m not in self.resident]
        total = human(self.weights(self.mode_modules))
        if self.budget is None:
            return f"memory plan: every mode resident ({total} of weights; no limit on {self.source})"
        largest = max(self.largest, key=self.largest.get)
        return (
            f"memory plan: {human(self.budget)} ({self.source}): {human(self.working)} kept for activations (the "
            f"largest request, {LARGEST}: {human(self.reserve)} for mode {largest}, and {MARGIN:.0%} headroom); "
            f"resident {', '.join(self.resident)} ({human(self.weights(self.resident))} of weights)"
            + (f"; in host memory until a request needs them: {', '.join(waiting)}" if waiting else "")
            + f"; all modes: {total}"
        )


LARGEST = "2048x2048, 8 images, classifier-free guidance where the mode has it"


def make_plan(
    mode_modules: dict[str, frozenset],
    module_bytes: dict[Hashable, int],
    always: frozenset,
    working: dict[str, int],
    budget: int | None,
    source: str,
    graph_pool: int = 0,
) -> Plan:
    """Which modes stay resident (table order) within `budget`, beside the working memory of the largest request
    of any mode (`working`: per mode), so that no request has to move a mode out; fails if an enabled mode cannot
    serve its own largest request even alone. `graph_pool`: the device memory the CUDA graphs' shared pool would
    hold (counted with the weights); within a budget, it gets at most what is left beside the largest request, and
    graphs larger than that are not recorded (Engine.load lowers SPEED_GRAPH_MEMORY to it)."""
    largest = dict(working)
    work = max(working.values(), default=0)
    plan = Plan(
        budget,
        source,
        work,
        dict(module_bytes),
        dict(mode_modules),
        frozenset(always),
        largest=largest,
        reserve=work,
        graph_pool=graph_pool,
    )
    if budget is not None:  # the graphs get what the budget leaves beside the largest request of any mode
        alone = max((plan.weights([m]) - graph_pool + largest[m] for m in mode_modules), default=0)
        plan = replace(plan, graph_pool=max(0, min(graph_pool, plan.usable - alone)))
    plan = replace(plan, needs={m: plan.weights([m]) + largest[m] for m in mode_modules})
    if budget is None:
        return replace(plan, resident=tuple(mode_modules))
    usable = plan.usable
    plan = replace(plan, working=work + budget - usable)
    too_big = {m: need for m, need in plan.needs.items() if need > usable}
    if too_big:
        fit = [m for m in mode_modules if m not in too_big]
        name, need = max(too_big.items(), key=lambda kv: kv[1])
        raise MemoryBudgetError(
            f"DEVICE_MEMORY_BUDGET: mode {name} needs {human(need)} of device memory ({human(plan.weights([name]))} "
            f"of weights, {human(largest[name])} working memory for its largest request: {LARGEST}) and the budget "
            f"is {human(budget)} ({source}; {MARGIN:.0%} of it is kept as headroom). "
            + (f"Too big here: {', '.join(too_big)}. " if len(too_big) > 1 else "")
            + "Set DEVICE_MEMORY_BUDGET higher (on a bigger device), or leave "
            + ("those modes" if len(too_big) > 1 else "the mode")
            + " out with ENABLED_MODES"
            + (f" (these fit: {', '.join(fit)})" if fit else " (no mode fits)")
        )
    resident: list[str] = []
    for m in mode_modules:
        if plan.weights([*resident, m]) <= plan.weights_budget:
            resident.append(m)
    return replace(plan, resident=tuple(resident))


_cap: dict[int, int] = {}  # CUDA device index -> the allocator's limit set by cap_allocator


def cap_allocator(device: torch.device, budget: int | None) -> None:
    """Hold the CUDA caching allocator to `budget` bytes (DEVICE_MEMORY_BUDGET; None: the whole device): beyond it an
    allocation fails with OutOfMemoryError, which the engine answers by moving other modes out, smaller decode chunks
    and a tiled decode, instead of the process growing past what it promised. cuDNN and cuBLAS workspaces come from
    the same allocator. The cap is the process's: each engine loaded sets it (or lifts it) anew."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    index = torch.cuda.current_device() if device.index is None else device.index  # the call takes no bare "cuda"
    total = torch.cuda.get_device_properties(index).total_memory
    limit = total if budget is None else min(budget, total)
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    if budget is None:
        _cap.pop(index, None)
    else:
        _cap[index] = limit


def device_room(device: torch.device) -> int | None:
    """Bytes that can still be allocated on a CUDA device (within cap_allocator's limit); None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    allocated = torch.cuda.memory_allocated(device)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - allocated
    cap = _cap.get(device.index or 0)
    return free if cap is None else min(free, cap - allocated)


@dataclass
class Residency:
    """Keeps a mode's modules on the device while it runs; moves modes in and out (least recently used out).

    Each moved module's tensors get a host copy once (pinned on CUDA, so that moves run at full PCIe speed,
    asynchronously): made when the module first leaves the device (or at setup for the modes the plan keeps in host
    memory) and kept. The weights never change after setup (a style LoRA adds adapter layers and removes them), so a
    move out only points the tensors back at their host copies and frees the device memory, and a move in copies
    each tensor once, from its host copy straight to the device. On a CPU device host and device memory are one: a
    move updates the bookkeeping only (unless `copies` asks for the copies, as the tests do)."""

    plan: Plan
    modules: dict[str, list[torch.nn.Module]]  # mode -> its modules (shared modules appear under several modes)
    device: torch.device
    always: list[torch.nn.Module] = field(default_factory=list)
    on_device: set[int] = field(default_factory=set)  # id() of the modules on the device
    recent: OrderedDict = field(default_factory=OrderedDict)  # resident modes, least recently used first
    moves: int = 0
    copies: bool | None = None  # whether moves copy (default: on CUDA)
    host: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # id(module) -> its tensors' host copies

    def __post_init__(self) -> None:
        self.on_device = {id(m) for m in self.always} | {
            id(m) for name in self.plan.resident for m in self.modules[name]
        }
        self.recent = OrderedDict((name, None) for name in self.plan.resident)
        self._bytes = {id(m): module_bytes(m) for ms in (*self.modules.values(), self.always) for m in ms}
        if self.copies is None:
            self.copies = self.device.type != "cpu"

    @classmethod
    def everything(cls, modes: dict, device: torch.device, safety=None) -> "Residency":
        """Every mode resident, no limit (an engine built without a plan: tests, the benchmark)."""
        modules = {name: m.modules() for name, m in modes.items()}
        plan = Plan(None, "no plan", 0, {}, {name: frozenset() for name in modes}, frozenset(), tuple(modes))
        return cls(plan, modules, torch.device(device), [safety.model] if safety else [])

    def is_resident(self, name: str) -> bool:
        return name in self.recent

    def pin_host(self) -> None:
        """Modules the plan keeps in host memory get their host copies now (after loading and the fast path)."""
        for modules in self.modules.values():
            for m in modules:
                if id(m) not in self.on_device:
                    self._to_host(m)

    def ensure(self, name: str, need: int | None = None) -> tuple[float, list[str]]:
        """Make `name`'s modules resident with room for `need` bytes of working memory (at least the plan's reserve)
        beside the resident weights, moving the least recently used other modes out; returns (seconds spent
        moving, modes moved out)."""
        started = time.perf_counter()
        needed = [m for m in self.modules[name] if id(m) not in self.on_device]
        if not needed and (need or 0) <= self.plan.reserve:  # resident, and the plan kept room for the batch
            self.recent[name] = None
            self.recent.move_to_end(name)
            return 0.0, []
        usable = self.plan.usable
        limit = None if usable is None else usable - max(need or 0, self.plan.reserve)
        evicted = []
        # With every other mode out, a mode runs even beyond the limit: make_plan checked that its weights and its
        # largest request's working memory fit.
        while limit is not None and self._resident_bytes(name, needed) > limit:
            victim = next((n for n in self.recent if n != name), None)
            if victim is None:
                break
            del self.recent[victim]
            evicted.append(victim)
            self._move_out(victim, keep=[*self.recent, name])
        self.recent[name] = None
        self.recent.move_to_end(name)
        if not needed and not evicted:
            return 0.0, []
        for m in needed:
            self._to_device(m)
            self.on_device.add(id(m))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the move is done before its time is reported
        seconds = time.perf_counter() - started
        out = f"moved out to host memory: {', '.join(evicted)}" if evicted else ""
        if needed:
            self.moves += 1
            moved = human(sum(self._bytes[id(m)] for m in needed))
            out = out and f"; {out}"
            log.info("memory: moved mode %s to %s in %.2f s (%s)%s", name, self.device, seconds, moved, out)
        else:
            log.info("memory: %s for a large batch of mode %s (%s of working memory)", out, name, human(need or 0))
        return seconds, evicted

    def can_evict(self, name: str) -> bool:
        """Whether another mode is resident that evict_all_but would move out."""
        return any(n != name for n in self.recent)

    def evict_all_but(self, name: str) -> list[str]:
        """Move every other mode out (a request ran out of device memory: it gets the whole device)."""
        others = [n for n in self.recent if n != name]
        for other in others:
            del self.recent[other]
            self._move_out(other, keep=[name, *self.recent])
        if others:
            log.info("memory: moved out %s to make room for a request of mode %s", ", ".join(others), name)
        return others

    def _move_out(self, mode: str, keep: list[str]) -> None:
        """`mode`'s modules to host memory, except those the `keep` modes (or every mode) also use."""
        kept = {id(m) for m in self.always} | {id(m) for n in keep for m in self.modules[n]}
        for m in self.modules[mode]:
            if id(m) not in kept and id(m) in self.on_device:
                self._to_host(m)
                self.on_device.discard(id(m))

    def _resident_bytes(self, name: str, needed) -> int:
        """The weights on the device once `needed` (of mode `name`) is in, with the CUDA graphs' pool."""
        on_device = sum(self._bytes[i] for i in self.on_device)
        return on_device + sum(self._bytes[id(m)] for m in needed) + self.plan.graph_pool

    @staticmethod
    def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    def _host_copies(self, module: torch.nn.Module) -> list[torch.Tensor]:
        """The module's tensors' host copies, made (and pinned, on CUDA) the first time only."""
        copies = self.host.get(id(module))
        if copies is None:
            pin = self.device.type == "cuda"
            copies = [torch.empty_like(t, device="cpu", pin_memory=pin).copy_(t) for t in self._tensors(module)]
            self.host[id(module)] = copies
        return copies

    def _to_host(self, module: torch.nn.Module) -> None:
        if self.copies:  # the weights are unchanged since the copy: pointing at it frees the device memory
            for t, copy in zip(self._tensors(module), self._host_copies(module), strict=True):
                t.data = copy

    def _to_device(self, module: torch.nn.Module) -> None:
        if self.copies:  # one copy per tensor, from its (pinned) host copy
            for t, copy in zip(self._tensors(module), self._host_copies(module), strict=True):
                t.data = copy.to(self.device, non_blocking=True) if self.device.type != "cpu" else copy.clone()
