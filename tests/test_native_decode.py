"""One decoded token's attention, top-k graph and values' neighbour sum in one compiled call
(gin_adapter/native/decode_graph.c through gin_adapter.native_decode): a float64 reference for every output over
several layouts (GQA, strided caches, value width unlike the key width and not a multiple of 16, fewer keys than
k, batches), ATen's operators where it does not apply, and the neighbour sums of other features over its picks."""

from __future__ import annotations

import pytest
import torch

from gin_adapter import joint_decode, native_decode

pytestmark = pytest.mark.skipif(not native_decode.available(), reason="gin_adapter's compiled kernels are not built")

SCALING = 0.3


def _inputs(batch: int, heads: int, kv_heads: int, keys: int, dim: int, dim_v: int, *, strided: bool = False, seed: int = 0):
    """``q (B, H, 1, D)`` as sdpa's layout transposed (as the attention modules pass it), ``k``/``v`` (B, Hkv, Lk, .);
    ``strided``: the cache rows of a longer preallocated cache (a static cache's slice)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 1, heads, dim, generator=generator).transpose(1, 2)
    room = keys + 7 if strided else keys
    key = torch.randn(batch, kv_heads, room, dim, generator=generator)[:, :, :keys]
    value = torch.randn(batch, kv_heads, room, dim_v, generator=generator)[:, :, :keys]
    return query, key, value


def _reference(query, key, value, top_k):
    """float64: sdpa's output in its layout, the top-k probabilities and keys per head, and their values' sum."""
    q, k, v = query.double(), key.double(), value.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    probs = torch.softmax(SCALING * q @ k.transpose(-1, -2), dim=-1)  # (B, H, 1, Lk)
    out = (probs @ v).transpose(1, 2)  # (B, 1, H, Dv)
    weights, index = probs.topk(min(top_k, k.shape[2]), dim=-1)  # (B, H, 1, k)
    picked = torch.gather(v, 2, index[:, :, 0, :, None].expand(*index.shape[:2], index.shape[-1], v.shape[-1]))
    sums = (weights[:, :, 0, :, None] * picked).sum(2, keepdim=True)  # (B, H, 1, Dv)
    return out, weights[:, :, 0], index[:, :, 0], sums


LAYOUTS = {
    "GQA 9 over 3, 130 keys (SmolLM2)": (1, 9, 3, 130, 64, 64, False),
    "batch 2, strided cache": (2, 4, 2, 37, 16, 16, True),
    "value width 20 != key width 24": (1, 6, 6, 50, 24, 20, False),
    "fewer keys than k": (2, 4, 1, 3, 8, 8, False),
    "one head, 300 keys": (1, 1, 1, 300, 32, 48, True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_compiled_step_equals_the_float64_reference(layout):
    batch, heads, kv_heads, keys, dim, dim_v, strided = LAYOUTS[layout]
    query, key, value = _inputs(batch, heads, kv_heads, keys, dim, dim_v, strided=strided)
    out, weights, index, sums = native_decode.attention_with_graph(query, key, value, scaling=SCALING, top_k=8)
    ref_out, ref_weights, ref_index, ref_sums = _reference(query, key, value, 8)
    picks = min(8, keys)
    assert out.shape == (batch, 1, heads, dim_v) and sums.shape == (batch, heads, 1, dim_v)
    assert weights.shape == index.shape == (batch, kv_heads, heads // kv_heads, picks) and index.dtype == torch.int64
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.reshape(batch, heads, picks).double(), ref_weights, rtol=1e-5, atol=1e-7)
    assert torch.equal(index.reshape(batch, heads, picks), ref_index)  # descending, as topk (random scores: no ties)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-6)


def test_decode_graph_sums_of_other_features_over_the_picks_equal_the_dense_graph(monkeypatch):
    """Features shared by the heads (hidden / input) and per-KV-head features other than the values: the compiled
    sum over the picks, and the same with the compiled sum off (the picks scattered into a dense graph)."""
    query, key, value = _inputs(2, 6, 3, 40, 8, 8)
    _, graph = joint_decode.attention_with_graph(query, key, value, scaling=SCALING, top_k=5)
    assert graph.adjacency is None and graph.weights is not None
    dense = graph.dense()
    assert dense.shape == (2, 3, 2, 40) and torch.equal((dense > 0).sum(-1), torch.full((2, 3, 2), 5))
    generator = torch.Generator().manual_seed(3)
    for features in (torch.randn(2, 1, 40, 7, generator=generator), torch.randn(2, 3, 40, 7, generator=generator)):
        expected = (dense.double() @ features.double().expand(2, 3, 40, 7)).reshape(2, 6, 1, 7)
        got = joint_decode.decode_graph_sum(graph, features)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        from gin_adapter import native_graph_sum

        monkeypatch.setattr(native_graph_sum, "ENABLED", False)
        torch.testing.assert_close(joint_decode.decode_graph_sum(graph, features).double(), expected, rtol=1e-5, atol=1e-6)
        monkeypatch.setattr(native_graph_sum, "ENABLED", True)
    assert joint_decode.decode_graph_sum(graph, value) is graph.value_sums  # the values: the kernel's own sums


@pytest.mark.parametrize("case", ["disabled", "k above 64", "compiling"])
def test_aten_operators_where_the_kernel_does_not_apply(case, monkeypatch):
    query, key, value = _inputs(1, 4, 2, 80, 8, 8)
    top_k = 65 if case == "k above 64" else 4
    if case == "disabled":
        monkeypatch.setattr(native_decode, "ENABLED", False)
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert native_decode.attention_with_graph(query, key, value, scaling=SCALING, top_k=top_k) is None
    out, graph = joint_decode.attention_with_graph(query, key, value, scaling=SCALING, top_k=top_k)
    assert graph.adjacency is not None  # ATen's dense graph
    torch.testing.assert_close(out.double(), _reference(query, key, value, top_k)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["GQA 9 over 3, 130 keys (SmolLM2)", "batch 2, strided cache", "value width 20 != key width 24"])
def test_compiled_threshold_step_equals_the_float64_reference_and_atens(layout, monkeypatch):
    """The published rule's decode graph: ``S [S > threshold]``, ``S = sigmoid(alpha (min(1, sum_h P_h) - tau))``,
    with peaked attention so that some keys pass the threshold, some do not, and some sums reach the cap of 1."""
    from gin_adapter import GinConfig
    from gin_adapter.adjacency import AdjacencyRule
    from gin_adapter.joint_threshold import decode_attention_with_threshold_graph

    batch, heads, kv_heads, keys, dim, dim_v, strided = LAYOUTS[layout]
    query, key, value = _inputs(batch, heads, kv_heads, keys, dim, dim_v, strided=strided)
    query = query * 4
    rule = AdjacencyRule.from_config(GinConfig.published())
    out, adjacency = native_decode.threshold_attention(query, key, value, scaling=SCALING, alpha=rule.sharpen_alpha, tau=rule.sharpen_tau,
                                                       threshold=rule.threshold)
    q, k, v = query.double(), key.double(), value.double()
    groups = heads // kv_heads
    probs = torch.softmax(SCALING * q @ k.repeat_interleave(groups, 1).transpose(-1, -2), dim=-1)[:, :, 0]  # (B, H, Lk)
    summed = probs.sum(1)
    sharpened = torch.sigmoid(rule.sharpen_alpha * (summed.clamp(max=1.0) - rule.sharpen_tau))
    expected = sharpened * (sharpened > rule.threshold)
    assert 0 < (expected > 0).sum() < expected.numel()
    assert (summed > 1).any() or heads < 9  # the cap reached where 9 heads are summed
    torch.testing.assert_close(adjacency.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), _reference(query, key, value, 1)[0], rtol=1e-5, atol=1e-6)
    built_out, built = decode_attention_with_threshold_graph(query, key, value, scaling=SCALING, rule=rule)
    monkeypatch.setattr(native_decode, "ENABLED", False)
    aten_out, aten = decode_attention_with_threshold_graph(query, key, value, scaling=SCALING, rule=rule)
    torch.testing.assert_close(built_out, aten_out, rtol=1e-4, atol=1e-5)  # two float32 computations
    torch.testing.assert_close(built.adjacency, aten.adjacency, rtol=1e-4, atol=1e-5)


def test_same_bits_on_any_thread_count():
    """Both decode kernels split the heads over threads from 65,536 multiply-adds (SmolLM2's 9 heads over 130 keys
    are above it): each head's results are one thread's, the published rule's head sum runs in head order."""
    query, key, value = _inputs(*LAYOUTS["GQA 9 over 3, 130 keys (SmolLM2)"][:6])
    before = torch.get_num_threads()
    top_k, threshold = [], []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            top_k.append(native_decode.attention_with_graph(query, key, value, scaling=SCALING, top_k=8))
            threshold.append(native_decode.threshold_attention(query * 4, key, value, scaling=SCALING, alpha=10.0, tau=0.5, threshold=0.1))
    finally:
        torch.set_num_threads(before)
    for results in (top_k, threshold):
        assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


def test_threshold_step_keeps_nan_where_atens_does(monkeypatch):
    """A NaN in the scores reaches the graph as NaN in both steps (ATen's clamp and product keep it)."""
    from gin_adapter import GinConfig
    from gin_adapter.adjacency import AdjacencyRule
    from gin_adapter.joint_threshold import decode_attention_with_threshold_graph

    query, key, value = _inputs(1, 4, 2, 20, 8, 8)
    key = key.clone()
    key[0, 0, 3, 0] = float("nan")
    rule = AdjacencyRule.from_config(GinConfig.published())
    _, compiled = decode_attention_with_threshold_graph(query, key, value, scaling=SCALING, rule=rule)
    monkeypatch.setattr(native_decode, "ENABLED", False)
    _, aten = decode_attention_with_threshold_graph(query, key, value, scaling=SCALING, rule=rule)
    assert torch.isnan(aten.adjacency).any()
    assert torch.equal(torch.isnan(compiled.adjacency), torch.isnan(aten.adjacency))
