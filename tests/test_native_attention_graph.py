"""The compiled attention with its top-k graph (gin_adapter/native/attention_graph.c): a float64 reference's values
and gradients, the same bits on any thread count, used by training where it applies and ATen's chunked form elsewhere."""

from __future__ import annotations

import pytest
import torch

from gin_adapter import joint, native_attention_graph
from gin_adapter.joint import attention_with_graph, graph_sum

pytestmark = pytest.mark.skipif(not native_attention_graph.available(), reason="the compiled library or PyTorch's sgemm is missing")


def _inputs(batch: int, heads: int, kv_heads: int, length: int, dim: int, dim_v: int, seed: int, strided: bool = True):
    generator = torch.Generator().manual_seed(seed)
    # (B, L, heads, D) transposed, as attention modules pass them: rows of one head are heads * D apart

    def make(heads_: int, width: int) -> torch.Tensor:
        if strided:
            return torch.randn(batch, length, heads_, width, generator=generator).transpose(1, 2)
        return torch.randn(batch, heads_, length, width, generator=generator)

    return make(heads, dim), make(kv_heads, dim), make(kv_heads, dim_v)


def _reference(q, k, v, scaling, index, grad_out, grad_weights):
    """Float64 causal attention, the weights ``P[idx]`` of the given picks, and the gradients to q, k, v of
    ``sum(O dO) + sum(W dW)``; also ``P`` (B, H, L, L)."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    scores = scaling * q @ k.repeat_interleave(groups, 1).transpose(-1, -2)
    length = q.shape[2]
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    out = probs @ v.repeat_interleave(groups, 1)
    weights = probs.gather(-1, index)
    loss = (out * grad_out.double()).sum() + (0 if grad_weights is None else (weights * grad_weights.double()).sum())
    grads = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), weights.detach(), probs.detach(), grads


SHAPES = [  # batch, heads, kv_heads, length, dim, dim_v, top_k: one tile, several tiles and runs, GQA, a short last tile
    (2, 4, 2, 12, 8, 8, 3),
    (1, 3, 1, 150, 16, 24, 8),
    (1, 9, 3, 300, 64, 64, 8),
    (2, 2, 2, 200, 32, 16, 24),
    (1, 1, 1, 70, 8, 8, 1),
]


@pytest.mark.parametrize("graph_grad", [True, False], ids=["graph-grad", "no-graph-grad"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compiled_attention_equals_a_float64_reference(shape, graph_grad):
    """Output, picks (a top-k of the reference probabilities, ties aside), weights and the three gradients."""
    batch, heads, kv_heads, length, dim, dim_v, top_k = shape
    q, k, v = _inputs(batch, heads, kv_heads, length, dim, dim_v, seed=length)
    scaling = dim**-0.5
    out, weights, index, saved = native_attention_graph.forward(q, k, v, None, scaling, top_k)
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=generator)
    grad_weights = torch.randn(weights.shape, generator=generator) if graph_grad else None
    ref_out, ref_weights, probs, ref_grads = _reference(q, k, v, scaling, index, grad_out, grad_weights)
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    assert torch.allclose(weights.double(), ref_weights, atol=1e-6)
    # the picks are a top-k: distinct, and none below the (k + 1)-th largest probability of its row
    assert (index.sort(-1).values.diff(dim=-1) > 0).all()
    kth_next = probs.topk(top_k + 1, dim=-1).values[..., -1:] if top_k < length else torch.zeros_like(probs[..., :1])
    assert (ref_weights >= kth_next - 1e-6).all()
    assert (weights[..., :-1] >= weights[..., 1:]).all()  # descending
    grads = native_attention_graph.backward(*saved, scaling, top_k, out, grad_out, grad_weights, weights, index)
    for name, got, expected in zip("qkv", grads, ref_grads):
        assert got.shape == expected.shape, name
        assert torch.allclose(got.double(), expected, atol=2e-5, rtol=1e-4), name


def _assert_same_bits_on_1_2_3_threads(step) -> None:
    """``step()`` returns tensors; they are bitwise equal whether torch runs 1, 2 or 3 threads."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(step())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_compiled_attention_gives_the_same_bits_on_any_thread_count():
    """Every head's tiles are cut into runs by the shape alone and the runs' gradients summed in a fixed order."""
    q, k, v = _inputs(1, 3, 1, 300, 16, 16, seed=0)
    generator = torch.Generator().manual_seed(2)
    grad_out, grad_weights = torch.randn(1, 3, 300, 16, generator=generator), torch.randn(1, 3, 300, 8, generator=generator)

    def step():
        out, weights, index, saved = native_attention_graph.forward(q, k, v, None, 0.25, 8)
        return out, weights, index, *native_attention_graph.backward(*saved, 0.25, 8, out, grad_out, grad_weights, weights, index)

    assert native_attention_graph.segments(1, 3, 300) > 1  # the runs are exercised
    _assert_same_bits_on_1_2_3_threads(step)


@pytest.mark.parametrize("used", ["both", "output", "graph"])
def test_training_uses_the_compiled_attention_and_equals_the_chunked_form(used, monkeypatch):
    """Through :func:`gin_adapter.joint.attention_with_graph`: the compiled kernel runs (no chunk is scored by ATen)
    and the values and gradients equal ATen's chunked form, with both results in the loss or one of them."""
    calls = []
    monkeypatch.setattr(joint, "_scores", lambda *a, _scores=joint._scores, **kw: calls.append(1) or _scores(*a, **kw))
    q, k, v = (x.requires_grad_() for x in _inputs(2, 4, 2, 140, 16, 16, seed=5))
    features = torch.randn(2, 2, 140, 6, generator=torch.Generator().manual_seed(6), requires_grad=True)
    upstream = torch.randn(2, 4, 140, 16, generator=torch.Generator().manual_seed(7))

    def step():
        out, graph = attention_with_graph(q, k, v, None, scaling=0.25, top_k=8)
        sums = graph_sum(graph, features)
        terms = {"output": (out * upstream).sum(), "graph": (sums * upstream[..., :6]).sum()}
        loss = sum(terms.values()) if used == "both" else terms[used]  # one term only: the other result gets no gradient
        return [out.detach(), graph.index, sums.detach(), *torch.autograd.grad(loss, (q, k, v, features), allow_unused=True)]

    compiled = step()
    assert not calls
    monkeypatch.setattr(native_attention_graph, "ENABLED", False)
    chunked = step()
    assert calls
    for position, (a, b) in enumerate(zip(compiled, chunked)):
        if a is None or b is None:
            assert a is None and b is None or used == "output" and position == 6  # features: no gradient without the graph
            continue
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b, atol=2e-5), position


@pytest.mark.parametrize("case", ["mask", "keep", "large_k", "disabled", "no_sgemm"])
def test_the_chunked_form_runs_where_the_compiled_attention_does_not_apply(case, monkeypatch):
    q, k, v = _inputs(1, 2, 2, 40, 8, 8, seed=3)
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril() if case == "mask" else None
    top_k = 30 if case == "large_k" else 4
    if case == "disabled":
        monkeypatch.setattr(native_attention_graph, "ENABLED", False)
    if case == "no_sgemm":
        monkeypatch.setattr(native_attention_graph, "blas_sgemm", lambda: None)
    native_attention_graph._kernels.cache_clear()
    try:
        calls = []
        monkeypatch.setattr(joint, "_scores", lambda *a, _scores=joint._scores, **kw: calls.append(1) or _scores(*a, **kw))
        q.requires_grad_()
        out, graph = attention_with_graph(q, k, v, mask, scaling=0.3, top_k=top_k, keep_probabilities=case == "keep")
        assert calls and out.shape == (1, 2, 40, 8) and graph.index.shape[-1] == top_k
        if case == "no_sgemm":
            assert not native_attention_graph.available()
    finally:
        monkeypatch.undo()
        native_attention_graph._kernels.cache_clear()
    assert native_attention_graph.available()


def test_a_wrong_sgemm_is_refused(monkeypatch):
    """The sgemm found is checked against torch.matmul before use: one that computes something else is not used."""
    import ctypes

    wrong = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)(lambda *args: None)  # leaves C untouched
    monkeypatch.setattr(native_attention_graph, "blas_sgemm", lambda: ctypes.cast(wrong, ctypes.c_void_p).value)
    native_attention_graph._kernels.cache_clear()
    try:
        assert not native_attention_graph.available()
    finally:
        monkeypatch.undo()
        native_attention_graph._kernels.cache_clear()
    assert native_attention_graph.available()


def test_segments_give_enough_units_and_at_most_half_the_tiles():
    assert native_attention_graph.segments(4, 9, 256) == 1  # 36 heads: enough units
    assert native_attention_graph.segments(1, 9, 2048) == 4
    assert native_attention_graph.segments(1, 1, 64) == 1  # one tile
    assert native_attention_graph.segments(1, 1, 4096) == 32



def test_recorded_in_results(monkeypatch):
    """Benchmark and trial results record whether the compiled attention was in use."""
    from gin_adapter.compare.machine import machine

    assert machine()["compiled_attention_graph"] is True
    monkeypatch.setattr(native_attention_graph, "ENABLED", False)
    assert machine()["compiled_attention_graph"] is False


def _published_rule(threshold: float = 0.6):
    from gin_adapter import GinConfig
    from gin_adapter.adjacency import AdjacencyRule

    return AdjacencyRule.from_config(GinConfig.published(hidden_dim=6, graph="gin", threshold=threshold))


def _threshold_step(q, k, v, features, upstream, rule, form, used):
    from gin_adapter.joint_threshold import attention_with_threshold_graph, threshold_graph_sum

    q, k, v, features = (x.detach().requires_grad_() for x in (q, k, v, features))
    out, graph = attention_with_threshold_graph(q, k, v, None, scaling=0.25, rule=rule, form=form)
    sums = threshold_graph_sum(graph, features, groups=q.shape[1] // k.shape[1])
    terms = {"output": (out * upstream).sum(), "graph": (sums * upstream[..., :1, :, : sums.shape[-1]]).sum()}
    loss = sum(terms.values()) if used == "both" else terms[used]  # one term only: the other result gets no gradient
    return [out.detach(), sums.detach(), *torch.autograd.grad(loss, (q, k, v, features), allow_unused=True)]


@pytest.mark.parametrize("used", ["both", "output", "graph"])
@pytest.mark.parametrize("form", ["dense", "top_k"])
def test_compiled_published_rule_equals_the_chunked_form(form, used, monkeypatch):
    """The published rule's graph with the attention (:mod:`gin_adapter.joint_threshold`) over several tiles and
    runs: values and gradients equal ATen's chunked form with the graph kept whole or as each row's K largest
    entries (head sums above 1 occur: peaked rows), and the compiled kernel runs (no chunk scored by ATen)."""
    from gin_adapter import joint_threshold, threshold_sum

    calls = []
    for module in (joint_threshold, threshold_sum):  # backward's and forward's chunk scores
        monkeypatch.setattr(module, "_scores", lambda *a, _scores=module._scores, **kw: calls.append(1) or _scores(*a, **kw))
    q, k, v = _inputs(2, 4, 2, 200, 16, 16, seed=8)
    q = 3 * q  # peaked rows
    features = torch.randn(2, 1, 200, 6, generator=torch.Generator().manual_seed(9))
    upstream = torch.randn(2, 4, 200, 16, generator=torch.Generator().manual_seed(10))
    rule = _published_rule()
    compiled = _threshold_step(q, k, v, features, upstream, rule, form, used)
    assert not calls
    monkeypatch.setattr(native_attention_graph, "ENABLED", False)
    chunked = _threshold_step(q, k, v, features, upstream, rule, form, used)
    assert calls
    for position, (a, b) in enumerate(zip(compiled, chunked)):
        if a is None or b is None:
            assert a is None and b is None, position
            continue
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), position


def test_compiled_published_rule_gives_the_same_bits_on_any_thread_count():
    q, k, v = _inputs(1, 4, 2, 300, 16, 16, seed=11)
    features = torch.randn(1, 1, 300, 6, generator=torch.Generator().manual_seed(12))
    upstream = torch.randn(1, 4, 300, 16, generator=torch.Generator().manual_seed(13))
    assert native_attention_graph.segments(1, 1, 300) > 1  # the runs are exercised
    _assert_same_bits_on_1_2_3_threads(lambda: _threshold_step(3 * q, k, v, features, upstream, _published_rule(), "top_k", "both"))


def test_the_kernels_write_float32_on_the_cpu_whatever_the_default_dtype():
    """Its results are allocated as the inputs (float32, CPU), not by torch's default dtype."""
    q, k, v = _inputs(1, 2, 1, 70, 8, 8, seed=14)
    expected = native_attention_graph.forward(q, k, v, None, 0.3, 4)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = native_attention_graph.forward(q, k, v, None, 0.3, 4)
        grads = native_attention_graph.backward(*got[3], 0.3, 4, got[0], torch.ones_like(got[0]), None, got[1], got[2])
    finally:
        torch.set_default_dtype(default)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], expected[:3]))
    assert all(g.dtype == torch.float32 for g in grads)
    reference = native_attention_graph.backward(*expected[3], 0.3, 4, expected[0], torch.ones_like(expected[0]), None, expected[1], expected[2])
    assert all(torch.equal(a, b) for a, b in zip(grads, reference))


@pytest.mark.parametrize("case", ["batch", "head_dim", "kv_heads", "empty", "alpha"])
def test_mismatched_inputs_fall_back_instead_of_reaching_the_kernel(case):
    """Shapes the kernel cannot take (ATen would broadcast or raise) and a rule it refuses are not handed to it."""
    q, k, v = _inputs(2, 4, 2, 70, 8, 8, seed=15)
    if case == "batch":
        k, v = k[:1], v[:1]
    elif case == "head_dim":
        k = k[..., :4]
    elif case == "kv_heads":
        v = v[:, :1]
    elif case == "empty":
        q, k, v = q[:0], k[:0], v[:0]
    assert native_attention_graph.threshold_applies(q, k, v, None, "dense", 1, alpha=1.0) == (case == "alpha")
    if case == "alpha":
        assert not native_attention_graph.threshold_applies(q, k, v, None, "dense", 1, alpha=1e-50)  # 0 as a float32
    else:
        assert not native_attention_graph.applies(q, k, v, None, 4)
