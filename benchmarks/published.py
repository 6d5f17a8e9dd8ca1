"""A re-creation of the published Sparse-GIN code's *way of computing* (DESIGN.md section 2), for benchmarking.

Written from the description in DESIGN.md, not copied. It computes the same output as a ``gin_adapter`` model
with ``GinConfig(head_reduction="sum", sparsify="threshold", graph="gin")`` (the published adjacency rule and
the intended key -> query message direction), but the way the published code does it:

1. eager attention for every layer, returning the full probabilities ``P (B, H, L, L)``; the probabilities
   stay in the autograd graph (the eager ``P @ V`` keeps them for backward);
2. the adjacency built from ``P`` with dense ``(B, L, L)`` tensor ops: sum over heads clamped to 1, attention
   mask, sharpen ``sigmoid(alpha (A - tau))``, zero entries ``<= threshold``, ``tril``;
3. a Python loop over the batch: ``nonzero()`` of each sample's adjacency (a host sync per sample), one
   ``torch_geometric.data.Data`` per sample, ``Batch.from_data_list``;
4. one PyG ``MessagePassing`` GIN-style convolution ``(1 + eps) x_i + sum_j A[i, j] x_j`` over the batched
   graph, split back per sample with ``batch.bincount().tolist()`` (another host sync), then the GIN MLP.

Node features are the layer's value vectors (heads repeated, concatenated), as in ``gin_adapter``, so that the
two compute the same numbers; the published code used hidden states, which does not change the cost profile.
The published code's message direction defect (DESIGN.md, "Known defect") is *not* reproduced: edges are
``source = key j -> target = query i`` here, so the output equals ``gin_adapter``'s ``graph="gin"``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import MessagePassing

from gin_adapter.blocks import GinBlock


class GinStyleConv(MessagePassing):
    """``z_i = (1 + eps) x_i + sum_{(j -> i)} w_ji x_j`` (PyG ``aggr="add"``, messages from ``edge_index[0]``)."""

    def __init__(self) -> None:
        super().__init__(aggr="add", flow="source_to_target")

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (1 + eps) * x + self.propagate(edge_index, x=x, edge_weight=edge_weight)

    def message(self, x_j: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return edge_weight.view(-1, 1) * x_j


class PublishedStyleSparseGin(nn.Module):
    """Wraps one (eager) Llama-style attention module; adds ``scale * RMSNorm(out(MLP(GIN(A, V))))`` to its output.

    Args:
        attention: the base attention module (its model must run ``attn_implementation="eager"``).
        block: the GIN parameters (a :class:`gin_adapter.blocks.GinBlock`, shared layout with ``gin_adapter``).
        alpha, tau, threshold: the published sharpen-and-threshold rule.
    """

    def __init__(self, attention: nn.Module, block: GinBlock, alpha: float = 10.0, tau: float = 0.1, threshold: float = 0.6) -> None:
        super().__init__()
        self.attention = attention
        self.block = block
        self.conv = GinStyleConv()
        self.alpha, self.tau, self.threshold = alpha, tau, threshold

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs: Any):
        attn_output, probs = self.attention(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs)
        if probs is None:
            raise RuntimeError("PublishedStyleSparseGin needs attention probabilities: load the model with attn_implementation='eager'.")
        batch, length, _ = hidden_states.shape
        attn = self.attention
        groups = attn.num_key_value_groups
        # node features: the value vectors, KV heads repeated to all heads, concatenated (B, L, H * D)
        values = attn.v_proj(hidden_states).view(batch, length, -1, attn.head_dim)
        values = values.repeat_interleave(groups, dim=2).reshape(batch, length, -1).float()

        # adjacency, dense (B, L, L): sum over heads clamped to 1, mask, sharpen, threshold, causal
        adjacency = probs.float().sum(dim=1).clamp(max=1.0)
        if attention_mask is not None:
            visible = attention_mask[:, 0, :, :length]
            visible = visible if visible.dtype == torch.bool else visible > torch.finfo(visible.dtype).min / 2
            adjacency = adjacency * visible
        adjacency = torch.sigmoid(self.alpha * (adjacency - self.tau))
        adjacency = torch.where(adjacency > self.threshold, adjacency, torch.zeros_like(adjacency))
        adjacency = torch.tril(adjacency)

        # the published Python loop: one PyG graph per sample from nonzero() (a host sync each)
        data_list = []
        for b in range(batch):
            target, source = adjacency[b].nonzero(as_tuple=True)
            edge_index = torch.stack([source, target])  # messages key j -> query i
            data_list.append(Data(x=values[b], edge_index=edge_index, edge_weight=adjacency[b, target, source]))
        graph = Batch.from_data_list(data_list)
        z = self.conv(graph.x, graph.edge_index, graph.edge_weight, self.block.eps)
        z = torch.stack(z.split(graph.batch.bincount().tolist()), dim=0)  # (B, L, H * D)

        block = self.block
        z = z.to(block.out_proj.weight.dtype)
        delta = block.norm(block.out_proj(block.mlp(z)), block.scale)
        return attn_output + delta.to(attn_output.dtype), probs


def build_published_model(base: nn.Module, blocks: list[GinBlock], alpha: float = 10.0, tau: float = 0.1, threshold: float = 0.6) -> nn.Module:
    """A copy of ``base`` (eager attention, frozen) whose attention modules are wrapped with copies of ``blocks``.

    ``blocks[i]`` is layer ``i``'s GIN block (e.g. taken from a ``gin_adapter`` model, so both compute the same).
    The copy shares ``base``'s (frozen) parameter and buffer tensors.
    """
    model = copy.deepcopy(base, {id(t): t for t in list(base.parameters()) + list(base.buffers())})
    model.set_attn_implementation("eager")
    model.requires_grad_(False)
    layers = model.model.layers
    if len(blocks) != len(layers):
        raise ValueError(f"need one GinBlock per layer: {len(blocks)} blocks for {len(layers)} layers")
    for layer, block in zip(layers, blocks):
        block = copy.deepcopy(block).requires_grad_(True)
        layer.self_attn = PublishedStyleSparseGin(layer.self_attn, block, alpha, tau, threshold)
    return model


def published_blocks(model: nn.Module) -> list[nn.Module]:
    """The GIN blocks of a model built by :func:`build_published_model`, in layer order."""
    return [layer.self_attn.block for layer in model.model.layers]
