"""Checkpoints of one trial that survive a crash: adapter weights, optimizer, scheduler, RNG and trainer state.

``checkpoint-<step>`` folders under ``checkpoints/<trial>/`` hold what ``accelerator.save_state`` writes, with the
frozen base model left out (:func:`register_adapter_checkpointing`), plus ``trainer_state.json``, written last:
its presence marks a checkpoint complete. Each is written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .outputs import write_json

TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete


@dataclass
class TrainerState:
    """Everything besides model/optimizer/RNG a resumed run needs; stored as JSON in each checkpoint."""

    step: int = 0
    elapsed_s: float = 0.0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_ppl: list[tuple[int, float]] = field(default_factory=list)
    scales: list[tuple[int, list[float]]] = field(default_factory=list)


def register_adapter_checkpointing(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` store only the trainable (adapter) weights, not the frozen base model."""

    def save_hook(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                trainable = {n: p.detach().cpu().contiguous() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
                save_file(trainable, os.path.join(output_dir, f"trainable_{i}.safetensors"))
        weights.clear()  # Accelerate would otherwise write the whole base model into every checkpoint

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            state = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            unexpected = accelerator.unwrap_model(model).load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"checkpoint {input_dir} holds weights this model lacks: {unexpected[:5]}; was the config changed?")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def complete_checkpoints(root: Path) -> list[Path]:
    """``checkpoint-<step>`` folders under ``root`` that were fully written, oldest first (temp folders ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit() and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def resume_latest(accelerator: Accelerator, root: Path) -> tuple[TrainerState, Path | None]:
    """Load the latest complete checkpoint under ``root`` into the prepared objects; a fresh state if there is none."""
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        return TrainerState(), None
    latest = checkpoints[-1]
    accelerator.load_state(str(latest))  # adapter weights, optimizer, scheduler, RNG states
    return TrainerState(**json.loads((latest / TRAINER_STATE).read_text())), latest


def save_checkpoint(accelerator: Accelerator, root: Path, state: TrainerState, keep: int) -> Path:
    """``save_state`` into a temp folder, then rename it to ``checkpoint-<step>`` atomically and prune old ones.

    A crash at any point leaves either the previous complete checkpoints or the new one, never a half-written
    ``checkpoint-*`` folder (the temp folder is ignored by ``complete_checkpoints`` and removed on the next save).
    """
    final, tmp = root / f"checkpoint-{state.step}", root / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / TRAINER_STATE, state.__dict__)  # last file in: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
