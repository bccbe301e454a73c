"""Where a prediction's time goes on the device: kernel launches, host synchronisations, and how much of the wall
time the GPU is busy, from torch.profiler (CUPTI), plus the synchronising calls torch itself reports
(`torch.cuda.set_sync_debug_mode`), which work where CUPTI does not."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch

# CUDA runtime / driver calls that launch work, and those that make the host wait for the device.
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")
SYNCS = (
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",  # the synchronous copy (cudaMemcpyAsync is counted apart)
    "cuStreamSynchronize",
    "cuCtxSynchronize",
)


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def profile(run: Callable[[], object], calls: int, device: torch.device) -> dict:
    """`run()` `calls` times under the profiler (after one call outside it): per call, the wall time, the kernels
    the device ran, launches (kernels, graphs), host synchronisations (CUDA API calls and torch's own count) and
    the device's busy time; plus the kernels that took most of it."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    syncs_reported = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch_profile(activities=activities) as prof:
                started = time.perf_counter()
                for _ in range(calls):
                    run()
                if cuda:
                    torch.cuda.synchronize(device)
                wall_s = time.perf_counter() - started
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        syncs_reported = sum("synchroniz" in str(w.message) for w in caught)
    events = prof.events()
    api = Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    busy_us = _busy_us(intervals)
    by_kernel = Counter()
    for e in kernels:
        by_kernel[e.name[:80]] += e.time_range.end - e.time_range.start
    per = 1 / calls
    return {
        "calls": calls,
        "wall_ms": round(wall_s * 1000 * per, 2),
        "device_events": len(kernels),
        "device_busy_ms": round(busy_us / 1000 * per, 2),
        "device_busy_share": round(busy_us / 1e6 / wall_s, 3) if wall_s else None,
        "kernels_per_call": round(len(kernels) * per, 1),
        "kernel_launches_per_call": round(sum(api[n] for n in LAUNCHES) * per, 1),
        "graph_launches_per_call": round(sum(api[n] for n in GRAPH_LAUNCHES) * per, 1),
        "host_syncs_per_call": {n: round(api[n] * per, 1) for n in SYNCS if api[n]},
        "memcpy_async_per_call": round(api["cudaMemcpyAsync"] * per, 1),
        "torch_reported_syncs_per_call": round(syncs_reported * per, 1),
        "top_kernels_ms": {k: round(v / 1000 * per, 3) for k, v in by_kernel.most_common(8)},
        "cupti": bool(kernels) or not cuda,
    }
