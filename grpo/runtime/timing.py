"""Seconds per phase of a training step, each phase timed once the device has finished its
queued work (CUDA kernels run asynchronously: without the wait a phase would be billed for the
one before it)."""

from __future__ import annotations

import contextlib
import time

import torch


def synced_time(device: torch.device | None) -> float:
    """Wall time once `device` has finished its queued work (on a CPU, just the time)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PhaseTimer:
    """`with timer.phase("update"): ...` adds the block's seconds to `timer.seconds["update"]`
    (a phase that comes back adds to its total)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = synced_time(self.device)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + synced_time(self.device) - start

    def total(self) -> float:
        return sum(self.seconds.values())
