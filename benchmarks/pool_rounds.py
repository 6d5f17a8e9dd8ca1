"""Pool the per-round ratios of several runs of the same benchmark command (noisy machines).

    python benchmarks/pool_rounds.py docs/benchmarks/xeon_1thread_train_4x256_memory_native_sums_bb948d6.json \\
        docs/benchmarks/xeon_1thread_train_4x256_memory_native_sums_454925f.json

Each run of ``run_benchmarks.py`` reports, per variant, the median of its per-round ratios against its LoRA (rounds
interleave, so a round's ratio compares steps taken seconds apart). Where one run's rounds spread over 0.8-1.4, two
runs of the same code can give medians 0.05 apart; pooling their rounds gives one median over all of them. This
script reads the rounds each JSON keeps (``step_*_s_all`` in the train suite, ``forward_s_all`` and
``generate_s_all`` in eval and generate, on the run's own timer) and prints, per suite, shape and variant:
the number of rounds, the median ratio and the quartiles. Training ratios are variant time / LoRA time; eval and
generate ratios are LoRA time / variant time (a tokens/s ratio). Only pool runs of the same code and command.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

BASELINE = {"gin_published": "lora_b", "gin_published_topk_only": "lora_b", "gin_published_aten_sum": "lora_b"}
"""The LoRA each variant is compared with (``lora`` unless named here), as in ``run_benchmarks.py``."""


def _baseline(variant: str) -> str:
    return BASELINE.get(variant, "lora")


def round_ratios(paths: list[Path]) -> dict[tuple[str, str, str], list[float]]:
    """``{(suite, shape, variant): [per-round ratio, ...]}`` over every run in ``paths``."""
    pooled: dict[tuple[str, str, str], list[float]] = {}
    for path in paths:
        results = json.loads(path.read_text())
        for block in results.get("train", []):
            rows = {r["variant"]: r for r in block["rows"]}
            for variant, row in rows.items():
                base = rows.get(_baseline(variant))
                if base is None or variant == base["variant"]:
                    continue
                key = "step_cpu_s_all" if row["timer"] == "cpu" else "step_wall_s_all"
                shape = f"{row['batch']}x{row['seq_len']}"
                pooled.setdefault(("train", shape, variant), []).extend(a / b for a, b in zip(row[key], base[key]))
        for suite, key in (("eval", "forward_s_all"), ("generate", "generate_s_all")):
            block = results.get(suite) or []
            rows = {r["variant"]: r for r in (block["rows"] if isinstance(block, dict) else block)}  # generate: {"rows": [...], ...}
            for variant, row in rows.items():
                base = rows.get(_baseline(variant))
                if base is None or variant == base["variant"]:
                    continue
                shape = f"{row['batch']}x{row.get('seq_len', row.get('prompt'))}"
                pooled.setdefault((suite, shape, variant), []).extend(b / a for a, b in zip(row[key], base[key]))
    return pooled


def summary(ratios: list[float]) -> dict[str, float]:
    """Median and quartiles of one variant's pooled ratios."""
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"rounds": len(ratios), "median": statistics.median(ratios), "q1": low, "q3": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmark_results JSON files of the same command")
    args = parser.parse_args()
    print("| suite | shape | variant | rounds | median ratio | quartiles |\n|---|---|---|---:|---:|---|")
    for (suite, shape, variant), ratios in sorted(round_ratios(args.results).items()):
        s = summary(ratios)
        print(f"| {suite} | {shape} | {variant} | {s['rounds']} | {s['median']:.3f} | {s['q1']:.2f}-{s['q3']:.2f} |")


if __name__ == "__main__":
    main()
