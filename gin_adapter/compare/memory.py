"""Peak memory of one trial: the accelerator's allocator peak on CUDA, the process's resident set on CPU.

On CPU PyTorch keeps no allocator statistics, and the process's ``ru_maxrss`` only ever grows (the first trial's
peak would hide every later one), so :class:`PeakMemory` first gives the heap's free pages back to the operating
system (they stay mapped under ``cpu_allocator: keep``, :mod:`gin_adapter.compare.allocator`), then samples the
resident set size every ``interval_s`` from a background thread and reports the peak over the trial and its
increase over the start. The numbers are the same kind for every method of a run, which is what a comparison
needs; they are not an allocator-exact figure.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from types import TracebackType

import torch

from .allocator import release_free_cpu_memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = Path("/proc/self/statm")


def resident_bytes() -> int:
    """This process's resident set size now (0 where ``/proc`` is not available)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.result()``: ``{"peak_mb", "increase_mb", "kind"}``."""

    def __init__(self, device: torch.device, interval_s: float = 0.2) -> None:
        self.device, self.interval_s = device, interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:  # freed memory a kept allocator still holds would count as this trial's (allocator.py)
            gc.collect()
            release_free_cpu_memory()
            self.start = self.peak = resident_bytes()
            self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes())
        elif self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)

    def result(self) -> dict[str, float | str]:
        kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "process resident set (sampled)"
        return {"peak_mb": round(self.peak / 2**20, 1), "increase_mb": round((self.peak - self.start) / 2**20, 1), "kind": kind}
