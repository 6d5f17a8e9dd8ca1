"""PEFT machinery: training only the adapter, save/load round trips, several adapters, merge/unload, generation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHITECTURES, perturb_adapter, tiny_model
from peft import PeftModel

from gin_adapter import GinConfig, get_gin_model, gin_layers, layer_scales, load_gin_model, save_adapter


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_only_adapter_parameters_change_after_a_step():
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".gin_blocks." in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(_ids(), labels=_ids()).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    assert any(name.endswith(".scale") for name in changed)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_wraps_trains_and_starts_at_identity(arch):
    base = tiny_model(arch, "eager")
    ids = _ids()
    expected = base(ids).logits
    model = get_gin_model(base, GinConfig(hidden_dim=8))
    assert len(gin_layers(model)) == 2
    assert (model(ids).logits - expected).abs().max().item() < 1e-5
    perturb_adapter(model)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_model_without_causal_attention_gives_clear_error():
    """BERT built bidirectional (is_decoder=False) has no causal self-attention to wrap; as a decoder it is wrapped."""
    from transformers import BertConfig, BertLMHeadModel

    def bert(is_decoder: bool) -> BertLMHeadModel:
        return BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=is_decoder))

    with pytest.raises(ValueError, match="model_type='bert'.*not causal.*is_decoder=True.*target_modules"):
        get_gin_model(bert(False), GinConfig(hidden_dim=4))
    assert len(gin_layers(get_gin_model(bert(True), GinConfig(hidden_dim=4)))) == 1


def test_attention_that_bypasses_the_interface_is_reported():
    """A wrapped module whose forward never calls transformers' attention interface (a custom or patched attention)
    gives no graph: the call says so and names the fix instead of failing later on a missing tensor."""
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8))
    layer = gin_layers(model)[0]
    layer.base_layer.forward = lambda hidden_states, *args, **kwargs: (hidden_states, None)
    with pytest.raises(RuntimeError, match="did not call transformers' attention interface.*target_modules"):
        model(_ids())


def test_wrapper_passes_the_attention_modules_attributes_through():
    """Decoder layers read their attention's attributes from outside (Ergo: ``self_attn.o_proj.weight.dtype``; OLMo 3
    on transformers 5.2-5.3: ``self_attn.attention_type``): the wrapper answers with the wrapped module's."""
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8))
    layer = gin_layers(model)[0]
    assert layer.o_proj is layer.base_layer.o_proj and layer.o_proj.weight.dtype == torch.float32
    assert layer.head_dim == layer.base_layer.head_dim and layer.layer_idx == 0
    assert layer.gin_blocks is layer._modules["gin_blocks"]  # the wrapper's own modules stay its own
    with pytest.raises(AttributeError, match="no_such_attribute"):
        layer.no_such_attribute
    layer.base_layer.o_proj.weight.data.zero_()  # what the wrapper answers is the live module, not a copy
    assert layer.o_proj.weight.abs().sum() == 0


def test_non_attention_target_is_refused():
    with pytest.raises(ValueError, match="not an attention module"):
        get_gin_model(tiny_model(), GinConfig(hidden_dim=4, target_modules=["mlp"]))


def _saved(tmp_path, **config):
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, **config))
    perturb_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _randomise_adapter(model: torch.nn.Module, seed: int = 7) -> dict[str, torch.Tensor]:
    """Overwrite every adapter parameter with fresh random numbers (a fresh tiny model re-seeds the same init, so
    only a full save/load can bring these back); returns them by name."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_save_load_round_trip_both_apis(tmp_path):
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8, sparsify="threshold", head_reduction="sum"))
    saved = _randomise_adapter(model)
    folder = save_adapter(model, tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():  # as the loaded, frozen copies run: without gradients the attention's own kernel runs
        expected = model(ids).logits  # (with them the graph is built beside the attention: equal up to rounding)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "GIN"
    assert not (folder / "adapter_model.bin").exists()
    for loader in (lambda base: PeftModel.from_pretrained(base, folder), lambda base: load_gin_model(base, folder)):
        loaded = loader(tiny_model())
        reloaded = {n: p.detach() for n, p in loaded.named_parameters() if ".gin_blocks." in n}
        assert reloaded.keys() == saved.keys()
        for name, tensor in saved.items():
            assert torch.equal(reloaded[name], tensor), name
        assert torch.equal(loaded(ids).logits, expected)
        assert loaded.peft_config["default"].sparsify == "threshold"


def test_two_adapters_loaded_from_disk_each_reproduce_their_outputs(tmp_path):
    ids = _ids()
    outputs = {}
    for name, config in (("first", GinConfig(hidden_dim=8)), ("second", GinConfig(hidden_dim=4, sparsify="threshold", head_reduction="sum"))):
        model = get_gin_model(tiny_model(), config)
        _randomise_adapter(model, seed=len(name))
        save_adapter(model, tmp_path / name)
        outputs[name] = model(ids).logits
    assert (outputs["first"] - outputs["second"]).abs().max() > 1e-3
    model = PeftModel.from_pretrained(tiny_model(), tmp_path / "first", adapter_name="first")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ("first", "second", "first"):
        model.set_adapter(name)
        assert torch.allclose(model(ids).logits, outputs[name], atol=1e-6), name


def test_adapters_saved_in_the_0_1_0_key_format_still_load(tmp_path):
    """0.1.0 wrote nested block keys with the adapter name inside (``gin_blocks.default.mlp.0.weight``)."""
    from safetensors.torch import load_file, save_file

    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8))
    _randomise_adapter(model)
    folder = save_adapter(model, tmp_path / "adapter")
    weights = load_file(folder / "adapter_model.safetensors")
    legacy = {k.replace(".gin_blocks.mlp.", ".gin_blocks.default.mlp.").replace(".gin_blocks.out_proj.", ".gin_blocks.default.out_proj.").replace(".gin_blocks.norm.", ".gin_blocks.default.norm."): v for k, v in weights.items()}
    assert legacy.keys() != weights.keys()
    save_file(legacy, folder / "adapter_model.safetensors")
    ids = _ids()
    loaded = PeftModel.from_pretrained(tiny_model(), folder, adapter_name="renamed")
    with torch.no_grad():  # the same attention path for both (with gradients, training builds the graph beside it)
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unknown_config_keys_are_named_in_a_warning(tmp_path):
    from gin_adapter.io import read_adapter_config

    _, folder = _saved(tmp_path)
    config_file = folder / "adapter_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "future_field": 3, "another_one": "x"}))
    with pytest.warns(UserWarning, match=r"\['another_one', 'future_field'\].*newer version"):
        config = read_adapter_config(folder)
    assert config.hidden_dim == 8


def test_atomic_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path)
    before = (folder / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_two_adapters_switch(tmp_path):
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=8))
    model.add_adapter("other", GinConfig(hidden_dim=4, graph="reference"))
    perturb_adapter(model, scale=0.3)
    ids = _ids()
    model.set_adapter("default")
    first = model(ids).logits
    model.set_adapter("other")
    second = model(ids).logits
    with model.disable_adapter():
        base = model(ids).logits
    model.set_adapter("default")
    assert torch.equal(model(ids).logits, first)
    assert (first - second).abs().max() > 1e-3 and (first - base).abs().max() > 1e-3
    assert {n.split(".gin_blocks.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"default"}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()


def test_merge_refused_and_unload_restores_base():
    base = tiny_model()
    ids = _ids()
    expected = base(ids).logits
    model = get_gin_model(base, GinConfig(hidden_dim=8))
    perturb_adapter(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    restored = model.unload()
    assert not gin_layers(restored)
    assert restored.config._attn_implementation == "sdpa"
    assert torch.equal(restored(ids).logits, expected)


def test_adapter_for_another_base_model_is_reported(tmp_path):
    _, folder = _saved(tmp_path)
    other = tiny_model(hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match=r"does not match this base model.*hidden size 32.*\n.*adapter \(\d+, ?\d+\)"):
        load_gin_model(other, folder)


@pytest.mark.parametrize("layers", [1, 3])
def test_adapter_for_another_number_of_layers_is_reported(tmp_path, layers):
    _, folder = _saved(tmp_path)  # two layers
    with pytest.raises(ValueError, match=rf"adapter holds layers 0-1, this base model has {layers} layers"):
        load_gin_model(tiny_model(num_hidden_layers=layers), folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_are_reported_by_peft_loader_too(tmp_path, damage):
    _, folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="adapter_model.safetensors is truncated or corrupt.*save or download the adapter again"):
        PeftModel.from_pretrained(tiny_model(), folder)


def test_corrupt_and_pickle_files_are_refused(tmp_path):
    _, folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gin_model(tiny_model(), folder)
    weights.unlink()
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_gin_model(tiny_model(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_gin_model(tiny_model(), folder)


@pytest.mark.parametrize("rule", [dict(), dict(backend="gather"), dict(sparsify="threshold", head_reduction="sum"), dict(head_reduction="max", top_k=2)])
def test_cached_generation_equals_uncached(rule, kernel_paths):
    """Greedy tokens with the KV cache equal those without, for a non-zero adapter and left-padded batches."""
    base = tiny_model()
    base.generation_config.pad_token_id = 0
    model = get_gin_model(base, GinConfig(hidden_dim=8, **rule))
    perturb_adapter(model, scale=2.0)
    ids = _ids(2, 9, seed=5)
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**kwargs, use_cache=True)
    without_cache = model.generate(**kwargs, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    if rule.get("backend") == "gather":  # prefill, decoding and the uncached runs all gathered
        assert set(kernel_paths) == {"gather"}, kernel_paths
    elif GinConfig(**rule).is_per_head_top_k:  # auto: dense sums at these lengths (a padding mask: no decode path)
        assert set(kernel_paths) == {"dense"}, kernel_paths
    with model.disable_adapter():
        plain = model.generate(**kwargs, use_cache=True)
    assert not torch.equal(with_cache, plain), "the adapter should change the generated tokens"
    # the padded row generates what it generates alone
    alone = model.generate(input_ids=ids[:1, 3:], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(alone[0, 6:], with_cache[0, 9:])


def test_loss_falls_on_a_tiny_task():
    """A few hundred steps on a fixed repeating sequence: the GIN adapter alone lowers the loss substantially."""
    torch.manual_seed(0)
    model = get_gin_model(tiny_model(), GinConfig(hidden_dim=16))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pattern = torch.arange(3, 35).repeat(2)[None]  # a period-32 sequence: copying from 32 tokens back is learnable
    losses = []
    for _ in range(100):
        loss = model(pattern, labels=pattern).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.85 * losses[0]  # about 4.85 -> 3.7 on this frozen random base
