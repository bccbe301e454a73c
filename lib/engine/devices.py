"""The device the engine runs on, chosen in one place, and what each kind of device has.

The order: MODEL_DEVICE where set; else CUDA where torch sees a GPU; else MPS (Apple silicon, through torch's Metal
backend) where torch has it; else the CPU. The dtypes per kind are lib/engine/precision.py's; the fast-path switches
that only CUDA has are turned off on MPS by lib/engine/speed.py (one line in the log). Everything here takes the
device kind as data, so that the decisions are tested on machines without the device (the MPS path has not been
measured: docs/serving.md).

Memory is read with each kind's own counters: CUDA's caching allocator (allocated, reserved), MPS's
(`torch.mps.current_allocated_memory`: tensors; `torch.mps.driver_allocated_memory`: everything Metal holds for
the process), and on the CPU none (host memory is the process's).
"""

from __future__ import annotations

import torch

KINDS = ("cuda", "mps", "cpu")  # the order in which the engine takes what is there


class DeviceError(RuntimeError):
    """MODEL_DEVICE names a device that is not on this machine."""


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def available() -> dict[str, bool]:
    return {"cuda": torch.cuda.is_available(), "mps": mps_available(), "cpu": True}


def choose(setting: str | None, found: dict[str, bool]) -> tuple[torch.device, str]:
    """(the device, why it was chosen) from MODEL_DEVICE (`setting`, as lib/settings.py parses it) and what is
    available (`found`, as `available()` gives it)."""
    if setting:
        device = torch.device(setting)
        if not found.get(device.type, False):
            hint = {
                "cuda": "torch sees no CUDA GPU here",
                "mps": "torch has no MPS here: it needs a Mac with Apple silicon, macOS 12.3 or later and an arm64 "
                "build of Python and torch",
            }[device.type]
            raise DeviceError(f"MODEL_DEVICE: {setting!r} is not available on this machine ({hint})")
        return device, "MODEL_DEVICE"
    kind = next(k for k in KINDS if found.get(k))
    return torch.device(kind), "the first available of " + ", ".join(KINDS)


def choose_from_env() -> tuple[torch.device, str]:
    from lib.settings import Settings

    return choose(Settings().model_device, available())


def memory(device: torch.device) -> dict[str, int]:
    """What the device's allocator holds now, in bytes, by its own counters."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
    if device.type == "mps":
        return {"allocated": torch.mps.current_allocated_memory(), "driver": torch.mps.driver_allocated_memory()}
    return {}


def describe(device: torch.device) -> str:
    """The device for the log: its name and memory."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 1e9:.1f} GB)"
    if device.type == "mps":
        return f"mps (Apple silicon; {torch.mps.recommended_max_memory() / 1e9:.1f} GB of unified memory recommended)"
    return f"cpu ({torch.get_num_threads()} threads)"


def memory_line(device: torch.device) -> str:
    """What memory() says, for the log: '5.21 GB allocated, 5.50 GB reserved'."""
    return ", ".join(f"{n / 1e9:.2f} GB {what}" for what, n in memory(device).items())


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device (CUDA, MPS); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
