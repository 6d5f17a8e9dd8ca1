"""The compiled per-row top-k (gin_adapter/native/row_topk.c through gin_adapter.native_top_k): built by the
install, exactly ``torch.topk``'s values, ties to the lowest position, the same on one or several threads, out of
the way where it does not apply, and the same training step as ATen's top-k."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import joint_training_step

from gin_adapter import GinConfig, native_graph_sum, native_library, native_score_rows, native_top_k
from gin_adapter import top_k as top_k_module
from gin_adapter.native_top_k import row_top_k
from gin_adapter.top_k import top_k_last


@pytest.fixture(autouse=True)
def every_k(monkeypatch):
    """The kernel's own range of k (up to 64), not just what ``row_top_k`` hands it by default (up to 24)."""
    monkeypatch.setattr(native_top_k, "MAX_K", native_top_k.KERNEL_MAX_K)


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_compiled_top_k_is_built(monkeypatch):
    """``pip install -e .`` (scripts/setup.sh) builds the library; a missing C compiler would leave the ATen path.
    Benchmark and trial results record whether it was in use."""
    from gin_adapter.compare.machine import machine

    assert native_top_k.available(), "gin_adapter/_native*.so is missing: reinstall with a C compiler present (pip install -e .)"
    assert machine()["compiled_top_k"] is True
    monkeypatch.setattr(native_top_k, "ENABLED", False)
    assert machine()["compiled_top_k"] is False


def _stable_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order the kernel promises: larger value, NaN first, then lower position."""
    order = torch.sort(x.nan_to_num(nan=float("inf"), posinf=3e38), dim=-1, descending=True, stable=True).indices[..., :k]
    return x.gather(-1, order), order


@pytest.mark.parametrize("thread_count", [1, 2])
def test_equals_torch_topk(thread_count, threads):
    """Random rows of every length class (insertion scan below 4 k, column maxima with and without a rest): values
    and positions exactly ``torch.topk``'s; calls large enough to be split over threads included."""
    threads(thread_count)
    generator = torch.Generator().manual_seed(0)
    for n, k in itertools.product([1, 7, 8, 31, 32, 33, 100, 256, 257, 1000, 2049], [1, 3, 8, 13, 64]):
        if k > n:
            continue
        x = torch.randn(3, 100, n, generator=generator)  # 300 rows: split over threads from n >= 219
        values, index = row_top_k(x, k)
        expected = x.topk(k, dim=-1)
        assert torch.equal(values, expected.values) and torch.equal(index, expected.indices), (n, k)


@pytest.mark.parametrize("n", [20, 64, 256, 999])
def test_ties_nan_and_infinities(n):
    """Ties go to the lowest positions, NaN ranks first (as in ``torch.topk``), -inf and all-zero rows are fine."""
    generator = torch.Generator().manual_seed(n)
    x = torch.randint(0, 3, (40, n), generator=generator).float()
    x[:4] = 0.0
    x[4:8] = float("-inf")
    x[8, ::3] = float("nan")
    x[9, -1] = float("nan")
    x[10, 5] = float("inf")
    values, index = row_top_k(x, 8)
    expected_values, expected_index = _stable_top_k(x, 8)
    assert torch.equal(index, expected_index)
    assert torch.equal(values.nan_to_num(7.0), expected_values.nan_to_num(7.0))
    assert torch.equal(values.nan_to_num(7.0), x.topk(8, dim=-1).values.nan_to_num(7.0))


@pytest.mark.parametrize("k", [8, 20, 64])
def test_mostly_zero_rows(k):
    """Rows with a few positive entries and zeros elsewhere (thresholded graphs, causal rows that see few keys):
    the positives first, then the lowest-positioned zeros."""
    generator = torch.Generator().manual_seed(k)
    x = torch.rand(64, 1500, generator=generator)
    x = x * (torch.rand(64, 1500, generator=generator) < torch.linspace(0.0, 0.05, 64)[:, None])  # 0 to ~75 positives per row
    values, index = row_top_k(x, k)
    expected_values, expected_index = _stable_top_k(x, k)
    assert torch.equal(values, expected_values) and torch.equal(index, expected_index)


def test_strided_inputs():
    """A slice of wider rows and a transposed tensor give the top-k of what they show."""
    x = torch.randn(50, 300, generator=torch.Generator().manual_seed(1))
    for view in (x[:, :200], x[:, 50:250], x.t()[:100], x[::2]):
        values, index = row_top_k(view, 8)
        assert torch.equal(values, view.topk(8, dim=-1).values) and torch.equal(index, view.topk(8, dim=-1).indices)


def test_does_not_apply_where_it_cannot(monkeypatch):
    """Gradients needed, another dtype, k above the limit or the switch off: ``None``, and ``top_k_last`` still equals
    ``torch.topk`` there (through the ATen path)."""
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    cases = [(x.clone().requires_grad_(), 8), (x.bfloat16(), 8), (x.double(), 8), (x, native_top_k.KERNEL_MAX_K + 1)]
    for tensor, k in cases:
        assert row_top_k(tensor, k) is None
        assert torch.equal(top_k_last(tensor, k)[0], tensor.topk(k, dim=-1).values)
    with torch.no_grad():
        assert row_top_k(x.clone().requires_grad_(), 8) is not None
    monkeypatch.setattr(native_top_k, "MAX_K", 24)  # the default limit: above it ATen's top-k is faster
    assert row_top_k(x, 24) is not None and row_top_k(x, 25) is None
    monkeypatch.setattr(native_top_k, "ENABLED", False)
    assert row_top_k(x, 8) is None


def test_compiled_graph_uses_aten():
    """Under ``torch.compile(fullgraph=True)`` the ATen path is traced (no graph break) and gives the same picks."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(lambda rows: top_k_last(rows, 8), fullgraph=True, backend="eager")
    values, index = compiled(x)
    assert torch.equal(values, x.topk(8, dim=-1).values) and torch.equal(index, x.topk(8, dim=-1).indices)


def test_training_step_equals_aten_top_k(monkeypatch):
    """A tiny wrapped model's training step (joint path, padded batch): the same loss and adapter gradients with the
    compiled top-k as with ATen's, and the compiled one is what ran (no ATen top-k call)."""
    config = GinConfig(target_modules=["self_attn"])
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(native_top_k, "ENABLED", enabled)
        results[enabled] = joint_training_step(config, joint_enabled=True, spied=(top_k_module, "two_stage_top_k"), monkeypatch=monkeypatch,
                                                padding=True)
        monkeypatch.undo()
    (loss, grads, aten_calls), (loss_aten, grads_aten, aten_calls_aten) = results[True], results[False]
    assert aten_calls == 0 and aten_calls_aten > 0
    assert torch.equal(loss, loss_aten)
    assert torch.equal(grads, grads_aten)


def _forget_library() -> None:
    """Drop every cached lookup of the compiled library, so the next call loads it again."""
    native_library.library.cache_clear()
    native_top_k._kernel.cache_clear()
    native_graph_sum._kernels.cache_clear()
    native_score_rows._kernels.cache_clear()


def test_missing_library_falls_back_to_aten(monkeypatch, caplog):
    """Installed without a C compiler: ``available()`` is false for every kernel, it is logged once, and
    ``top_k_last`` and the neighbour sums still give ATen's values (the two-stage top-k, the dense sum)."""
    import importlib
    import logging

    from gin_adapter.chunk_sums import chunk_sum

    def no_library(name, *args, **kwargs):
        raise ImportError(f"No module named {name!r}")

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(10, 300, generator=generator)
    weights, index, features = torch.rand(1, 2, 5, 3, generator=generator), torch.rand(1, 2, 5, 7, generator=generator).argsort(-1)[..., :3], torch.randn(1, 2, 7, 4)
    expected_sum = (weights.unsqueeze(-1) * features[0, :, None].expand(2, 5, 7, 4).gather(2, index[0, ..., None].expand(2, 5, 3, 4))).sum(-2)
    _forget_library()
    monkeypatch.setattr(importlib, "import_module", no_library)
    try:
        with caplog.at_level(logging.INFO, logger="gin_adapter.native_library"):
            assert not any(module.available() for module in (native_top_k, native_graph_sum, native_score_rows))
            assert row_top_k(x, 8) is None
            assert torch.equal(top_k_last(x, 8)[0], x.topk(8, dim=-1).values)
            assert native_graph_sum.graph_sum(weights, index, features) is None
            torch.testing.assert_close(chunk_sum("dense", index, index, weights, features, 0, 7), expected_sum)
        assert sum("not available" in record.message for record in caplog.records) == 1
    finally:
        monkeypatch.undo()
        _forget_library()
    assert all(module.available() for module in (native_top_k, native_graph_sum, native_score_rows))
