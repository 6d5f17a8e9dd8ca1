"""One decoded token's attention and top-k graph from one score computation (gin_adapter/joint_decode.py): equal to
sdpa followed by the separate decode step, taken on every layer and decoded token where it applies, and only there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_adapter, tiny_model

from gin_adapter import GinConfig, get_gin_model
from gin_adapter import joint as joint_module
from gin_adapter import joint_decode, native_decode
from gin_adapter.adjacency import AdjacencyRule
from gin_adapter.aggregate import neighbour_sums
from gin_adapter.joint_decode import attention_with_graph, decode_applies, decode_graph_sum
from gin_adapter.topk_sum import topk_neighbour_sum

SCALING = 8**-0.5


def _decode_inputs(keys: int = 20, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 6, 1, 8, generator=generator)  # 6 query heads over 3 KV heads
    key, value = (torch.randn(2, 3, keys, 8, generator=generator) for _ in range(2))
    shared = torch.randn(2, 1, keys, 5, generator=generator)  # features shared by the heads (hidden / input)
    return query, key, value, shared


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "aten"])
@pytest.mark.parametrize("keys", [3, 20])  # fewer keys than k: every key is a neighbour
def test_decode_attention_equals_sdpa_and_its_sums_equal_the_separate_decode_step(keys, compiled, monkeypatch):
    """Both forms of the step: one compiled call (the graph as its picks, gin_adapter.native_decode) and ATen's."""
    if compiled and not native_decode.available():
        pytest.skip("gin_adapter's compiled kernels are not built")
    monkeypatch.setattr(native_decode, "ENABLED", compiled)
    query, key, value, shared = _decode_inputs(keys)
    out, graph = attention_with_graph(query, key, value, scaling=SCALING, top_k=4)
    assert (graph.adjacency is None) == compiled
    expected = F.scaled_dot_product_attention(query, key, value, enable_gqa=True).transpose(1, 2)  # sdpa's layout (B, 1, H, D)
    assert out.shape == expected.shape == (2, 1, 6, 8)
    assert torch.allclose(out, expected, atol=1e-6)
    for features in (value, shared):
        separate = topk_neighbour_sum(query, key, features.expand(2, 3, keys, features.shape[-1]), None, top_k=4, scaling=SCALING)
        assert torch.allclose(decode_graph_sum(graph, features), separate, atol=1e-6)
    assert (graph.dense() > 0).sum(-1).eq(min(4, keys)).all()


@pytest.mark.parametrize("shared_features", [False, True])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "aten"])
def test_decode_reference_sum_equals_the_generic_chain_self_loops(shared_features, compiled, monkeypatch):
    """``graph="reference"``: the new token's own weight times its own features (zero when it is not in its top k)."""
    if compiled and not native_decode.available():
        pytest.skip("gin_adapter's compiled kernels are not built")
    monkeypatch.setattr(native_decode, "ENABLED", compiled)
    query, key, value, shared = _decode_inputs()
    features = shared if shared_features else value
    _, graph = attention_with_graph(query, key, value, scaling=SCALING, top_k=4)
    rule = AdjacencyRule.from_config(GinConfig(graph="reference", top_k=4, backend="dense"))
    expected = neighbour_sums(query, key, features, None, rule, SCALING, groups=2)
    got = decode_graph_sum(graph, features, reference=True)
    assert torch.allclose(got, expected.expand_as(got), atol=1e-6)
    own = graph.dense()[..., -1]  # (B, Hkv, G): some heads keep the token itself, some do not
    assert (own > 0).any() and (own == 0).any()


def test_decode_applies_only_where_it_reproduces_sdpa():
    query, key, value, _ = _decode_inputs()
    assert decode_applies(query, key, value, None, {})
    assert not decode_applies(query, key, value, torch.ones(2, 1, 1, 20, dtype=torch.bool), {})  # a mask (padding)
    assert not decode_applies(torch.randn(2, 6, 2, 8), key, value, None, {})  # two new tokens
    assert not decode_applies(query.bfloat16(), key.bfloat16(), value.bfloat16(), None, {})
    assert not decode_applies(query.requires_grad_(True), key, value, None, {})
    query = query.detach()
    for extra in (dict(dropout=0.1), dict(softcap=30.0), dict(sliding_window=8), dict(sinks=torch.zeros(6)), dict(position_bias=torch.zeros(1))):
        assert not decode_applies(query, key, value, None, extra), extra
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not decode_applies(query, key, value, None, {})


def assert_generation_takes_the_decode_graph(config: GinConfig, module, function_name: str, monkeypatch) -> None:
    """Greedy generation on a tiny model: ``module.function_name`` builds the graph on every layer and decoded token
    with the joint path on and never with it off, and both give the same tokens and logits (up to 1e-5)."""
    model = get_gin_model(tiny_model(num_key_value_heads=2), config)
    perturb_adapter(model)
    model.eval()
    calls = []
    real = getattr(module, function_name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function_name, spy)
    prompt = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(0))
    runs = {}
    for enabled in (True, False):
        monkeypatch.setattr(joint_module, "ENABLED", enabled)
        calls.clear()
        with torch.no_grad():
            runs[enabled] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        assert len(calls) == (2 * 5 if enabled else 0)  # 2 layers x the 5 tokens decoded after the prompt's forward
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for joint_step, separate_step in zip(runs[True].logits, runs[False].logits):
        assert torch.allclose(joint_step, separate_step, atol=1e-5)


@pytest.mark.parametrize("config", [dict(), dict(node_features="hidden", hidden_dim=8), dict(node_features="hidden", hidden_dim=8, graph="reference")],
                         ids=["values", "hidden", "hidden-reference"])
def test_generation_takes_the_joint_decode_step_on_every_layer_and_token_and_matches_the_separate_path(config, monkeypatch):
    assert_generation_takes_the_decode_graph(GinConfig(top_k=4, **config), joint_decode, "attention_with_graph", monkeypatch)


@pytest.mark.parametrize("graph", ["gin", "reference"])
def test_published_rule_decode_graph_equals_sdpa_and_the_separate_kernel(graph):
    """The published rule's graph for one decoded token, built with the attention: sdpa's output, and the
    separate kernel's neighbour sums for shared features and for the values (repeated over the query groups)."""
    from gin_adapter.joint_threshold import decode_attention_with_threshold_graph, threshold_graph_sum
    from gin_adapter.threshold_sum import threshold_neighbour_sum

    rule = AdjacencyRule.from_config(GinConfig.published(graph=graph))
    query, key, value, shared = _decode_inputs(20)
    query = query * 3  # peaked attention: some summed weights pass the threshold, some do not
    out, built = decode_attention_with_threshold_graph(query, key, value, scaling=SCALING, rule=rule)
    expected = F.scaled_dot_product_attention(query, key, value, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    dense = built.adjacency if graph == "gin" else None
    if dense is not None:
        assert dense.shape == (2, 1, 20) and 0 < (dense > 0).sum() < dense.numel()
    for features in (value, shared):
        separate = threshold_neighbour_sum(query, key, features, None, rule, scaling=SCALING)
        got = threshold_graph_sum(built, features, groups=2)
        assert got.shape == separate.shape and torch.allclose(got, separate, atol=1e-6)
        assert got.abs().sum() > 0


@pytest.mark.parametrize("graph", ["gin", "reference"])
def test_published_preset_generation_takes_its_decode_graph_and_matches_the_separate_path(graph, monkeypatch):
    """The same for the published preset (its head-summed threshold graph), both operators."""
    from gin_adapter import joint_threshold

    config = GinConfig.published(graph=graph, hidden_dim=8, dropout=0.0)
    assert_generation_takes_the_decode_graph(config, joint_threshold, "decode_attention_with_threshold_graph", monkeypatch)
