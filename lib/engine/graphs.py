"""Static shapes for the models' calls: CUDA graphs and compiled code per batch-size bucket, made at setup only.

One SD step at 512 px is about a thousand small kernels whose launches, not their arithmetic, take the time (an SD
2.1 UNet step measured 35 ms eager on an H200, where its arithmetic needs about 1 ms). A CUDA graph records one call's
kernels and replays them with a single launch, but it is fixed to its input shapes and to the addresses of its
inputs and weights; torch.compile, likewise, compiles per shape. So each model that lib/engine/speed.py speeds up gets
a `Static` dispatcher as its `forward`:
- a call's batch is rounded up to the next bucket (SPEED_GRAPH_BATCHES: 1, 2, 4, 8, 16): its tensors are copied
  into the static input buffers of that bucket's graph (a batch of 3 runs the graph of 4; the rows of a batch are
  independent, so the padding rows change nothing), the graph is replayed and the outputs' rows copied out;
- graphs are recorded, and compiled code made, only while setup's warm-up is `recording()`: each shape a request
  brings later that setup did not warm (another size, a batch past the last bucket, a bucket whose graph would not
  fit in SPEED_GRAPH_MEMORY) runs without a graph, on code compiled at setup where a compiled kernel covers it
  (torch's compile stance is `eager_on_recompile` after setup: it never compiles on a request), else as loaded;
- all graphs share one memory pool: they replay one at a time on the device thread and each call's outputs are
  copied out before the next replay, so one graph's scratch memory is the next one's (the pool holds about the
  largest graph's activations, not their sum);
- each call checks its weights' addresses: a module the memory plan moved out and back has new ones, and its graphs
  are recorded again on first use (for the shapes setup warmed only; a graph, not a compile);
- `eager()` turns graphs and compiled code off (a style LoRA changes what the modules compute: a replay would not).
On the CPU there are no CUDA graphs: the same dispatcher runs the module on its static buffers (what the CPU tests
check of the padding and the copies).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)

_state = threading.local()  # .recording: setup's warm-up is on (this thread)
_eager = 0  # >0: every Static runs as loaded (eager())


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """While this is on (setup's warm-up, on the device thread), new shapes are compiled and graphed."""
    before = getattr(_state, "recording", False)
    _state.recording = True
    try:
        yield
    finally:
        _state.recording = before


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Every module as loaded inside: no graph replays, no compiled code (torch.compile's `force_eager` stance)."""
    global _eager
    _eager += 1
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        _eager -= 1


def seal() -> None:
    """After setup: compiled code is used where it fits a call and never made anew (a request would wait minutes)."""
    torch.compiler.set_stance("eager_on_recompile")


def unseal() -> None:
    torch.compiler.set_stance("default")


def bucket_of(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


@dataclass
class Entry:
    """One recorded shape: static input buffers, and the CUDA graph and its outputs (None on the CPU)."""

    inputs: list[torch.Tensor]  # the call's tensors, in flatten order; batched ones at the bucket's batch
    batched: list[bool]
    values: list  # the call's other leaves (None, flags), in flatten order, None at tensor positions
    spec: object
    graph: object = None
    outputs: list | None = None
    out_spec: object = None
    peak: int = 0  # bytes the recording call allocated beyond what was there (its activations)
    seconds: float = 0.0


@dataclass
class Static:
    """The dispatcher installed as a module's `forward` (see the module docstring)."""

    module: torch.nn.Module
    name: str
    call: Callable  # what runs a call: the module's forward as loaded, or compiled
    buckets: tuple[int, ...]
    graphs: bool  # record CUDA graphs (on CUDA; the CPU runs the static buffers without)
    compiled: bool  # `call` is torch.compile'd: mark the batch dimension dynamic from bucket 2 on
    pool: object = None  # the CUDA graphs' shared memory pool
    memory_limit: int | None = None  # bytes of activations above which a bucket is not graphed
    entries: dict = field(default_factory=dict)
    warmed: set = field(default_factory=set)  # keys recorded at setup: the only ones recorded again after a move
    too_big: dict = field(default_factory=dict)  # shape (without batch) -> smallest bucket over the memory limit
    exemplars: dict = field(default_factory=dict)  # shape (without batch) -> (leaves, spec) of its first call
    failed: set = field(default_factory=set)
    replays: int = 0
    fallbacks: int = 0  # calls that ran without a recorded shape

    def __post_init__(self) -> None:
        params = list(self.module.parameters())
        self._probes = [params[0], params[-1]] if params else []
        self._addresses = self._weights()
        self.device = params[0].device if params else torch.device("cpu")

    def _weights(self) -> tuple:
        return tuple(p.data_ptr() for p in self._probes)

    # -- a call -----------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        recording = getattr(_state, "recording", False)
        if _eager or torch.is_grad_enabled() or not (self.graphs or recording):
            return self.call(*args, **kwargs)  # compiled without graphs: the code made at setup covers every bucket
        leaves, spec = tree_flatten((args, kwargs))
        found = self._key(leaves, spec)
        if found is None:
            self.fallbacks += 1
            return self.call(*args, **kwargs)
        key, n, bucket = found
        if self._weights() != self._addresses:  # moved out and back: the graphs point at the old weights
            self._addresses = self._weights()
            if self.entries:
                log.info("%s: weights moved; its CUDA graphs are recorded again on first use", self.name)
            self.entries.clear()
        entry = self.entries.get(key)
        if entry is not None:
            return self._replay(entry, leaves, n)
        if key in self.failed or (not recording and key not in self.warmed):
            self.fallbacks += 1
            return self.call(*args, **kwargs)
        if recording:
            self.exemplars.setdefault(self._shape(key), (leaves, spec))
        return self._record(key, leaves, spec, n, bucket)

    def _key(self, leaves: list, spec) -> tuple | None:
        """(key, batch, bucket) of a call: its structure, grad mode, other arguments and tensor shapes with the batch
        rounded up to its bucket; None where no bucket holds it (or an argument cannot be part of a key)."""
        first = next((x for x in leaves if isinstance(x, torch.Tensor)), None)
        if first is None or first.ndim == 0:
            return None
        n = first.shape[0]
        bucket = bucket_of(n, self.buckets)
        if bucket is None:
            return None
        parts = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                batched = x.ndim > 0 and x.shape[0] == n
                parts.append((batched, tuple(x.shape[1:]) if batched else tuple(x.shape), x.dtype))
            else:
                try:
                    hash(x)
                except TypeError:
                    return None
                parts.append(("value", x))
        # Inference mode is part of the key: static buffers made in it cannot be written outside it.
        return (spec, torch.is_inference_mode_enabled(), bucket, tuple(parts)), n, bucket

    @staticmethod
    def _shape(key: tuple) -> tuple:
        """The key without its bucket."""
        spec, inference, _, parts = key
        return spec, inference, parts

    def _replay(self, entry: Entry, leaves: list, n: int):
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        for buffer, batched, x in zip(entry.inputs, entry.batched, tensors, strict=True):
            (buffer[:n] if batched else buffer).copy_(x, non_blocking=True)
        self.replays += 1
        if entry.graph is not None:
            entry.graph.replay()
            outputs, out_spec = entry.outputs, entry.out_spec
        else:  # the CPU: the module on the static buffers
            args, kwargs = self._arguments(entry)
            outputs, out_spec = tree_flatten(self.call(*args, **kwargs))
        return self._copy_out(outputs, out_spec, n, entry.inputs[0].shape[0])

    @staticmethod
    def _copy_out(outputs: list, out_spec, n: int, bucket: int):
        """The first n rows of each batched output, copied: the next replay reuses the graph's output memory."""
        copied = [
            (x[:n] if x.ndim > 0 and x.shape[0] == bucket else x).clone() if isinstance(x, torch.Tensor) else x
            for x in outputs
        ]
        return tree_unflatten(copied, out_spec)

    @staticmethod
    def _arguments(entry: Entry) -> tuple[tuple, dict]:
        tensors = iter(entry.inputs)
        leaves = [next(tensors) if v is _TENSOR else v for v in entry.values]
        args, kwargs = tree_unflatten(leaves, entry.spec)
        return args, kwargs

    # -- recording ------------------------------------------------------------------------------------------------
    def _record(self, key: tuple, leaves: list, spec, n: int, bucket: int):
        """Static buffers for `key` filled from this call, one run on them (compiling, if compiled), then the graph
        recorded; returns this call's outputs."""
        started = time.perf_counter()
        inputs, batched, values = [], [], []
        with torch.no_grad():  # in the call's inference mode (part of the key): later calls copy into these
            for x in leaves:
                if not isinstance(x, torch.Tensor):
                    values.append(x)
                    continue
                values.append(_TENSOR)
                is_batched = x.ndim > 0 and x.shape[0] == n
                if is_batched:
                    layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
                    buffer = torch.empty(
                        (bucket, *x.shape[1:]), dtype=x.dtype, device=self.device, memory_format=layout
                    )
                    buffer[:n].copy_(x)
                    if bucket > n:  # padding rows: real values (row 0), not uninitialised memory
                        buffer[n:].copy_(x[:1].expand(bucket - n, *x.shape[1:]))
                    if self.compiled and bucket > 1:
                        torch._dynamo.mark_dynamic(buffer, 0)
                else:
                    buffer = x.to(self.device, copy=True)
                inputs.append(buffer)
                batched.append(is_batched)
        entry = Entry(inputs, batched, values, spec)
        args, kwargs = self._arguments(entry)
        cuda = self.device.type == "cuda"
        shape = self._shape(key)
        if cuda and self.graphs:
            out, entry.peak = self._measured(args, kwargs)
        else:
            out = self.call(*args, **kwargs)
        outputs, out_spec = tree_flatten(out)
        result = self._copy_out(outputs, out_spec, n, bucket)
        if cuda and self.graphs:
            if self.memory_limit is not None and entry.peak > self.memory_limit:
                self.too_big[shape] = min(bucket, self.too_big.get(shape, bucket))
                log.info(
                    "%s: batch %d takes %.2f GB of activations, over SPEED_GRAPH_MEMORY: runs without a CUDA graph",
                    self.name,
                    bucket,
                    entry.peak / 1e9,
                )
                self.failed.add(key)
                return result
            try:
                entry.graph, entry.outputs, entry.out_spec = self._capture(args, kwargs)
            except Exception as e:  # noqa: BLE001 - a model that cannot be graphed still runs, without a graph
                log.warning("%s: no CUDA graph for batch %d (%s): runs without one", self.name, bucket, str(e)[:300])
                self.failed.add(key)
                return result
        entry.seconds = time.perf_counter() - started
        self.entries[key] = entry
        self.warmed.add(key)
        return result

    def _measured(self, args: tuple, kwargs: dict) -> tuple[object, int]:
        """One run on a side stream (as torch.cuda.graphs asks before a capture: lazy initialisation, cuDNN's choice
        of algorithms, compiling), with the bytes it allocated at its peak beyond what was allocated before."""
        device = self.device
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = self.call(*args, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        return out, torch.cuda.max_memory_allocated(device) - before

    def _capture(self, args: tuple, kwargs: dict) -> tuple:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the host thread may use the device meanwhile (the safety checker, copies of pixels)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.call(*args, **kwargs)
        outputs, out_spec = tree_flatten(out)
        return graph, outputs, out_spec

    def expand(self, deadline: float, clock: Callable[[], float] = time.monotonic) -> list[int]:
        """Record the remaining buckets of every shape this module ran at during the warm-up (from its first call at
        that shape, its batch rows repeated, in that call's grad mode), smallest first, while `clock()` is before
        `deadline`, the memory limit allows and no recording failed. Returns the buckets left out for lack of time."""
        left_out = []
        for shape, (leaves, spec) in list(self.exemplars.items()):
            _, inference, parts = shape
            n0 = next(x for x in leaves if isinstance(x, torch.Tensor)).shape[0]
            previous = None
            for bucket in self.buckets:
                key = (spec, inference, bucket, parts)
                if bucket <= n0 or key in self.entries or key in self.failed:
                    continue
                if bucket >= self.too_big.get(shape, bucket + 1):
                    break
                projected = self._projected(shape, bucket)
                if self.memory_limit is not None and self.graphs and projected > self.memory_limit:
                    self.too_big[shape] = bucket
                    log.info(
                        "%s: batch %d would take about %.2f GB of activations, over SPEED_GRAPH_MEMORY: "
                        "runs without a CUDA graph",
                        self.name,
                        bucket,
                        projected / 1e9,
                    )
                    break
                estimate = previous.seconds * bucket / previous.inputs[0].shape[0] if previous else 0.0
                if clock() + estimate > deadline:
                    left_out += [b for b in self.buckets if b >= bucket]
                    break
                grown = [
                    x.expand(bucket, *x.shape[1:]) if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n0 else x
                    for x in leaves
                ]
                with torch.inference_mode(inference), torch.no_grad(), recording():
                    found = self._key(grown, spec)
                    if found is None or found[0] != key:
                        break
                    self._record(key, grown, spec, bucket, bucket)
                previous = self.entries.get(key)
                if previous is None:  # over the memory limit, or not graphable: larger buckets would fail too
                    break
        return left_out

    def _projected(self, shape: tuple, bucket: int) -> int:
        """Activation bytes at `bucket`, from the largest recorded bucket of this shape (they grow with the batch)."""
        known = [(e.inputs[0].shape[0], e.peak) for k, e in self.entries.items() if self._shape(k) == shape and e.peak]
        if not known:
            return 0
        batch, peak = max(known)
        return peak * bucket // batch

    def disable(self) -> None:
        """Back to the module as loaded: no graphs, no compiled code (its warm-up failed)."""
        self.call = getattr(self.call, "_torchdynamo_orig_callable", self.call)
        self.graphs = self.compiled = False
        self.entries.clear()
        self.warmed.clear()
        self.exemplars.clear()

    def report(self) -> dict:
        recorded: dict = {}
        for key, entry in self.entries.items():
            recorded.setdefault(str(entry.inputs[0].shape[1:]).removeprefix("torch.Size"), []).append(
                {
                    "batch": key[2],
                    "graph": entry.graph is not None,
                    "seconds": round(entry.seconds, 3),
                    "activations_gb": round(entry.peak / 1e9, 3),
                }
            )
        return {
            "recorded": recorded,
            "over_memory_limit_from_batch": sorted(set(self.too_big.values())),
            "failed": len(self.failed),
            "replays": self.replays,
            "fallbacks": self.fallbacks,
        }


_TENSOR = object()  # marks a tensor's place among a call's leaves


def _channels_last(x: torch.Tensor) -> bool:
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def install(module: torch.nn.Module, name: str, **options) -> Static:
    """A Static as `module.forward` (over whatever forward it has: as loaded, or compiled). Idempotent."""
    current = module.__dict__.get("forward")
    if isinstance(current, Static):
        return current
    static = Static(module, name, module.forward, **options)
    module.forward = static
    return static


def installed(module: torch.nn.Module) -> Static | None:
    found = module.__dict__.get("forward")
    return found if isinstance(found, Static) else None
