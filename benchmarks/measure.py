"""How the benchmarks measure: the machine, interleaved timing, and memory.

* :func:`interleaved_times`: every variant once per round, the order rotated each round, wall-clock and process
  CPU time of every call (``--timer`` picks which one medians and ratios use; :data:`TIMER`);
* memory on CPU: peak bytes held by PyTorch's CPU allocator during a step above what was live when it started
  (torch.profiler with ``profile_memory=True``; :func:`peak_step_bytes`); on CUDA ``max_memory_allocated``;
  :func:`live_bytes` is what a step needs before it starts; :func:`record_saved_tensors` records what autograd
  keeps for backward (``saved_tensors_hooks``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import resource  # POSIX only: each timed call's system time and page faults
except ImportError:  # Windows
    resource = None

logger = logging.getLogger("benchmarks")

MiB = 1024**2


AUTOCAST: dict[str, torch.dtype | None] = {"dtype": None}
"""``--autocast``: the dtype train and eval forwards run under ``torch.autocast`` (``None``: off)."""


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` with :data:`AUTOCAST`'s dtype, or nothing when it is off."""
    dtype = AUTOCAST["dtype"]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def machine_info(device: torch.device) -> dict[str, Any]:
    import peft
    import torch_geometric
    import transformers

    from gin_adapter.compare.machine import machine

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_geometric": torch_geometric.__version__,
        **machine(device),
    }
    info["threads"] = info["torch_threads"]  # the name earlier results files use
    try:
        mem = {line.split(":")[0]: line.split(":")[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()[:3]}
        info["mem_total"] = mem.get("MemTotal")
    except OSError:
        pass
    info["loadavg_start"] = _loadavg()
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Timings:
    """Per variant: wall-clock seconds, process CPU seconds, the system part of those and minor page faults of
    each timed call (same calls; the last two from ``getrusage``, empty where it is not available)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    system: dict[str, list[float]]
    minor_faults: dict[str, list[int]]
    primary: str = "wall"

    def __getitem__(self, name: str) -> list[float]:
        return (self.cpu if self.primary == "cpu" else self.wall)[name]

    def items(self):
        return ((name, self[name]) for name in self.wall)


TIMER = {"primary": "wall"}  # set by main() from --timer


def process_usage():
    """This process's resource usage (``None`` where the ``resource`` module is missing: Windows)."""
    return resource.getrusage(resource.RUSAGE_SELF) if resource is not None else None


def interleaved_times(fns: dict[str, Callable[[], Any]], warmup: int, steps: int, sync: Callable[[], None], what: str = "", collect: bool = True) -> Timings:
    """Run ``warmup + steps`` rounds; each round calls every fn once, in an order rotated by one each round.

    Records wall-clock time and process CPU time (``time.process_time``) of every call, and from ``getrusage``
    its system time and minor page faults (memory faulted in again after the allocator gave it back: see
    ``gin_adapter/compare/allocator.py``). With one thread on a CPU
    shared with other jobs, CPU time does not count the time this process waited for a core, so it is the less
    noisy measure of the work done (``--timer``). ``collect``: ``gc.collect()`` before each (untimed) call, so no
    collector pause lands inside a timed one.
    """
    names = list(fns)
    timings = Timings(*({n: [] for n in names} for _ in range(4)), primary=TIMER["primary"])
    for round_index in range(warmup + steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if collect:
                gc.collect()
            sync()
            usage, start, start_cpu = process_usage(), time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            usage_end = process_usage()
            if round_index >= warmup:
                timings.wall[name].append(elapsed)
                timings.cpu[name].append(elapsed_cpu)
                if usage is not None and usage_end is not None:
                    timings.system[name].append(usage_end.ru_stime - usage.ru_stime)
                    timings.minor_faults[name].append(usage_end.ru_minflt - usage.ru_minflt)
            logger.info("%s round %d/%d %-12s %8.3f s wall %8.3f s cpu%s", what, round_index + 1, warmup + steps, name, elapsed, elapsed_cpu,
                        "" if round_index >= warmup else " (warm-up)")
    return timings


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class SavedReport:
    bytes: int = 0  # unique storages saved for backward, parameters excluded
    count: int = 0
    attention_maps: int = 0  # saved tensors of size (B, H, L, L) or larger with trailing (L, L)
    square_shapes: list = field(default_factory=list)  # shapes of any saved tensor with trailing (L, L)
    largest: list = field(default_factory=list)


@contextlib.contextmanager
def record_saved_tensors(model: torch.nn.Module, length: int, full_map_numel: int):
    """Record what autograd saves for backward (``saved_tensors_hooks``); tensors are kept as is (no copy)."""
    report = SavedReport()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    largest = [0, []]

    def pack(tensor: torch.Tensor):
        shape = list(tensor.shape)
        report.count += 1
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs and ptr not in seen:
                seen.add(ptr)
                report.bytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        if tensor.numel() > largest[0]:
            largest[0], largest[1] = tensor.numel(), shape
        if tensor.dim() >= 3 and shape[-1] == length and shape[-2] == length:
            if shape not in report.square_shapes:
                report.square_shapes.append(shape)
            if tensor.numel() >= full_map_numel:
                report.attention_maps += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield report
    report.largest = largest[1]


def live_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the unique tensors a training step needs before it starts: weights, buffers, optimiser state."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(seen.values())


def peak_step_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by PyTorch during ``fn()`` above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak
