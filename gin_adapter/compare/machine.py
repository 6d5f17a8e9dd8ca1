"""What a measurement ran on: CPU model and features, thread count, accelerator. Recorded with every trial and
benchmark, since timings and ratios move with the CPU and the number of threads."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


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


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model and features, torch threads, logical CPUs, the device and (on CUDA) its name."""
    info: dict[str, Any] = {"cpu_model": cpu_model(), **cpu_features(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info
