"""The GIN block's forward in one compiled call for decoding (gin_adapter/native/block_forward.c through
gin_adapter.native_block): the values of the modules for every block, activation and node-feature layout, the
delta added to the attention output in the same pass, taken by every layer of a decoded token and only where it
applies, and the same generated tokens and logits as the modules."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_adapter, tiny_model
from torch import nn

from gin_adapter import GinConfig, get_gin_model, native_block
from gin_adapter.blocks import AttentionDims, make_block

pytestmark = pytest.mark.skipif(not native_block.available(), reason="gin_adapter's compiled kernels are not built")

DIMS = AttentionDims(heads=6, head_dim=8, model_dim=48)


def _block(config: GinConfig, seed: int = 0, dims: AttentionDims = DIMS) -> nn.Module:
    """A block of ``config`` in eval mode with every parameter moved off its initial value (scale, eps, slope too)."""
    torch.manual_seed(seed)
    block = make_block(config, dims, scale_init=0.5).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return block


def _inputs(block: nn.Module, *, batch: int = 2, length: int = 1, self_heads: int | None = None, shared_graph: bool = False, seed: int = 1):
    """``x_self (B, Hs, L, F)`` as the last ``L`` rows of a longer cache (strided, as decoding passes the values) and
    ``neighbours (B, Hn, L, F)``."""
    generator = torch.Generator().manual_seed(seed)
    heads = block.heads_in
    self_heads = self_heads or heads
    cache = torch.randn(batch, self_heads, length + 5, block.width_in, generator=generator)
    neighbours = torch.randn(batch, 1 if shared_graph else heads, length, block.width_in, generator=generator)
    return cache[:, :, -length:, :], neighbours


CASES = [
    ("values, GELU, 3 KV heads", GinConfig(), dict(self_heads=3)),
    ("values, GELU, every head its own", GinConfig(), {}),
    ("values, PReLU, eps self weight", GinConfig(activation="prelu", self_weight="eps"), dict(self_heads=2)),
    ("values, ReLU", GinConfig(activation="relu"), dict(self_heads=3)),
    ("hidden, SiLU, one graph", GinConfig(node_features="hidden", activation="silu", head_reduction="sum"), dict(shared_graph=True)),
    ("hidden, per-head graphs", GinConfig(node_features="hidden"), dict(self_heads=1)),
    ("published", GinConfig.published(), dict(shared_graph=True)),
    ("published, two tokens, batch 3", GinConfig.published(), dict(shared_graph=True, batch=3, length=2)),
]


@pytest.mark.parametrize("name, config, layout", CASES, ids=[case[0] for case in CASES])
def test_compiled_forward_equals_the_modules(name, config, layout):
    block = _block(config)
    x_self, neighbours = _inputs(block, **layout)
    with torch.no_grad():
        expected = block.delta(x_self, neighbours)
        got = native_block.block_forward(block, x_self, neighbours)
        base = torch.randn_like(expected)
        added = native_block.block_forward(block, x_self, neighbours, add_to=base)
    assert got is not None and got.shape == expected.shape == (x_self.shape[0], x_self.shape[2], DIMS.model_dim)
    assert expected.abs().max() > 0.1  # far from the zero delta of a fresh block
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(added, base + expected, rtol=1e-5, atol=1e-5)


def test_block_call_takes_the_compiled_forward_and_adds_in_the_same_pass(monkeypatch):
    block = _block(GinConfig())
    x_self, neighbours = _inputs(block, self_heads=3)
    base = torch.randn(2, 1, DIMS.model_dim)
    calls = []
    monkeypatch.setattr(block, "delta", lambda *args: calls.append(args) or torch.zeros(2, 1, DIMS.model_dim))
    with torch.no_grad():
        out = block(x_self, neighbours, base)
    assert not calls and not torch.equal(out, base)  # the modules never ran, and the delta was added
    monkeypatch.setattr(native_block, "ENABLED", False)
    with torch.no_grad():
        assert torch.equal(block(x_self, neighbours, base), base) and len(calls) == 1  # the modules' (stubbed) zero delta


@pytest.mark.parametrize("case", ["training dropout", "gradient", "too many rows", "float64", "tanh GELU", "Tanh", "disabled"])
def test_modules_run_where_the_kernel_does_not_apply(case, monkeypatch):
    config = GinConfig(dropout=0.2) if case == "training dropout" else GinConfig()
    block = _block(config)
    x_self, neighbours = _inputs(block, self_heads=3, length=40 if case == "too many rows" else 1)
    if case == "training dropout":
        block.train()
    elif case == "float64":
        block.double()
        x_self, neighbours = x_self.double(), neighbours.double()
    elif case == "tanh GELU":
        block.mlp[1] = block.mlp[4] = nn.GELU(approximate="tanh")
    elif case == "Tanh":
        block.mlp[1] = block.mlp[4] = nn.Tanh()
    elif case == "disabled":
        monkeypatch.setattr(native_block, "ENABLED", False)
    with torch.set_grad_enabled(case == "gradient"):
        assert native_block.block_forward(block, x_self, neighbours) is None
        if case != "disabled":  # and the module call still gives the modules' values (the same dropout mask)
            torch.manual_seed(5)
            called = block(x_self, neighbours)
            torch.manual_seed(5)
            torch.testing.assert_close(called, block.delta(x_self, neighbours), rtol=0, atol=0)
    with torch.no_grad():  # a plain block on plain inputs still takes the kernel (while it is enabled)
        monkeypatch.setattr(native_block, "ENABLED", True)
        plain = _block(GinConfig())
        assert native_block.block_forward(plain, *_inputs(plain, self_heads=3)) is not None


@pytest.mark.parametrize("config", [GinConfig(top_k=4), GinConfig.published(), GinConfig.published(graph="gin"), GinConfig(node_features="hidden", top_k=4),
                                    GinConfig(node_features="input", head_reduction="sum", sparsify="threshold")],
                         ids=["default", "published", "published-gin", "hidden-top-k", "input-threshold"])
def test_compiled_forward_is_taken_for_every_layer_of_a_decoded_token_and_generates_the_same(monkeypatch, config):
    """Greedy decoding, batch of two: the same tokens and logits (to float32 rounding) with the compiled kernels as
    with the modules, and one compiled call per layer and decoded token: the block forward for value features, the
    whole update (projection, feature cache, neighbour sum, block) for projected ones."""
    counted = {"block_forward": [], "decode_update": []}
    for kernel, calls in counted.items():
        original = getattr(native_block, kernel)

        def counting(*args, _original=original, _calls=calls, **kwargs):
            out = _original(*args, **kwargs)
            _calls.append(out is not None)
            return out

        monkeypatch.setattr(native_block, kernel, counting)
    model = get_gin_model(tiny_model("llama"), config)
    perturb_adapter(model)
    model.eval()
    prompt = torch.randint(0, 100, (2, native_block.MAX_ROWS + 8), generator=torch.Generator().manual_seed(0))  # prefill: modules
    runs = {}
    for enabled in (True, False):
        monkeypatch.setattr(native_block, "ENABLED", enabled)
        for calls in counted.values():
            calls.clear()
        runs[enabled] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                                       do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        if enabled:
            layers = model.config.num_hidden_layers
            if config.node_features == "values":  # the prompt's pass (too many rows for the kernel), then every decoded token
                assert counted["block_forward"] == [False] * layers + [True] * 4 * layers and counted["decode_update"] == []
            else:  # the prompt's pass through the modules, every decoded token's whole update in one call
                assert counted["block_forward"] == [False] * layers and counted["decode_update"] == [True] * 4 * layers
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for with_kernel, without in zip(runs[True].logits, runs[False].logits):
        torch.testing.assert_close(with_kernel, without, rtol=1e-4, atol=1e-4)


def test_recorded_in_results(monkeypatch):
    """Benchmark and trial results record whether the compiled block forward was in use."""
    from gin_adapter.compare.machine import machine

    assert machine()["compiled_block_forward"] is True
    monkeypatch.setattr(native_block, "ENABLED", False)
    assert machine()["compiled_block_forward"] is False


def test_kept_arguments_follow_the_parameters():
    """The kernel's arguments, kept per block, follow in-place updates (an optimizer step), parameters replaced by
    new objects (``load_state_dict(assign=True)``), moved storage (``.to()`` and back) and the train flag."""
    block = _block(GinConfig(dropout=0.1))
    x_self, neighbours = _inputs(block, self_heads=3)

    def check() -> None:
        with torch.no_grad():
            got = native_block.block_forward(block, x_self, neighbours)
            assert got is not None
            torch.testing.assert_close(got, block.delta(x_self, neighbours), rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        block.mlp[0].weight.mul_(-2.0)  # in place
    check()
    replaced = {name: 1.5 * value.clone() for name, value in block.state_dict().items()}
    block.load_state_dict(replaced, assign=True)  # new Parameter objects
    check()
    block.double().float()  # new storage, same objects
    check()
    block.train()
    with torch.no_grad():
        assert native_block.block_forward(block, x_self, neighbours) is None  # dropout active
    block.eval()
    check()


def test_same_bits_on_any_thread_count():
    """The published preset's block (above the kernel's threshold for splitting its layers over threads) gives the
    same bits on 1, 2 and 3 threads: each output is one thread's dot product whatever the split."""
    block = _block(GinConfig.published(), dims=AttentionDims(heads=9, head_dim=64, model_dim=576))  # SmolLM2's sizes
    x_self, neighbours = _inputs(block, shared_graph=True, batch=3, length=2)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                results.append(native_block.block_forward(block, x_self, neighbours))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], other) for other in results[1:])
    torch.testing.assert_close(results[0], block.delta(x_self, neighbours), rtol=1e-5, atol=1e-5)


def test_modules_run_where_the_kernel_would_skip_something():
    """A gradient wanted through ``add_to`` (a frozen block on a trainable base), parameters swapped in by
    ``torch.func.functional_call``, a weight re-strided in place (same storage), hooks on a layer, the MLP's container
    or its dropout slot (pruning's mask among them), a second activation changed in place and parametrized weights:
    the kernel steps aside (or re-plans) and the values are the modules'."""
    import torch.nn.utils.parametrize as parametrize

    block = _block(GinConfig())
    x_self, neighbours = _inputs(block, self_heads=3)
    base = torch.randn(2, 1, DIMS.model_dim, requires_grad=True)
    block.requires_grad_(False)
    out = block(x_self, neighbours, base)
    assert out.requires_grad  # the gradient to the attention output is kept
    out.sum().backward()
    assert torch.equal(base.grad, torch.ones_like(base))
    block.requires_grad_(True)

    def modules_value(module=block, inputs=(x_self, neighbours)):
        with torch.no_grad():
            return module.delta(*inputs)

    swapped = {name: 2.0 * value.detach() for name, value in block.named_parameters()}
    with torch.no_grad():
        native_block.block_forward(block, x_self, neighbours)  # a plan for the block's own parameters
        got = torch.func.functional_call(block, swapped, (x_self, neighbours))  # the kernel, on the swapped tensors
        native_block.ENABLED = False
        try:
            expected = torch.func.functional_call(block, swapped, (x_self, neighbours))  # the modules
        finally:
            native_block.ENABLED = True
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(native_block.block_forward(block, x_self, neighbours), modules_value(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, modules_value())

    square = _block(GinConfig.published(hidden_dim=16), dims=AttentionDims(heads=6, head_dim=8, model_dim=48))
    xs, ns = _inputs(square, shared_graph=True)
    with torch.no_grad():
        native_block.block_forward(square, xs, ns)
        square.lin2.weight.data = square.lin2.weight.data.t()  # same storage, transposed strides
        assert native_block.block_forward(square, xs, ns) is None  # a non-contiguous weight: the modules
        torch.testing.assert_close(square(xs, ns), modules_value(square, (xs, ns)), rtol=0, atol=0)

    for hooked in (block.mlp[0], block.mlp, block.mlp[2]):  # a layer, the MLP's container, its dropout slot
        handle = hooked.register_forward_hook(lambda module, args, output: output * 0)
        with torch.no_grad():
            assert native_block.block_forward(block, x_self, neighbours) is None
            torch.testing.assert_close(block(x_self, neighbours), modules_value(), rtol=0, atol=0)
        handle.remove()

    with torch.no_grad():
        assert native_block.block_forward(block, x_self, neighbours) is not None
        block.mlp[4].approximate = "tanh"  # the second GELU changed in place: an activation the kernel lacks
        assert native_block.block_forward(block, x_self, neighbours) is None
        block.mlp[4].approximate = "none"

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    parametrize.register_parametrization(block.out_proj, "weight", Doubled())
    with torch.no_grad():
        assert native_block.block_forward(block, x_self, neighbours) is None
        torch.testing.assert_close(block(x_self, neighbours), modules_value(), rtol=0, atol=0)


def test_a_block_that_ran_the_kernel_copies_and_pickles():
    """The kernel's kept arguments live beside the block, not in it: deepcopy and torch.save work after a call."""
    import copy
    import io

    block = _block(GinConfig())
    x_self, neighbours = _inputs(block, self_heads=3)
    with torch.no_grad():
        first = native_block.block_forward(block, x_self, neighbours)
    twin = copy.deepcopy(block)
    buffer = io.BytesIO()
    torch.save(block, buffer)
    with torch.no_grad():
        torch.testing.assert_close(native_block.block_forward(twin, x_self, neighbours), first, rtol=0, atol=0)


def _update_inputs(block: nn.Module, form: str, *, batch: int = 2, keys: int = 7, with_u1: bool = True, seed: int = 2):
    """Inputs of :func:`native_block.decode_update` for graph ``form`` ("picks": per-head top-3 positions, "dense":
    one weight per key shared by the heads, "diagonal": the new token's own weight), and a feature cache of
    ``keys - 1`` earlier rows (strided: a buffer with spare rows) whose last row the call writes."""
    generator = torch.Generator().manual_seed(seed)
    d_in, width = block.in_proj.weight.shape[1], block.width_in
    u0 = torch.randn(batch, 1, d_in, generator=generator)
    u1 = torch.randn(batch, 1, d_in, generator=generator) if with_u1 else None
    buffer = torch.randn(batch, keys + 3, width, generator=generator)
    features = buffer[:, :keys]
    if form == "picks":
        index = torch.stack([torch.randperm(keys, generator=generator)[:3] for _ in range(batch * block.heads_in)]).view(batch, block.heads_in, 3)
        graph = (torch.rand(batch, block.heads_in, 3, generator=generator), index, keys)
    elif form == "dense":
        graph = (torch.rand(batch, 1, keys, generator=generator), None, keys)
    else:
        graph = (torch.rand(batch, keys, generator=generator)[:, -1:].reshape(batch, 1, 1), None, 1)  # a strided view, as decoding gives
    return u0, u1, graph, features


def _update_reference(block: nn.Module, u0, u1, graph, features, add_to):
    """``(new feature row, add_to + delta)`` by the modules, float64 sums."""
    weights, index, span = graph
    x = block.project(u0 if u1 is None else u0 + u1)  # (B, 1, F)
    rows = torch.cat([features[:, :-1], x], dim=1)[:, features.shape[1] - span :]  # (B, span, F)
    if index is None:
        n = torch.einsum("bhm,bmf->bhf", weights.double(), rows.double())
    else:
        n = torch.stack([torch.stack([(weights[b, h, :, None].double() * rows[b, index[b, h]].double()).sum(0) for h in range(weights.shape[1])])
                         for b in range(weights.shape[0])])
    delta = block.delta(x.unsqueeze(1), n.float().unsqueeze(2))  # (B, Hn, 1, F)
    return x, delta if add_to is None else add_to + delta


UPDATE_CASES = [
    ("published, dense graph", GinConfig.published(graph="gin"), "dense", True),
    ("published, its own entry", GinConfig.published(), "diagonal", True),
    ("hidden, per-head picks", GinConfig(node_features="hidden", top_k=3), "picks", True),
    ("input, one graph, no add_to", GinConfig(node_features="input", head_reduction="sum", sparsify="threshold"), "dense", False),
]


@pytest.mark.parametrize("name, config, form, with_u1", UPDATE_CASES, ids=[case[0] for case in UPDATE_CASES])
def test_decode_update_equals_the_modules(name, config, form, with_u1):
    """One call: the new feature row written into the cache's buffer, the neighbour sum over the graph's rows (the
    new one among them), the block and the addition, as the modules compute them."""
    block = _block(config)
    u0, u1, graph, features = _update_inputs(block, form, with_u1=with_u1)
    add_to = torch.randn(2, 1, DIMS.model_dim) if with_u1 else None
    reserved = []
    with torch.no_grad():
        x, expected = _update_reference(block, u0, u1, graph, features, add_to)
        got = native_block.decode_update(block, u0, u1, graph, lambda width: reserved.append(width) or features, add_to=add_to)
    assert reserved == [block.width_in]
    torch.testing.assert_close(features[:, -1:], x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_decode_update_same_bits_on_any_thread_count():
    """The published preset at SmolLM2's sizes (its projection and layers split over threads): the same bits on 1,
    2 and 3 threads, feature row and output."""
    block = _block(GinConfig.published(graph="gin"), dims=AttentionDims(heads=9, head_dim=64, model_dim=576))
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            u0, u1, graph, features = _update_inputs(block, "dense", batch=3, keys=40)
            with torch.no_grad():
                results.append((native_block.decode_update(block, u0, u1, graph, lambda width: features), features[:, -1].clone()))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0][0], out) and torch.equal(results[0][1], row) for out, row in results[1:])
    with torch.no_grad():
        x, expected = _update_reference(block, u0, u1, graph, features, None)
    torch.testing.assert_close(results[0][0], expected, rtol=1e-4, atol=1e-5)


def test_decode_update_steps_aside_before_reserving_anything(monkeypatch):
    """Where the kernel cannot run the call, ``None`` comes back and the feature cache was not touched: switched off,
    too many sequences, key positions of another dtype, a hook on the projection, the block or a layer, a strided
    bias, a pruned or wrapped projection, autocast, a compact block over value features (no projection)."""
    import torch.nn.utils.prune as prune

    block = _block(GinConfig.published(graph="gin"))
    u0, u1, graph, features = _update_inputs(block, "dense")

    def refused(target=block, u0=u0, graph=graph) -> bool:
        with torch.no_grad():
            return native_block.decode_update(target, u0, u1 if u0.shape == u1.shape else None, graph, lambda width: pytest.fail("reserved")) is None

    with torch.no_grad():  # as given, it applies
        assert native_block.decode_update(block, u0, u1, graph, lambda width: features) is not None
    monkeypatch.setattr(native_block, "ENABLED", False)
    assert refused()
    monkeypatch.setattr(native_block, "ENABLED", True)
    many = native_block.MAX_ROWS + 1
    assert refused(u0=torch.randn(many, 1, DIMS.model_dim), graph=(torch.rand(many, 1, 7), None, 7))
    picks_block = _block(GinConfig(node_features="hidden", top_k=3))
    _, _, (weights, index, span), _ = _update_inputs(picks_block, "picks")
    assert refused(picks_block, graph=(weights, index.int(), span))
    for hooked in (block.in_proj, block, block.lin2):  # a hook on the projection, on the block, on one of its layers
        handle = hooked.register_forward_pre_hook(lambda module, args: None)
        assert refused()
        handle.remove()
    strided = torch.randn(2 * block.in_proj.bias.shape[0])[::2]
    original_bias, block.in_proj.bias = block.in_proj.bias, nn.Parameter(strided)  # a strided bias
    assert refused()
    block.in_proj.bias = original_bias
    pruned = _block(GinConfig.published(graph="gin"))
    prune.l1_unstructured(pruned.in_proj, "weight", 0.3)  # the weight is computed on access now
    assert refused(pruned)
    pruned.in_proj = nn.Sequential(nn.Linear(DIMS.model_dim, pruned.width_in))  # a projection wrapped in another module
    assert refused(pruned)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert refused()
    assert refused(_block(GinConfig()))
