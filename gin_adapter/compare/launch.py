"""How ``train.py`` was launched and where it logs: a launcher pitfall, and Accelerate trackers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .config import TrainingConfig


def single_process_cpu_launch_warning(num_processes: int) -> str | None:
    """Explain the trap of ``accelerate launch --cpu --num_processes N``: without mpirun it starts ONE process.

    Accelerate's ``--cpu`` launcher only spawns several processes through MPI (``--mpirun_hostfile``); otherwise it
    runs the script once (with ``MASTER_PORT`` set, which is how this case is recognised). ``torchrun`` spawns them.
    """
    env = os.environ
    if num_processes == 1 and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        return ("WARNING: `accelerate launch --cpu --num_processes N` started a single process (Accelerate needs mpirun for "
                "several CPU processes). For N CPU processes run:\n"
                "    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N train.py --config ...\n"
                "or  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train.py --config ...")
    return None


def init_trackers(accelerator: Accelerator, cfg: TrainingConfig, out: Path) -> None:
    """Start the ``log_with`` trackers (if any) with the config's scalar hyperparameters."""
    if not cfg.log_with:
        return
    if "trackio" in cfg.log_with:  # keep trackio's local database with the run unless the user chose a place
        os.environ.setdefault("TRACKIO_DIR", str((out / "logs" / "trackio").resolve()))
    accelerator.init_trackers("gin_adapter", config=flat_hparams(cfg))


def flat_hparams(cfg: TrainingConfig) -> dict[str, Any]:
    """Scalar hyperparameters for trackers (TensorBoard's hparams only take scalars and strings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        elif value is not None:
            flat[prefix] = json.dumps(value)

    walk("", {k: v for k, v in cfg.to_dict().items() if k != "runs"})
    flat["runs"] = json.dumps([r.name for r in cfg.runs])
    return flat
