"""Attention and the published rule's graph from one score computation (training with sdpa; ``GinConfig.published()``).

The published rule (:mod:`gin_adapter.threshold_sum`) needs every head's attention probabilities ``P``, which the
attention computes anyway. :func:`attention_with_threshold_graph` computes them once per query chunk and returns
the attention output together with the graph:

    O[b, h, i] = sum_j P[b, h, i, j] v[b, h // G, j]                                    (B, H, Lq, Dv)
    W = min(1, sum_h P[b, h]),   S = sigmoid(alpha (W - tau)),   A = S * [S > threshold] * visible    (B, Lq, Lk)

kept whole for ``graph="gin"`` (``n = A x``) and as its diagonal ``A[b, i, self(i)]`` ``(B, Lq)`` for
``graph="reference"`` (self-loops only). :func:`threshold_graph_sum` forms the neighbour sum for any node features
later (plain autograd: one matmul, or a product with the diagonal). Backward recomputes ``P`` once per chunk and
adds the graph's gradient ``dA`` to the attention's before one softmax backward:

    dW = dA * [S > threshold] * visible * alpha S (1 - S) * [sum_h P <= 1]                 (the same for every head)
    dP_h = dO_h v^T + dW,   dS_h = P_h * (dP_h - sum_j dP_h,j P_h,j),   sum_j dP_h,j P_h,j = dO_h . O_h + sum_j dW_j P_h,j
    dq = scaling dS k,   dk = scaling dS^T q,   dv = P^T dO.

So a layer scores the keys twice (forward, backward) instead of four times (sdpa and the separate kernel, each
forward and backward), and runs one ``dq``/``dk`` pair instead of two. The values and gradients equal sdpa followed
by :func:`gin_adapter.threshold_sum.threshold_neighbour_sum` up to float32 rounding (tests). Kept for backward:
q, k, v, the mask argument, ``O`` (which sdpa keeps too) and the graph: ``(B, Lq, Lk)`` for ``graph="gin"``,
which is why :func:`fits` takes this path only while that is no larger than the queries ``(B, H, Lq, D)``
(``Lk <= H * D``: 576 keys on SmolLM2), ``(B, Lq)`` for ``graph="reference"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import topk_sum
from .adjacency import AdjacencyRule, float32_region
from .joint import attention_output_grads
from .threshold_sum import _chunk_graph, _self_columns
from .topk_sum import Chunk, ScoreSpec, _Layout, add_score_grads, plan_chunks


@dataclass
class ThresholdGraph:
    """The graph :func:`attention_with_threshold_graph` built (differentiable): the adjacency ``(B, Lq, Lk)``
    (``graph="gin"``) or its diagonal ``(B, Lq)`` (``graph="reference"``), and the rule it follows."""

    adjacency: torch.Tensor
    rule: AdjacencyRule


def fits(rule: AdjacencyRule, query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether keeping this call's graph costs no more memory than the queries: always for ``graph="reference"``
    (the diagonal), for ``"gin"`` while ``Lk <= H * D``; longer inputs take sdpa + the separate kernel."""
    return rule.graph == "reference" or key.shape[-2] <= query.shape[1] * query.shape[-1]


def same_rule(a: AdjacencyRule, b: AdjacencyRule) -> bool:
    """Whether two published-rule adapters build the same graph (their sharpening, threshold and operator)."""
    fields = ("sharpen_alpha", "sharpen_tau", "threshold", "graph")
    return all(getattr(a, name) == getattr(b, name) for name in fields)


def _store(graph: torch.Tensor, adjacency: torch.Tensor, chunk: Chunk, rule: AdjacencyRule, spec: ScoreSpec, k_len: int) -> None:
    """Write one chunk's adjacency ``(B, R, K)`` into the kept graph (whole, or the rows' own columns)."""
    if rule.graph == "gin":
        graph[:, chunk.q0 : chunk.q1, chunk.k0 : chunk.k1] = adjacency
    else:
        columns = _self_columns(chunk, spec.q_len, k_len, adjacency.device)
        graph[:, chunk.q0 : chunk.q1] = adjacency.gather(-1, columns.view(1, -1, 1).expand(adjacency.shape[0], -1, 1)).squeeze(-1)


def _chunk_graph_grad(grad_graph: torch.Tensor, chunk: Chunk, rule: AdjacencyRule, spec: ScoreSpec, shape: torch.Size, k_len: int) -> torch.Tensor:
    """``dA`` of one chunk ``(B, R, K)`` from the kept graph's gradient."""
    if rule.graph == "gin":
        return grad_graph[:, chunk.q0 : chunk.q1, chunk.k0 : chunk.k1]
    columns = _self_columns(chunk, spec.q_len, k_len, grad_graph.device)
    index = columns.view(1, -1, 1).expand(shape[0], -1, 1)
    return grad_graph.new_zeros(shape).scatter_(-1, index, grad_graph[:, chunk.q0 : chunk.q1, None])


class _AttentionWithThresholdGraph(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, spec: ScoreSpec, rule: AdjacencyRule, chunks: list[Chunk]):
        layout = _Layout(query, key.shape[1])
        batch, k_len = layout.batch, key.shape[-2]
        query5 = layout.split(query)
        out5 = value.new_empty(batch, layout.kv_heads, layout.groups, layout.q_len, value.shape[-1])
        graph = query.new_zeros(batch, layout.q_len, k_len) if rule.graph == "gin" else query.new_empty(batch, layout.q_len)
        for chunk in chunks:
            adjacency, probs = _chunk_graph(layout.rows(query5, chunk), key, mask, spec, rule, chunk, batch)[:2]
            layout.put(out5, chunk, torch.matmul(probs, value[..., chunk.k0 : chunk.k1, :]))
            _store(graph, adjacency, chunk, rule, spec, k_len)
        ctx.save_for_backward(query, key, value, mask, out5)
        ctx.spec, ctx.rule, ctx.chunks = spec, rule, chunks
        return out5.view(*query.shape[:-1], value.shape[-1]), graph

    @staticmethod
    def backward(ctx, grad_out, grad_graph):
        with float32_region(grad_out.device):  # a backward run inside autocast stays float32
            return _backward(ctx, grad_out.float(), grad_graph)


def _backward(ctx, grad_out, grad_graph):
    query, key, value, mask, out5 = ctx.saved_tensors
    spec, rule = ctx.spec, ctx.rule
    layout = _Layout(query, key.shape[1])
    batch, k_len = layout.batch, key.shape[-2]
    grad5, query5 = layout.split(grad_out), layout.split(query)
    grad_query5 = layout.split(torch.zeros_like(query))
    grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
    for chunk in ctx.chunks:
        chunk_query, chunk_keys = layout.rows(query5, chunk), key[..., chunk.k0 : chunk.k1, :]
        adjacency, probs, kept, under_one, sharpened, _ = _chunk_graph(chunk_query, key, mask, spec, rule, chunk, batch)
        d_probs, row = attention_output_grads(probs, layout.rows(grad5, chunk), value, layout.rows(out5, chunk), grad_value, chunk)
        if grad_graph is not None:
            d_summed = _chunk_graph_grad(grad_graph, chunk, rule, spec, adjacency.shape, k_len) * kept
            d_summed = d_summed.mul_(sharpened * (1.0 - sharpened)).mul_(rule.sharpen_alpha).mul_(under_one)  # dW (B, R, K)
            rows, keys = chunk.rows, chunk.k1 - chunk.k0
            per_head = d_probs.view(batch, -1, rows, keys)  # (B, H, R, K), heads h = kv * G + g
            per_head += d_summed.unsqueeze(1)
            row += (probs.view(batch, -1, rows, keys) * d_summed.unsqueeze(1)).sum(dim=-1, keepdim=True).view_as(row)
        d_scores = d_probs.sub_(row).mul_(probs)
        add_score_grads(d_scores, None, chunk_query, chunk_keys, chunk, layout, spec, grad_query5, grad_key)
    return grad_query5.view(query.shape), grad_key, grad_value, None, None, None, None


def attention_with_threshold_graph(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, *,
                                   scaling: float, rule: AdjacencyRule) -> tuple[torch.Tensor, ThresholdGraph]:
    """``(attention output (B, H, Lq, Dv) float32, the published rule's graph)`` from ``query (B, H, L, D)``,
    ``key``/``value`` ``(B, Hkv, L, .)`` and a bool mask or ``None`` (plain causal). Computed in float32, under
    ``torch.autocast`` too (:func:`gin_adapter.joint.sdpa_layout` rounds the output as sdpa's). See the module
    docstring."""
    heads, q_len = query.shape[1], query.shape[2]
    spec = ScoreSpec(scaling=float(scaling), softcap=None, sliding_window=None, groups=heads // key.shape[1], q_len=q_len)
    chunks = plan_chunks(q_len, key.shape[2], 1, mask is not None, None, topk_sum.QUERY_CHUNK_ROWS)
    with float32_region(query.device):
        out, graph = _AttentionWithThresholdGraph.apply(query.float(), key.float(), value.float(), mask, spec, rule, chunks)
    return out, ThresholdGraph(graph, rule)


def threshold_graph_sum(graph: ThresholdGraph, features: torch.Tensor, groups: int) -> torch.Tensor:
    """``n_i = sum_j A[i, j] x_j`` (``graph="gin"``) or ``A[i, self(i)] x_self(i)`` (``"reference"``) for node
    features ``(B, 1, Lk, F)`` shared by the heads or the values ``(B, Hkv, Lk, F)``; returns ``(B, 1, Lq, F)`` or
    ``(B, H, Lq, F)`` float32, as :func:`gin_adapter.threshold_sum.threshold_neighbour_sum` does."""
    features = features.float()
    with float32_region(features.device):
        if graph.rule.graph == "gin":
            out = torch.matmul(graph.adjacency.unsqueeze(1), features)
        else:
            q_len = graph.adjacency.shape[-1]
            out = graph.adjacency[:, None, :, None] * features[..., features.shape[-2] - q_len :, :]
    if features.shape[1] > 1 and groups > 1:  # the values: one row per query head
        out = out.repeat_interleave(groups, dim=1)
    return out
