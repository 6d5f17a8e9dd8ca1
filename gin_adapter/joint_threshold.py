"""Attention and the published rule's graph from one score computation (training with sdpa; ``GinConfig.published()``).

The published rule (:mod:`gin_adapter.threshold_sum`) needs every head's attention probabilities ``P``, which the
attention computes anyway. :func:`attention_with_threshold_graph` computes them once per query chunk and returns
the attention output together with the graph:

    O[b, h, i] = sum_j P[b, h, i, j] v[b, h // G, j]                                    (B, H, Lq, Dv)
    W = min(1, sum_h P[b, h]),   S = sigmoid(alpha (W - tau)),   A = S * [S > threshold] * visible    (B, Lq, Lk)

kept for the neighbour sum in one of three forms (:func:`storage`): its diagonal ``A[b, i, self(i)]`` ``(B, Lq)``
for ``graph="reference"`` (self-loops only); for ``graph="gin"`` either whole, ``(B, Lq, Lk)`` (``n = A x``), or,
on long inputs, as the ``K`` largest entries of each row with their key indices, ``(B, Lq, K)`` (``n`` gathered
from ``K`` rows). That form is exact: a kept key has ``W_j > w_min = tau + logit(threshold) / alpha`` and a row's
``W`` sum to at most ``H`` (each head's probabilities sum to 1), so a row keeps fewer than ``H / w_min`` keys,
``K = floor(H / w_min)`` (64 for 9 heads and the published constants) whatever the length.
:func:`threshold_graph_sum` forms the neighbour sum for any node features later (one matmul, a product with the
diagonal, or the gathered sum of :mod:`gin_adapter.joint`). Backward recomputes ``P`` once per chunk and adds the
graph's gradient ``dA`` to the attention's before one softmax backward (or, with ``keep_probabilities``, takes the
``P`` kept from forward and forms only the graph's parts from it again):

    dW = dA * [S > threshold] * visible * alpha S (1 - S) * [sum_h P <= 1]                 (the same for every head)
    dP_h = dO_h v^T + dW,   dS_h = P_h * (dP_h - sum_j dP_h,j P_h,j),   sum_j dP_h,j P_h,j = dO_h . O_h + sum_j dW_j P_h,j
    dq = scaling dS k,   dk = scaling dS^T q,   dv = P^T dO.

With the graph kept as each row's ``K`` largest entries, ``dW`` is non-zero only on them: backward recomputes
only ``P`` and forms ``dW`` and its terms on those ``K`` entries (:func:`kept_graph_terms`), and the softmax
backward is the joint top-k path's single pass (:func:`gin_adapter.joint._score_grads`, compiled on the CPU).

On the CPU, for plain causal attention with the graph kept whole or as at most 64 entries a row, all of it runs
in one compiled call per layer and direction (:func:`gin_adapter.native_attention_graph.threshold_forward`: tiles
of query rows with every head's probabilities in cache); elsewhere (a mask, ``keep_probabilities``, the diagonal,
another device) in the query chunks of ATen operators below.

So a layer scores the keys twice (forward, backward) instead of four times (sdpa and the separate kernel, each
forward and backward), and runs one ``dq``/``dk`` pair instead of two. The values and gradients equal sdpa followed
by :func:`gin_adapter.threshold_sum.threshold_neighbour_sum` up to float32 rounding (tests). Kept for backward:
q, k, v, the mask argument, ``O`` (which sdpa keeps too), the graph in its form and, with ``keep_probabilities``
(``GinConfig(recompute_adjacency=False)``), every chunk's ``P``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from . import native_attention_graph, native_decode, topk_sum
from .adjacency import AdjacencyRule, float32_region
from .joint import TopKGraph, _score_grads, attention_output_grads, graph_sum
from .joint_decode import decode_attention
from .threshold_sum import _chunk_graph, _graph_of_probabilities, _self_columns
from .top_k import top_k_last
from .topk_sum import Chunk, ScoreSpec, _Layout, _mask_rows, _row_probabilities, _scores, add_score_grads, plan_chunks

Storage = Literal["diagonal", "dense", "top_k"]

TOP_K_STORAGE_MIN_KEYS_PER_PICK = 8
"""``graph="gin"`` keeps each row's ``K`` largest entries instead of the whole graph once there are at least this
many keys per pick (``Lk >= 8 K``: 512 keys for 9 heads). Below it the whole graph and one dense matmul per sum
are cheap (4 x 256 tokens: 1 MB per layer); above it the gathered sum, ``O(L K F)`` instead of ``O(L^2 F)``, wins
and the whole graph would outgrow the queries."""


@dataclass
class ThresholdGraph:
    """The graph :func:`attention_with_threshold_graph` built (differentiable), in its :func:`storage` form:
    ``adjacency`` ``(B, Lq)`` (``"diagonal"``), ``(B, Lq, Lk)`` (``"dense"``) or ``(B, Lq, K)`` with the key
    ``index`` of each entry (``"top_k"``); and the rule it follows."""

    adjacency: torch.Tensor
    rule: AdjacencyRule
    form: Storage
    index: torch.Tensor | None = None
    chunks: list[Chunk] | None = None


def kept_per_row_bound(rule: AdjacencyRule, heads: int) -> int | None:
    """``floor(H / w_min)``, ``w_min = tau + logit(threshold) / alpha``: more keys than this are never kept in one
    row (see the module docstring); ``None`` when ``w_min <= 0`` (a threshold that keeps keys of any weight)."""
    w_min = rule.sharpen_tau + math.log(rule.threshold / (1.0 - rule.threshold)) / rule.sharpen_alpha
    return math.floor(heads / w_min) if w_min > 0 else None


def storage(rule: AdjacencyRule, query: torch.Tensor, key: torch.Tensor) -> Storage | None:
    """How this call's graph is kept, or ``None`` when none fits (sdpa + the separate kernel then): the diagonal
    for ``graph="reference"``; for ``"gin"`` each row's ``K`` largest entries from
    :data:`TOP_K_STORAGE_MIN_KEYS_PER_PICK` keys per pick on, else the whole graph while it is no larger than the
    queries ``(B, H, Lq, D)`` (``Lk <= H * D``)."""
    if rule.graph == "reference":
        return "diagonal"
    k_len, bound = key.shape[-2], kept_per_row_bound(rule, query.shape[1])
    if bound is not None and k_len >= TOP_K_STORAGE_MIN_KEYS_PER_PICK * bound:
        return "top_k"
    return "dense" if k_len <= query.shape[1] * query.shape[-1] else None


def same_rule(a: AdjacencyRule, b: AdjacencyRule) -> bool:
    """Whether two published-rule adapters build the same graph (their sharpening, threshold and operator)."""
    fields = ("sharpen_alpha", "sharpen_tau", "threshold", "graph")
    return all(getattr(a, name) == getattr(b, name) for name in fields)


def _store(graph: torch.Tensor, index: torch.Tensor | None, adjacency: torch.Tensor, chunk: Chunk, form: Storage, spec: ScoreSpec,
           k_len: int) -> None:
    """Write one chunk's adjacency ``(B, R, K)`` into the kept graph in its form."""
    rows = slice(chunk.q0, chunk.q1)
    if form == "dense":
        graph[:, rows, chunk.k0 : chunk.k1] = adjacency
    elif form == "top_k":  # every kept entry is among the row's K largest (module docstring); the rest weigh 0
        weights, local = top_k_last(adjacency, graph.shape[-1])
        graph[:, rows], index[:, rows] = weights, local + chunk.k0
    else:
        columns = _self_columns(chunk, spec.q_len, k_len, adjacency.device)
        graph[:, rows] = adjacency.gather(-1, columns.view(1, -1, 1).expand(adjacency.shape[0], -1, 1)).squeeze(-1)


def _chunk_graph_grad(grad_graph: torch.Tensor, chunk: Chunk, form: Storage, spec: ScoreSpec, shape: torch.Size, k_len: int) -> torch.Tensor:
    """``dA`` of one chunk ``(B, R, K)`` from the gradient of the graph kept whole or as its diagonal (the
    ``"top_k"`` form's gradient is taken on its entries, :func:`kept_graph_terms`)."""
    rows = slice(chunk.q0, chunk.q1)
    if form == "dense":
        return grad_graph[:, rows, chunk.k0 : chunk.k1]
    columns = _self_columns(chunk, spec.q_len, k_len, grad_graph.device)
    return grad_graph.new_zeros(shape).scatter_(-1, columns.view(1, -1, 1).expand(shape[0], -1, 1), grad_graph[:, rows, None])


class _AttentionWithThresholdGraph(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, spec: ScoreSpec, rule: AdjacencyRule, chunks: list[Chunk], form: Storage, top_k: int, keep: bool):
        layout = _Layout(query, key.shape[1])
        batch, k_len = layout.batch, key.shape[-2]
        compiled = None if keep else native_attention_graph.threshold_forward(query, key, value, mask, spec.scaling, **_rule_fields(rule), form=form,
                                                                             top_k=top_k)
        ctx.compiled = compiled is not None
        if compiled is not None:  # every tile of the layer in one compiled call
            out, graph, index, inputs = compiled
            ctx.save_for_backward(*inputs, out, graph if form == "top_k" else None, index)
            ctx.spec, ctx.rule, ctx.form = spec, rule, form
            ctx.set_materialize_grads(False)
            if index is not None:
                ctx.mark_non_differentiable(index)
            return out.view(*query.shape[:-1], value.shape[-1]), graph, index
        query5 = layout.split(query)
        out5 = value.new_empty(batch, layout.kv_heads, layout.groups, layout.q_len, value.shape[-1])
        shape = {"dense": (batch, layout.q_len, k_len), "top_k": (batch, layout.q_len, top_k), "diagonal": (batch, layout.q_len)}[form]
        graph = query.new_zeros(shape) if form == "dense" else query.new_empty(shape)
        index = torch.empty(shape, dtype=torch.long, device=query.device) if form == "top_k" else None
        kept_probs = []
        for chunk in chunks:
            adjacency, probs = _chunk_graph(layout.rows(query5, chunk), key, mask, spec, rule, chunk, batch)[:2]
            layout.put(out5, chunk, torch.matmul(probs, value[..., chunk.k0 : chunk.k1, :]))
            _store(graph, index, adjacency, chunk, form, spec, k_len)
            if keep:
                kept_probs.append(probs)
        ctx.save_for_backward(query, key, value, mask, out5, index, graph if form == "top_k" else None, *kept_probs)
        ctx.spec, ctx.rule, ctx.chunks, ctx.form = spec, rule, chunks, form
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused graph (adjacency_grad=False)
        if index is not None:
            ctx.mark_non_differentiable(index)
        return out5.view(*query.shape[:-1], value.shape[-1]), graph, index

    @staticmethod
    def backward(ctx, grad_out, grad_graph, _grad_index):
        if grad_out is None and grad_graph is None:
            return (None,) * 10
        with float32_region((grad_out if grad_out is not None else grad_graph).device):  # a backward run inside autocast stays float32
            return _backward(ctx, None if grad_out is None else grad_out.float(), grad_graph)


def _rule_fields(rule: AdjacencyRule) -> dict[str, float]:
    return dict(alpha=rule.sharpen_alpha, tau=rule.sharpen_tau, threshold=rule.threshold)


def _backward(ctx, grad_out, grad_graph):
    if ctx.compiled:
        query, key, value, out, graph, index = ctx.saved_tensors
        grads = native_attention_graph.threshold_backward(query, key, value, ctx.spec.scaling, **_rule_fields(ctx.rule), form=ctx.form, out=out,
                                                          grad_out=grad_out, grad_graph=grad_graph, graph=graph, index=index)
        return (*grads, None, None, None, None, None, None, None)
    query, key, value, mask, out5, index, kept_graph, *kept_probs = ctx.saved_tensors
    spec, rule, sparse = ctx.spec, ctx.rule, ctx.form == "top_k"
    layout = _Layout(query, key.shape[1])
    batch, k_len = layout.batch, key.shape[-2]
    grad5 = torch.zeros_like(out5) if grad_out is None else layout.split(grad_out)  # (an unused attention output)
    query5 = layout.split(query)
    grad_query5 = layout.split(torch.zeros_like(query))
    grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
    for number, chunk in enumerate(ctx.chunks):
        chunk_query, chunk_keys = layout.rows(query5, chunk), key[..., chunk.k0 : chunk.k1, :]
        if sparse:  # the graph's gradient needs P at its K kept entries only, then dS in one pass (compiled on the CPU)
            probs = kept_probs[number] if kept_probs else _chunk_probabilities(chunk_query, key, mask, spec, chunk)
            graph_terms = (None,) * 3 if grad_graph is None else kept_graph_terms(probs, grad_graph, kept_graph, index, chunk, rule, batch)
            d_scores = _score_grads(probs, layout.rows(grad5, chunk), value, out5, grad_value, chunk, layout, *graph_terms)
        else:
            if kept_probs:  # the graph's parts again from the kept probabilities (no scores, no softmax)
                adjacency, probs, kept, under_one, sharpened = _graph_of_probabilities(kept_probs[number], mask, spec, rule, chunk, batch)
            else:
                adjacency, probs, kept, under_one, sharpened, _ = _chunk_graph(chunk_query, key, mask, spec, rule, chunk, batch)
            d_probs, row = attention_output_grads(probs, layout.rows(grad5, chunk), value, layout.rows(out5, chunk), grad_value, chunk)
            if grad_graph is not None:
                d_summed = _chunk_graph_grad(grad_graph, chunk, ctx.form, spec, adjacency.shape, k_len) * kept
                d_summed = d_summed.mul_(sharpened * (1.0 - sharpened)).mul_(rule.sharpen_alpha).mul_(under_one)  # dW (B, R, K)
                rows, keys = chunk.rows, chunk.k1 - chunk.k0
                per_head = d_probs.view(batch, -1, rows, keys)  # (B, H, R, K), heads h = kv * G + g
                per_head += d_summed.unsqueeze(1)
                row += (probs.view(batch, -1, rows, keys) * d_summed.unsqueeze(1)).sum(dim=-1, keepdim=True).view_as(row)
            d_scores = d_probs.sub_(row).mul_(probs)
        add_score_grads(d_scores, None, chunk_query, chunk_keys, chunk, layout, spec, grad_query5, grad_key)
    return grad_query5.view(query.shape), grad_key, grad_value, None, None, None, None, None, None, None


def _chunk_probabilities(chunk_query, key, mask, spec: ScoreSpec, chunk: Chunk) -> torch.Tensor:
    """One chunk's attention probabilities ``P (B, Hkv, G * R, K)`` (the scores' softmax, nothing of the graph)."""
    scores = _scores(chunk_query, key[..., chunk.k0 : chunk.k1, :], _mask_rows(mask, chunk), spec, chunk)[0]
    return _row_probabilities(scores, may_be_empty=mask is not None)


def kept_graph_terms(probs: torch.Tensor, grad_graph: torch.Tensor, graph: torch.Tensor, index: torch.Tensor, chunk: Chunk,
                     rule: AdjacencyRule, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``"top_k"``-kept graph's gradient on one chunk's ``K`` stored entries of each row, in the terms the
    joint top-k path's softmax backward takes (:func:`gin_adapter.joint._score_grads`). With ``A_m`` the stored
    weights (``S`` on kept keys, 0 on the entries that fill a row up to ``K``) at key positions ``j_m``:

        dW_m = dA_m * [A_m > 0] * alpha A_m (1 - A_m) * [sum_h P_h[j_m] <= 1]                  (B, R, K)
        dS_h[j] = P_h[j] (dP_h[j] - c_h) + sum_{m: j_m = j} P_h[j_m] dW_m,   c_h = dO_h . O_h + sum_m P_h[j_m] dW_m

    which is the module docstring's dense ``dP_h += dW`` restricted to where ``dW`` can be non-zero (every kept
    key is stored), so no ``(B, R, Lk)`` graph is formed again: ``O(H K)`` per row instead of ``O(H Lk)``.
    Returns ``(dW, P_h[j_m], j_m)``, each ``(B, Hkv, G * R, K)`` (the same ``dW`` and ``j_m`` for every head)."""
    rows, keys = chunk.rows, chunk.k1 - chunk.k0
    span = slice(chunk.q0, chunk.q1)
    weights = graph[:, span]
    per_head = probs.view(batch, -1, rows, keys)  # heads h = kv * G + g
    positions = index[:, span].unsqueeze(1).expand(-1, per_head.shape[1], -1, -1)  # (B, H, R, K), absolute
    picked = per_head.gather(-1, positions - chunk.k0)
    d_kept = grad_graph[:, span] * weights * (1.0 - weights) * rule.sharpen_alpha
    d_kept = d_kept * ((weights > 0) & (picked.sum(dim=1) <= 1.0))
    return tuple(t.reshape(probs.shape[:-1] + (t.shape[-1],)) for t in (d_kept.unsqueeze(1).expand_as(picked), picked, positions))


def attention_with_threshold_graph(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, *,
                                   scaling: float, rule: AdjacencyRule, form: Storage | None = None,
                                   keep_probabilities: bool = False) -> tuple[torch.Tensor, ThresholdGraph]:
    """``(attention output (B, H, Lq, Dv) float32, the published rule's graph)`` from ``query (B, H, L, D)``,
    ``key``/``value`` ``(B, Hkv, L, .)`` and a bool mask or ``None`` (plain causal). Computed in float32, under
    ``torch.autocast`` too (:func:`gin_adapter.joint.sdpa_layout` rounds the output as sdpa's). ``form``: how the
    graph is kept (default :func:`storage`'s choice, or the whole graph where it has none); ``keep_probabilities``:
    keep every chunk's probabilities for backward instead of recomputing them there. See the module docstring."""
    heads, q_len = query.shape[1], query.shape[2]
    form = form or storage(rule, query, key) or "dense"
    if (form == "diagonal") != (rule.graph == "reference"):
        raise ValueError(f"graph={rule.graph!r} cannot be kept as {form!r}: the diagonal is for graph='reference' only.")
    top_k = kept_per_row_bound(rule, heads) if form == "top_k" else 1
    if top_k is None:
        raise ValueError(f"threshold={rule.threshold} keeps keys of any weight, so no number of keys per row bounds its graph; "
                         "keep it whole (form='dense').")
    top_k = min(top_k, key.shape[-2])
    spec = ScoreSpec(scaling=float(scaling), softcap=None, sliding_window=None, groups=heads // key.shape[1], q_len=q_len)
    chunks = plan_chunks(q_len, key.shape[2], top_k, mask is not None, None, topk_sum.QUERY_CHUNK_ROWS)  # >= K keys per chunk
    with float32_region(query.device):
        out, graph, index = _AttentionWithThresholdGraph.apply(query.float(), key.float(), value.float(), mask, spec, rule, chunks, form, top_k,
                                                                 keep_probabilities)
    return out, ThresholdGraph(graph, rule, form, index, chunks)


def decode_attention_with_threshold_graph(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float,
                                          rule: AdjacencyRule) -> tuple[torch.Tensor, ThresholdGraph]:
    """One decoded float32 token's attention output (sdpa's layout) and the published rule's graph from one score
    computation (:func:`gin_adapter.joint_decode.decode_applies` holds: no mask, no gradient). With the
    probabilities ``P (B, H, Lk)`` of the new token over every cached key:

        W = min(1, sum_h P_h),   S = sigmoid(alpha (W - tau)),   A = S * [S > threshold]          (B, Lk)

    kept as ``"dense"`` ``(B, 1, Lk)`` for ``graph="gin"`` or ``"diagonal"`` ``(B, 1)`` (the new token's own entry,
    the last key) for ``"reference"``, the forms :func:`threshold_graph_sum` takes. The same operations as the
    separate kernel's (:func:`gin_adapter.threshold_sum.threshold_neighbour_sum`) for one row; on the CPU in one
    compiled call (:func:`gin_adapter.native_decode.threshold_attention`: the same values up to float32 rounding)."""
    compiled = native_decode.threshold_attention(query, key, value, scaling=scaling, alpha=rule.sharpen_alpha, tau=rule.sharpen_tau,
                                                 threshold=rule.threshold)
    if compiled is not None:  # one call (gin_adapter.native_decode)
        out, adjacency = compiled
    else:
        batch, heads, k_len = query.shape[0], query.shape[1], key.shape[2]
        out, _, probs = decode_attention(query, key, value, scaling)
        summed = probs.view(batch, heads, k_len).sum(dim=1)  # heads h = kv * G + g
        sharpened = torch.sigmoid(summed.clamp_(max=1.0).sub_(rule.sharpen_tau).mul_(rule.sharpen_alpha))
        adjacency = sharpened * (sharpened > rule.threshold)
    if rule.graph == "reference":
        return out, ThresholdGraph(adjacency[:, -1:], rule, "diagonal")
    return out, ThresholdGraph(adjacency.unsqueeze(1), rule, "dense")


def threshold_graph_sum(graph: ThresholdGraph, features: torch.Tensor, groups: int) -> torch.Tensor:
    """``n_i = sum_j A[i, j] x_j`` (``graph="gin"``) or ``A[i, self(i)] x_self(i)`` (``"reference"``) for node
    features ``(B, 1, Lk, F)`` shared by the heads or the values ``(B, Hkv, Lk, F)``; returns ``(B, 1, Lq, F)`` or
    ``(B, H, Lq, F)`` float32, as :func:`gin_adapter.threshold_sum.threshold_neighbour_sum` does."""
    features = features.float()
    with float32_region(features.device):
        if graph.form == "top_k":  # the K kept entries of each row, one graph for every feature head
            batch, q_len, top_k = graph.adjacency.shape
            shape5 = (batch, features.shape[1], 1, q_len, top_k)
            picks = TopKGraph(graph.adjacency[:, None, None].expand(shape5), graph.index[:, None, None].expand(shape5), graph.chunks, top_k)
            out = graph_sum(picks, features, "gather")
        elif graph.form == "dense":
            out = torch.matmul(graph.adjacency.unsqueeze(1), features)
        else:
            q_len = graph.adjacency.shape[-1]
            out = graph.adjacency[:, None, :, None] * features[..., features.shape[-2] - q_len :, :]
    if features.shape[1] > 1 and groups > 1:  # the values: one row per query head
        out = out.repeat_interleave(groups, dim=1)
    return out
