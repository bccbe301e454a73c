"""Device memory: a plan made before loading of which modes stay on the device, and moving the others in when
a request needs them.

The plan counts, per module, the bytes it will take on the device (from the safetensors headers of its files
and the dtype it will run in; modules stored in identical files count once, as the loader shares them), and
keeps working memory free for the largest mode's activations at its default size. The budget is the device's
free memory, or DEVICE_MEMORY_BUDGET where set (bytes, or with a unit: 500MB, 20GB, 20GiB). Every enabled mode
must fit on its own beside the modules every mode uses (the safety checker), or setup fails saying what is
needed; of the rest, modes stay resident in table order (the default mode first) while they fit.

Modes that do not fit wait in host memory (pinned, so that a move runs at full PCIe speed) and are moved to the
device when a request needs them, least recently used out first (`Residency.ensure`). The batcher groups requests
by mode, so moves are rare; each one shows in that prediction's metrics as `timings.mode_load` and in the logs.
On a CPU device, host and device memory are one: without DEVICE_MEMORY_BUDGET every mode is resident; with it
the same plan and bookkeeping run, and a move only updates the bookkeeping.
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

# Working memory, per image at a mode's default size (estimates, checked on a GPU by scripts/gpu_check.sh): the VAE
# decoder holds about ten tensors of its full-resolution width at once; the UNet about two dozen of its widest
# latent-resolution activations per batch entry (classifier-free guidance doubles the batch).
VAE_LIVE_TENSORS = 10
UNET_LIVE_TENSORS = 24
MARGIN = 0.05  # of the budget: the allocator's fragmentation, cuBLAS and cuDNN workspaces


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


def working_bytes(
    unet_config: dict, vae_config: dict, size: int, unet_dtype: torch.dtype, vae_dtype: torch.dtype, cfg: bool
) -> int:
    """Activation memory of one image at `size` x `size` (estimate; see VAE_LIVE_TENSORS)."""
    latent = (size // 8) ** 2
    unet = latent * max(unet_config["block_out_channels"]) * unet_dtype.itemsize * UNET_LIVE_TENSORS * (2 if cfg else 1)
    return vae_bytes(size, size, vae_config["block_out_channels"][0], vae_dtype) + unet


def vae_bytes(width: int, height: int, channels: int, dtype: torch.dtype) -> int:
    """Decoding one image: VAE_LIVE_TENSORS full-resolution tensors of the decoder's first-block width."""
    return width * height * channels * dtype.itemsize * VAE_LIVE_TENSORS


@dataclass(frozen=True)
class Plan:
    budget: int | None  # bytes the plan may use on the device; None: no limit
    source: str  # where the budget came from, for messages
    working: int  # kept free for activations
    module_bytes: dict[Hashable, int]
    mode_modules: dict[str, frozenset]  # mode -> the modules it runs
    always: frozenset  # used by every mode (the safety checker): always resident
    resident: tuple[str, ...] = ()
    needs: dict[str, int] = field(default_factory=dict)  # mode -> device bytes it needs alone (weights + working)

    def weights(self, modes: Iterable[str]) -> int:
        keys = set(self.always).union(*(self.mode_modules[m] for m in modes))
        return sum(self.module_bytes[k] for k in keys)

    @property
    def weights_budget(self) -> int | None:
        return None if self.budget is None else self.budget - self.working

    def describe(self) -> str:
        waiting = [m for m in self.mode_modules if m not in self.resident]
        total = human(self.weights(self.mode_modules))
        if self.budget is None:
            return f"memory plan: every mode resident ({total} of weights; no limit on {self.source})"
        return (
            f"memory plan: {human(self.budget)} ({self.source}): {human(self.working)} kept for activations; "
            f"resident {', '.join(self.resident)} ({human(self.weights(self.resident))} of weights)"
            + (f"; in host memory until a request needs them: {', '.join(waiting)}" if waiting else "")
            + f"; all modes: {total}"
        )


def make_plan(
    mode_modules: dict[str, frozenset],
    module_bytes: dict[Hashable, int],
    always: frozenset,
    working: dict[str, int],
    budget: int | None,
    source: str,
) -> Plan:
    """Which modes stay resident (table order) within `budget`; fails if an enabled mode cannot fit at all."""
    work = max(working.values(), default=0)
    plan = Plan(budget, source, work, dict(module_bytes), dict(mode_modules), frozenset(always))
    plan = replace(plan, needs={m: plan.weights([m]) + working[m] for m in mode_modules})
    if budget is None:
        return replace(plan, resident=tuple(mode_modules))
    usable = int(budget * (1 - MARGIN))
    plan = replace(plan, working=work + budget - usable)
    too_big = {m: need for m, need in plan.needs.items() if need > usable}
    if too_big:
        fit = [m for m in mode_modules if m not in too_big]
        name, need = max(too_big.items(), key=lambda kv: kv[1])
        raise MemoryBudgetError(
            f"DEVICE_MEMORY_BUDGET: mode {name} needs {human(need)} of device memory ({human(plan.weights([name]))} "
            f"of weights, {human(working[name])} working memory for one image at its default size) and the budget is "
            f"{human(budget)} ({source}; {MARGIN:.0%} of it is kept as headroom). "
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


@dataclass
class Residency:
    """Keeps a mode's modules on the device while it runs; moves modes in and out (least recently used out)."""

    plan: Plan
    modules: dict[str, list[torch.nn.Module]]  # mode -> its modules (shared modules appear under several modes)
    device: torch.device
    always: list[torch.nn.Module] = field(default_factory=list)
    on_device: set[int] = field(default_factory=set)  # id() of the modules on the device
    recent: OrderedDict = field(default_factory=OrderedDict)  # resident modes, least recently used first
    moves: int = 0

    def __post_init__(self) -> None:
        self.on_device = {id(m) for m in self.always} | {
            id(m) for name in self.plan.resident for m in self.modules[name]
        }
        self.recent = OrderedDict((name, None) for name in self.plan.resident)
        self._bytes = {id(m): module_bytes(m) for ms in (*self.modules.values(), self.always) for m in ms}

    @classmethod
    def everything(cls, modes: dict, device: torch.device, safety=None) -> "Residency":
        """Every mode resident, no limit (an engine built without a plan: tests, the benchmark)."""
        modules = {name: m.modules() for name, m in modes.items()}
        plan = Plan(None, "no plan", 0, {}, {name: frozenset() for name in modes}, frozenset(), tuple(modes))
        return cls(plan, modules, torch.device(device), [safety.model] if safety else [])

    def is_resident(self, name: str) -> bool:
        return name in self.recent

    def pin_host(self) -> None:
        """Modules the plan keeps in host memory go to pinned memory (after loading and the fast path)."""
        for modules in self.modules.values():
            for m in modules:
                if id(m) not in self.on_device:
                    self._to_host(m)

    def ensure(self, name: str) -> tuple[float, list[str]]:
        """Make `name`'s modules resident; returns (seconds spent moving, modes moved out)."""
        if name in self.recent:
            self.recent.move_to_end(name)
            return 0.0, []
        started = time.perf_counter()
        needed = [m for m in self.modules[name] if id(m) not in self.on_device]
        evicted = []
        limit = self.plan.weights_budget
        # With every other mode out, a mode runs even beyond the weights budget: make_plan checked that its weights
        # and its own working memory fit (a mode with large weights and small activations).
        while (
            limit is not None
            and self.recent
            and self._resident_bytes() + sum(self._bytes[id(m)] for m in needed) > limit
        ):
            victim, _ = self.recent.popitem(last=False)
            evicted.append(victim)
            self._move_out(victim, keep=[*self.recent, name])
        for m in needed:
            m.to(self.device, non_blocking=True)
            self.on_device.add(id(m))
        self.recent[name] = None
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the move is done before its time is reported
        self.moves += 1
        seconds = time.perf_counter() - started
        log.info(
            "memory: moved mode %s to %s in %.2f s (%s)%s",
            name,
            self.device,
            seconds,
            human(sum(self._bytes[id(m)] for m in needed)),
            f"; moved out to host memory: {', '.join(evicted)}" if evicted else "",
        )
        return seconds, evicted

    def evict_all_but(self, name: str) -> list[str]:
        """Move every other mode out (a request ran out of device memory: it gets the whole device)."""
        others = [n for n in self.recent if n != name]
        for other in others:
            del self.recent[other]
            self._move_out(other, keep=[name])
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

    def _resident_bytes(self) -> int:
        return sum(self._bytes[i] for i in self.on_device)

    def _to_host(self, module: torch.nn.Module) -> None:
        module.to("cpu")
        if self.device.type == "cuda":  # pinned: the next move in runs at full PCIe speed, asynchronously
            for t in (*module.parameters(), *module.buffers()):
                t.data = t.data.pin_memory()
