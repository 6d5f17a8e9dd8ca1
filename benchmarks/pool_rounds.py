"""Pool the per-round ratios of several runs of the same benchmark command (noisy machines).

    python benchmarks/pool_rounds.py docs/benchmarks/xeon_1thread_train_4x256_memory_native_sums_bb948d6.json \\
        docs/benchmarks/xeon_1thread_train_4x256_memory_native_sums_454925f.json

Each run of ``run_benchmarks.py`` reports, per variant, the median of its per-round ratios against its LoRA (rounds
interleave, so a round's ratio compares steps taken seconds apart). Where one run's rounds spread over 0.8-1.4, two
runs of the same code can give medians 0.1 apart; pooling their rounds gives one median over all of them. This
script reads the rounds each JSON keeps (``step_s_all`` in the train suite, ``forward_s_all`` and
``generate_s_all`` in eval and generate, on the run's own timer) and prints, per suite, thread count, shape and variant:
the number of rounds, the median ratio and the quartiles. Training ratios are variant time / LoRA time; eval and
generate ratios are LoRA time / variant time (a tokens/s ratio). Only pool runs of the same code and command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import its_lora, round_ratios  # noqa: E402

SUITES = {"train": "step_s_all", "eval": "forward_s_all", "generate": "generate_s_all"}
"""Each suite's list of per-round times on the run's own timer."""


def pooled_ratios(paths: list[Path]) -> dict[tuple[str, int | None, str, str], list[float]]:
    """``{(suite, threads, shape, variant): [per-round ratio, ...]}`` over every run in ``paths``, each variant
    against :func:`benchmarks.report.its_lora`; runs at different thread counts stay apart."""
    pooled: dict[tuple[str, int | None, str, str], list[float]] = {}
    for path in paths:
        results = json.loads(path.read_text())
        threads = results.get("machine", {}).get("torch_threads")
        for suite, key in SUITES.items():
            block = results.get(suite) or []
            tables = block if suite == "train" else [{"rows": block["rows"] if isinstance(block, dict) else block}]  # generate: {"rows": ...}
            for table in tables:
                for row in table["rows"]:
                    lora = its_lora(table["rows"], row)
                    if not lora or lora is row:
                        continue
                    pair = (row, lora) if suite == "train" else (lora, row)  # time ratio, or tokens/s ratio
                    shape = f"{row['batch']}x{row.get('seq_len', row.get('prompt'))}"
                    pooled.setdefault((suite, threads, shape, row["variant"]), []).extend(round_ratios(*pair, key) or [])
    return pooled


def summary(ratios: list[float]) -> dict[str, float]:
    """Median and quartiles of one variant's pooled ratios."""
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"rounds": len(ratios), "median": statistics.median(ratios), "q1": low, "q3": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmark_results JSON files of the same command")
    args = parser.parse_args()
    print("| suite | threads | shape | variant | rounds | median ratio | quartiles |\n|---|---:|---|---|---:|---:|---|")
    for (suite, threads, shape, variant), ratios in sorted(pooled_ratios(args.results).items()):
        s = summary(ratios)
        print(f"| {suite} | {threads} | {shape} | {variant} | {s['rounds']} | {s['median']:.3f} | {s['q1']:.2f}-{s['q3']:.2f} |")


if __name__ == "__main__":
    main()
