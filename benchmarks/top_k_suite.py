"""The ``top_k`` suite: the per-row top-k the kernels pick neighbours with, three ways, on rows of attention
probabilities shaped as one query chunk of the fused kernels (B=4, Hkv=3, 3 query heads per KV head x 64 rows, so
2,304 rows of ``n`` keys, causal: the chunk's last 64 keys are masked in a triangle).

``torch_topk``: ``torch.topk``; ``two_stage``: :func:`gin_adapter.top_k.two_stage_top_k` (ATen ops, the fallback);
``compiled``: :func:`gin_adapter.native_top_k.row_top_k` (``gin_adapter/native/row_topk.c``). Each row of the
result holds the median milliseconds per call and each way's time over ``torch_topk``'s; every way's values are
checked equal to ``torch.topk``'s first.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.measure import interleaved_times, median
from gin_adapter import native_top_k
from gin_adapter.top_k import two_stage_top_k


def chunk_probabilities(keys: int, rows: int = 64, seed: int = 0) -> torch.Tensor:
    """Softmax of random scores ``(4, 3, 3 * rows, keys)`` under a causal mask on the last ``rows`` keys."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, 3, 3, rows, keys, generator=generator) * 2
    visible = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1).view(4, 3, 3 * rows, keys)


def top_k_cases(probs: torch.Tensor, k: int = 8) -> dict[str, Callable[[], Any]]:
    """The ways to pick each row's ``k`` largest probabilities (``compiled`` only where the library was built)."""
    cases = {"torch_topk": lambda: probs.topk(k, dim=-1), "two_stage": lambda: two_stage_top_k(probs, k)}
    if native_top_k.available():
        cases["compiled"] = lambda: native_top_k.row_top_k(probs, k)
    expected = probs.topk(k, dim=-1).values
    for name, case in cases.items():
        if not torch.equal(case()[0], expected):
            raise AssertionError(f"top_k suite: {name} picked other values than torch.topk")
    return cases


def run_top_k(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time :func:`top_k_cases` per pick count in ``args.top_k_picks`` and key count in ``args.top_k_keys`` (rows
    of at least 4 keys per pick; interleaved rounds, medians). ``compiled`` calls the kernel itself, also above
    :data:`gin_adapter.native_top_k.MAX_K` (where ``top_k_last`` takes ATen's)."""
    rows = []
    enabled, limit = native_top_k.ENABLED, native_top_k.MAX_K
    native_top_k.ENABLED, native_top_k.MAX_K = True, native_top_k.KERNEL_MAX_K
    try:
        for k in args.top_k_picks:
            for keys in (n for n in args.top_k_keys if n >= 4 * k):
                cases = top_k_cases(chunk_probabilities(keys, seed=args.seed), k)
                timings = interleaved_times(cases, 2, args.top_k_reps, lambda: None, what=f"top-{k} of {keys} keys", collect=False)
                medians = {name: median(t) for name, t in timings.items()}
                rows.append(dict(keys=keys, rows=2304, k=k, ms={name: 1000 * t for name, t in medians.items()},
                                 over_torch_topk={name: t / medians["torch_topk"] for name, t in medians.items()}))
                gc.collect()
    finally:
        native_top_k.ENABLED, native_top_k.MAX_K = enabled, limit
    return rows
