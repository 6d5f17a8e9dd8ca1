"""The published graph rule fused with the neighbour sum, chunked, with an analytic backward.

For ``head_reduction="sum"`` and ``sparsify="threshold"`` (``GinConfig.published()``) the adapter needs

    W[b, i, j] = min(1, sum_h P[b, h, i, j]),   S = sigmoid(alpha (W - tau)),   A = S * [S > threshold] * visible
    n[b, f, i] = sum_j A[b, i, j] x[b, f, j]          (graph="gin": messages from key j to query i)
    n[b, f, i] = A[b, i, self(i)] x[b, f, self(i)]    (graph="reference": self-loops only, the published code)

with ``P`` the attention probabilities of every head (``P = softmax_j(cap(scaling q_i . k_j))`` over visible keys)
and node features ``x (B, Fh, Lk, F)``, ``Fh`` = 1 (hidden or input features, shared by the heads) or ``Hkv`` (the
values; the sum of KV head ``c`` is that of its ``G`` query heads). This module computes exactly what the generic
chain (:func:`gin_adapter.aggregate.neighbour_sums`) computes for that rule, but one chunk of query rows at a time
(:func:`gin_adapter.topk_sum.plan_chunks`: under plain causal attention a chunk never scores the keys after its
last row) and without keeping any ``(B, H, Lq, Lk)`` or ``(B, Lq, Lk)`` tensor for backward.

Backward recomputes one chunk's ``P``, ``W``, ``S`` and, with ``dA`` the gradient of the adjacency
(``dA = dn x^T`` for "gin", the diagonal ``dn_i . x_self(i)`` for "reference"),

    dW = dA * [S > threshold] * visible * alpha S (1 - S) * [sum_h P <= 1]
    dS_h = P_h * (dW - sum_j dW_j P_h,j)          (the softmax backward; dP_h = dW for every head)
    dq = scaling dS k,   dk = scaling dS^T q      (times 1 - (s / c)^2 under soft-capping),   dx = A^T dn.

Saved for backward: q, k, the node features and the mask argument (tensors that exist anyway).
"""

from __future__ import annotations

import torch

from .adjacency import AdjacencyRule, float32_region, visible_keys
from .topk_sum import (QUERY_CHUNK_ROWS, Chunk, ScoreSpec, _causal_visible, _Layout, hide_future_keys, _mask_rows, _row_probabilities, _scores,
                       add_score_grads, plan_chunks)


def _chunk_graph(chunk_query, key, mask, spec: ScoreSpec, rule: AdjacencyRule, chunk: Chunk, batch: int, cap_slope: bool = False):
    """One chunk's ``(A (B, R, K), P (B, Hkv, G * R, K), kept (B, R, K) bool, under_one (B, R, K) bool, S, slope)``."""
    scores, slope = _scores(chunk_query, key[..., chunk.k0 : chunk.k1, :], _mask_rows(mask, chunk), spec, chunk, cap_slope=cap_slope)
    probs = _row_probabilities(scores, may_be_empty=mask is not None)
    del scores
    return (*_graph_of_probabilities(probs, mask, spec, rule, chunk, batch), slope)


def _graph_of_probabilities(probs, mask, spec: ScoreSpec, rule: AdjacencyRule, chunk: Chunk, batch: int):
    """``(A, P, kept, under_one, S)`` of :func:`_chunk_graph` from the chunk's probabilities ``P (B, Hkv, G * R, K)``."""
    rows, keys = chunk.rows, chunk.k1 - chunk.k0
    mask_rows = _mask_rows(mask, chunk)
    summed = probs.view(batch, -1, rows, keys).sum(dim=1)  # (B, R, K): heads h = kv * G + g
    under_one = summed <= 1.0
    sharpened = torch.sigmoid(summed.clamp_(max=1.0).sub_(rule.sharpen_tau).mul_(rule.sharpen_alpha))
    kept = sharpened > rule.threshold
    if mask is not None:
        kept &= visible_keys(mask_rows, rows, keys, probs.device, spec.sliding_window).any(dim=1)
    elif spec.q_len > 1 and spec.sliding_window is None:
        hide_future_keys(kept, chunk, False)
    elif spec.q_len > 1:
        kept &= _causal_visible(chunk, spec.sliding_window, probs.device)
    # (one decoded token without a mask sees every key)
    return sharpened * kept, probs, kept, under_one, sharpened


def _self_columns(chunk: Chunk, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Column of each chunk row's own key inside the chunk's keys (the queries are the last ``Lq`` keys)."""
    return torch.arange(chunk.q0, chunk.q1, device=device) + (k_len - q_len - chunk.k0)


def _sum_chunk(adjacency, features, chunk: Chunk, rule: AdjacencyRule, q_len: int):
    """``n (B, Fh, R, F)`` of one chunk from its adjacency ``(B, R, K)`` and all features ``(B, Fh, Lk, F)``."""
    if rule.graph == "gin":
        return torch.matmul(adjacency.unsqueeze(1), features[..., chunk.k0 : chunk.k1, :])
    columns = _self_columns(chunk, q_len, features.shape[-2], features.device)
    diagonal = adjacency.gather(-1, columns.view(1, -1, 1).expand(adjacency.shape[0], -1, 1))  # (B, R, 1)
    return diagonal.unsqueeze(1) * features[..., columns + chunk.k0, :]


def _forward(query, key, features, mask, spec: ScoreSpec, rule: AdjacencyRule, chunks: list[Chunk]) -> torch.Tensor:
    layout = _Layout(query, key.shape[1])
    query5 = layout.split(query)
    out = features.new_empty(*features.shape[:2], query.shape[-2], features.shape[-1])
    for chunk in chunks:
        adjacency = _chunk_graph(layout.rows(query5, chunk), key, mask, spec, rule, chunk, layout.batch)[0]
        out[..., chunk.q0 : chunk.q1, :] = _sum_chunk(adjacency, features, chunk, rule, spec.q_len)
    return out


def _backward(ctx, grad_out):
    query, key, features, mask = ctx.saved_tensors
    spec, rule = ctx.spec, ctx.rule
    need_q, need_k, need_x = ctx.needs_input_grad[:3]
    layout = _Layout(query, key.shape[1])
    query5, keys = layout.split(query), key.float()
    grad_query5 = layout.split(torch.zeros_like(query, dtype=torch.float32)) if need_q else None
    grad_key = torch.zeros_like(keys) if need_k else None
    grad_features = torch.zeros_like(features) if need_x else None
    for chunk in ctx.chunks:
        chunk_query = layout.rows(query5, chunk)
        adjacency, probs, kept, under_one, sharpened, slope = _chunk_graph(chunk_query, key, mask, spec, rule, chunk, layout.batch, cap_slope=True)
        grad = grad_out[..., chunk.q0 : chunk.q1, :]  # (B, Fh, R, F)
        chunk_features = features[..., chunk.k0 : chunk.k1, :]
        if rule.graph == "gin":
            if need_x:
                grad_features[..., chunk.k0 : chunk.k1, :] += torch.matmul(adjacency.unsqueeze(1).transpose(-1, -2), grad)
            if need_q or need_k:
                d_adjacency = torch.matmul(grad, chunk_features.transpose(-1, -2)).sum(dim=1)  # (B, R, K)
        else:
            columns = _self_columns(chunk, spec.q_len, features.shape[-2], features.device)
            index = columns.view(1, -1, 1).expand(layout.batch, -1, 1)
            if need_x:
                grad_features[..., columns + chunk.k0, :] += adjacency.gather(-1, index).unsqueeze(1) * grad
            if need_q or need_k:
                d_diagonal = (grad * chunk_features[..., columns, :]).sum(dim=(1, -1)).unsqueeze(-1)  # (B, R, 1)
                d_adjacency = torch.zeros_like(adjacency).scatter_(-1, index, d_diagonal)
        if not (need_q or need_k):
            continue
        d_summed = d_adjacency.mul_(kept).mul_(sharpened * (1.0 - sharpened)).mul_(rule.sharpen_alpha).mul_(under_one)  # dW
        rows, keys_in_chunk = chunk.rows, chunk.k1 - chunk.k0
        per_head = probs.view(layout.batch, -1, rows, keys_in_chunk)  # (B, H, R, K)
        row = (per_head * d_summed.unsqueeze(1)).sum(dim=-1, keepdim=True)
        d_scores = per_head.mul_(d_summed.unsqueeze(1) - row).view_as(probs)  # dS, in the probability buffer
        add_score_grads(d_scores, slope, chunk_query, keys[..., chunk.k0 : chunk.k1, :], chunk, layout, spec, grad_query5, grad_key)
    return (
        grad_query5.view(query.shape).to(query.dtype) if need_q else None,
        grad_key.to(key.dtype) if need_k else None,
        grad_features,
        None, None, None, None,
    )


class ThresholdNeighbourSum(torch.autograd.Function):
    """Autograd wrapper of :func:`_forward` with the analytic backward of the module docstring."""

    @staticmethod
    def forward(ctx, query, key, features, mask, spec: ScoreSpec, rule: AdjacencyRule, chunks: list[Chunk]):
        ctx.save_for_backward(query, key, features, mask)
        ctx.spec, ctx.rule, ctx.chunks = spec, rule, chunks
        return _forward(query, key, features, mask, spec, rule, chunks)

    @staticmethod
    def backward(ctx, grad_out):
        with float32_region(grad_out.device):  # a backward run inside autocast stays float32
            return _backward(ctx, grad_out)


def threshold_neighbour_sum(
    query: torch.Tensor,
    key: torch.Tensor,
    features: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rule: AdjacencyRule,
    *,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The published rule's neighbour sum straight from the attention's q, k (see the module docstring).

    Args:
        query: ``(B, H, Lq, D)``; the queries are the last ``Lq`` of the ``Lk`` keys.
        key: ``(B, Hkv, Lk, D)``, not repeated over query groups.
        features: node features ``(B, 1, Lk, F)`` shared by the heads, or the values ``(B, Hkv, Lk, F)``.
        attention_mask: what transformers passes to an attention function (bool, additive float, or ``None``).
        rule: the adapter's rule (its sharpening constants, threshold and ``graph`` operator); scaling, softcap, sliding_window: as the attention's.
        chunk_rows: query rows per chunk (default :data:`gin_adapter.topk_sum.QUERY_CHUNK_ROWS`).
    Returns:
        ``(B, 1, Lq, F)`` for shared features, ``(B, H, Lq, F)`` for the values (KV head ``c``'s sum repeated
        over its query heads), float32, as the generic chain returns them.
    """
    heads, q_len = query.shape[1], query.shape[2]
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads.")
    if features.shape[1] not in (1, kv_heads):
        raise ValueError(f"node features have {features.shape[1]} heads; expected 1 (shared) or {kv_heads} (the values).")
    spec = ScoreSpec(scaling=float(scaling), softcap=softcap, sliding_window=sliding_window, groups=heads // kv_heads, q_len=q_len)
    with float32_region(query.device):
        features = features.float()
        chunks = plan_chunks(q_len, k_len, 1, attention_mask is not None, sliding_window, chunk_rows or QUERY_CHUNK_ROWS)
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or features.requires_grad)
        if needs_grad:
            out = ThresholdNeighbourSum.apply(query, key, features, attention_mask, spec, rule, chunks)
        else:
            out = _forward(query, key, features, attention_mask, spec, rule, chunks)
    if features.shape[1] > 1 and spec.groups > 1:  # the values: one row per query head, as the generic chain
        out = out.repeat_interleave(spec.groups, dim=1)
    return out
