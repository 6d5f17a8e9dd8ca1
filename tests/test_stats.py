"""Seed statistics of the comparison: mean +- std, paired differences with a 95 % CI, grid edges."""

from __future__ import annotations

import math

import pytest

from gin_adapter.compare.stats import grid_edge, mean_std, paired_difference, t975


def test_mean_std_uses_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_paired_difference_uses_shared_seeds_and_student_t():
    arm = {0: 10.0, 1: 11.0, 2: 12.5, 7: 99.0}
    ref = {0: 11.0, 1: 11.5, 2: 13.5}
    diff = paired_difference(arm, ref)
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(-2.5 / 3)
    half = 4.303 * diff["std"] / math.sqrt(3)  # t_{0.975, 2}
    assert (diff["ci95_low"], diff["ci95_high"]) == pytest.approx((diff["mean"] - half, diff["mean"] + half))
    assert paired_difference({0: 1.0}, {1: 2.0}) is None
    assert math.isnan(paired_difference({0: 1.0}, {0: 2.0})["ci95_low"])


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(30) == 2.042 and t975(100) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_grid_edges():
    grid = [1e-4, 3e-4, 1e-3]
    assert grid_edge(grid, 1e-4) == "low" and grid_edge(grid, 1e-3) == "high" and grid_edge(grid, 3e-4) is None
    assert grid_edge([1e-3], 1e-3) == "only"
