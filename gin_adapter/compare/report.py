"""What ``train.py`` reports: per run the best learning rate and mean +- std over seeds, a verdict per GIN/LoRA
pair, a table, ``results.json``, ``curves.png`` / ``scales.png`` and ``adapters/<run>/``.

Selecting the learning rate and reporting on the same validation split flatters every method equally; the
numbers compare methods, they are not test-set estimates.
"""

from __future__ import annotations

import math
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .config import TrainingConfig
from .outputs import write_json

QUESTION = "At the same number of trainable parameters, does Sparse-GIN fine-tuning reach lower validation perplexity than LoRA?"


def summarize(cfg: TrainingConfig, results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run: mean +- std over seeds at each learning rate, and the learning rate with the lowest mean val ppl."""
    summary: dict[str, dict[str, Any]] = {}
    for run in cfg.runs:
        mine = [r for r in results if r["run"] == run.name]
        by_lr = {}
        for lr in cfg.learning_rates_for(run):
            ppls = [r["final_val_ppl"] for r in mine if r["learning_rate"] == lr]
            by_lr[f"{lr:g}"] = {"learning_rate": lr, "mean": statistics.fmean(ppls), "std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                                "n": len(ppls), "val_ppl_by_seed": ppls}
        best = min(by_lr.values(), key=lambda d: d["mean"])
        summary[run.name] = {
            "method": run.method, "trainable_params": mine[0]["trainable_params"], "best_learning_rate": best["learning_rate"],
            "val_ppl_mean": best["mean"], "val_ppl_std": best["std"], "n_seeds": best["n"], "by_learning_rate": by_lr,
        }
    return summary


def verdict(summary: dict[str, dict[str, Any]], base_ppl: float | None) -> str:
    """One honest sentence per GIN/LoRA pair: which is lower, by how much, and whether seeds separate them."""
    lines = []
    gins = [n for n, s in summary.items() if s["method"] == "gin"]
    loras = [n for n, s in summary.items() if s["method"] == "lora"]
    for g in gins:
        for lo in loras:
            sg, sl = summary[g], summary[lo]
            diff = sg["val_ppl_mean"] - sl["val_ppl_mean"]
            spread = math.sqrt(sg["val_ppl_std"] ** 2 / sg["n_seeds"] + sl["val_ppl_std"] ** 2 / sl["n_seeds"])
            better = f"{g} is lower than {lo}" if diff < 0 else f"{g} is not lower than {lo}"
            if min(sg["n_seeds"], sl["n_seeds"]) < 2:
                certainty = "single seed, no error estimate"
            elif abs(diff) > 2 * spread:
                certainty = f"more than 2 standard errors ({spread:.3f}) apart"
            else:
                certainty = f"within 2 standard errors ({spread:.3f}): not distinguishable with these seeds"
            lines.append(f"{better} by {abs(diff):.3f} ppl ({sg['val_ppl_mean']:.3f} vs {sl['val_ppl_mean']:.3f}; {certainty}).")
    return " ".join(lines)


def format_table(summary: dict[str, dict[str, Any]], base_ppl: float | None) -> str:
    header = f"{'run':<18}{'method':<8}{'trainable':>12}{'best lr':>10}   {'val ppl (mean ± std, n)':<28}{'vs base':>9}"
    rows = [header, "-" * len(header)]
    if base_ppl is not None:
        rows.append(f"{'base model':<18}{'-':<8}{0:>12,}{'-':>10}   {base_ppl:<28.4f}{'':>9}")
    for name, s in summary.items():
        ppl = f"{s['val_ppl_mean']:.4f} ± {s['val_ppl_std']:.4f} (n={s['n_seeds']})"
        delta = f"{s['val_ppl_mean'] - base_ppl:+.3f}" if base_ppl is not None else ""
        rows.append(f"{name:<18}{s['method']:<8}{s['trainable_params']:>12,}{s['best_learning_rate']:>10.2g}   {ppl:<28}{delta:>9}")
    return "\n".join(rows)


def representative(summary: dict[str, dict[str, Any]], results: list[dict[str, Any]], cfg: TrainingConfig) -> dict[str, dict[str, Any]]:
    """Per run, the trial plotted and exported: the best learning rate, first seed."""
    chosen = {}
    for name, s in summary.items():
        for r in results:
            if r["run"] == name and r["learning_rate"] == s["best_learning_rate"] and r["seed"] == cfg.seeds[0]:
                chosen[name] = r
    return chosen


def software_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import evaluate
    import peft
    import transformers

    import gin_adapter

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "evaluate": evaluate.__version__, "gin_adapter": getattr(gin_adapter, "__version__", "unknown"),
            "platform": platform.platform()}


def build_report(cfg: TrainingConfig, results: list[dict[str, Any]], base: dict[str, Any], budget: dict[str, Any], model_path: str,
                 accelerator: Accelerator, started: float) -> dict[str, Any]:
    """The content of ``results.json``: the summary and verdict, every trial, the representative curves, provenance.

    ``started`` is the ``time.perf_counter()`` of the start of the whole comparison.
    """
    summary = summarize(cfg, results)
    chosen = representative(summary, results, cfg)
    return {
        "question": QUESTION,
        "answer": verdict(summary, base["perplexity"]),
        "base": base, "summary": summary, "budget": budget, "trials": [{k: v for k, v in r.items() if k not in ("curves", "scale_history")} for r in results],
        "curves": {name: r["curves"] for name, r in chosen.items()},
        "scale_history": {name: r["scale_history"] for name, r in chosen.items() if r["scale_history"]},
        "trial_curves": {r["trial"]: r["curves"] for r in results},
        "config": cfg.to_dict(), "model_path": model_path, "versions": software_versions(),
        "accelerate": {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)},
        "wall_time_s": time.perf_counter() - started,
    }


def write_report(cfg: TrainingConfig, report: dict[str, Any], out: Path, accelerator: Accelerator) -> None:
    """On the main process: ``adapters/<run>/`` (best learning rate, first seed), ``results.json``, the plots, the table."""
    if not accelerator.is_main_process:
        return
    for name, r in representative(report["summary"], report["trials"], cfg).items():
        src, dst = out / r["adapter_dir"], out / "adapters" / name
        for f in src.iterdir():
            shutil.copy2(f, dst / f.name)
    write_json(out / "results.json", report)
    write_plots(report, out)
    accelerator.print("\n" + format_table(report["summary"], report["base"]["perplexity"]))
    accelerator.print(report["answer"])
    accelerator.print(f"results: {out / 'results.json'} (wall time {report['wall_time_s']:.0f} s)")


def write_plots(report: dict[str, Any], out: Path) -> None:
    """curves.png and scales.png through gin_adapter.analysis.plotting."""
    from gin_adapter.analysis.plotting import plot_scales, plot_training_curves

    plot_training_curves(report["curves"], out / "curves.png")
    if report["scale_history"]:
        plot_scales(report["scale_history"], out / "scales.png")
