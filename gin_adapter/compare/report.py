"""What ``train.py`` reports: per run the best learning rate and mean +- std over seeds, a verdict per GIN/LoRA
pair, a table, ``results.json``, ``curves.png`` / ``scales.png`` and ``adapters/<run>/``.

Selecting the learning rate and reporting on the same validation split flatters every method equally; the
numbers compare methods, they are not test-set estimates.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .adapter_export import export_adapters
from .config import TrainingConfig
from .machine import machine
from .outputs import write_json
from .runs import best_sweep_rate, sweep_grid
from .stats import grid_edge, mean_std, paired_difference

QUESTION = "At the same number of trainable parameters, does Sparse-GIN fine-tuning reach lower validation perplexity than LoRA?"


def summarize(cfg: TrainingConfig, results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run: mean +- std at each learning rate tried, the best rate (chosen on the sweep seeds), whether it sits
    at an edge of the grid, mean +- std over every seed there, out-of-domain perplexity, cost, and the paired
    difference to the run's ``baseline`` over shared seeds at each one's best rate."""
    summary: dict[str, dict[str, Any]] = {}
    for run in cfg.runs:
        mine = [r for r in results if r["run"] == run.name]
        if not mine:
            continue
        grid = sweep_grid(cfg, run, results)
        by_lr = {}
        for lr in sorted({r["learning_rate"] for r in mine}):
            at = [r for r in mine if r["learning_rate"] == lr]
            mean, std = mean_std([r["final_val_ppl"] for r in at])
            by_lr[f"{lr:g}"] = {"learning_rate": lr, "mean": mean, "std": std, "n": len(at),
                                "val_ppl_by_seed": {str(r["seed"]): r["final_val_ppl"] for r in at}}
        best_lr = best_sweep_rate(cfg, run, results)
        if best_lr is None:  # sweep unfinished: the best rate so far, flagged
            best_lr = min((d for d in by_lr.values()), key=lambda d: d["mean"])["learning_rate"]
        at_best = [r for r in mine if r["learning_rate"] == best_lr]
        ood = [r["ood_ppl"] for r in at_best if r.get("ood_ppl") is not None]
        summary[run.name] = {
            "method": run.method, "trainable_params": mine[0]["trainable_params"], "best_learning_rate": best_lr,
            "grid": grid, "best_at_edge": grid_edge(grid, best_lr), "sweep_complete": best_sweep_rate(cfg, run, results) is not None,
            "val_ppl_mean": by_lr[f"{best_lr:g}"]["mean"], "val_ppl_std": by_lr[f"{best_lr:g}"]["std"], "n_seeds": len(at_best),
            "val_ppl_by_seed": {str(r["seed"]): r["final_val_ppl"] for r in at_best},  # str keys: as JSON stores them
            "ood_ppl_mean": mean_std(ood)[0] if ood else None,
            "ood_ppl_by_seed": {str(r["seed"]): r["ood_ppl"] for r in at_best if r.get("ood_ppl") is not None},
            "train_tokens_per_s": _median([r.get("train_tokens_per_s") for r in at_best]),
            "peak_memory_mb": max((r.get("peak_memory") or {}).get("peak_mb", 0.0) for r in at_best) or None,
            "wall_time_s_per_trial": _median([r.get("wall_time_s") for r in at_best]),
            "train_cpu_s_per_step": _median([r["train_cpu_s"] / r["train_cpu_steps"] for r in at_best if r.get("train_cpu_steps")]),
            "baseline": run.baseline, "by_learning_rate": by_lr,
        }
    for name, entry in summary.items():
        base = summary.get(entry["baseline"]) if entry["baseline"] else None
        entry["paired_difference_to_baseline"] = paired_difference(entry["val_ppl_by_seed"], base["val_ppl_by_seed"]) if base else None
        entry["paired_ood_difference_to_baseline"] = paired_difference(entry["ood_ppl_by_seed"], base["ood_ppl_by_seed"]) if base else None
    return summary


def message_controls(cfg: TrainingConfig) -> list[tuple[str, str]]:
    """``(with messages, without)`` pairs of GIN runs: the same :class:`~gin_adapter.GinConfig` except ``graph``
    (``"gin"``: messages from key ``j`` to query ``i``; ``"reference"``: self-loops only). Their paired difference
    is what the messages along the attention graph add, everything else held fixed."""
    from .budget import gin_config

    def without_graph(run: Any) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(gin_config(run.gin)).items() if k != "graph"}

    gins = [run for run in cfg.runs if run.method == "gin"]
    graph = {run.name: gin_config(run.gin).graph for run in gins}
    return [(a.name, b.name) for a in gins for b in gins
            if graph[a.name] == "gin" and graph[b.name] == "reference" and without_graph(a) == without_graph(b)]


def control_differences(cfg: TrainingConfig, summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """For each pair of :func:`message_controls` with trials: the paired difference (with - without) of validation
    and out-of-domain perplexity over shared seeds, each arm at its own best learning rate."""
    rows = []
    for with_messages, without in message_controls(cfg):
        a, b = summary.get(with_messages), summary.get(without)
        if a and b:
            rows.append({"with_messages": with_messages, "without_messages": without,
                         "val_ppl": paired_difference(a["val_ppl_by_seed"], b["val_ppl_by_seed"]),
                         "ood_ppl": paired_difference(a["ood_ppl_by_seed"], b["ood_ppl_by_seed"])})
    return rows


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def certainty(diff: dict[str, float]) -> str:
    """Whether a :func:`~gin_adapter.compare.stats.paired_difference` tells its arms apart, in words."""
    if diff["n"] < 2:
        return "one shared seed, no interval"
    interval = f"95 % CI [{diff['ci95_low']:+.3f}, {diff['ci95_high']:+.3f}]"
    if diff["ci95_high"] < 0 or diff["ci95_low"] > 0:
        return f"{interval} excludes 0"
    return f"{interval} includes 0: not distinguishable"


def _compared(name: str, other: str, diff: dict[str, float]) -> str:
    where = "lower" if diff["mean"] < 0 else "higher"
    return f"{name} is {abs(diff['mean']):.3f} ppl {where} than {other} (paired over {diff['n']} seeds; {certainty(diff)})."


def verdict(summary: dict[str, dict[str, Any]], base_ppl: float | None, controls: list[dict[str, Any]] | None = None) -> str:
    """One honest sentence per run with a baseline (paired over seeds) and per message control (with messages vs
    self-loops only), else per GIN/LoRA pair (unpaired)."""
    lines = [_compared(name, s["baseline"], s["paired_difference_to_baseline"])
             for name, s in summary.items() if s.get("paired_difference_to_baseline")]
    lines += [f"Messages: {_compared(c['with_messages'], c['without_messages'], c['val_ppl'])}" for c in controls or [] if c["val_ppl"]]
    if lines:
        return " ".join(lines)
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


def format_table(summary: dict[str, dict[str, Any]], base_ppl: float | None, base_ood: float | None = None) -> str:
    """The summary as a fixed-width table (``!`` marks a best learning rate at an edge of its grid)."""
    header = (f"{'run':<22}{'method':<7}{'trainable':>11}{'best lr':>10}  {'val ppl (mean ± std, n)':<27}{'vs base':>8}"
              f"{'paired diff to baseline (95 % CI)':>38}{'ood ppl':>9}{'tok/s':>7}{'peak MB':>9}")
    rows = [header, "-" * len(header)]
    if base_ppl is not None:
        rows.append(f"{'base model':<22}{'-':<7}{0:>11,}{'-':>10}  {base_ppl:<27.4f}{'':>8}{'':>38}{(f'{base_ood:.3f}' if base_ood else '-'):>9}")
    for name, s in summary.items():
        ppl = f"{s['val_ppl_mean']:.4f} ± {s['val_ppl_std']:.4f} (n={s['n_seeds']})"
        delta = f"{s['val_ppl_mean'] - base_ppl:+.3f}" if base_ppl is not None else ""
        diff = s.get("paired_difference_to_baseline")
        paired = f"{diff['mean']:+.3f} [{diff['ci95_low']:+.3f}, {diff['ci95_high']:+.3f}] vs {s['baseline']}" if diff else "-"
        lr = f"{s['best_learning_rate']:.2g}{'!' if s['best_at_edge'] else ''}"
        ood = f"{s['ood_ppl_mean']:.3f}" if s.get("ood_ppl_mean") else "-"
        memory = f"{s['peak_memory_mb']:.0f}" if s.get("peak_memory_mb") else "-"
        rows.append(f"{name:<22}{s['method']:<7}{s['trainable_params']:>11,}{lr:>10}  {ppl:<27}{delta:>8}{paired:>38}{ood:>9}{(s['train_tokens_per_s'] or 0):>7.0f}{memory:>9}")
    if any(s["best_at_edge"] for s in summary.values()):
        rows.append("! best learning rate at an edge of the grid tried: the optimum was not bracketed.")
    return "\n".join(rows)


def representative(summary: dict[str, dict[str, Any]], results: list[dict[str, Any]], cfg: TrainingConfig) -> dict[str, dict[str, Any]]:
    """Per run, the trial plotted and exported: the best learning rate, and there the seed with the lowest val ppl."""
    chosen = {}
    for name, s in summary.items():
        at_best = [r for r in results if r["run"] == name and r["learning_rate"] == s["best_learning_rate"]]
        if at_best:
            chosen[name] = min(at_best, key=lambda r: (r["final_val_ppl"], r["seed"]))
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
    controls = control_differences(cfg, summary)
    return {
        "question": QUESTION,
        "answer": verdict(summary, base["perplexity"], controls),
        "base": base, "summary": summary, "message_controls": controls, "budget": budget, "trials": [{k: v for k, v in r.items() if k not in ("curves", "scale_history")} for r in results],
        "curves": {name: r["curves"] for name, r in chosen.items()},
        "scale_history": {name: r["scale_history"] for name, r in chosen.items() if r["scale_history"]},
        "trial_curves": {r["trial"]: r["curves"] for r in results},
        "config": cfg.to_dict(), "model_path": model_path, "versions": software_versions(),
        "accelerate": {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)},
        "machine": machine(accelerator.device),  # of the process that wrote the report; each trial records its own
        "wall_time_s": time.perf_counter() - started,
    }


def write_report(cfg: TrainingConfig, report: dict[str, Any], out: Path, accelerator: Accelerator) -> None:
    """On the main process: ``adapters/<run>/`` (best learning rate, best seed there; stored in
    ``export_adapter_dtype``), ``results.json``, the plots, the table."""
    if not accelerator.is_main_process:
        return
    missing = export_adapters(cfg, representative(report["summary"], report["trials"], cfg), out)
    if missing:
        report["adapters_missing"] = missing
        accelerator.print(f"not exported, their trials' adapters are not in this checkout: {', '.join(missing)} "
                          f"(to train those trials again without changing the study: scripts/study_report.py {out} --prepare-retrain DIR)")
    write_json(out / "results.json", report)
    write_plots(report, out)
    accelerator.print("\n" + format_table(report["summary"], report["base"]["perplexity"], report["base"].get("ood_perplexity")))
    accelerator.print(report["answer"])
    accelerator.print(f"results: {out / 'results.json'} (wall time {report['wall_time_s']:.0f} s)")


def write_plots(report: dict[str, Any], out: Path) -> None:
    """curves.png and scales.png through gin_adapter.analysis.plotting."""
    from gin_adapter.analysis.plotting import plot_scales, plot_training_curves

    plot_training_curves(report["curves"], out / "curves.png")
    if report["scale_history"]:
        plot_scales(report["scale_history"], out / "scales.png")
