"""Print a Markdown summary table of a train.py results folder: `python scripts/results_table.py runs/compare`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    results = json.loads((Path(folder) / "results.json").read_text())
    base = results["base"]["perplexity"]
    lines = [
        "| run | method | trainable params | best lr | val ppl at best lr (mean +- std over seeds) | per seed | train tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| base model | - | 0 | - | {base:.2f} | - | - |",
    ]
    for name, summary in results["summary"].items():
        best = summary["by_learning_rate"][str(summary["best_learning_rate"])]
        speeds = [t["train_tokens_per_s"] for t in results["trials"] if t["run"] == name]
        seeds = ", ".join(f"{v:.2f}" for v in best["val_ppl_by_seed"])
        lines.append(
            f"| {name} | {summary['method']} | {summary['trainable_params']:,} | {summary['best_learning_rate']:g} | "
            f"{summary['val_ppl_mean']:.2f} +- {summary['val_ppl_std']:.2f} | {seeds} | {sorted(speeds)[len(speeds) // 2]:.0f} |"
        )
    lines.append("")
    lines.append("All learning rates: " + "; ".join(
        f"{name} " + ", ".join(f"lr {lr}: {v['mean']:.2f}" for lr, v in s["by_learning_rate"].items())
        for name, s in results["summary"].items()
    ))
    print("\n".join(lines))
    print(f"\n{results['answer']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/compare")
