"""The machine a benchmark runs on, its memory, and figures from timings: what every benchmark records alike."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import re
import resource
import statistics
from pathlib import Path

import torch

from lib.engine.devices import synchronize


def device_info(device: torch.device) -> dict:
    import diffusers
    import PIL
    import transformers

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=props.name,
            memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    elif device.type == "mps":
        info.update(device=f"MPS ({info['cpu']})", memory_gb=round(torch.mps.recommended_max_memory() / 2**30, 1))
    else:
        info["device"] = f"CPU ({info['cpu']}, {os.cpu_count()} cores)"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def sync(device: torch.device) -> None:
    synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if device.type == "mps":  # MPS keeps no peak: what Metal holds for the process now
        return round(torch.mps.driver_allocated_memory() / 2**30, 2)
    # The process's peak RSS: KiB on Linux, bytes on macOS.
    unit = 1 if platform.system() == "Darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**30, 2)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def median_ms(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values) * 1000, 2) if values else None
