"""The block's GELU (gin_adapter/activations.py): nn.GELU's function on every input size, ATen's kernel on small
CPU inputs, and PyTorch's oneDNN flag left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gin_adapter import activations
from gin_adapter.activations import GELU


@pytest.mark.parametrize("numel", [32, activations.SMALL_INPUT, activations.SMALL_INPUT + 1])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_equals_nn_gelu_in_values_and_gradients(numel, approximate):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel), requires_grad=True)
    ours, reference = GELU(approximate)(x), nn.GELU(approximate)(x)
    assert torch.allclose(ours, reference, atol=1e-6)
    upstream = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(torch.autograd.grad(ours, x, upstream)[0], torch.autograd.grad(reference, x, upstream)[0], atol=1e-6)
    assert torch._C._get_mkldnn_enabled()


def test_small_inputs_skip_onednn_and_the_flag_is_restored(monkeypatch):
    """Small inputs run with the oneDNN flag off (so ATen's kernel), large ones with it on; the flag is back on
    afterwards, also when the call raises, and a user's own setting (off) is kept."""
    seen, gelu = [], F.gelu

    def recording_gelu(x, approximate="none"):
        seen.append(torch._C._get_mkldnn_enabled())
        if x.numel() == 3:
            raise RuntimeError("boom")
        return gelu(x, approximate=approximate)

    monkeypatch.setattr(activations.F, "gelu", recording_gelu)
    GELU()(torch.randn(8))
    GELU()(torch.randn(activations.SMALL_INPUT + 1))
    with pytest.raises(RuntimeError, match="boom"):
        GELU()(torch.randn(3))
    assert seen == [False, True, False] and torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        GELU()(torch.randn(8))
        assert not torch._C._get_mkldnn_enabled()
    finally:
        torch._C._set_mkldnn_enabled(True)


def test_gelu_compiles_without_graph_breaks():
    """Under ``torch.compile(fullgraph=True)`` the oneDNN switch is skipped (it would break the graph)."""
    compiled = torch.compile(GELU(), fullgraph=True, backend="eager")
    x = torch.randn(8)
    assert torch.allclose(compiled(x), F.gelu(x), atol=1e-6)
