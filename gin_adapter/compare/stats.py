"""The numbers a comparison reports: mean +- std over seeds, paired differences with a 95 % confidence interval,
and whether a learning-rate grid bracketed its optimum.

Paired: two arms trained with the same seed saw the same data order and are scored on the same validation
blocks, so their difference per seed removes the seed's share of the variance. For ``n`` paired differences
``d_s`` the interval is ``mean(d) +- t_{0.975, n-1} * std(d) / sqrt(n)`` (Student's t, sample std with ``n - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# Student's t, two-sided 95 % (the 0.975 quantile), by degrees of freedom 1..30; 1.96 beyond.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof >= 1`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_difference(arm: Mapping[int, float], reference: Mapping[int, float]) -> dict[str, float] | None:
    """``arm - reference`` over the seeds both have: mean, std, 95 % CI and n; ``None`` without a shared seed.

    With one shared seed the interval is undefined (reported as ``nan``).
    """
    seeds = sorted(set(arm) & set(reference))
    if not seeds:
        return None
    diffs = [arm[s] - reference[s] for s in seeds]
    mean, std = mean_std(diffs)
    half = t975(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "n": len(diffs)}


def grid_edge(learning_rates: Sequence[float], best: float) -> str | None:
    """``"low"`` or ``"high"`` when ``best`` is the smallest or largest of the grid, ``"only"`` for a single rate,
    else ``None`` (an optimum at an edge was never bracketed: the grid must be extended that way)."""
    grid = sorted(set(learning_rates))
    if len(grid) < 2:
        return "only" if grid else None
    if best == grid[0]:
        return "low"
    if best == grid[-1]:
        return "high"
    return None
