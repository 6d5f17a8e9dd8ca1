"""The wrapper around one attention module: ``output = attention(x) + scale * GIN(attention graph)``.

For one wrapped layer with heads ``h``, value vectors ``v_j^h`` (the node features, so the KV cache already holds
every earlier token's features and cached decoding is exact) and sparse adjacency ``A^h`` (see
:mod:`gin_adapter.adjacency`):

    z_i   = (1 + eps) * concat_h v_i^h + concat_h sum_{j <= i} A^h[i, j] v_j^h          (B, L, H * D)
    delta = scale * RMSNorm(W_out act(W_2 act(W_1 z_i + b_1) + b_2))                   (B, L, d_model)

``W_1`` is the paper's projection into the GIN width fused with the first layer of the GIN MLP (two linear maps
in a row are one); ``W_2`` the MLP's second layer, ``W_out`` the projection back, then RMSNorm and the learnable
per-layer ``scale`` (zero at init by default, so the wrapped model equals the base model).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from .adjacency import AdjacencyRule
from .attention import AggregationRequest, capture
from .config import GinConfig

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


class GinBlock(nn.Module):
    """One adapter's trainable parameters for one layer (scalars live here, not on the wrapper: FSDP-friendly).

    Args:
        in_dim: ``H * D``, the width of the concatenated per-head node features.
        hidden_dim: GIN width.
        out_dim: the model's hidden size.
        scale_init: initial value of the learnable scale.
    Shapes:
        ``x_self (B, Hkv, L, D), neighbours (B, H, L, D) -> (B, L, out_dim)`` with ``in_dim = H * D``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, activation: str = "gelu", dropout: float = 0.0, scale_init: float = 0.0) -> None:
        super().__init__()
        self.scale_init = scale_init
        self.eps = nn.Parameter(torch.zeros(1))
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),  # no kernel call at all for the default 0
            nn.Linear(hidden_dim, hidden_dim),
            ACTIVATIONS[activation](),
        )
        self.out_proj = nn.Linear(hidden_dim, out_dim, bias=False)
        self.norm = nn.RMSNorm(out_dim, eps=1e-6)
        self.scale = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init for the MLP, ``eps = 0``, unit norm weight, ``scale = scale_init``; callable again."""
        for module in (self.mlp[0], self.mlp[3], self.out_proj):
            module.reset_parameters()
        self.norm.reset_parameters()
        with torch.no_grad():
            self.eps.zero_()
            self.scale.fill_(self.scale_init)

    def forward(self, x_self: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """``x_self (B, Hkv, L, D)`` (un-repeated over the ``G = H / Hkv`` query groups), ``neighbours (B, H, L, D)``.

        ``z = (1 + eps) x_self + neighbours`` is formed per head (``x_self`` broadcast over groups, no copy of the
        repeated values) and merged to ``(B, L, H * D)`` once. The scale is folded into the RMSNorm weight,
        ``scale * (n(y) * w) = n(y) * (scale * w)``, so autograd keeps no normalised output for the scale's gradient.
        """
        dtype = self.out_proj.weight.dtype
        batch, heads, length, dim = neighbours.shape
        kv_heads = x_self.shape[1]
        grouped = neighbours.to(dtype).view(batch, kv_heads, heads // kv_heads, length, dim)
        z = grouped + (1 + self.eps) * x_self.to(dtype).unsqueeze(2)  # (B, Hkv, G, L, D)
        z = z.permute(0, 3, 1, 2, 4).reshape(batch, length, heads * dim)  # (B, L, H * D), heads h = kv * G + g
        y = self.out_proj(self.mlp(z))
        return F.rms_norm(y, self.norm.normalized_shape, self.norm.weight * self.scale, self.norm.eps)  # (B, L, d_model)


class GinAttentionLayer(nn.Module, BaseTunerLayer):
    """PEFT tuner layer wrapping one attention module; forward has three branches: disabled, active, none active."""

    adapter_layer_names = ("gin_blocks",)
    other_param_names = ("gin_rules",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GinConfig, *, in_dim: int, out_dim: int, scale_init: float, layer_index: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.gin_blocks = nn.ModuleDict()
        self.gin_rules: dict[str, AdjacencyRule] = {}
        self.in_dim, self.out_dim, self.layer_index = in_dim, out_dim, layer_index
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config, scale_init=scale_init)

    def update_layer(self, adapter_name: str, config: GinConfig, *, scale_init: float) -> None:
        """Add (or replace) adapter ``adapter_name`` on this layer."""
        block = GinBlock(self.in_dim, config.hidden_dim, self.out_dim, config.activation, config.dropout, scale_init)
        weight = next(self.base_layer.parameters(), None)
        if weight is not None:
            block.to(weight.device)
        self.gin_blocks[adapter_name] = block
        self.gin_rules[adapter_name] = AdjacencyRule.from_config(config)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "A GIN adapter cannot be merged into the base weights: its output depends on the input through the "
            "attention graph, so no fixed weight change reproduces it. Use `unload()` to drop the adapter, or keep "
            "the PeftModel for inference."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        active = [name for name in self.active_adapters if name in self.gin_blocks]
        if self.disable_adapters or not active:
            return self.base_layer(hidden_states, *args, **kwargs)
        request = AggregationRequest(module=self.base_layer, rules={name: self.gin_rules[name] for name in active})
        with capture(request):
            output = self.base_layer(hidden_states, *args, **kwargs)
        if len(request.results) != len(active):
            raise RuntimeError(
                f"{getattr(self, 'target_description', type(self.base_layer).__name__)} did not call transformers' "
                "attention interface with the GIN attention function and itself as `module`, so it cannot be wrapped; "
                "pass GinConfig(target_modules=[...]) naming the module that does."
            )
        attn_output = output[0] if isinstance(output, tuple) else output
        deltas = [self.gin_blocks[name](*request.results[name]) for name in active]
        delta = deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(0)
        attn_output = attn_output + delta.to(attn_output.dtype)
        return (attn_output, *output[1:]) if isinstance(output, tuple) else attn_output

    def __repr__(self) -> str:
        return "gin." + super().__repr__()
