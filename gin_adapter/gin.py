"""The GIN neighbourhood sum over an attention-derived graph, in two interchangeable backends.

GIN (Xu et al., 2019, "How Powerful are Graph Neural Networks?") updates node ``i`` as
``z_i = (1 + eps) * x_i + sum_{j in N(i)} A[i, j] * x_j`` and then applies an MLP. Here the nodes are tokens,
``N(i)`` are the keys ``j <= i`` kept in the sparse adjacency, and messages flow from key ``j`` (source) to
query ``i`` (target). This module computes the neighbourhood sum ``sum_j A[i, j] x_j`` per head:

* :func:`neighbour_sum_dense`: a batched matmul ``A @ X`` (fixed shapes, no host syncs, compiles);
* :func:`neighbour_sum_pyg`: torch_geometric message passing over an explicit ``edge_index``;
* :func:`neighbour_sum_reference`: the published code's effective operator, self-loops only
  (``A[i, i] * x_i``); see DESIGN.md "Known defect".

All three take ``adjacency (B, Ha, Lq, Lk)`` and node features ``x (B, Hx, Lk, D)`` with ``Ha, Hx`` in ``{1, H}``
and return ``(B, max(Ha, Hx), Lq, D)``; dense and pyg give the same numbers and gradients.
"""

from __future__ import annotations

import torch
from torch_geometric.nn import MessagePassing

from .adjacency import self_index


def neighbour_sum_dense(adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_j A[b, h, i, j] * x[b, h, j]`` as one batched matmul; ``Ha = 1`` broadcasts over heads."""
    return torch.matmul(adjacency.to(x.dtype), x)


class WeightedNeighbourSum(MessagePassing):
    """``out_i = sum_{(j -> i) in E} w_ji * x_j`` (PyG, ``aggr="add"``, ``flow="source_to_target"``).

    ``edge_index[0]`` holds source (key) nodes, ``edge_index[1]`` target (query) nodes. The graph may be
    bipartite: ``size=(num_sources, num_targets)``.
    """

    def __init__(self) -> None:
        super().__init__(aggr="add", flow="source_to_target")

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.propagate(edge_index, x=(x, None), edge_weight=edge_weight, size=size)

    def message(self, x_j: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return edge_weight.unsqueeze(-1) * x_j


_PYG_SUM = WeightedNeighbourSum()


def adjacency_to_edges(adjacency: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense adjacency ``(B, Ha, Lq, Lk)`` -> ``edge_index (2, E)`` and differentiable ``edge_weight (E,)``.

    Nodes are numbered per (batch, head) graph: source ``(b * H + h) * Lk + j``, target ``(b * H + h) * Lq + i``.
    Uses ``nonzero()`` (a host sync): this is the sparse backend's price, the dense backend has none.
    """
    batch, _, q_len, k_len = adjacency.shape
    adjacency = adjacency.expand(batch, num_heads, q_len, k_len)
    b, h, i, j = adjacency.nonzero(as_tuple=True)
    graph = b * num_heads + h
    edge_index = torch.stack([graph * k_len + j, graph * q_len + i])
    return edge_index, adjacency[b, h, i, j]


def neighbour_sum_pyg(adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Same result as :func:`neighbour_sum_dense`, computed by torch_geometric message passing."""
    heads = max(adjacency.shape[1], x.shape[1])  # features shared by the heads (1) or one graph for all (Ha = 1)
    batch, _, k_len, dim = x.shape
    x = x.expand(batch, heads, k_len, dim)
    q_len = adjacency.shape[-2]
    edge_index, edge_weight = adjacency_to_edges(adjacency, heads)
    out = _PYG_SUM(x.reshape(-1, dim), edge_index, edge_weight.to(x.dtype), size=(batch * heads * k_len, batch * heads * q_len))
    return out.view(batch, heads, q_len, dim)


def neighbour_sum_reference(adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Self-loops only: ``A[b, h, i, i] * x[b, h, i]``, what the published Sparse-GIN computes in effect."""
    q_len, k_len = adjacency.shape[-2:]
    keys = self_index(q_len, k_len, adjacency.device)
    diagonal = adjacency[..., torch.arange(q_len, device=adjacency.device), keys]  # (B, Ha, Lq)
    return diagonal.unsqueeze(-1).to(x.dtype) * x[..., keys, :]


NEIGHBOUR_SUMS = {
    "dense": neighbour_sum_dense,
    "pyg": neighbour_sum_pyg,
}
