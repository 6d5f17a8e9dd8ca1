"""The GIN neighbour sum ``n_i = sum_j A[i, j] x_j`` over the attention graph, for any node features.

The adjacency ``A`` comes from the attention's own ``q, k`` (with its mask, scale, soft-cap and sliding window,
:class:`GraphInputs`); the node features ``x`` are either the attention's value vectors ``(B, Hkv, Lk, D)`` or
features shared by every head ``(B, 1, Lk, F)`` (``node_features="hidden"`` or ``"input"``, projected to the GIN
width). Two implementations give the same numbers and gradients:

* the per-head top-k rule (the default) runs the fused kernel :func:`gin_adapter.topk_sum.topk_neighbour_sum`,
  which never keeps the probabilities, or, when the attention function already built the graph with the attention
  itself (training with sdpa, :mod:`gin_adapter.joint`; one decoded token, :mod:`gin_adapter.joint_decode`),
  only sums over it;
* the published rule (heads summed, sharpened, thresholded; ``GinConfig.published()``) with ``backend="auto"``
  runs the fused kernel :func:`gin_adapter.threshold_sum.threshold_neighbour_sum`, chunked, nothing of size
  ``(B, H, Lq, Lk)`` kept, or, when the attention function built the graph with the attention
  (:mod:`gin_adapter.joint_threshold`), only sums over it;
* every other rule (and ``backend="dense"`` or ``"pyg"`` for the published one) runs the generic chain :func:`neighbour_sums` (probabilities,
  head reduction, sparsify, sum), checkpointed when ``rule.recompute`` so its ``(B, H, Lq, Lk)`` intermediates are
  rebuilt in backward instead of kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.utils.checkpoint

from .adjacency import AdjacencyRule, attention_probabilities, float32_region, sparse_adjacency, visible_keys
from .gin import NEIGHBOUR_SUMS, neighbour_sum_reference
from .joint import TopKGraph, graph_sum, self_loop_sum
from .joint_decode import DecodeGraph, decode_graph_sum
from .joint_threshold import ThresholdGraph, same_rule, threshold_graph_sum
from .threshold_sum import threshold_neighbour_sum
from .topk_sum import topk_neighbour_sum


@dataclass(slots=True)
class GraphInputs:
    """What one attention call hands the attention function: everything the graph is built from.

    ``query (B, H, Lq, D)``, ``key``/``value (B, Hkv, Lk, D)`` (RoPE and the KV cache already applied, not
    repeated over query groups), the mask argument as transformers passes it, the score scale, and the
    architecture's soft-cap and sliding window (``None`` when it has none).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    sliding_window: int | None
    joint: TopKGraph | ThresholdGraph | DecodeGraph | None = None  # the graph, when the attention function built it with the attention

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.query.shape[1] // self.key.shape[1]

    @property
    def q_len(self) -> int:
        return self.query.shape[-2]

    @property
    def k_len(self) -> int:
        return self.key.shape[-2]


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, Hkv, L, D) -> (B, Hkv * groups, L, D)`` (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def neighbour_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rule: AdjacencyRule,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """The generic chain: ``sum_j A[i, j] x_j`` from the attention's q, k and node features ``value``.

    Args:
        query: ``(B, H, Lq, D)``; key: ``(B, H / groups, Lk, D)``, repeated here to ``H`` heads (inside the
            checkpoint, so only the unrepeated tensors are kept for backward).
        value: node features ``(B, H / groups, Lk, F)`` (repeated like the keys) or ``(B, 1, Lk, F)`` shared by all
            heads (broadcast, never repeated).
    Returns:
        ``(B, H or 1, Lq, F)`` float32 (under ``torch.autocast`` too): one row per adjacency head (1 when heads are
        reduced and features shared).
    """
    key = repeat_heads(key, groups)
    if value.shape[1] != 1:
        value = repeat_heads(value, groups)
    q_len, k_len = query.shape[-2], key.shape[-2]
    with float32_region(query.device):  # float32 throughout, also under mixed precision
        visible = visible_keys(attention_mask, q_len, k_len, query.device, sliding_window)
        probs = attention_probabilities(query, key, visible, scaling, softcap)
        adjacency = sparse_adjacency(probs, visible, rule)
        features = value.float()
        if rule.graph == "reference":
            return neighbour_sum_reference(adjacency, features)
        backend = "pyg" if rule.backend == "pyg" else "dense"
        return NEIGHBOUR_SUMS[backend](adjacency, features)


def graph_neighbour_sum(graph: GraphInputs, features: torch.Tensor, rule: AdjacencyRule) -> torch.Tensor:
    """``n_i = sum_j A[i, j] x_j`` for one adapter's rule: features ``(B, Hkv or 1, Lk, F)`` -> ``(B, H or 1, Lq, F)``.

    The fused kernel always returns one row per query head (shared features are expanded over the KV heads as a
    view); the generic chain returns one row per adjacency head.
    """
    joint = graph.joint
    if isinstance(joint, DecodeGraph) and rule.per_head_top_k and rule.top_k == joint.top_k:  # one decoded token, no grad
        return decode_graph_sum(joint, features, reference=rule.graph == "reference")
    if isinstance(joint, TopKGraph) and rule.per_head_top_k and rule.top_k == joint.top_k:
        batch, kv_heads, k_len = graph.key.shape[:3]
        joint = joint if rule.adjacency_grad else replace(joint, weights=joint.weights.detach())
        if rule.graph == "reference":
            return self_loop_sum(joint, features)
        return graph_sum(joint, features.expand(batch, kv_heads, k_len, features.shape[-1]))
    if isinstance(joint, ThresholdGraph) and rule.fused_threshold and same_rule(rule, joint.rule):
        joint = joint if rule.adjacency_grad else replace(joint, adjacency=joint.adjacency.detach())
        return threshold_graph_sum(joint, features, graph.groups)
    query, key = (graph.query, graph.key) if rule.adjacency_grad else (graph.query.detach(), graph.key.detach())
    if rule.fused_top_k:
        batch, kv_heads, k_len = key.shape[:3]
        if features.shape[1] != kv_heads:  # features shared by the heads: a view per KV head
            features = features.expand(batch, kv_heads, k_len, features.shape[-1])
        return topk_neighbour_sum(
            query, key, features, graph.mask, top_k=rule.top_k, scaling=graph.scaling, softcap=graph.softcap,
            sliding_window=graph.sliding_window, sum_mode=rule.backend if rule.backend in ("dense", "gather") else "auto",
        )
    if rule.fused_threshold:
        return threshold_neighbour_sum(query, key, features, graph.mask, rule, scaling=graph.scaling, softcap=graph.softcap,
                                       sliding_window=graph.sliding_window)
    args = (query, key, features, graph.mask)
    options = dict(rule=rule, scaling=graph.scaling, softcap=graph.softcap, sliding_window=graph.sliding_window, groups=graph.groups)
    if rule.recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(neighbour_sums, *args, use_reentrant=False, **options)
    return neighbour_sums(*args, **options)


def decode_graph_rows(graph: GraphInputs, rule: AdjacencyRule) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """One decoded token's graph as weighted rows of node features shared by the heads, for the compiled decode
    update (:func:`gin_adapter.native_block.decode_update`): ``(w (B, Hn, m), at (B, Hn, m) or None, span)``, where
    ``n_h = sum_m w[h, m] x[at[h, m]]`` over the keys' features (``at`` key positions), or ``sum_m w[h, m]
    x[Lk - span + m]`` without ``at``. The per-head top-k graph kept as picks (``Hn = H``, ``m = k``, span ``Lk``),
    the published rule's graph (``Hn = 1``: dense, ``m = Lk``; ``graph="reference"``: the new token's own entry, span
    1); ``None`` for any other graph (a dense top-k graph, top-k with ``graph="reference"``)."""
    joint = graph.joint
    if isinstance(joint, DecodeGraph) and rule.per_head_top_k and rule.top_k == joint.top_k and rule.graph != "reference" and joint.adjacency is None:
        batch, kv_heads, groups, picks = joint.weights.shape
        return joint.weights.view(batch, kv_heads * groups, picks), joint.index.view(batch, kv_heads * groups, picks), graph.k_len
    if isinstance(joint, ThresholdGraph) and (joint.rule is rule or (rule.fused_threshold and same_rule(rule, joint.rule))) and joint.form in ("dense", "diagonal"):
        adjacency = joint.adjacency  # (B, 1) or (B, Lq = 1, Lk)
        if joint.form == "diagonal":
            return adjacency.view(adjacency.shape[0], 1, 1), None, 1
        return adjacency, None, graph.k_len
    return None
