"""Parameter products reused while no gradient is recorded (gin_adapter.derived): recomputed after every change."""

from __future__ import annotations

import copy

import torch
from conftest import tiny_model

from gin_adapter import GinConfig, get_gin_model, gin_layers
from gin_adapter.derived import Derived


def test_reused_without_grad_and_recomputed_after_each_kind_of_change():
    weight, scale = torch.nn.Parameter(torch.rand(4)), torch.nn.Parameter(torch.tensor([0.5]))
    gain = Derived(torch.mul)
    with torch.no_grad():
        first = gain(weight, scale)
        assert gain(weight, scale) is first
        scale.fill_(2.0)  # in place (an optimiser step, load_state_dict)
        assert torch.equal(gain(weight, scale), weight * 2.0)
    weight.data = weight.data * 3  # a new storage
    with torch.inference_mode():
        assert torch.equal(gain(weight, scale), weight * scale)
    weight.data = weight.data.double()
    with torch.no_grad():
        assert gain(weight, scale).dtype == torch.float64
    recorded = gain(weight, scale)  # gradient recording: computed every call, differentiable
    assert recorded.requires_grad and recorded is not gain(weight, scale)


def test_deepcopy_keeps_nothing_cached():
    weight = torch.rand(3)
    gain = Derived(torch.mul)
    with torch.no_grad():
        gain(weight, weight)
    assert copy.deepcopy(gain)._value is None


def test_evaluation_after_training_steps_uses_the_new_parameters():
    """The block's self weight and norm gain are reused between no-grad calls: after optimiser steps (in-place
    parameter updates) evaluation gives exactly what a fresh copy of the trained model gives."""
    model = get_gin_model(tiny_model("llama"), GinConfig(hidden_dim=8))
    with torch.no_grad():
        for layer in gin_layers(model):
            layer.gin_blocks["default"].scale.fill_(0.5)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            model(ids)  # fills the caches with the current parameters
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            cached = model(ids).logits
            fresh = copy.deepcopy(model)(ids).logits
        assert torch.equal(cached, fresh)
    block = next(iter(gin_layers(model)[0].gin_blocks.values()))
    assert block.eps.item() != 0.0 and block.scale.item() != 0.5  # the steps changed what is cached
