"""The output folder of ``train.py``: never mixing results of two configs, and JSON written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .config import TrainingConfig

OUR_OUTPUTS = ("results.json", "curves.png", "scales.png", "config.json", "base_eval.json", "adapters", "checkpoints", "trials", "logs")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def prepare_output_dir(cfg: TrainingConfig, out: Path, resume: bool, overwrite: bool, accelerator: Accelerator) -> None:
    """Refuse to mix results of different configs; ``--overwrite`` clears our files, ``--resume`` checks the config.

    Every process takes the same decision (so an error stops all of them); only the main process writes.
    """
    saved, current = out / "config.json", json.loads(json.dumps(cfg.comparable_dict()))
    if saved.is_file() and not overwrite:
        if not resume:
            raise ValueError(f"output_dir {str(out)!r} already holds results; pass --resume to continue them, --overwrite to "
                             "start over, or choose another --output-dir.")
        before = json.loads(saved.read_text())
        changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
        if changed:
            raise ValueError(f"--resume: the config differs from the one in {str(saved)!r} in {changed}; resume with the same "
                             "config or use another --output-dir.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite:
            for name in OUR_OUTPUTS:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved, current)
    accelerator.wait_for_everyone()
