"""Where a training step's time goes: ``torch.profiler`` self CPU time per ATen operator, for two variants side by side.

    python benchmarks/profile_step.py --variants lora,gin --shape 4x256 --threads 1 --autocast bfloat16 \\
        --out docs/benchmarks/epyc_1thread_profile_bf16_4x256.json

Both variants are built from one frozen base (as in ``run_benchmarks.py``), trained for ``--warmup`` steps each,
interleaved, so the allocator has reached its steady state (with ``cpu_allocator: keep`` the heap still grows
during the first steps, and those page faults land in whichever operator touches the new memory first), then
once more under the profiler (discarded: the profiler's own buffers move the heap again, and the faults of the
first profiled steps landed in the loss's ``log_softmax`` backward), and then each is profiled for ``--rounds``
steps, whose minor page faults the JSON records. For every operator the JSON holds the median over the rounds of its
self CPU seconds per step in each variant, and the difference (second minus first); the table sorts by the size
of the difference. Self times do not overlap (an operator's time excludes the operators it calls), so the rows
say which operators a variant adds or removes; what no operator covers (Python between the calls) is the rest
of the step time. One profiled step runs somewhat slower than an unprofiled one (the profiler's own
bookkeeping); the step times beside the table are the profiled ones. Not run by the test suite (``profile_variants`` is, on a
tiny model).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import measure  # noqa: E402
from benchmarks.train_suite import train_step_fn  # noqa: E402
from benchmarks.variants import build_variants, corpus_ids, load_base  # noqa: E402
from gin_adapter.compare.allocator import CPU_ALLOCATORS, configure_cpu_allocator  # noqa: E402
from gin_adapter.compare.outputs import write_json  # noqa: E402

logger = logging.getLogger("benchmarks")


def self_seconds_per_operator(fn) -> tuple[float, int | None, Counter]:
    """Run ``fn`` once under ``torch.profiler``: ``(process CPU seconds, minor page faults (``None`` without
    ``getrusage``), Counter operator -> self CPU seconds)``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        usage, start = measure.process_usage(), time.process_time()
        fn()
        seconds, usage_end = time.process_time() - start, measure.process_usage()
    faults = usage_end.ru_minflt - usage.ru_minflt if usage is not None and usage_end is not None else None
    ops: Counter = Counter()
    for event in prof.key_averages():
        ops[event.key] += event.self_cpu_time_total / 1e6
    return seconds, faults, ops


def profile_variants(base: torch.nn.Module, ids: torch.Tensor, names: list[str], *, warmup: int, rounds: int, top: int = 30) -> dict[str, Any]:
    """Profile one training step of each of the two ``names`` on ``ids (B, L)`` ``rounds`` times (after ``warmup``
    interleaved unprofiled steps each); returns per-variant step times and operator medians and the ``top``
    operators by the size of their difference."""
    if len(names) != 2:
        raise ValueError(f"profile_step compares two variants, got {names}; pass e.g. --variants lora,gin.")
    variants = build_variants(base, names)
    steps = {name: train_step_fn(variant, ids) for name, variant in variants.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for step in steps.values():  # the profiler's own first buffers, outside the record
        self_seconds_per_operator(step)
    runs: dict[str, list[tuple[float, int | None, Counter]]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            runs[name].append(self_seconds_per_operator(steps[name]))
    per_variant = {}
    for name, measured in runs.items():
        keys = set().union(*(ops for _, _, ops in measured))
        per_variant[name] = dict(step_s_all=[s for s, _, _ in measured], step_s=statistics.median(s for s, _, _ in measured),
                                 minor_faults_all=[f for _, f, _ in measured],
                                 ops={key: statistics.median(ops[key] for _, _, ops in measured) for key in sorted(keys)})
    first, second = (per_variant[name]["ops"] for name in names)
    diff = [dict(op=key, first_s=first.get(key, 0.0), second_s=second.get(key, 0.0), diff_s=second.get(key, 0.0) - first.get(key, 0.0))
            for key in set(first) | set(second)]
    diff.sort(key=lambda row: -abs(row["diff_s"]))
    return dict(variants=names, shape=list(ids.shape), warmup=warmup, rounds=rounds, per_variant=per_variant, top_differences=diff[:top])


def markdown(result: dict[str, Any]) -> str:
    """The difference table: one row per operator, self CPU seconds per step in each variant."""
    a, b = result["variants"]
    steps = {name: result["per_variant"][name]["step_s"] for name in (a, b)}
    faults = {name: max((f for f in result["per_variant"][name]["minor_faults_all"] if f is not None), default="?") for name in (a, b)}
    lines = [f"Profiled step ({'x'.join(map(str, result['shape']))}, median of {result['rounds']} rounds): "
             f"{a} {steps[a]:.2f} s, {b} {steps[b]:.2f} s, ratio {steps[b] / steps[a]:.2f}; "
             f"at most {faults[a]} and {faults[b]} minor page faults in a profiled step", "",
             f"| operator | {a} (s) | {b} (s) | difference (s) |", "|---|---:|---:|---:|"]
    lines += [f"| `{row['op']}` | {row['first_s']:.3f} | {row['second_s']:.3f} | {row['diff_s']:+.3f} |" for row in result["top_differences"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default="lora,gin", help="two names from benchmarks/variants.py, comma-separated")
    p.add_argument("--shape", default="4x256", help="batch x sequence length")
    p.add_argument("--model", default="embedded")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--autocast", choices=["bfloat16"], default=None, help="train under torch.autocast with this dtype")
    p.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="keep")
    p.add_argument("--warmup", type=int, default=4, help="unprofiled steps per variant first")
    p.add_argument("--rounds", type=int, default=3, help="profiled steps per variant")
    p.add_argument("--top", type=int, default=30, help="operators kept in the table")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_cpu_allocator(args.cpu_allocator)
    torch.set_num_threads(args.threads)
    measure.AUTOCAST["dtype"] = torch.bfloat16 if args.autocast else None
    device = torch.device("cpu")
    batch, length = (int(n) for n in args.shape.lower().split("x"))
    base, tokenizer = load_base(args.model, torch.float32, device)
    ids = corpus_ids(tokenizer, batch * length).view(batch, length)
    result = profile_variants(base, ids, args.variants.split(","), warmup=args.warmup, rounds=args.rounds, top=args.top)
    result = dict(command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]), machine=measure.machine_info(device),
                  autocast=args.autocast, **result)
    result["markdown"] = markdown(result)
    logger.info("%s", result["markdown"])
    write_json(args.out, result)  # atomically
    return result


if __name__ == "__main__":
    main()
