"""What a measurement ran on: CPU model and features, thread count, accelerator. Recorded with every trial and
benchmark, since timings and ratios move with the CPU and the number of threads."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .. import native_attention_graph, native_block, native_decode, native_graph_sum, native_score_rows, native_top_k
from .allocator import cpu_allocator


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def cpu_features() -> dict[str, bool]:
    """The instruction-set extensions that change CPU matmul speed and bf16 support: AVX2, AVX-512, AMX."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


LIBRARIES = ("torch", "transformers", "peft", "accelerate", "torch-geometric", "gin-adapter")


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide the numbers (``None`` for one that is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


@functools.cache
def source_commit() -> str | None:
    """The git commit of this checkout (with ``+dirty`` when files differ from it), or ``None`` outside a checkout.

    Read once per process, at the first call, and kept: a long run (the study) must record the commit of the code
    it imported, not whatever the checkout holds when a trial ends. Scripts call it at start."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model and features, torch threads, logical CPUs, the CPU allocator setting
    (:mod:`gin_adapter.compare.allocator`), whether the compiled kernels are in use (:mod:`gin_adapter.native_top_k`,
    :mod:`gin_adapter.native_graph_sum`, :mod:`gin_adapter.native_score_rows`, :mod:`gin_adapter.native_attention_graph`,
    :mod:`gin_adapter.native_decode`, :mod:`gin_adapter.native_block`), the
    device and (on CUDA) its name, the library versions and the source commit."""
    info: dict[str, Any] = {"cpu_model": cpu_model(), **cpu_features(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                            "cpu_allocator": cpu_allocator(), "compiled_top_k": native_top_k.ENABLED and native_top_k.available(),
                            "compiled_graph_sum": native_graph_sum.ENABLED and native_graph_sum.available(),
                            "compiled_score_rows": native_score_rows.ENABLED and native_score_rows.available(),
                            "compiled_attention_graph": native_attention_graph.ENABLED and native_attention_graph.available(),
                            "compiled_decode_attention": native_decode.ENABLED and native_decode.available(),
                            "compiled_block_forward": native_block.ENABLED and native_block.available(),
                            "versions": versions(), "commit": source_commit()}
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info
