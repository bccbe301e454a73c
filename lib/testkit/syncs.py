"""Counting the calls that make the host wait for the device (or draw noise on the host) inside each denoising step.

A `SyncCounter` is a TorchFunctionMode: every torch function and tensor method called from Python passes through
it, so it sees what no profiler shows on a CPU: a tensor turned into a Python value (`item`, `tolist`, `bool(t)`,
`int(t)`, indexing with a 0-dim tensor, ...), an output whose size depends on the values (`nonzero`, `unique`),
a copy to host memory, and a random draw from a generator (per-step noise drawn on the host and copied over). On a
CUDA device each of these stalls the host until the device has caught up (or copies every step); on a CPU they are
cheap, so the tests count them on the CPU to keep them out of the code that runs on a GPU. Calls on tensors of
another device than `device` (host scalars beside CUDA tensors) stall nothing and are not counted there; on a CPU
every tensor is the device's, so the count is stricter than a GPU needs.

`instrument(pipeline_classes, device)` makes every call of those pipeline classes count, one tally per denoising
step: a step runs from the end of the previous one (for the first: the loop's first scheduler or UNet call) to the
end of its `callback_on_step_end`. On a CUDA device the same counter counts only what stalls there.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

# A Python value out of a tensor, or an output sized by the values: the host waits for the device.
TO_PYTHON = {
    "item",
    "tolist",
    "numpy",
    "__array__",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
    "__contains__",
    "__format__",
    "__repr__",
    "is_nonzero",
    "equal",
    "allclose",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
}
HOST_NOISE = {"randn", "randn_like", "rand", "rand_like", "normal", "normal_", "randint"}  # drawn with a generator
INDEXING = {"__getitem__", "__setitem__"}


class SyncCounter(TorchFunctionMode):
    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.steps: list[Counter] = []  # per denoising step: {what: count}
        self.where: list[str] = []  # a short stack of each counted call, for the failure message
        self.active = False

    # -- step boundaries ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.steps.append(Counter())
        self.active = True

    def next_step(self) -> None:
        """The end of a step (its callback has run): what follows counts to the next one."""
        self.steps.append(Counter())

    def stop(self) -> None:
        """The end of the pipeline call: the tally opened after the last step's end held no step."""
        if self.active:
            self.steps.pop()
        self.active = False

    # -- counting ---------------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            what = self.classify(func, args, kwargs)
            if what:
                self.steps[-1][what] += 1
                stack = traceback.extract_stack(limit=6)[-3::-1]  # innermost first, without this method
                self.where.append(f"{what} in " + " <- ".join(f"{f.name} ({f.filename}:{f.lineno})" for f in stack))
        return func(*args, **kwargs)

    def _mine(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.device.type == self.device.type

    def classify(self, func, args, kwargs) -> str | None:
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if name in TO_PYTHON:
            return name if self._mine(first) or not isinstance(first, torch.Tensor) else None
        if name in HOST_NOISE:
            generator = kwargs.get("generator")
            return f"{name} (host noise)" if generator is not None and generator.device.type == "cpu" else None
        if name in INDEXING and self._mine(first):
            index = args[1] if len(args) > 1 else None
            for i in index if isinstance(index, tuple) else (index,):
                if isinstance(i, torch.Tensor) and (i.dim() == 0 or i.dtype == torch.bool):
                    return f"{name} with a {'0-dim' if i.dim() == 0 else 'boolean'} tensor index"
            return None
        if self.device.type != "cpu":  # on a CPU there is no other memory to copy to
            if name == "copy_" and len(args) > 1 and self._mine(args[1]) and first.device.type == "cpu":
                return "copy_ to host memory"
            if name in ("to", "cpu") and self._mine(first) and _target(name, args, kwargs) == torch.device("cpu"):
                return f"{name} to host memory"
        return None


def _target(name: str, args, kwargs) -> torch.device | None:
    if name == "cpu":
        return torch.device("cpu")
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            try:
                return torch.device(a)
            except RuntimeError:
                continue
        if isinstance(a, torch.Tensor):
            return a.device
    return None


@contextlib.contextmanager
def instrument(pipeline_classes, device: torch.device) -> Iterator[SyncCounter]:
    """Count, per denoising step, in every call of `pipeline_classes` inside the block (see the module docstring)."""
    counter = SyncCounter(device)
    saved = {cls: cls.__call__ for cls in pipeline_classes}

    def wrap(real):
        def call(self, *args, callback_on_step_end=None, **kwargs):
            def on_step_end(pipe, i, t, callback_kwargs):
                out = callback_on_step_end(pipe, i, t, callback_kwargs) if callback_on_step_end else callback_kwargs
                counter.next_step()
                return out

            with _loop_start(self, counter):
                try:
                    return real(self, *args, callback_on_step_end=on_step_end, **kwargs)
                finally:
                    counter.stop()

        return call

    for cls, real in saved.items():
        cls.__call__ = wrap(real)
    try:
        with counter:
            yield counter
    finally:
        for cls, real in saved.items():
            cls.__call__ = real


@contextlib.contextmanager
def _loop_start(pipe, counter: SyncCounter) -> Iterator[None]:
    """The first step opens at the loop's first scheduler call (scale_model_input or step) or UNet call, whichever
    comes first: what the pipeline does before its loop (the schedule, the initial latents) is not a step. A compiled
    UNet gets no hook (it would be traced): its first call then counts only from the first scheduler call on."""
    scheduler, unet = pipe.scheduler, pipe.unet

    def opening(method):
        def call(*args, **kwargs):
            if not counter.active:
                counter.start()
            return method(*args, **kwargs)

        return call

    names = [n for n in ("scale_model_input", "step") if hasattr(scheduler, n)]
    for name in names:
        setattr(scheduler, name, opening(getattr(scheduler, name)))
    hook = None
    if getattr(unet, "_compiled_call_impl", None) is None:
        hook = unet.register_forward_pre_hook(lambda module, args: None if counter.active else counter.start())
    try:
        yield
    finally:
        for name in names:
            delattr(scheduler, name)
        if hook is not None:
            hook.remove()
