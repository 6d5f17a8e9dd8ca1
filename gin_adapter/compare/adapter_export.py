"""The committed best-seed adapters of a study: ``adapters/<run>/``, each with ``study_trial.json`` naming its trial.

Each trial's adapter is kept under ``adapters/<run>/trials/<trial>/`` (not committed) by the checkout that trained
it. A trial that finished in another checkout has its JSON committed but not its adapter; such a trial can be
trained again in a scratch copy of the study that lacks only it (:func:`prepare_retrain`, then
``train.py --resume --trial <id>`` on that copy: the same config, seed, data order and validation set), and its adapter
exported from there. The record then keeps the study's figures (``final_val_ppl``, ``machine``) and, under
``retrained``, the retrained trial's own: re-scoring the committed adapter reproduces the latter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from .config import TrainingConfig
from .outputs import write_json

EXPORT_RECORD = "study_trial.json"
"""In ``adapters/<run>/``: the trial the adapter was exported from."""


def exported_trial(folder: Path) -> str | None:
    """The trial id ``adapters/<run>/`` was exported from (``None``: nothing exported there, or before it was recorded)."""
    record = folder / EXPORT_RECORD
    return json.loads(record.read_text())["trial"] if record.is_file() else None


def needs_adapter(name: str, trial: dict[str, Any], out: Path) -> bool:
    """Whether run ``name``'s chosen ``trial`` has its adapter neither in this checkout nor exported already."""
    return not (out / trial["adapter_dir"]).is_dir() and exported_trial(out / "adapters" / name) != trial["trial"]


def retrained_source(trial: dict[str, Any], out: Path, folders: Iterable[Path]) -> tuple[Path, dict[str, Any]] | None:
    """``(adapter folder, record of the retrained trial)`` from the first scratch study in ``folders`` that trained
    ``trial`` again and still holds its adapter; ``None`` if none did. A folder whose ``config.json`` differs from
    the study's (``out``) is refused: its trial would not be the same trial."""
    study_config = None
    for folder in folders:
        folder = Path(folder)
        result, adapter = folder / "trials" / f"{trial['trial']}.json", folder / trial["adapter_dir"]
        if not (result.is_file() and adapter.is_dir()):
            continue
        study_config = study_config or json.loads((out / "config.json").read_text())
        if json.loads((folder / "config.json").read_text()) != study_config:
            raise ValueError(f"{folder} was not prepared from {out}: its config.json differs, so its trial "
                             f"{trial['trial']} is not the study's; prepare it with `scripts/study_report.py {out} --prepare-retrain {folder}`.")
        again = json.loads(result.read_text())
        return adapter, {key: again.get(key) for key in ("final_val_ppl", "ood_ppl", "machine")}
    return None


def export_adapters(cfg: TrainingConfig, chosen: dict[str, dict[str, Any]], out: Path, retrained: Iterable[Path] = ()) -> list[str]:
    """Copy each run's chosen trial's adapter to ``adapters/<run>/``, safetensors in ``export_adapter_dtype``, with
    ``study_trial.json`` naming the trial. A trial adapter not in ``out`` is taken from a scratch study in
    ``retrained`` that trained the same trial again (:func:`retrained_source`). Returns the runs whose trial
    adapter is in neither and was not exported before (a trial finished in another checkout)."""
    missing, retrained = [], list(retrained)
    for name, trial in chosen.items():
        src, dst = out / trial["adapter_dir"], out / "adapters" / name
        record = {"trial": trial["trial"], "final_val_ppl": trial["final_val_ppl"], "machine": trial.get("machine")}
        if not src.is_dir():
            again = retrained_source(trial, out, retrained) if retrained else None
            if again is None:
                if needs_adapter(name, trial, out):
                    missing.append(name)
                continue
            src, record["retrained"] = again
        _copy_adapter(src, dst, cfg.export_adapter_dtype)
        write_json(dst / EXPORT_RECORD, record)
    return missing


def _copy_adapter(src: Path, dst: Path, dtype: str) -> None:
    """The adapter files of ``src`` into ``dst``, floating-point safetensors in ``dtype``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" and dtype != "float32":
            to = getattr(torch, dtype)
            save_file({k: t.to(to) if t.is_floating_point() else t for k, t in load_file(f).items()}, dst / f.name)
        elif f.is_file():
            shutil.copy2(f, dst / f.name)


def prepare_retrain(out: Path, trial_ids: Iterable[str], folder: Path) -> list[str]:
    """A scratch copy of the study ``out`` in ``folder`` lacking only ``trial_ids`` (config, base perplexity, every
    other trial JSON), so ``train.py --config <the study's> --output-dir folder --resume --trial <id> ...`` trains
    exactly those trials again (``--trial``: the schedule alone might pick another trial first, since the missing
    result changes which rate looks best). Returns them; refuses a ``folder`` that already holds a study."""
    trial_ids = sorted(set(trial_ids))
    if (folder / "config.json").exists():
        raise FileExistsError(f"{folder} already holds a study; choose an empty folder.")
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "base_eval.json"):
        if (out / name).is_file():
            shutil.copy2(out / name, folder / name)
    for result in sorted((out / "trials").glob("*.json")):
        if result.stem not in trial_ids:
            shutil.copy2(result, folder / "trials" / result.name)
    return trial_ids
