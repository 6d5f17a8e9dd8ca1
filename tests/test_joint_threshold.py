"""The attention and the published rule's graph from one score computation (gin_adapter/joint_threshold.py): equal
to sdpa followed by the separate fused kernel, in values and gradients, and used only where it fits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import joint_training_step, tiny_model

from gin_adapter import GinConfig, get_gin_model, gin_layers
from gin_adapter import joint_threshold
from gin_adapter.adjacency import AdjacencyRule
from gin_adapter.joint_threshold import attention_with_threshold_graph, threshold_graph_sum
from gin_adapter.threshold_sum import threshold_neighbour_sum


def _rule(graph: str, threshold: float = 0.6) -> AdjacencyRule:
    return AdjacencyRule.from_config(GinConfig.published(hidden_dim=6, graph=graph, threshold=threshold))


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("graph,form", [("gin", "dense"), ("gin", "top_k"), ("reference", "diagonal")])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 7])
@pytest.mark.parametrize("threshold", [0.6, 0.05], ids=["published", "keeps_every_visible_key"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "aten"])
def test_joint_threshold_equals_sdpa_and_the_separate_kernel(graph, form, padding, chunk_rows, threshold, keep, compiled, monkeypatch):
    """Attention output, the neighbour sums of the values and of features shared by the heads, and the gradients
    to q, k, v and the shared features all equal sdpa + ``threshold_neighbour_sum``, with the graph kept whole,
    as each row's ``K = floor(H / w_min)`` largest entries (28 for 4 heads at the published threshold; a threshold
    below ``sigmoid(-alpha tau)`` has no such bound and is refused) or as its diagonal, and the probabilities
    recomputed in backward or kept from forward (``keep_probabilities``); with the compiled softmax backward
    (the ``top_k`` form's sparse graph gradient goes through it) and with ATen's."""
    from gin_adapter import native_score_rows, topk_sum

    monkeypatch.setattr(native_score_rows, "ENABLED", compiled)

    if chunk_rows:
        monkeypatch.setattr(topk_sum, "QUERY_CHUNK_ROWS", chunk_rows)
    rule = _rule(graph, threshold)
    generator = torch.Generator().manual_seed(7)
    if form == "top_k" and threshold < 0.5:
        with pytest.raises(ValueError, match="keeps keys of any weight"):
            attention_with_threshold_graph(torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), None, scaling=1.0, rule=rule, form=form)
        return
    q = (3 * torch.randn(2, 4, 40, 8, generator=generator)).requires_grad_()  # peaked rows: head sums above 1 occur
    k, v = (torch.randn(2, 2, 40, 8, generator=generator, requires_grad=True) for _ in range(2))
    shared = torch.randn(2, 1, 40, 6, generator=generator, requires_grad=True)
    mask = None
    if padding:
        mask = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
        mask[0, ..., :3] = False  # sample 0 left-padded by 3 tokens
        mask[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    upstream = [torch.randn(2, 4, 40, d, generator=generator) for d in (8, 8)] + [torch.randn(2, 1, 40, 6, generator=generator)]

    def separate():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return (out, threshold_neighbour_sum(q, k, v, mask, rule, scaling=8**-0.5), threshold_neighbour_sum(q, k, shared, mask, rule, scaling=8**-0.5))

    def joint():
        out, built = attention_with_threshold_graph(q, k, v, mask, scaling=8**-0.5, rule=rule, form=form, keep_probabilities=keep)
        assert built.form == form
        return out, threshold_graph_sum(built, v, groups=2), threshold_graph_sum(built, shared, groups=2)

    results = []
    for fn in (separate, joint):
        outputs = fn()
        loss = sum((o * w).sum() for o, w in zip(outputs, upstream))
        results.append([o.detach() for o in outputs] + list(torch.autograd.grad(loss, (q, k, v, shared))))
    for name, a, b in zip(["out", "sum of values", "sum of shared", "dq", "dk", "dv", "d shared"], *results):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    graph_only = torch.autograd.grad(threshold_graph_sum(attention_with_threshold_graph(q, k, v, mask, scaling=8**-0.5, rule=rule, form=form)[1],
                                                         shared, 2).sum(), q)[0]
    assert graph_only.abs().sum() > 0  # the graph's own gradient reaches the queries


def _step(config: GinConfig, enabled: bool, length: int, padding: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, int]:
    return joint_training_step(config, joint_enabled=enabled, spied=(joint_threshold, "attention_with_threshold_graph"),
                               monkeypatch=monkeypatch, length=length, padding=padding, pad_tokens=5)


@pytest.mark.parametrize("graph", ["gin", "reference"])
@pytest.mark.parametrize("padding", [False, True])
def test_training_the_published_preset_with_the_joint_path_equals_the_separate_path(graph, padding, monkeypatch):
    """A training step of ``GinConfig.published()`` (hidden-state features, dropout off) gives the same loss and
    adapter gradients with the graph built beside the attention as with sdpa + the separate kernel."""
    config = GinConfig.published(hidden_dim=8, graph=graph, dropout=0.0)
    joint_loss, joint_grads, joint_calls = _step(config, True, 48, padding, monkeypatch)
    loss, grads, calls = _step(config, False, 48, padding, monkeypatch)
    assert joint_calls > 0 and calls == 0
    assert torch.allclose(joint_loss, loss, atol=1e-6)
    assert torch.allclose(joint_grads, grads, atol=1e-6, rtol=1e-4)


def test_where_the_graph_is_kept_and_where_the_separate_kernel_runs(monkeypatch):
    """``graph="gin"`` keeps the whole graph up to ``Lk = H * D`` keys (64 in the tiny model) and each row's
    ``K = floor(H / w_min)`` largest entries (28 for its 4 heads) from ``8 K`` = 224 keys on; in between the
    separate kernel runs. The self-loop operator keeps only the diagonal and always may."""
    published = GinConfig.published(hidden_dim=8, graph="gin", dropout=0.0)
    assert _step(published, True, 64, False, monkeypatch)[2] > 0
    assert _step(published, True, 65, False, monkeypatch)[2] == 0
    assert _step(published, True, 223, False, monkeypatch)[2] == 0
    assert _step(published, True, 224, False, monkeypatch)[2] > 0
    assert _step(GinConfig.published(hidden_dim=8, graph="reference", dropout=0.0), True, 65, False, monkeypatch)[2] > 0


@pytest.mark.parametrize("padding", [False, True])
def test_training_with_the_top_k_form_of_the_graph_equals_the_separate_path(padding, monkeypatch):
    """The same step as above with the graph kept as each row's 28 largest entries (forced at 48 tokens)."""
    monkeypatch.setattr(joint_threshold, "TOP_K_STORAGE_MIN_KEYS_PER_PICK", 1)
    forms = []
    from gin_adapter import aggregate

    monkeypatch.setattr(aggregate, "threshold_graph_sum", lambda graph, *a: forms.append(graph.form) or threshold_graph_sum(graph, *a))
    config = GinConfig.published(hidden_dim=8, graph="gin", dropout=0.0)
    joint_loss, joint_grads, joint_calls = _step(config, True, 48, padding, monkeypatch)
    loss, grads, _ = _step(config, False, 48, padding, monkeypatch)
    assert joint_calls > 0 and set(forms) == {"top_k"}
    assert torch.allclose(joint_loss, loss, atol=1e-6)
    assert torch.allclose(joint_grads, grads, atol=1e-6, rtol=1e-4)


def test_the_joint_rule_follows_the_active_adapters():
    """The attention builds the graph only when every active adapter would build the same one."""
    model = get_gin_model(tiny_model(), GinConfig.published(hidden_dim=8))
    model.add_adapter("messages", GinConfig.published(hidden_dim=8, graph="gin"))
    model.add_adapter("dense", GinConfig.published(hidden_dim=8, backend="dense"))
    model.add_adapter("topk", GinConfig(hidden_dim=8))
    layer = gin_layers(model)[0]
    assert layer._joint_rule_for(["default"]) == layer.gin_rules["default"]
    assert layer._joint_rule_for(["default", "messages"]) is None  # different operators: different graphs
    assert layer._joint_rule_for(["dense"]) is None  # an explicit backend keeps the generic chain
    assert layer._joint_rule_for(["default", "topk"]) is None
    assert layer._joint_rule_for(["topk"]).top_k == 8
