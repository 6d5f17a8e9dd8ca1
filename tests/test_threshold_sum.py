"""The fused kernel for the published rule (gin_adapter/threshold_sum.py) equals the generic chain it replaces, in
values and in gradients, for both operators, both kinds of node features, padding, chunking, soft-capping and
sliding windows; and the published preset uses it."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_adapter, tiny_model

from gin_adapter import GinConfig, get_gin_model, gin_layers
from gin_adapter import threshold_sum as threshold_module
from gin_adapter.adjacency import AdjacencyRule, attention_probabilities, sparse_adjacency, visible_keys
from gin_adapter.aggregate import neighbour_sums, repeat_heads
from gin_adapter.threshold_sum import threshold_neighbour_sum


def _rule(graph: str, threshold: float = 0.6, backend: str = "auto") -> AdjacencyRule:
    return AdjacencyRule(head_reduction="sum", sparsify="threshold", top_k=8, sharpen_alpha=10.0, sharpen_tau=0.1, threshold=threshold,
                         graph=graph, backend=backend, recompute=False)


def _inputs(length: int, features_heads: int, padding: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(2, 4, length, 8, generator=generator)).requires_grad_()  # peaked rows: sums above 1 occur
    k = torch.randn(2, 2, length, 8, generator=generator, requires_grad=True)
    x = torch.randn(2, features_heads, length, 6, generator=generator, requires_grad=True)
    mask = None
    if padding:
        mask = torch.ones(2, 1, length, length, dtype=torch.bool).tril()
        mask[0, ..., :3] = False  # sample 0 left-padded by 3 tokens; its padding rows see nothing
    return q, k, x, mask


@pytest.mark.parametrize("graph", ["gin", "reference"])
@pytest.mark.parametrize("features_heads", [1, 2], ids=["shared", "values"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 7])
@pytest.mark.parametrize("variant", ["plain", "low_threshold", "softcap", "sliding_window"])
def test_fused_threshold_equals_the_generic_chain(graph, features_heads, padding, chunk_rows, variant):
    """Sums and gradients to q, k and the features equal :func:`neighbour_sums` with the same rule. A threshold
    below ``sigmoid(-alpha tau)`` keeps every visible key: invisible ones must still be left out."""
    q, k, x, mask = _inputs(40, features_heads, padding)
    threshold = 0.05 if variant == "low_threshold" else 0.6
    softcap = 2.0 if variant == "softcap" else None
    window = 9 if variant == "sliding_window" else None
    rule = _rule(graph, threshold, backend="dense")
    upstream = torch.randn(2, 4 if features_heads > 1 else 1, 40, 6, generator=torch.Generator().manual_seed(1))
    fused = threshold_neighbour_sum(q, k, x, mask, rule, scaling=8**-0.5, softcap=softcap,
                                    sliding_window=window, chunk_rows=chunk_rows)
    generic = neighbour_sums(q, k, x, mask, rule, scaling=8**-0.5, softcap=softcap, sliding_window=window, groups=2)
    assert fused.shape == generic.shape
    assert torch.allclose(fused, generic, atol=1e-5)
    fused_grads = torch.autograd.grad((fused * upstream).sum(), (q, k, x))
    generic_grads = torch.autograd.grad((generic * upstream).sum(), (q, k, x))
    for name, a, b in zip(("dq", "dk", "dx"), fused_grads, generic_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), name
    assert fused_grads[0].abs().sum() > 0  # the graph's gradient reaches the queries


def test_the_test_inputs_reach_every_branch_of_the_rule():
    """The equality test above would prove little if no entry were clamped, kept or dropped: its inputs do all three."""
    q, k, _, mask = _inputs(40, 1, padding=True)
    visible = visible_keys(mask, 40, 40, q.device)
    summed = attention_probabilities(q, repeat_heads(k, 2), visible, 8**-0.5).sum(dim=1)
    sharpened = torch.sigmoid(10 * (summed.clamp(max=1.0) - 0.1))
    assert (summed > 1).any() and (visible[:, 0] & (sharpened > 0.6)).any() and (visible[:, 0] & (sharpened <= 0.6)).any()


def test_decoding_one_token_and_no_gradient_paths_agree():
    """One decoded token (no mask, every cached key visible) and an inference call give the training values."""
    q, k, x, _ = _inputs(30, 1, padding=False)
    rule = _rule("gin")
    with torch.no_grad():
        full = threshold_neighbour_sum(q, k, x, None, rule, scaling=8**-0.5)
        last = threshold_neighbour_sum(q[:, :, -1:], k, x, None, rule, scaling=8**-0.5)
    assert torch.allclose(last, full[:, :, -1:], atol=1e-6)


@pytest.mark.parametrize("graph", ["gin", "reference"])
def test_published_preset_runs_the_fused_kernel_with_the_generic_chains_numbers(graph, monkeypatch):
    """A training step of the published preset (backend "auto": the fused kernel) gives the loss and adapter
    gradients of backend "dense" (the generic chain), on a model with padding."""
    calls = []
    original = threshold_module._forward
    monkeypatch.setattr(threshold_module, "_forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    results = []
    for backend in ("auto", "dense"):
        torch.manual_seed(0)
        model = get_gin_model(tiny_model(), GinConfig.published(hidden_dim=8, graph=graph, dropout=0.0, backend=backend))
        perturb_adapter(model)
        assert all(layer.gin_rules["default"].fused_threshold == (backend == "auto") for layer in gin_layers(model))
        model.train()
        ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, :9] = 0
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
        if backend == "auto":
            assert calls, "the fused kernel did not run"
            calls.clear()
    assert not calls  # backend "dense" keeps the generic chain
    (fused_loss, fused_grads), (loss, grads) = results
    assert torch.allclose(fused_loss, loss, atol=1e-6)
    assert torch.allclose(fused_grads, grads, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("graph", ["gin", "reference"])
def test_threshold_kernel_compiles_without_graph_breaks(graph):
    """``torch.compile(fullgraph=True)`` traces the kernel (autograd function, query chunks, padding mask) in one
    graph; values and gradients equal the eager kernel's (``aot_eager``: inductor's tracing without the C++ build)."""
    torch._dynamo.reset()
    q, k, x, mask = _inputs(40, 1, padding=True)
    rule = _rule(graph)

    def kernel(q, k, x, mask):
        return threshold_neighbour_sum(q, k, x, mask, rule, scaling=8**-0.5, chunk_rows=16)

    compiled = torch.compile(kernel, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (kernel, compiled):
        out = fn(q, k, x, mask)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, x))))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for eager_grad, compiled_grad in zip(results[0][1], results[1][1]):
        assert torch.allclose(eager_grad, compiled_grad, atol=1e-5)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0], ids=["flat", "plain", "peaked"])
def test_the_published_rule_keeps_at_most_heads_over_w_min_keys_per_row(scale):
    """docs/benchmarks.md's bound: a kept key has ``W_j > w_min = tau + logit(threshold) / alpha`` and the row's
    ``W`` sum to at most ``H`` (every head's probabilities sum to 1), so a row keeps fewer than ``H / w_min`` keys
    (64 for 9 heads and the published constants) however long the sequence; with flat attention rows get close."""
    import math

    rule = _rule("gin")
    w_min = rule.sharpen_tau + math.log(rule.threshold / (1 - rule.threshold)) / rule.sharpen_alpha
    heads, length = 9, 600
    generator = torch.Generator().manual_seed(2)
    q = scale * torch.randn(1, heads, length, 16, generator=generator)
    k = torch.randn(1, heads, length, 16, generator=generator)
    visible = visible_keys(None, length, length, q.device)
    adjacency = sparse_adjacency(attention_probabilities(q, k, visible, 16**-0.5), visible, rule)
    kept = (adjacency > 0).sum(dim=-1)
    assert kept.max() <= math.floor(heads / w_min) == 64
    assert kept.max() > 8  # the bound is not vacuous here: rows keep many keys
