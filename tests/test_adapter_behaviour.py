"""The adapter's numbers: identity at init, causality, real message passing, backends, eager == sdpa, padding."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_adapter, tiny_model

from gin_adapter import GinConfig, get_gin_model, gin_layers


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("rule", [dict(), dict(sparsify="threshold", head_reduction="sum"), dict(graph="reference")])
def test_identity_at_init(attn, rule):
    base = tiny_model("llama", attn)
    ids = _ids()
    expected = base(ids).logits
    model = get_gin_model(base, GinConfig(hidden_dim=8, **rule))
    assert (model(ids).logits - expected).abs().max().item() < 1e-5


def test_linear_scale_schedule_is_not_identity():
    base = tiny_model("llama", num_hidden_layers=3)
    model = get_gin_model(base, GinConfig(hidden_dim=8, scale_init="linear", scale_max=0.5))
    scales = [layer.gin_blocks["default"].scale.item() for layer in gin_layers(model)]
    assert scales == pytest.approx([0.0, 0.25, 0.5])


@pytest.mark.parametrize("rule", [dict(), dict(head_reduction="mean", sparsify="none"), dict(sparsify="threshold", threshold=0.3)])
def test_causal(rule):
    """Changing token j > i never changes the output at position i."""
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, **rule))
    perturb_adapter(model)
    ids = _ids(1, 16)
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 128
    a, b = model(ids).logits, model(changed).logits
    assert (a[0, :10] - b[0, :10]).abs().max().item() < 1e-6
    assert (a[0, 10:] - b[0, 10:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("rule", [dict(sparsify="none"), dict(sparsify="topk", top_k=4), dict(sparsify="threshold", threshold=0.1, sharpen_tau=0.05)])
def test_message_passing_happens_in_graph_mode_only(rule):
    """Changing only the value (message) of key 2 changes query 9's neighbour sum in 'gin' mode, never in 'reference'.

    q and k are held fixed, so the adjacency is identical in both runs: any change is a message along 2 -> 9.
    """
    from gin_adapter.adjacency import AdjacencyRule
    from gin_adapter.attention import neighbour_sums

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=generator) for _ in range(3))
    v_changed = v.clone()
    v_changed[:, :, 2] += 1.0
    changes = {}
    for graph in ("gin", "reference"):
        adjacency_rule = AdjacencyRule.from_config(GinConfig(graph=graph, **rule))
        # make key 2 the strongest key of query 9 so top-k and threshold keep the edge
        k_strong = k.clone()
        k_strong[:, :, 2] = 3.0 * q[:, :, 9]
        a = neighbour_sums(q, k_strong, v, None, adjacency_rule, scaling=8**-0.5)
        b = neighbour_sums(q, k_strong, v_changed, None, adjacency_rule, scaling=8**-0.5)
        changes[graph] = (a[..., 9, :] - b[..., 9, :]).abs().max().item()
        assert (a[..., :2, :] - b[..., :2, :]).abs().max().item() == 0.0  # queries before 2 never see it
    assert changes["gin"] > 1e-3
    assert changes["reference"] == 0.0


@pytest.mark.parametrize("rule", [dict(), dict(head_reduction="max", sparsify="topk", top_k=3), dict(sparsify="threshold", head_reduction="sum")])
def test_dense_and_pyg_backends_agree(rule):
    ids = _ids(2, 11)
    outputs, grads = {}, {}
    for backend in ("dense", "pyg"):
        model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, backend=backend, **rule))
        perturb_adapter(model)
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        outputs[backend] = loss.detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert torch.allclose(outputs["dense"], outputs["pyg"], atol=1e-6)
    for name, grad in grads["dense"].items():
        assert torch.allclose(grad, grads["pyg"][name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_eager_equals_sdpa(arch):
    ids = _ids(2, 12)
    logits = {}
    for attn in ("eager", "sdpa"):
        model = get_gin_model(tiny_model(arch, attn), GinConfig(hidden_dim=8))
        perturb_adapter(model)
        logits[attn] = model(ids).logits
    assert (logits["eager"] - logits["sdpa"]).abs().max().item() < 1e-4


def test_padded_equals_unpadded():
    """A left-padded row gives the same logits on its real tokens as the same row alone."""
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, sparsify="threshold", threshold=0.2))
    perturb_adapter(model)
    short = _ids(1, 7, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([pad, short], dim=1)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(short)], dim=1)
    alone = model(short).logits
    together = model(torch.cat([padded, _ids(1, 12, seed=4)]), attention_mask=torch.cat([mask, torch.ones(1, 12, dtype=torch.long)])).logits
    assert (together[0, 5:] - alone[0]).abs().max().item() < 1e-5


def test_padding_tokens_are_never_neighbours():
    from gin_adapter.adjacency import AdjacencyRule, sparse_adjacency, visible_keys

    rule = AdjacencyRule.from_config(GinConfig(sparsify="threshold", threshold=0.0, sharpen_tau=0.9))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[..., 0] = False  # key 0 is padding
    probs = torch.rand(1, 2, 4, 4)
    adjacency = sparse_adjacency(probs, visible_keys(mask, 4, 4, torch.device("cpu")), rule)
    assert adjacency[..., 0].abs().max() == 0
    assert torch.all(adjacency.triu(1) == 0)


def test_gradient_checkpointing_matches():
    ids = _ids(2, 10)
    grads = []
    for checkpointing in (False, True):
        base = tiny_model()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_gin_model(base, GinConfig(hidden_dim=8))
        perturb_adapter(model)
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_base_with_fp32_adapter():
    base = tiny_model().to(torch.bfloat16)
    model = get_gin_model(base, GinConfig(hidden_dim=8))
    perturb_adapter(model)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.train()
    loss = model(_ids(), labels=_ids()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_no_full_attention_map_kept_for_backward():
    """With recompute on, no saved tensor for backward has the (B, H, L, L) size of an attention map."""
    length, heads = 48, 4
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    for recompute in (True, False):
        saved.clear()
        model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, recompute_adjacency=recompute))
        perturb_adapter(model)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(_ids(2, length), labels=_ids(2, length)).loss
        maps = [s for s in saved if len(s) == 4 and s[-2:] == (length, length)]
        if recompute:
            assert maps == [], maps
        else:
            assert maps, "without recompute the adjacency is saved (sanity check of this test)"
