"""Saving and loading GIN adapters with checks: atomic saves, safetensors only, clear errors on mismatch.

PEFT's own ``save_pretrained`` / ``PeftModel.from_pretrained`` work too (after ``import gin_adapter``); these
helpers add what a careful user wants on top: nothing half-written after a crash, pickle files refused, a corrupt
file or an adapter made for another base model reported in plain words before any weight is touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .config import PEFT_TYPE, GinConfig
from .blocks import make_block
from .discovery import attention_layer_numbers
from .model import attention_dims, register, text_config

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def save_adapter(model: PeftModel, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(path)`` written to a temporary sibling folder, then moved into place at once."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True, **kwargs)
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_adapter_folder(source: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (config and safetensors only)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source!s} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"], **hub_kwargs))


def read_adapter_config(folder: Path) -> GinConfig:
    """The folder's ``adapter_config.json`` as a :class:`GinConfig`, or a clear error."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {folder}; is this a saved adapter folder?")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}); the file is corrupt, save the adapter again.") from None
    if data.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{config_file} describes a {data.get('peft_type')!r} adapter, not a GIN adapter; load it with peft.PeftModel.")
    known = set(GinConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(
            f"{config_file} has fields this version of gin_adapter does not know: {unknown}. They are ignored; the "
            "adapter was probably saved by a newer version (upgrade gin_adapter if it loads or behaves wrongly).",
            stacklevel=2,
        )
    return GinConfig(**{k: v for k, v in data.items() if k in known})


def check_weights_file(weights_file: Path) -> None:
    """Raise ``ValueError`` if ``weights_file`` is not a complete safetensors file (reads the header only)."""
    try:
        with safe_open(str(weights_file), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_file} is truncated or corrupt ({error}); save or download the adapter again.") from None


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors from ``adapter_model.safetensors``; pickle files are refused, corrupt files reported."""
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        pickles = [name for name in PICKLE_NAMES if (folder / name).exists()]
        if pickles:
            raise ValueError(
                f"{folder} holds only {pickles[0]} (a pickle file, which can run arbitrary code when loaded). gin_adapter "
                "loads safetensors only: re-save the adapter with save_pretrained(..., safe_serialization=True)."
            )
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {folder}.")
    check_weights_file(weights_file)
    try:
        return load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_file} is truncated or corrupt ({error}); save or download the adapter again.") from None


def check_compatible(base_model: torch.nn.Module, config: GinConfig, weights: dict[str, torch.Tensor], source: str = "") -> None:
    """Raise ``ValueError`` listing every tensor whose shape does not fit ``base_model`` (other base model)."""
    model_config = text_config(base_model.config)
    dims = attention_dims(None, model_config)
    heads, head_dim, out_dim = dims.heads, dims.head_dim, dims.model_dim
    expected = {name: tuple(t.shape) for name, t in make_block(config, dims).state_dict().items()}
    problems = []
    num_layers = model_config.num_hidden_layers
    saved_layers = {int(m.group(1)) for key in weights if (m := re.search(r"\.(\d+)\.", key))}
    wanted = config.layers_to_transform
    wanted_layers = attention_layer_numbers(base_model, num_layers) if wanted is None else ({wanted} if isinstance(wanted, int) else set(wanted))
    if saved_layers and saved_layers != wanted_layers:
        problems.append(
            f"  the adapter holds layers {_ranges(saved_layers)}, this base model has {num_layers} layers"
            + (f" (layers_to_transform={wanted})" if wanted is not None else "")
        )
    for key, tensor in weights.items():
        match = re.search(r"gin_blocks\.(.+)$", key)
        if match is None:
            continue
        name = match.group(1)
        want = expected.get(name, expected.get(name.partition(".")[2]))  # without, or with, an adapter name
        if want is not None and tuple(tensor.shape) != want:
            problems.append(f"  {key}: adapter {tuple(tensor.shape)}, this base model needs {want}")
    if problems:
        saved_for = config.base_model_name_or_path or "an unrecorded model"
        here = getattr(base_model.config, "_name_or_path", "") or type(base_model).__name__
        raise ValueError(
            f"The adapter {source} was saved for {saved_for}, which does not match this base model ({here}: hidden size "
            f"{out_dim}, {heads} heads of {head_dim}, {model_config.num_hidden_layers} layers). Mismatched tensors:\n"
            + "\n".join(problems[:20])
        )


def _ranges(indices: set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``'0-2, 5'``."""
    ordered, parts = sorted(indices), []
    start = previous = ordered[0]
    for index in ordered[1:] + [None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ", ".join(parts)


def load_gin_model(base_model: torch.nn.Module, source: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False, **hub_kwargs: Any) -> PeftModel:
    """Load a GIN adapter (local folder or Hub repo id) onto ``base_model`` after checking it fits."""
    register()
    folder = resolve_adapter_folder(source, **hub_kwargs)
    config = read_adapter_config(folder)
    weights = read_adapter_weights(folder)
    check_compatible(base_model, config, weights, source=str(source))
    here = getattr(base_model.config, "_name_or_path", "")
    if config.base_model_name_or_path and here and Path(config.base_model_name_or_path).name != Path(here).name:
        logger.warning("Adapter was trained on %s but is loaded onto %s (shapes match).", config.base_model_name_or_path, here)
    return PeftModel.from_pretrained(base_model, folder, adapter_name=adapter_name, is_trainable=is_trainable)
