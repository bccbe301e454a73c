"""Stage timings that never stall the device: marks are CUDA events recorded on the device's stream (on a CPU,
plain clock readings), and durations are read once the work has finished. Nothing here synchronizes while a
batch runs; `seconds()` waits only for the mark it is asked about."""

from __future__ import annotations

import time

import torch


class Timeline:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if not self.cuda:
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
