"""The compiled neighbour sum of the top-k graph (gin_adapter/native/graph_sum.c through
gin_adapter.native_graph_sum): the values and gradients of the ATen sums, the same on one or several threads,
errors for positions outside the features, out of the way where it does not apply, and the same training step."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import joint_training_step

from gin_adapter import GinConfig, chunk_sums, native_graph_sum
from gin_adapter import joint as joint_module


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _graph(batch: int, kv_heads: int, rows: int, keys: int, k: int, width: int, seed: int = 0):
    """Random weights ``(B, Hkv, R, k)``, distinct key positions (as top-k picks are) and features ``(B, Hkv, Lk, F)``."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(batch, kv_heads, rows, k, generator=generator)
    index = torch.rand(batch, kv_heads, rows, keys, generator=generator).argsort(-1)[..., :k]
    features = torch.randn(batch, kv_heads, keys, width, generator=generator)
    return weights, index, features


def _reference(weights, index, features):
    """``N[b, h, r] = sum_m W[b, h, r, m] X[b, h, idx[b, h, r, m]]`` in float64 by indexing, differentiable."""
    batch, kv_heads, rows, k = index.shape
    picked = features.unsqueeze(2).expand(batch, kv_heads, rows, *features.shape[-2:]).gather(
        3, index.unsqueeze(-1).expand(*index.shape, features.shape[-1]))
    return (weights.unsqueeze(-1) * picked).sum(-2)


def test_library_built(monkeypatch):
    """``pip install -e .`` builds the kernels with the top-k (one library); benchmark and trial results record
    whether the compiled sum was in use."""
    from gin_adapter.compare.machine import machine

    assert native_graph_sum.available(), "gin_adapter/_native*.so is missing: reinstall with a C compiler present (pip install -e .)"
    assert machine()["compiled_graph_sum"] is True
    monkeypatch.setattr(native_graph_sum, "ENABLED", False)
    assert machine()["compiled_graph_sum"] is False


@pytest.mark.parametrize("thread_count", [1, 2, 3])
def test_sum_and_gradients_equal_reference(thread_count, threads):
    """Values, ``dW`` and ``dX`` against a float64 reference through autograd, for widths that fill no vector, one
    vector strip and more than one (155: the published preset's), one pick, many picks, one graph (shared node
    features) or three, and calls large enough to be split over threads; ``dX`` is added to what is there."""
    threads(thread_count)
    shapes = itertools.product([1, 2], [1, 3], [1, 64, 300], [8, 257], [1, 8], [5, 64, 155])
    for (batch, kv_heads, rows, keys, k, width), seed in zip(shapes, itertools.count()):
        weights, index, features = _graph(batch, kv_heads, rows, keys, k, width, seed)
        out = native_graph_sum.graph_sum(weights, index, features)
        w64, x64 = weights.double().requires_grad_(), features.double().requires_grad_()
        expected = _reference(w64, index, x64)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        expected.backward(grad.double())
        already = torch.randn(features.shape, generator=torch.Generator().manual_seed(seed + 100))
        grad_features = already.clone()
        done, grad_weights = native_graph_sum.graph_sum_grad(grad, weights, index, features, grad_features, need_weights=True)
        assert done
        torch.testing.assert_close(grad_weights.double(), w64.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((grad_features - already).double(), x64.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kv_heads, width", [(1, 155), (3, 64), (3, 155)])
def test_same_bits_on_any_thread_count(kv_heads, width, threads):
    """The sum and both gradients are bitwise the same on 1, 2 and 3 threads: the backward splits graphs or, with
    fewer graphs than threads (one graph of shared node features), ``dW`` by rows and ``dX`` by bands of features,
    and every entry adds its rows in the same order either way."""
    weights, index, features = _graph(1, kv_heads, 512, 512, 8, width, seed=3)
    grad = torch.randn(*weights.shape[:-1], width, generator=torch.Generator().manual_seed(4))
    results = []
    for thread_count in (1, 2, 3):
        threads(thread_count)
        grad_features = torch.zeros_like(features)
        grad_weights = native_graph_sum.graph_sum_grad(grad, weights, index, features, grad_features, need_weights=True)[1]
        results.append((native_graph_sum.graph_sum(weights, index, features), grad_weights, grad_features))
    for other in results[1:]:
        for first, value in zip(results[0], other):
            assert torch.equal(first, value)


def test_equals_aten_chunk_sums(monkeypatch):
    """``chunk_sum`` and ``chunk_sum_grads`` give the ATen ways' values (dense and gathered) with the kernel on."""
    weights, index, features = _graph(2, 3, 96, 200, 8, 64, seed=7)
    grad = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for enabled, mode in [(True, "dense"), (False, "dense"), (False, "gather")]:
        monkeypatch.setattr(native_graph_sum, "ENABLED", enabled)
        out = chunk_sums.chunk_sum(mode, index, index, weights, features, 0, 200)
        grad_features = torch.zeros_like(features)
        grad_weights = chunk_sums.chunk_sum_grads(mode, grad, index, index, weights, features, grad_features, 0, 200, need_weights=True)
        results[enabled, mode] = (out, grad_weights, grad_features)
    for aten in [(False, "dense"), (False, "gather")]:
        for native_value, aten_value in zip(results[True, "dense"], results[aten]):
            torch.testing.assert_close(native_value, aten_value, rtol=1e-5, atol=1e-5)


def test_positions_outside_the_features_are_refused():
    """A key position outside ``[0, Lk)`` raises (the kernel checks before it reads) instead of reading other memory."""
    weights, index, features = _graph(1, 2, 4, 10, 3, 8)
    for bad in (10, -1):
        index_bad = index.clone()
        index_bad[0, 1, 2, 0] = bad
        with pytest.raises(IndexError, match="outside"):
            native_graph_sum.graph_sum(weights, index_bad, features)
        with pytest.raises(IndexError, match="outside"):
            native_graph_sum.graph_sum_grad(torch.ones(1, 2, 4, 8), weights, index_bad, features, torch.zeros_like(features), need_weights=True)


def test_shapes_that_do_not_fit_are_refused():
    weights, index, features = _graph(1, 2, 4, 10, 3, 8)
    with pytest.raises(ValueError, match="do not fit"):
        native_graph_sum.graph_sum(weights, index[..., :2], features)
    with pytest.raises(ValueError, match="do not fit"):
        native_graph_sum.graph_sum(weights, index, features[:, :1])


def test_not_applied_where_it_cannot_be(monkeypatch):
    """Autograd tracking, float64, ``torch.compile`` tracing and the switch leave the sum to ATen (``None``)."""
    weights, index, features = _graph(1, 2, 4, 10, 3, 8)
    assert native_graph_sum.graph_sum(weights, index, features) is not None
    assert native_graph_sum.graph_sum(weights.requires_grad_(), index, features) is None
    assert native_graph_sum.graph_sum(weights.detach().double(), index, features.double()) is None
    assert native_graph_sum.graph_sum_grad(torch.ones(1, 2, 4, 8), weights.detach(), index, features, torch.zeros(10, 8).t(), need_weights=False) == (False, None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert native_graph_sum.graph_sum(weights.detach(), index, features) is None
    monkeypatch.undo()
    monkeypatch.setattr(native_graph_sum, "ENABLED", False)
    assert native_graph_sum.graph_sum(weights.detach(), index, features) is None


@pytest.mark.parametrize("node_features", ["values", "hidden"])
def test_training_step_equals_aten_sum(monkeypatch, node_features):
    """A tiny wrapped model's training step (joint path, padded batch): the loss and adapter gradients with the
    compiled sum equal those with the ATen sums up to float32 rounding, and the compiled one is what ran."""
    config = GinConfig(target_modules=["self_attn"], node_features=node_features)
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(native_graph_sum, "ENABLED", enabled)
        results[enabled] = joint_training_step(config, joint_enabled=True, spied=(joint_module, "chunk_sum"), monkeypatch=monkeypatch, padding=True)
        monkeypatch.undo()
    (loss, grads, chunk_calls), (loss_aten, grads_aten, chunk_calls_aten) = results[True], results[False]
    assert chunk_calls == 0 and chunk_calls_aten > 0  # the joint path's sum ran in one compiled call per layer
    torch.testing.assert_close(loss, loss_aten, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, grads_aten, rtol=1e-4, atol=1e-6)
    assert joint_module.ENABLED
