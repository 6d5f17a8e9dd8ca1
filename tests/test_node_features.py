"""Every node-feature mode ('values', 'hidden', 'input', the published block): identity at init, causality, backends,
eager == sdpa, gradient checkpointing, exact cached decoding (greedy, beams, sampling, assisted, left padding,
sliding windows), messages along the graph, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model
from peft import PeftModel

from gin_adapter import GinConfig, get_gin_model, gin_layers, save_adapter

MODES = {
    "values": dict(hidden_dim=8),
    "hidden": dict(hidden_dim=8, node_features="hidden"),
    "input": dict(hidden_dim=8, node_features="input"),
    "hidden-threshold-sum": dict(hidden_dim=8, node_features="hidden", sparsify="threshold", head_reduction="sum", threshold=0.3),
    "published-gin": GinConfig.published(graph="gin", hidden_dim=8, scale_init="zero", dropout=0.0).to_dict(),
    "published-reference": GinConfig.published(hidden_dim=8, scale_init="zero", dropout=0.0).to_dict(),
}
FEATURE_MODES = [m for m in MODES if m != "values"]


def config(mode: str, **overrides) -> GinConfig:
    fields = {k: v for k, v in MODES[mode].items() if k in GinConfig.__dataclass_fields__ and k not in ("peft_type", "task_type")}
    return GinConfig(**{**fields, **overrides})


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise(model: torch.nn.Module, seed: int = 1, scale: float = 1.0) -> None:
    """Every adapter parameter random (scales set to ``scale``, eps and PReLU slopes in (0, 1))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(".scale"):
                p.fill_(scale)
            elif name.endswith((".eps", "act.weight")) or p.dim() == 1 and p.numel() == 1:
                p.copy_(torch.rand(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def wrapped(mode: str, arch: str = "llama", attn: str = "sdpa", **overrides) -> PeftModel:
    model = get_gin_model(tiny_model(arch, attn), config(mode, **overrides))
    randomise(model)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", MODES)
def test_identity_at_init(mode, attn):
    base = tiny_model("llama", attn)
    ids = _ids()
    expected = base(ids).logits
    model = get_gin_model(base, config(mode))
    assert (model(ids).logits - expected).abs().max().item() < 1e-5
    randomise(model)
    assert (model(ids).logits - expected).abs().max().item() > 1e-3  # and the adapter does act once non-zero


@pytest.mark.parametrize("mode", MODES)
def test_causal(mode):
    model = wrapped(mode)
    ids = _ids(1, 16)
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 128
    a, b = model(ids).logits, model(changed).logits
    assert (a[0, :10] - b[0, :10]).abs().max().item() < 1e-5
    assert (a[0, 10:] - b[0, 10:]).abs().max().item() > 1e-3


def _loss_and_grads(model: PeftModel, ids: torch.Tensor, mask: torch.Tensor | None = None):
    model.train()
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", MODES)
def test_backends_agree(mode, kernel_paths):
    """dense (and gather where the fused kernel runs) == torch_geometric, forward and every adapter gradient."""
    ids = _ids(2, 11)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    fused = config(mode).is_per_head_top_k
    backends = ("dense", "gather", "pyg") if fused else ("dense", "pyg")
    results = {}
    for backend in backends:
        kernel_paths.clear()
        results[backend] = _loss_and_grads(wrapped(mode, backend=backend), ids, mask)
        assert set(kernel_paths) == ({backend} if fused and backend != "pyg" else set()), (backend, kernel_paths)
    loss, grads = results["pyg"]
    for backend in backends[:-1]:
        assert torch.allclose(results[backend][0], loss, atol=1e-6), backend
        for name, grad in grads.items():
            assert torch.allclose(results[backend][1][name], grad, atol=1e-5, rtol=1e-4), (backend, name)


@pytest.mark.parametrize("mode", MODES)
def test_eager_equals_sdpa(mode):
    ids = _ids()
    logits = {attn: wrapped(mode, attn=attn)(ids).logits for attn in ("eager", "sdpa")}
    assert (logits["eager"] - logits["sdpa"]).abs().max().item() < 1e-4


def _checkpointed_grads(mode: str, use_reentrant: bool | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    base = tiny_model()
    if use_reentrant is not None:
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24 names it so
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        base.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model = get_gin_model(base, config(mode))
    randomise(model)
    return _loss_and_grads(model, _ids(2, 10))


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_gives_the_same_gradients(mode, use_reentrant):
    """Recomputation re-captures the decoder layer's input: same loss, same (non-zero) gradients of every parameter."""
    loss, grads = _checkpointed_grads(mode, None)
    loss_ckpt, grads_ckpt = _checkpointed_grads(mode, use_reentrant)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert {n for n, g in grads.items() if g.abs().sum() > 0} == {n for n, g in grads_ckpt.items() if g.abs().sum() > 0}
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-6, rtol=1e-5), name


def _padded_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    ids = _ids(2, 12, seed=5)
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _generate(model: PeftModel, use_cache: bool, **kwargs) -> torch.Tensor:
    ids, mask = _padded_prompt()
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, use_cache=use_cache, **kwargs)


@pytest.mark.parametrize(
    "decoding",
    [dict(do_sample=False), dict(do_sample=False, num_beams=3), dict(do_sample=True, top_k=20, seed=3)],
    ids=["greedy", "beam3", "sampling"],
)
@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_equals_uncached(mode, decoding):
    """Left-padded batch of 2: the same tokens with and without the KV cache (and the GIN feature cache)."""
    model = wrapped(mode)
    with_cache = _generate(model, True, **decoding)
    assert torch.equal(with_cache, _generate(model, False, **decoding))
    with model.disable_adapter():
        assert not torch.equal(with_cache, _generate(model, True, **decoding)), "the adapter should change the tokens"


@pytest.mark.parametrize("mode", FEATURE_MODES)
def test_assisted_decoding_equals_uncached(mode):
    """Prompt-lookup decoding crops the cache whenever a drafted token is rejected: the features are cropped too."""
    model = wrapped(mode)
    prompt = torch.arange(3, 15).repeat(2)[None]  # repeats, so prompt lookup drafts (and gets some rejected)
    kwargs = dict(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kwargs, prompt_lookup_num_tokens=3), model.generate(**kwargs, use_cache=False))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))  # gemma2/gemma3: sliding window 8 < prompt + new tokens
@pytest.mark.parametrize("mode", ["hidden", "published-gin"])
def test_cached_generation_equals_uncached_on_every_architecture(mode, arch):
    model = wrapped(mode, arch=arch, attn="eager" if arch.startswith("gemma") else "sdpa")
    model.base_model.model.generation_config.pad_token_id = 0
    assert torch.equal(_generate(model, True, do_sample=False), _generate(model, False, do_sample=False))


def test_feature_cache_follows_beam_reordering_and_stays_aligned():
    """The cache layer carries one (B, N, F) tensor per adapter, as many rows as the KV cache keeps."""
    from transformers import DynamicCache

    model = wrapped("hidden")
    cache = DynamicCache(config=model.base_model.model.config)
    ids, mask = _padded_prompt()
    model(ids, attention_mask=mask, cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert type(layer).__name__ == "GinDynamicLayer"
    assert layer.gin_features["default"].shape == (2, 12, 8) and layer.keys.shape[-2] == 12
    beam_idx = torch.tensor([1, 0])
    expected = layer.gin_features["default"][beam_idx]
    cache.reorder_cache(beam_idx)
    assert torch.equal(layer.gin_features["default"], expected)
    cache.crop(-2)
    assert layer.gin_features["default"].shape[-2] == layer.keys.shape[-2] == 10


def test_static_cache_is_refused_with_a_clear_error():
    model = wrapped("values")
    with pytest.raises(NotImplementedError, match="dynamic caches only.*StaticLayer.*cache_implementation"):
        _generate(model, True, do_sample=False, cache_implementation="static")


@pytest.mark.parametrize("mode", FEATURE_MODES)
def test_messages_flow_along_the_graph_in_gin_mode_only(mode):
    """Changing only token 2's node features (q, k and so the graph held fixed) changes token 9's neighbour sum in
    graph mode, never in reference mode (self-loops only)."""
    from gin_adapter.adjacency import AdjacencyRule
    from gin_adapter.aggregate import GraphInputs, graph_neighbour_sum

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 10, 8, generator=generator)
    k = torch.randn(1, 2, 10, 8, generator=generator)
    k[:, :, 2] = 3.0 * q[:, ::2, 9]  # key 2 is query 9's strongest key, so every rule keeps the edge
    graph = GraphInputs(q, k, torch.zeros_like(k), None, scaling=8**-0.5, softcap=None, sliding_window=None)
    x = torch.randn(1, 1, 10, 5, generator=generator)  # shared node features, as hidden/input modes give
    x_changed = x.clone()
    x_changed[:, :, 2] += 1.0
    changes = {}
    for graph_mode in ("gin", "reference"):
        rule = AdjacencyRule.from_config(config(mode, graph=graph_mode, sharpen_tau=0.05, threshold=0.3))
        a, b = graph_neighbour_sum(graph, x, rule), graph_neighbour_sum(graph, x_changed, rule)
        changes[graph_mode] = (a[..., 9, :] - b[..., 9, :]).abs().max().item()
        assert (a[..., :2, :] - b[..., :2, :]).abs().max().item() == 0.0
    assert changes["gin"] > 1e-3
    assert changes["reference"] == 0.0


@pytest.mark.parametrize("mode", ["hidden", "published-reference"])
def test_hidden_features_are_the_residual_stream_after_attention(mode):
    """The block projects u = h + attn_out: exactly what Llama's post-attention norm receives (scale 0, so delta 0)."""
    model = get_gin_model(tiny_model(), config(mode))
    seen = {}
    layer = model.base_model.model.model.layers[1]
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, args: seen.__setitem__("residual", args[0]))
    gin_layers(model)[1].gin_blocks["default"].in_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("u", args[0]))
    model(_ids())
    assert torch.equal(seen["u"], seen["residual"])


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(mode, tmp_path):
    model = wrapped(mode)
    folder = save_adapter(model, tmp_path / "adapter")
    ids = _ids()
    loaded = PeftModel.from_pretrained(tiny_model(), folder)
    assert loaded.peft_config["default"].node_features == config(mode).node_features
    with torch.no_grad():  # the same attention path for both (with gradients, training builds the graph beside it)
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("grad", [True, False], ids=["cat", "buffer"])
def test_feature_cache_returns_the_features_of_exactly_the_keys_seen_and_keeps_the_cached_ones(grad):
    """``gin_extend`` returns the features of the last ``k_len`` keys (older rows dropped), keeps as many rows as
    the KV cache keeps keys, and refuses a cache with fewer feature rows than keys; with gradient recording by
    ``torch.cat``, without it in a buffer with room to grow."""
    from transformers import DynamicCache

    from gin_adapter.cache import feature_cache_layer

    with torch.set_grad_enabled(grad):
        cache = DynamicCache()
        cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), 0)
        layer = feature_cache_layer(cache, 0, "Attention")
        layer.keys, layer.values = layer.keys[..., 1:, :], layer.values[..., 1:, :]  # as a sliding window: 4 seen, 3 kept
        rows = torch.arange(6.0).view(1, 6, 1)
        full = layer.gin_extend("a", rows[:, :5], k_len=4)  # 5 rows for 4 keys: the oldest is not one of them
        assert full.squeeze().tolist() == [1.0, 2.0, 3.0, 4.0]
        assert layer.gin_features["a"].squeeze().tolist() == [2.0, 3.0, 4.0]  # as many rows as keys kept
        cache.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0)  # one decoded token: 4 keys
        assert layer.gin_extend("a", rows[:, 5:], k_len=4).squeeze().tolist() == [2.0, 3.0, 4.0, 5.0]
        with pytest.raises(RuntimeError, match="out of step with the KV cache: 5 feature rows for 7 keys"):
            layer.gin_extend("a", rows[:, 5:], k_len=7)
    assert ("gin_buffers" in vars(layer)) is not grad


def test_feature_cache_appends_in_place_and_starts_a_new_buffer_when_the_rows_are_replaced():
    """Without gradient recording each token's row is written into the buffer (no copy of the cached rows: the
    buffer stays the same until it is full), views returned earlier keep their values, and a cache operation that
    replaces the rows (beam reordering, cropping) or a buffer from inference mode used outside it starts a new
    buffer holding the right rows."""
    from transformers import DynamicCache

    from gin_adapter.cache import feature_cache_layer

    cache = DynamicCache()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 40, 3, generator=generator)
    with torch.inference_mode():
        cache.update(torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2), 0)
        layer = feature_cache_layer(cache, 0, "Attention")
        first = layer.gin_extend("a", rows[:, :4], k_len=4)
        buffer = layer.gin_buffers["a"][0]
        for t in range(4, 30):
            cache.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), 0)
            full = layer.gin_extend("a", rows[:, t : t + 1], k_len=t + 1)
            assert torch.equal(full, rows[:, : t + 1]) and torch.equal(layer.gin_features["a"], rows[:, : t + 1])
        assert layer.gin_buffers["a"][0] is buffer and full.data_ptr() == first.data_ptr() == buffer.data_ptr()
        assert torch.equal(first, rows[:, :4])
        cache.reorder_cache(torch.tensor([1, 0]))
        cache.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), 0)
        full = layer.gin_extend("a", rows[:, 30:31], k_len=31)
        assert torch.equal(full, torch.cat([rows[[1, 0], :30], rows[:, 30:31]], dim=1)) and layer.gin_buffers["a"][0] is not buffer
        cache.crop(-3)
        cache.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), 0)
        expected = torch.cat([rows[[1, 0], :28], rows[:, 31:32]], dim=1)
        assert torch.equal(layer.gin_extend("a", rows[:, 31:32], k_len=29), expected)
    buffer = layer.gin_buffers["a"][0]
    with torch.no_grad():  # an inference tensor cannot be written outside inference mode: a new (ordinary) buffer
        cache.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), 0)
        full = layer.gin_extend("a", rows[:, 32:33], k_len=30)
    assert torch.equal(full, torch.cat([expected, rows[:, 32:33]], dim=1)) and not layer.gin_buffers["a"][0].is_inference()
    expected = full
    for t, grad in ((33, True), (34, False)):  # rows appended by torch.cat (with gradients) are not lost to the buffer
        cache.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), 0)
        with torch.set_grad_enabled(grad):
            expected = torch.cat([expected, rows[:, t : t + 1]], dim=1)
            assert torch.equal(layer.gin_extend("a", rows[:, t : t + 1], k_len=expected.shape[1]), expected)
            assert ("a" in layer.gin_buffers) is not grad  # cat's rows are not in a buffer: the old one is let go


def _hook_counts(model: PeftModel) -> list[int]:
    """Forward pre-hooks on each decoder layer and its children."""
    layers = model.get_base_model().model.layers
    return [len(layer._forward_pre_hooks) + sum(len(child._forward_pre_hooks) for child in layer.children()) for layer in layers]


def test_decoder_layers_carry_only_the_hooks_hidden_features_need():
    """Value features hook nothing (a hooked module takes the slower call path on every decoded token). Adding a
    hidden-state adapter hooks the layer and its children until the first call shows which child receives ``h``;
    then only that child's hook is left, and the output is still the one a fresh hidden-feature model gives."""
    model = wrapped("values")
    assert set(_hook_counts(model)) == {0}
    model.add_adapter("hidden", config("hidden"))
    model.set_adapter("hidden")
    randomise(model, seed=2)
    layer = model.get_base_model().model.layers[0]
    assert _hook_counts(model)[0] == 1 + len(list(layer.children()))
    ids = _ids()
    with torch.no_grad():
        first = model(ids).logits
    assert set(_hook_counts(model)) == {1}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, first)
    fresh = get_gin_model(tiny_model("llama"), config("hidden"))
    loaded = fresh.load_state_dict({k.replace(".hidden.", ".default."): v for k, v in model.state_dict().items() if ".default." not in k})
    assert not loaded.missing_keys and not loaded.unexpected_keys
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, first, atol=1e-6)


def test_two_active_hidden_adapters_decode_with_and_without_the_cache():
    """Two adapters with hidden-state features active at once read the decoder layer's input once per call (the
    watcher lets go of it when read without gradient): cached generation runs and equals the uncached one."""
    model = wrapped("hidden")
    model.add_adapter("second", config("hidden"))
    randomise(model)
    model.base_model.set_adapter(["default", "second"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(_generate(model, True, do_sample=False), _generate(model, False, do_sample=False))
