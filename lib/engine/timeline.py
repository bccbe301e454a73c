"""Stage timings that never stall the device: marks are CUDA events recorded on the device's stream (on a CPU,
plain clock readings), and durations are read once the work has finished. Nothing here synchronizes while a
batch runs; `seconds()` waits only for the mark it is asked about.

On MPS there are no CUDA events: a mark waits for the work queued before it (torch.mps.synchronize), then reads the
clock, so the timings are true at the cost of a short stall per mark (lib/engine/speed.py logs it once)."""

from __future__ import annotations

import time

import torch

from lib.engine import devices


class Timeline:
    def __init__(self, device: torch.device):
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        self.device = device if device.type == "mps" else None  # a device to wait for before each clock reading

    def mark(self):
        if not self.cuda:
            if self.device is not None:
                devices.synchronize(self.device)
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def done(self, mark) -> bool:
        """Whether the work before `mark` has run (never blocks)."""
        return True if not self.cuda else mark.query()

    def seconds(self, start, end) -> float:
        """Device time from `start` to `end` (waits for `end` if it has not run yet)."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000
