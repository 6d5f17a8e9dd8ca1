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
    from gin_adapter.aggregate import neighbour_sums

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


BACKEND_CASES = [
    (dict(), ("dense", "gather", "pyg")),  # fused top-k kernel (dense and gather sums) vs the generic chain on PyG
    (dict(adjacency_grad=False), ("dense", "gather", "pyg")),
    (dict(head_reduction="max", sparsify="topk", top_k=3), ("dense", "pyg")),
    (dict(sparsify="threshold", head_reduction="sum"), ("dense", "pyg")),
]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: soft-capped logits and a sliding window
@pytest.mark.parametrize("rule,backends", BACKEND_CASES)
def test_backends_agree(arch, rule, backends, kernel_paths):
    """Same loss and same adapter gradients from every backend (pyg always runs the generic, checkpointed chain)."""
    ids = _ids(2, 11)
    outputs, grads = {}, {}
    for backend in backends:
        base = tiny_model(arch, "eager" if arch == "gemma2" else "sdpa")  # transformers has no sdpa for Gemma-2
        model = get_gin_model(base, GinConfig(hidden_dim=8, backend=backend, **rule))
        perturb_adapter(model)
        model.train()
        kernel_paths.clear()
        loss = model(ids, labels=ids).loss
        loss.backward()
        fused = GinConfig(**rule).is_per_head_top_k and backend != "pyg"  # the kernel runs, with this sum
        assert set(kernel_paths) == ({backend} if fused else set()), (backend, kernel_paths)
        outputs[backend] = loss.detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    reference = backends[-1]
    for backend in backends[:-1]:
        assert torch.allclose(outputs[backend], outputs[reference], atol=1e-6), backend
        for name, grad in grads[backend].items():
            assert torch.allclose(grad, grads[reference][name], atol=1e-5, rtol=1e-4), (backend, name)


@pytest.mark.parametrize("padding", [False, True])
def test_backends_agree_over_several_query_chunks(padding, kernel_paths):
    """150 tokens: the kernel runs three query chunks (64, 64, 22) on a real model; same loss and gradients as PyG."""
    ids = _ids(2, 150)
    mask = torch.ones_like(ids)
    if padding:
        mask[0, :20] = 0
    results = {}
    for backend in ("dense", "gather", "pyg"):
        model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, backend=backend))
        perturb_adapter(model)
        model.train()
        kernel_paths.clear()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        assert set(kernel_paths) == ({backend} if backend != "pyg" else set()), (backend, kernel_paths)
        results[backend] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    for backend in ("dense", "gather"):
        assert torch.allclose(results[backend][0], results["pyg"][0], atol=1e-6), backend
        assert torch.allclose(results[backend][1], results["pyg"][1], atol=1e-5, rtol=1e-4), backend


FUSED_CASES = [
    dict(),
    dict(padding=True),
    dict(softcap=2.0),
    dict(sliding_window=4),
    dict(sliding_window=4, padding=True, softcap=2.0),
    dict(q_len=1),  # one decoded token against a 12-token cache, no mask
    dict(q_len=1, softcap=2.0),
    dict(q_len=3, padding=True),  # a chunk of 3 new tokens against the cache
    dict(top_k=20),  # more neighbours than keys: every visible key is kept
    dict(k_len=90, q_len=90, top_k=4),  # rows of >= 16 k keys: the two-stage top-k (16 columns, 10 keys left over)
    dict(k_len=90, q_len=90, top_k=4, padding=True, sliding_window=70),
]


@pytest.mark.parametrize("chunk_rows", [None, 5])  # 5: query rows in chunks of 5, 5, 2 (causal chunks skip keys)
@pytest.mark.parametrize("sum_mode", ["dense", "gather"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_fused_top_k_equals_generic_chain(case, sum_mode, chunk_rows):
    """The fused kernel's values and q, k, v gradients equal the generic chain's (probabilities, top-k, dense sum)."""
    from gin_adapter.adjacency import AdjacencyRule
    from gin_adapter.aggregate import neighbour_sums
    from gin_adapter.topk_sum import topk_neighbour_sum

    k_len, q_len, top_k = case.get("k_len", 12), case.get("q_len", 12), case.get("top_k", 3)
    softcap, window = case.get("softcap"), case.get("sliding_window")
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, k_len, 8, generator=generator, requires_grad=True) for _ in range(2))
    mask = None
    if case.get("padding"):
        rows = torch.arange(k_len - q_len, k_len).unsqueeze(-1)
        cols = torch.arange(k_len).unsqueeze(0)
        visible = cols <= rows
        if window:
            visible = visible & (rows - cols < window)
        mask = visible.expand(2, 1, q_len, k_len).clone()
        mask[0, :, :, :3] = False  # sample 0 is left-padded: keys 0-2 are padding (queries 0-2 then see nothing)
    rule = AdjacencyRule.from_config(GinConfig(top_k=top_k, backend="pyg"))
    expected = neighbour_sums(q, k, v, mask, rule, 8**-0.5, softcap=softcap, sliding_window=window, groups=2)
    weights = torch.randn(expected.shape, generator=generator)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    options = dict(top_k=top_k, scaling=8**-0.5, softcap=softcap, sliding_window=window, sum_mode=sum_mode, chunk_rows=chunk_rows)
    fused = topk_neighbour_sum(q, k, v, mask, **options)
    fused_grads = torch.autograd.grad((fused * weights).sum(), (q, k, v))
    assert fused.shape == expected.shape
    assert torch.allclose(fused, expected, atol=1e-5)
    for name, a, b in zip("qkv", fused_grads, expected_grads):
        assert torch.allclose(a, b, atol=1e-5), name
    with torch.no_grad():  # the inference path (no autograd function) gives the same numbers
        assert torch.allclose(topk_neighbour_sum(q, k, v, mask, **options), fused)


@pytest.mark.parametrize("shape", [(6, 9), (6, 127), (6, 128), (2, 3, 150), (6, 256), (2, 1000)])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_two_stage_top_k_equals_torch_topk(shape, k):
    """``two_stage_top_k`` (column maxima, then the top-k of the best columns; the ATen fallback of the compiled
    top-k) returns exactly ``torch.topk``'s values and positions, including rows whose length is not a multiple of
    the column count; with ties, the values agree."""
    from gin_adapter.top_k import two_stage_top_k as top_k_last

    x = torch.randn(shape, generator=torch.Generator().manual_seed(k))
    values, index = top_k_last(x, k)
    expected = x.topk(k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(index, expected.indices)
    tied = x.clamp(max=x.quantile(0.9))  # many entries share the maximum
    values, index = top_k_last(tied, k)
    assert torch.equal(values, tied.topk(k, dim=-1).values)
    assert torch.equal(tied.gather(-1, index), values)
    assert index.sort(dim=-1).values.diff(dim=-1).ne(0).all()  # k distinct positions per row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_rms_norm_equals_torch_rms_norm(dtype):
    """The block's RMSNorm (the composite's float operations with 0-dim constants, fewer operator calls) gives
    F.rms_norm's values and gradients (input, weight, scale); bf16 goes through F.rms_norm itself."""
    from gin_adapter.blocks import ScaledRMSNorm

    generator = torch.Generator().manual_seed(0)
    eps = 1e-6
    norm = ScaledRMSNorm(576, eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=generator) + 0.5)
    y = (3 * torch.randn(2, 5, 576, generator=generator)).to(dtype).requires_grad_()
    scale = torch.tensor([0.7], dtype=dtype, requires_grad=True)
    out = norm(y, scale)
    expected = torch.nn.functional.rms_norm(y, (576,), norm.weight * scale, eps)
    upstream = torch.randn(out.shape, generator=generator).to(dtype)
    grads = torch.autograd.grad((out * upstream).sum(), (y, norm.weight, scale))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (y, norm.weight, scale))
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=0)
    assert torch.allclose(out, expected, **tolerance)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else tolerance))


@pytest.mark.parametrize("grad", [False, True])
def test_block_compiles_in_one_graph_with_and_without_gradients(grad):
    """``torch.compile(fullgraph=True)`` traces the whole block (input, MLP, fused projection and norm) without a
    graph break and gives the eager block's output."""
    from gin_adapter.blocks import AttentionDims, make_block

    block = make_block(GinConfig(hidden_dim=8), AttentionDims(heads=4, head_dim=6, model_dim=24), scale_init=0.5)
    generator = torch.Generator().manual_seed(0)
    x_self, neighbours = torch.randn(2, 4, 5, 6, generator=generator), torch.randn(2, 4, 5, 6, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.set_grad_enabled(grad):
        assert torch.allclose(compiled(x_self, neighbours), block(x_self, neighbours), atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_projection_and_norm_keep_no_model_width_tensor_and_equal_the_modules(bias):
    """``project_and_norm`` (the block's output projection and scaled RMSNorm, projection recomputed in backward)
    gives the plain modules' values and gradients to every input, and keeps nothing of the model width for backward."""
    from gin_adapter.blocks import ScaledRMSNorm
    from gin_adapter.out_norm import project_and_norm

    generator = torch.Generator().manual_seed(0)
    out_proj = torch.nn.Linear(12, 96, bias=bias)
    norm = ScaledRMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=generator) + 0.5)
    scale = torch.tensor([0.3], requires_grad=True)
    m = torch.randn(3, 7, 12, generator=generator, requires_grad=True)
    upstream = torch.randn(3, 7, 96, generator=generator)
    inputs = [m, out_proj.weight, norm.weight, scale] + ([out_proj.bias] if bias else [])

    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
        fused = project_and_norm(m, out_proj, norm, scale)
    plain = norm(out_proj(m), scale)
    assert torch.allclose(fused, plain, atol=1e-6)
    assert (3, 7, 96) not in saved_shapes and (3, 7, 12) in saved_shapes
    fused_grads = torch.autograd.grad((fused * upstream).sum(), inputs)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), inputs)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_detached_graph_keeps_forward_and_own_layer_gradients():
    """adjacency_grad=False: same output; the last layer's GIN gets the same gradients (its graph does not depend on
    it), earlier layers' differ (their effect on later graphs is cut), and nothing reaches q/k through the graph."""
    ids = _ids(2, 11)
    losses, grads = {}, {}
    for flag in (True, False):
        model = get_gin_model(tiny_model(num_hidden_layers=3), GinConfig(hidden_dim=8, adjacency_grad=flag))
        perturb_adapter(model)
        model.train()
        losses[flag] = model(ids, labels=ids).loss
        losses[flag].backward()
        grads[flag] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert torch.allclose(losses[True], losses[False], atol=1e-6)
    last = [n for n in grads[True] if ".layers.2." in n]
    first = [n for n in grads[True] if ".layers.0." in n and "mlp.0.weight" in n]
    assert last and first
    for name in last:
        assert torch.allclose(grads[True][name], grads[False][name], atol=1e-6), name
    assert not torch.allclose(grads[True][first[0]], grads[False][first[0]], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_eager_equals_sdpa(arch):
    ids = _ids(2, 12)
    logits = {}
    for attn in ("eager", "sdpa"):
        model = get_gin_model(tiny_model(arch, attn), GinConfig(hidden_dim=8))
        perturb_adapter(model)
        logits[attn] = model(ids).logits
    assert (logits["eager"] - logits["sdpa"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("rule", [dict(), dict(sparsify="threshold", threshold=0.2)], ids=["per-head-top-k", "threshold"])
def test_padded_equals_unpadded(rule):
    """A left-padded row gives the same logits on its real tokens as the same row alone."""
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, **rule))
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
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
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


AUTOCAST_RULES = [
    dict(),  # the fused kernel, dense sum
    dict(backend="gather"),
    dict(backend="pyg"),  # the generic chain with message passing
    dict(sparsify="threshold", head_reduction="sum"),  # the generic chain, checkpointed
    dict(node_features="hidden"),
    dict(preset="published"),
]


@pytest.mark.parametrize("rule", AUTOCAST_RULES, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()) or "default")
def test_training_step_under_bf16_autocast(rule):
    """Mixed precision (``torch.autocast(bfloat16)``, what Accelerate's ``mixed_precision="bf16"`` does): the step
    runs and every adapter gradient is finite; the graph is built in float32, so the neighbour sums under autocast
    equal the float32 ones for the same q, k, v."""
    from gin_adapter.aggregate import graph_neighbour_sum

    fields = dict(rule)
    config = GinConfig.published(hidden_dim=8) if fields.pop("preset", None) else GinConfig(hidden_dim=8, **fields)
    model = get_gin_model(tiny_model(), config)
    perturb_adapter(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(_ids(2, 40), labels=_ids(2, 40)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)

    layer = gin_layers(model)[0]
    _, graph = layer.attend(torch.randn(2, 40, model.config.hidden_size, generator=torch.Generator().manual_seed(0)),
                            position_embeddings=model.base_model.model.model.rotary_emb(torch.zeros(1), torch.arange(40)[None]),
                            attention_mask=None)
    adjacency_rule = layer.gin_rules["default"]
    features = graph.value if config.node_features == "values" else torch.randn(2, 1, 40, 8, generator=torch.Generator().manual_seed(1))
    expected = graph_neighbour_sum(graph, features, adjacency_rule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = graph_neighbour_sum(graph, features, adjacency_rule)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, expected, atol=1e-6)


@pytest.mark.parametrize(
    "rule,recompute,expect_maps",
    [
        (dict(), True, False),
        (dict(), False, True),  # the graph built with the attention keeps its probabilities when asked
        (dict(backend="gather"), True, False),
        (dict(sparsify="threshold", head_reduction="sum"), True, False),
        (dict(sparsify="none", head_reduction="none"), True, False),
        (dict(sparsify="threshold", head_reduction="none"), False, True),  # sanity check of this test
    ],
)
def test_no_full_attention_map_kept_for_backward(rule, recompute, expect_maps, kernel_paths):
    """No tensor saved for backward has the (B, H, L, L) size of an attention map, however its query rows are
    grouped (grouped-query heads as ``(B, Hkv, G * L, L)``), unless ``recompute_adjacency=False`` asks for the
    probabilities to be kept: the generic chain's, and the graph built with the attention under sdpa."""
    length = 48
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    base = tiny_model()
    heads = base.config.num_attention_heads
    model = get_gin_model(base, GinConfig(hidden_dim=8, recompute_adjacency=recompute, **rule))
    perturb_adapter(model)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(_ids(2, length), labels=_ids(2, length)).loss
    maps = [s for s in saved if len(s) == 4 and s[-1] == length and s[1] * s[2] >= heads * length]
    assert bool(maps) == expect_maps, maps
    if rule.get("backend") == "gather":
        assert set(kernel_paths) == {"gather"}, kernel_paths


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("sum_mode", ["dense", "gather"])
def test_kernel_compiles_without_graph_breaks(sum_mode, padding):
    """``torch.compile(fullgraph=True)`` traces the fused kernel (autograd function, query chunks) in one graph, so a
    compiled model gets it fused; values and q, k, v gradients equal the eager kernel's. (``aot_eager``: the same
    tracing as inductor, without the C++ build, so the test takes seconds.)"""
    from gin_adapter.topk_sum import topk_neighbour_sum

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 80, 16, generator=generator, requires_grad=True) for h in (4, 2, 2))
    mask = None
    if padding:
        mask = torch.ones(2, 1, 80, 80, dtype=torch.bool).tril()
        mask[0, ..., :5] = False

    def kernel(q, k, v, mask):
        return topk_neighbour_sum(q, k, v, mask, top_k=8, scaling=0.25, sum_mode=sum_mode, chunk_rows=32)

    compiled = torch.compile(kernel, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (kernel, compiled):
        out = fn(q, k, v, mask)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for eager_grad, compiled_grad in zip(results[0][1], results[1][1]):
        assert torch.allclose(eager_grad, compiled_grad, atol=1e-5)


def test_the_layer_follows_set_add_and_delete_adapter_between_calls():
    """Each wrapper keeps its active adapters between calls (worked out once, it runs per layer and decoded token):
    switching, adding to the active set and deleting an adapter change the next call's output as PEFT says."""
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8))
    model.add_adapter("other", GinConfig(hidden_dim=8))
    perturb_adapter(model)
    ids = _ids()
    with torch.no_grad():
        first = model(ids).logits
        model.set_adapter("other")
        other = model(ids).logits
        model.base_model.set_adapter(["default", "other"])
        both = model(ids).logits
        model.delete_adapter("other")  # PEFT makes the remaining adapter active again
        after = model(ids).logits
    assert model.active_adapters == ["default"]
    assert (other - first).abs().max().item() > 1e-3 and (both - first).abs().max().item() > 1e-3 and (both - other).abs().max().item() > 1e-3
    assert torch.equal(after, first)
