"""The compiled passes over a query chunk's scores (gin_adapter/native/score_rows.c through
gin_adapter.native_score_rows): the causal mask writes what ATen's masked_fill_ writes, the softmax backward gives
ATen's score gradient, both on one or several threads, out of the way where they do not apply, and a training step
equal to the one with ATen's operators."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import joint_training_step

from gin_adapter import GinConfig, native_score_rows
from gin_adapter import joint as joint_module
from gin_adapter.topk_sum import Chunk, hide_future_keys


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _future(rows: int, keys: int, q0: int, k0: int) -> torch.Tensor:
    """True where key ``k0 + j`` comes after query ``q0 + i``: ``(rows, keys)``."""
    return torch.arange(k0, k0 + keys)[None, :] > torch.arange(q0, q0 + rows)[:, None]


@pytest.mark.parametrize("thread_count", [1, 2])
def test_hide_future_equals_masked_fill(thread_count, threads, monkeypatch):
    """Every chunk geometry of a causal plan (first, middle, last chunk; a short last chunk; G = 1 and 3; calls
    large enough to be split over threads): the same tensor as ATen's ``masked_fill_`` of the future keys."""
    threads(thread_count)
    generator = torch.Generator().manual_seed(0)
    for (batch, groups, rows), (q0, k0, keys) in itertools.product([(1, 1, 5), (2, 3, 64)], [(0, 0, 64), (64, 0, 128), (192, 0, 256), (40, 0, 45)]):
        chunk = Chunk(q0, q0 + rows, k0, k0 + keys)
        scores = torch.randn(batch, 3, groups * rows, keys, generator=generator)
        expected = scores.view(batch, 3, groups, rows, keys).masked_fill(_future(rows, keys, q0, k0), float("-inf")).view_as(scores)
        compiled = scores.clone()
        hide_future_keys(compiled.view(batch, 3, groups, rows, keys), chunk, float("-inf"))
        monkeypatch.setattr(native_score_rows, "ENABLED", False)
        aten = scores.clone()
        hide_future_keys(aten.view(batch, 3, groups, rows, keys), chunk, float("-inf"))
        monkeypatch.undo()
        assert torch.equal(compiled, expected) and torch.equal(aten, expected)


def _grad_case(batch: int, groups: int, rows: int, q0: int, keys: int, k: int, dv: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    R, q_len = groups * rows, q0 + rows
    probs = torch.rand(batch, 3, R, keys, generator=generator).view(batch, 3, groups, rows, keys).masked_fill(_future(rows, keys, q0, 0), 0)
    probs = (probs / probs.sum(-1, keepdim=True)).view(batch, 3, R, keys)
    weights, index = probs.topk(k, dim=-1)
    d_probs = torch.randn(batch, 3, R, keys, generator=generator)
    grad_rows = torch.randn(batch, 3, R, dv, generator=generator)
    out5 = torch.randn(batch, 3, groups, q_len, dv, generator=generator)
    kept = torch.randn(batch, 3, R, k, generator=generator)
    return probs, d_probs, grad_rows, out5, kept, weights, index


def _aten_score_grads(probs, d_probs, grad_rows, out5, kept, weights, index, q0, rows):
    """``dS = P (dP + scatter(dW) - (dO . O + sum dW W))`` with ATen operators (the fallback's order)."""
    batch, kv_heads, groups = out5.shape[:3]
    out_rows = out5[:, :, :, q0 : q0 + rows].reshape(batch, kv_heads, groups * rows, -1)
    row = (grad_rows * out_rows).sum(-1, keepdim=True)
    d_probs = d_probs.clone()
    if kept is not None:
        d_probs.scatter_add_(-1, index, kept)
        row += (kept * weights).sum(-1, keepdim=True)
    return d_probs.sub_(row).mul_(probs)


@pytest.mark.parametrize("thread_count", [1, 2])
def test_softmax_grad_equals_aten(thread_count, threads):
    """With and without a gradient reaching the graph, value widths that fill no vector, G = 1 and 3, calls split
    over threads: ATen's score gradient up to float32 rounding."""
    threads(thread_count)
    for seed, ((batch, groups, rows), (q0, keys), dv, graph_grad) in enumerate(
            itertools.product([(1, 1, 7), (2, 3, 64)], [(0, 64), (64, 128), (192, 256)], [5, 64], [True, False])):
        if keys < q0 + rows:
            continue
        probs, d_probs, grad_rows, out5, kept, weights, index = _grad_case(batch, groups, rows, q0, keys, 4, dv, seed)
        if not graph_grad:
            kept = weights = index = None
        expected = _aten_score_grads(probs, d_probs, grad_rows, out5, kept, weights, index, q0, rows)
        assert native_score_rows.softmax_grad_(d_probs, probs, grad_rows, out5, q0, rows, 0, kept, weights, index)
        torch.testing.assert_close(d_probs, expected, rtol=1e-5, atol=1e-5)


def test_recorded_in_results(monkeypatch):
    """Built with the other kernels; benchmark and trial results record whether the passes were in use."""
    from gin_adapter.compare.machine import machine

    assert native_score_rows.available(), "gin_adapter/_native*.so is missing: reinstall with a C compiler present (pip install -e .)"
    assert machine()["compiled_score_rows"] is True
    monkeypatch.setattr(native_score_rows, "ENABLED", False)
    assert machine()["compiled_score_rows"] is False


def test_not_applied_where_it_cannot_be(monkeypatch):
    """Non-contiguous scores, autograd tracking, float64, ``torch.compile`` tracing and the switch: ``False``, and
    the tensor is left as it was."""
    scores = torch.randn(1, 3, 8, 8)
    for case in (scores.transpose(-1, -2), scores.clone().requires_grad_(), scores.double()):
        before = case.detach().clone()
        assert not native_score_rows.hide_future_(case, 8, 0, 0, float("-inf"))
        assert torch.equal(case.detach(), before)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not native_score_rows.hide_future_(scores, 8, 0, 0, float("-inf"))
    monkeypatch.undo()
    monkeypatch.setattr(native_score_rows, "ENABLED", False)
    assert not native_score_rows.hide_future_(scores, 8, 0, 0, float("-inf"))
    probs, d_probs, grad_rows, out5, kept, weights, index = _grad_case(1, 1, 7, 0, 64, 4, 5, 0)
    assert not native_score_rows.softmax_grad_(d_probs, probs, grad_rows, out5, 0, 7, 0, kept, weights, index)


@pytest.mark.parametrize("adjacency_grad", [True, False])
def test_training_step_equals_aten(monkeypatch, adjacency_grad):
    """A tiny wrapped model's training step (joint path, padded batch): the loss and adapter gradients with the
    compiled passes equal those with ATen's operators up to float32 rounding, and the compiled backward ran."""
    config = GinConfig(target_modules=["self_attn"], adjacency_grad=adjacency_grad)
    compiled_runs = []
    original = native_score_rows.softmax_grad_

    def recording(*args, **kwargs):
        compiled_runs.append(original(*args, **kwargs))
        return compiled_runs[-1]

    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(native_score_rows, "ENABLED", enabled)
        monkeypatch.setattr(native_score_rows, "softmax_grad_", recording)
        results[enabled] = joint_training_step(config, joint_enabled=True, spied=(joint_module, "_score_grads"), monkeypatch=monkeypatch, padding=True)
        monkeypatch.undo()
        if enabled:
            assert compiled_runs and all(compiled_runs)
            compiled_runs.clear()
    assert compiled_runs and not any(compiled_runs)
    (loss, grads, calls), (loss_aten, grads_aten, calls_aten) = results[True], results[False]
    assert calls == calls_aten > 0
    torch.testing.assert_close(loss, loss_aten, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, grads_aten, rtol=1e-4, atol=1e-6)
