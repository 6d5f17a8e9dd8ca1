"""The attention and the top-k graph from one score computation (gin_adapter/joint.py): equal to sdpa followed by
the separate fused kernel, in values and in gradients, and used only where it reproduces sdpa."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import joint_training_step, tiny_model

from gin_adapter import GinConfig, get_gin_model, gin_layers
from gin_adapter import joint as joint_module
from gin_adapter.joint import attention_with_graph, graph_sum, joint_applies
from gin_adapter.topk_sum import topk_neighbour_sum


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("sum_mode", ["dense", "gather"])
@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("length", [12, 40])
def test_joint_equals_sdpa_and_the_separate_kernel(length, padding, chunk_rows, sum_mode, keep, monkeypatch):
    """Attention output, neighbour sums of two kinds of node features (the values; features shared by the heads),
    and the gradients to q, k, v and the features all equal sdpa + ``topk_neighbour_sum``, with the joint graph's
    sums formed densely or by gathering the picked rows, and the probabilities recomputed in backward or kept."""
    from gin_adapter import topk_sum

    if chunk_rows:
        monkeypatch.setattr(topk_sum, "QUERY_CHUNK_ROWS", chunk_rows)
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(2, 4, length, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, length, 8, generator=generator, requires_grad=True) for _ in range(2))
    shared = torch.randn(2, 1, length, 6, generator=generator, requires_grad=True)
    mask = None
    if padding:
        mask = torch.ones(2, 1, length, length, dtype=torch.bool).tril()
        mask[0, ..., :3] = False  # sample 0 left-padded by 3 tokens
        mask[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    weights = [torch.randn(2, 4, length, d, generator=generator) for d in (8, 8, 6)]
    features = shared.expand(2, 2, length, 6)

    def separate():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return out, topk_neighbour_sum(q, k, v, mask, top_k=3, scaling=8**-0.5), topk_neighbour_sum(q, k, features, mask, top_k=3, scaling=8**-0.5)

    def joint():
        out, graph = attention_with_graph(q, k, v, mask, scaling=8**-0.5, top_k=3, keep_probabilities=keep)
        return out, graph_sum(graph, v, sum_mode), graph_sum(graph, features, sum_mode)

    results = []
    for fn in (separate, joint):
        outputs = fn()
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        results.append([o.detach() for o in outputs] + list(torch.autograd.grad(loss, (q, k, v, shared))))
    for name, a, b in zip(["out", "sum of values", "sum of shared", "dq", "dk", "dv", "d shared"], *results):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("fields", [dict(), dict(preset="published", graph="gin")], ids=["top-k", "published"])
def test_recompute_adjacency_false_keeps_the_probabilities_and_backward_scores_no_chunk_again(fields, recompute, monkeypatch):
    """``GinConfig(recompute_adjacency=False)``: the graph built with the attention keeps every chunk's probabilities,
    so backward scores no chunk again (one ``_scores`` call per chunk and layer, in forward); by default every chunk
    is scored again in backward. Gradients are the same either way (the equality tests above, both ways)."""
    from gin_adapter import joint_threshold, native_attention_graph, threshold_sum, topk_sum

    monkeypatch.setattr(topk_sum, "QUERY_CHUNK_ROWS", 8)
    monkeypatch.setattr(native_attention_graph, "ENABLED", False)  # ATen's chunked form (the compiled kernel recomputes, as sdpa)
    calls = []
    for module in (joint_module, threshold_sum):
        monkeypatch.setattr(module, "_scores", lambda *a, _scores=module._scores, **kw: calls.append(1) or _scores(*a, **kw))
    fields = dict(fields)  # the parametrized dict is shared between the cases
    preset = fields.pop("preset", None)
    config = (GinConfig.published if preset else GinConfig)(hidden_dim=8, recompute_adjacency=recompute, **fields)
    model = get_gin_model(tiny_model(num_hidden_layers=2), config)
    model.train()
    spied = (joint_module, "attention_with_graph") if not preset else (joint_threshold, "attention_with_threshold_graph")
    used = []
    original = getattr(*spied)
    monkeypatch.setattr(*spied, lambda *a, **kw: used.append(kw["keep_probabilities"]) or original(*a, **kw))
    ids = torch.randint(3, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()  # so the first layer's attention needs backward too
    loss = model(inputs_embeds=embeds, labels=ids).loss
    forward_calls = len(calls)
    loss.backward()
    assert used == [not recompute] * 2 and forward_calls == 2 * 4  # two layers, four chunks of 8 rows
    assert len(calls) == forward_calls * (2 if recompute else 1)


@pytest.mark.parametrize("used", ["output", "graph"])
def test_joint_gradients_when_only_the_output_or_only_the_graph_is_used(used, monkeypatch):
    """With only one of the two results in the loss the other gets no gradient (not a zero-filled one): the
    gradients to q, k, v equal sdpa's alone, or the separate kernel's alone."""
    received = []
    backward = joint_module._AttentionWithGraph._backward
    monkeypatch.setattr(joint_module._AttentionWithGraph, "_backward",
                        staticmethod(lambda ctx, grad_out, grad_weights: received.append((grad_out, grad_weights)) or backward(ctx, grad_out, grad_weights)))
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 24, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, 24, 8, generator=generator, requires_grad=True) for _ in range(2))
    upstream = torch.randn(2, 4, 24, 8, generator=generator)
    out, graph = attention_with_graph(q, k, v, None, scaling=8**-0.5, top_k=3)
    if used == "output":
        got, expected = out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        got, expected = graph_sum(graph, v), topk_neighbour_sum(q, k, v, None, top_k=3, scaling=8**-0.5)
    grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, torch.autograd.grad((expected * upstream).sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-5), name
    (grad_out, grad_weights), = received
    assert (grad_weights is None) == (used == "output") and (grad_out is None) == (used == "graph")


def _loss_and_grads(config: GinConfig, enabled: bool, padding: bool, monkeypatch, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    return joint_training_step(config, joint_enabled=enabled, spied=(joint_module, "attention_with_graph"), monkeypatch=monkeypatch,
                               padding=padding, autocast=autocast)


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("fields", [dict(), dict(node_features="hidden"), dict(adjacency_grad=False), dict(top_k=3), dict(graph="reference"),
                                    dict(node_features="hidden", graph="reference"), dict(graph="reference", adjacency_grad=False)],
                         ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()) or "default")
def test_training_with_the_joint_path_equals_the_separate_path(fields, padding, monkeypatch):
    """A training step of a wrapped model (three query chunks, optional left padding) gives the same loss and
    adapter gradients with the graph built beside the attention as with sdpa + the separate kernel (for
    ``graph="reference"``: + the generic chain's self-loop sum)."""
    config = GinConfig(hidden_dim=8, **fields)
    joint_loss, joint_grads, joint_calls = _loss_and_grads(config, True, padding, monkeypatch)
    loss, grads, calls = _loss_and_grads(config, False, padding, monkeypatch)
    assert joint_calls > 0 and calls == 0
    assert torch.allclose(joint_loss, loss, atol=1e-6)
    assert torch.allclose(joint_grads, grads, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("fields", [dict(), dict(node_features="hidden"), dict(node_features="hidden", graph="reference")],
                         ids=["default", "hidden", "hidden-reference"])
def test_training_under_autocast_with_the_joint_path_matches_the_separate_path(fields, padding, monkeypatch):
    """Under bf16 autocast the joint path runs (in float32) and gives the loss and adapter gradients of sdpa (in
    bfloat16) + the separate kernel up to bfloat16 rounding of the attention output (here about 0.2-0.4 % of the
    gradient's norm). That the graphs and their gradients are the same is checked exactly, one level down, by
    ``test_joint_under_autocast_builds_the_separate_kernels_graph``."""
    config = GinConfig(hidden_dim=8, **fields)
    joint_loss, joint_grads, joint_calls = _loss_and_grads(config, True, padding, monkeypatch, autocast=True)
    loss, grads, calls = _loss_and_grads(config, False, padding, monkeypatch, autocast=True)
    assert joint_calls > 0 and calls == 0
    assert torch.allclose(joint_loss, loss, atol=1e-4)
    assert (joint_grads - grads).norm() < 0.02 * grads.norm()


@pytest.mark.parametrize("fields", [dict(backend="dense"), dict(backend="gather"), dict(sparsify="threshold", head_reduction="sum")])
def test_other_rules_and_explicit_backends_keep_the_separate_path(fields, monkeypatch):
    assert _loss_and_grads(GinConfig(hidden_dim=8, **fields), True, False, monkeypatch)[2] == 0


@pytest.mark.parametrize("case", ["plain", "no_grad", "bf16", "dropout", "softcap", "sliding_window", "sinks", "cache", "not_causal", "autocast", "float_mask"])
def test_joint_applies_only_where_it_reproduces_sdpa(case):
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    q = torch.randn(1, 2, 6, 4, generator=generator).to(dtype).requires_grad_(case != "no_grad")
    k = torch.randn(1, 2, 6, 4, generator=generator).to(dtype)
    if case == "cache":  # 3 new queries against 6 cached keys
        q = q[:, :, 3:]
    module = torch.nn.Module()
    module.is_causal = case != "not_causal"
    kwargs = {"dropout": {"dropout": 0.1}, "softcap": {"softcap": 30.0}, "sliding_window": {"sliding_window": 4},
              "sinks": {"s_aux": torch.zeros(2)}}.get(case, {})
    mask = torch.zeros(1, 1, 6, 6) if case == "float_mask" else None
    if case == "autocast":  # computed in float32 and rounded to the autocast dtype (bf16 inputs too)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert joint_applies(module, q, k, mask, kwargs) and joint_applies(module, q.bfloat16(), k.bfloat16(), mask, kwargs)
        return
    assert joint_applies(module, q, k, mask, kwargs) == (case == "plain")


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_joint_under_autocast_builds_the_separate_kernels_graph(input_dtype):
    """Under ``torch.autocast(bfloat16)`` the joint path computes in float32: its neighbour sums and their gradients
    equal the separate kernel's (which builds the graph in float32 too) for the same q, k, v; its attention output
    is rounded to bfloat16 as sdpa's is and equals sdpa's up to bfloat16 rounding (sdpa rounds q and k first)."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 40, 8, generator=generator).to(input_dtype).requires_grad_(True)
    k, v = (torch.randn(2, 2, 40, 8, generator=generator).to(input_dtype).requires_grad_(True) for _ in range(2))
    weights = torch.randn(2, 4, 40, 8, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, graph = attention_with_graph(q, k, v, None, scaling=8**-0.5, top_k=3)
        out = joint_module.sdpa_layout(out)
        sums = graph_sum(graph, v)
        separate = topk_neighbour_sum(q, k, v, None, top_k=3, scaling=8**-0.5)
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert out.dtype == reference.dtype == torch.bfloat16 and out.shape == (2, 40, 4, 8)
    assert torch.allclose(out.float(), reference.float(), atol=3e-2)
    assert sums.dtype == torch.float32
    assert torch.allclose(sums, separate, atol=1e-6)
    joint_grads = torch.autograd.grad((sums * weights).sum(), (q, k, v), retain_graph=True)
    separate_grads = torch.autograd.grad((separate * weights).sum(), (q, k, v))
    # both float32 sums rounded to the input dtype: bfloat16 may round a float32 difference in the last place either
    # way (the compiled backward adds in another order), one bfloat16 step, 2^-8 relative
    rtol = 2**-7 if input_dtype == torch.bfloat16 else 1e-5
    for name, a, b in zip("qkv", joint_grads, separate_grads):
        assert a.dtype == input_dtype and torch.allclose(a.float(), b.float(), atol=1e-5, rtol=rtol), name
    out_grads = torch.autograd.grad(out.float().sum(), (q, k, v), retain_graph=True)
    reference_grads = torch.autograd.grad(reference.float().sum(), (q, k, v))
    for name, a, b in zip("qkv", out_grads, reference_grads):
        assert torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2), name


def test_the_joint_k_follows_the_active_adapters_and_replaced_configs(monkeypatch):
    """The wrapper works out once per set of active adapters whether the attention may build their graph; adding,
    switching or replacing an adapter must not leave a stale answer (a stale ``k`` would build the wrong graph)."""
    torch.manual_seed(0)
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, top_k=4))
    model.add_adapter("threshold", GinConfig(hidden_dim=8, sparsify="threshold", head_reduction="sum"))
    model.add_adapter("k2", GinConfig(hidden_dim=8, top_k=2))
    layer = gin_layers(model)[0]
    assert layer._joint_rule_for(["default"]).top_k == 4
    assert layer._joint_rule_for(["threshold"]).fused_threshold  # the published rule's own joint path
    assert layer._joint_rule_for(["default", "threshold"]) is None
    assert layer._joint_rule_for(["default", "k2"]) is None  # two different k: the separate kernel
    seen = []
    original = joint_module.attention_with_graph
    monkeypatch.setattr(joint_module, "attention_with_graph", lambda *a, **kw: seen.append(kw["top_k"]) or original(*a, **kw))
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    model.train()

    def ks_seen() -> set[int]:
        seen.clear()
        model(ids, labels=ids).loss.backward()
        return set(seen)

    model.base_model.set_adapter(["default"])  # a list: PEFT assigns the same object again when an adapter is replaced
    assert ks_seen() == {4}
    last = gin_layers(model)[-1]  # (the first layer's q and k need no gradient: no joint path there)
    last.update_layer("default", GinConfig(hidden_dim=8, top_k=6), scale_init=0.0)
    assert last._joint_rule_for(["default"]).top_k == 6
    assert ks_seen() == {6}
    model.set_adapter("k2")
    assert ks_seen() == {2}


@pytest.mark.parametrize("q_len, k_len, chunk_rows", [(200, 200, 64), (40, 40, 64), (5, 5, 2), (3, 12, 64)])
def test_hiding_future_keys_follows_the_causal_rule(q_len, k_len, chunk_rows):
    """In-place masking of a chunk's future keys marks exactly the keys the causal rule hides, for every chunk of the
    plan: full chunks, a short last one, chunks widened to k keys past their rows, one chunk with more keys than rows."""
    from gin_adapter.topk_sum import _causal_visible, hide_future_keys, plan_chunks

    chunks = plan_chunks(q_len, k_len, 8, False, None, chunk_rows)
    assert any(chunk.k1 > chunk.q1 for chunk in chunks) == ((q_len, k_len) in {(5, 5), (3, 12)})
    for chunk in chunks:
        hidden = torch.zeros(2, 3, chunk.rows, chunk.k1 - chunk.k0, dtype=torch.bool)
        hide_future_keys(hidden, chunk, True)
        assert torch.equal(hidden, ~_causal_visible(chunk, None, hidden.device).expand_as(hidden)), chunk


def test_training_output_is_contiguous_for_modules_that_view_it():
    """The joint path returns the attention output contiguous in sdpa's layout, as sdpa does: JetMoE's attention
    ``.view``s it (its training step failed on a transposed view), and ``Tensor.to(memory_format=...)`` alone
    leaves a transposed view as it is."""
    from tiny_models import build

    from gin_adapter.joint import sdpa_layout

    out = sdpa_layout(torch.randn(2, 3, 5, 4))
    assert out.shape == (2, 5, 3, 4) and out.is_contiguous()
    base, why = build("jetmoe")
    if base is None:
        pytest.skip(why)
    model = get_gin_model(base, GinConfig())
    model.train()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
