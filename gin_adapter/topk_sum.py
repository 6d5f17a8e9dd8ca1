"""The per-head top-k neighbour sum fused with the attention scores, with an analytic backward.

For the default rule (``sparsify="topk"``, ``head_reduction="none"``, ``graph="gin"``) the adapter needs, per head,

    out[b, h, i] = sum_{j in topk_i} P[b, h, i, j] * v[b, h // G, j]                          (B, H, Lq, D)
    P[b, h, i, j] = softmax_j(s[b, h, i, j]) over visible keys,  s = cap(scaling * q_i . k_j)

with ``G = H / Hkv`` query heads per key/value head (grouped-query attention) and ``cap(s) = c * tanh(s / c)`` when
the model soft-caps its logits (Gemma-2). This module computes exactly what the generic chain in
:mod:`gin_adapter.attention` computes for that rule (same values, same gradients to q, k, v), but

* picks the top-k on the probabilities of one query chunk at a time (one fused ``softmax`` per chunk: the
  same picks as the chain, which takes the top-k of the probabilities too), through :func:`top_k_last`, which
  is 1.2-2x faster than ``torch.topk`` on CPU for rows of 128 keys and more;
* handles grouped-query attention by viewing the queries as ``(B, Hkv, G * Lq, D)``: keys and values are never
  repeated, and the tensors saved for backward are the q, k, v that the attention itself keeps;
* sums the neighbours either densely (the k weights scattered into the probability buffer, one batched matmul: best on
  short sequences) or by gathering the k value rows (``O(L k D)``: best on long sequences with small k);
* works through the query rows in chunks (:data:`QUERY_CHUNK_ROWS`): under plain causal attention a chunk only
  computes scores for the keys its rows can see, so the upper triangle (and keys outside a sliding window) is
  skipped, and each chunk's buffers stay small enough for the cache;
* recomputes only the probabilities in backward (one matmul, one fused ``softmax``). With ``W`` the kept weights
  and ``dW`` their gradient, the softmax backward ``dS = P * (dP - sum_j dP_j P_j)`` has ``dP`` non-zero on the k kept keys only, so
  ``dS = scatter(dW * W) - c * P`` with ``c = sum_k dW * W``; then ``dq = scaling * dS k`` and
  ``dk = scaling * dS^T q`` (times ``1 - (s / c)^2`` under soft-capping).

Saved for backward: q, k, v, the attention mask argument (tensors that exist anyway) and the top-k indices and
weights ``(B, H, Lq, k)``. Nothing of size ``(B, H, Lq, Lk)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from . import native_score_rows
from .adjacency import float32_region, visible_keys
from .chunk_sums import chunk_sum, chunk_sum_grads
from .joint_decode import DecodeGraph, decode_graph_sum, decode_scores, top_k_adjacency
from .top_k import top_k_last

SumMode = Literal["dense", "gather"]

GATHER_MIN_KEYS_PER_NEIGHBOUR = 128
"""``sum_mode="auto"`` gathers when ``Lk >= 128 * k`` (docs/benchmarks.md: on CPU the gathered sum beat the dense
one for k = 8 from 1024 tokens on)."""

QUERY_CHUNK_ROWS = 64
"""Query rows per chunk. Longer inputs are processed in chunks of this many rows; with plain causal attention
each chunk only touches the keys up to its last row (and inside the sliding window), so about half of the score
matrix is never computed, and the ``(G * rows, keys)`` buffers stay in cache. On CPU (one thread, H=9, Hkv=3,
D=64, forward + backward) 64 rows was the fastest of 32-256: 1.4-1.8x faster than one chunk at 256 tokens, 3x at
1024 and 4096 (docs/benchmarks.md)."""


@dataclass(frozen=True)
class ScoreSpec:
    """What turns ``q, k`` into masked scores: everything except the tensors."""

    scaling: float
    softcap: float | None
    sliding_window: int | None
    groups: int
    q_len: int


@dataclass(frozen=True)
class Chunk:
    """Query rows ``[q0, q1)`` and the key columns ``[k0, k1)`` they can see."""

    q0: int
    q1: int
    k0: int
    k1: int

    @property
    def rows(self) -> int:
        return self.q1 - self.q0


def choose_sum_mode(sum_mode: str, top_k: int, k_len: int) -> SumMode:
    """Resolve ``"auto"`` to ``"dense"`` or ``"gather"`` (see :data:`GATHER_MIN_KEYS_PER_NEIGHBOUR`)."""
    if sum_mode == "auto":
        return "gather" if k_len >= GATHER_MIN_KEYS_PER_NEIGHBOUR * top_k else "dense"
    if sum_mode not in ("dense", "gather"):
        raise ValueError(f"sum_mode={sum_mode!r} is not one of 'auto', 'dense', 'gather'.")
    return sum_mode


def plan_chunks(q_len: int, k_len: int, top_k: int, has_mask: bool, sliding_window: int | None, chunk_rows: int) -> list[Chunk]:
    """Split the query rows into chunks; without a mask argument (plain causal) each sees keys ``j <= i`` only.

    Every chunk spans at least ``min(top_k, Lk)`` keys so that all chunks return ``k`` picks (picks of keys a row
    cannot see get weight 0).
    """
    if q_len <= chunk_rows:
        return [Chunk(0, q_len, 0, k_len)]
    k = min(top_k, k_len)
    chunks = []
    for q0 in range(0, q_len, chunk_rows):
        q1 = min(q0 + chunk_rows, q_len)
        k0, k1 = 0, k_len
        if not has_mask:  # visible_keys' no-mask rule for Lq > 1: key j <= query i (and i - j < window)
            k1 = min(k_len, q1)
            if sliding_window is not None:
                k0 = max(0, q0 - sliding_window + 1)
            if k1 - k0 < k:
                k1 = min(k_len, k0 + k)
                k0 = k1 - k
        chunks.append(Chunk(q0, q1, k0, k1))
    return chunks


def _causal_visible(chunk: Chunk, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean ``(rows, keys)`` of the chunk under plain causal attention (:func:`visible_keys` with no mask)."""
    rows = torch.arange(chunk.q0, chunk.q1, device=device).unsqueeze(-1)
    cols = torch.arange(chunk.k0, chunk.k1, device=device).unsqueeze(0)
    visible = cols <= rows
    if sliding_window is not None:
        visible = visible & (rows - cols < sliding_window)
    return visible


@functools.lru_cache(maxsize=64)
def _future_columns(rows: int, keys: int, diagonal: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(rows, keys)``, True where ``j - i >= diagonal`` (shared, never written to)."""
    return torch.ones(rows, keys, dtype=torch.bool, device=device).triu_(diagonal)


def hide_future_keys(x: torch.Tensor, chunk: Chunk, value: float | bool) -> None:
    """Set ``x[..., i, j]`` to ``value`` in place where key ``k0 + j`` comes after query ``q0 + i`` (plain causal
    attention without a window, row ``i`` at position ``q0 + i`` as in :func:`_causal_visible`): ``x (..., rows,
    keys)``. Keys before ``q0`` are visible to every row of the chunk, so only the block from column ``max(k0, q0)``
    on is touched: ``rows x rows`` entries for a full chunk instead of a ``rows x keys`` bias built per chunk, layer
    and pass. On the CPU the compiled pass writes only the hidden entries (:mod:`gin_adapter.native_score_rows`)."""
    if isinstance(value, float) and native_score_rows.hide_future_(x, chunk.rows, chunk.q0, chunk.k0, value):
        return
    start = max(chunk.k0, chunk.q0)
    if chunk.k1 > start + 1:
        future = _future_columns(chunk.rows, chunk.k1 - start, chunk.q0 - start + 1, x.device)
        x[..., start - chunk.k0 :].masked_fill_(future, value)


def _scores(grouped_query, key, mask, spec: ScoreSpec, chunk: Chunk, cap_slope: bool = False):
    """Masked float32 scores ``(B, Hkv, G * rows, keys)`` of one chunk, ``-inf`` where invisible (no autograd).

    ``grouped_query``: the chunk's queries ``(B, Hkv, G * rows, D)``; ``key``: its keys ``(B, Hkv, keys, D)``;
    ``mask``: the attention mask argument sliced to the chunk, or ``None``. Without a mask (plain causal attention,
    e.g. packed training blocks) only the chunk's last ``rows`` keys are masked (:func:`hide_future_keys`), and
    without a soft-cap the scaling is applied inside the matmul (``baddbmm``), saving a pass over the scores; with
    a sliding window the causal bias is added inside the matmul. With ``cap_slope`` also returns ``1 - (s / c)^2``,
    the soft-cap's derivative (``None`` without it).
    """
    batch, kv_heads, rows, dim = grouped_query.shape
    k_len = key.shape[-2]
    keys_t = key.float().transpose(-1, -2)
    visible, causal = None, False
    if mask is not None:
        visible = visible_keys(mask, chunk.rows, k_len, grouped_query.device, spec.sliding_window)
    elif spec.q_len > 1 and spec.sliding_window is None:
        causal = True
    elif spec.q_len > 1:  # (a single decoded token with no mask sees every cached key)
        visible = _causal_visible(chunk, spec.sliding_window, grouped_query.device)[None, None]
        if spec.softcap is None:
            bias = torch.zeros(visible.shape[-2:], device=grouped_query.device).masked_fill_(~visible[0, 0], float("-inf"))
            bias = bias.expand(spec.groups, chunk.rows, k_len).reshape(1, rows, k_len).expand(batch * kv_heads, rows, k_len)
            scores = torch.baddbmm(bias, grouped_query.float().reshape(-1, rows, dim), keys_t.reshape(-1, dim, k_len), alpha=spec.scaling)
            return scores.view(batch, kv_heads, rows, k_len), None
    slope = None
    if causal and spec.softcap is None:
        zero = torch.zeros((), device=grouped_query.device).expand(batch * kv_heads, rows, k_len)  # ignored (beta=0)
        scores = torch.baddbmm(zero, grouped_query.float().reshape(-1, rows, dim), keys_t.reshape(-1, dim, k_len), beta=0.0, alpha=spec.scaling)
        scores = scores.view(batch, kv_heads, rows, k_len)
    else:
        scores = torch.matmul(grouped_query.float() * spec.scaling, keys_t)
    if spec.softcap is not None:
        scores.div_(spec.softcap).tanh_()
        if cap_slope:
            slope = 1.0 - scores.square()
        scores.mul_(spec.softcap)
    if causal:
        hide_future_keys(scores.view(batch, kv_heads, spec.groups, chunk.rows, k_len), chunk, float("-inf"))
    elif visible is not None:
        vb, vh = visible.shape[:2]
        view = scores.view(batch, kv_heads, spec.groups, chunk.rows, k_len)
        if vh == 1:
            invisible = ~visible.view(vb, 1, 1, chunk.rows, k_len)
        else:
            invisible = ~visible.reshape(vb, kv_heads, spec.groups, chunk.rows, k_len)
        view.masked_fill_(invisible, float("-inf"))
    return scores, slope


def _row_probabilities(scores: torch.Tensor, may_be_empty: bool) -> torch.Tensor:
    """``softmax_j(s)`` per row (one fused kernel); rows with no visible key (all ``-inf``, only with a padding mask)
    get all-zero probabilities instead of NaN."""
    probs = torch.softmax(scores, dim=-1)
    return probs.nan_to_num_(0.0) if may_be_empty else probs


class _Layout:
    """Views between ``(B, H, Lq, .)`` tensors, the per-group layout ``(B, Hkv, G, Lq, .)`` and one chunk's
    grouped rows ``(B, Hkv, G * rows, .)`` (heads ordered ``h = kv * G + g``, transformers' ``repeat_kv`` order)."""

    def __init__(self, query: torch.Tensor, kv_heads: int) -> None:
        self.batch, heads, self.q_len, self.dim = query.shape
        self.kv_heads, self.groups = kv_heads, heads // kv_heads

    @classmethod
    def of_split(cls, x5: torch.Tensor) -> "_Layout":
        """The layout of a split tensor ``(B, Hkv, G, Lq, n)``."""
        layout = cls.__new__(cls)
        layout.batch, layout.kv_heads, layout.groups, layout.q_len, layout.dim = x5.shape
        return layout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, Lq, n) -> (B, Hkv, G, Lq, n)`` (a view: splitting a dimension never copies)."""
        return x.reshape(self.batch, self.kv_heads, self.groups, self.q_len, x.shape[-1])

    def rows(self, x5: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """The chunk's rows of a split tensor as ``(B, Hkv, G * rows, n)``."""
        return x5[:, :, :, chunk.q0 : chunk.q1].reshape(self.batch, self.kv_heads, self.groups * chunk.rows, x5.shape[-1])

    def put(self, x5: torch.Tensor, chunk: Chunk, rows: torch.Tensor) -> None:
        """Write ``(B, Hkv, G * rows, n)`` into the chunk's rows of the split tensor ``x5``."""
        x5[:, :, :, chunk.q0 : chunk.q1] = rows.view(self.batch, self.kv_heads, self.groups, chunk.rows, -1)


def _mask_rows(mask: torch.Tensor | None, chunk: Chunk) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape[-2] == 1:  # a mask broadcast over query rows
        return mask[..., chunk.k0 : chunk.k1]
    return mask[..., chunk.q0 : chunk.q1, chunk.k0 : chunk.k1]


def add_score_grads(d_scores, slope, chunk_query, chunk_keys, chunk: Chunk, layout: _Layout, spec: ScoreSpec, grad_query5, grad_key) -> None:
    """From one chunk's score gradient ``dS (B, Hkv, G * rows, keys)`` (times the soft-cap's slope when given, in
    place): ``dq = scaling dS k`` into the chunk's rows of ``grad_query5`` and ``dk += scaling dS^T q`` into its
    keys of ``grad_key``, each skipped when ``None``."""
    if slope is not None:
        d_scores.mul_(slope)
    if grad_query5 is not None:
        layout.put(grad_query5, chunk, torch.matmul(d_scores, chunk_keys).mul_(spec.scaling))
    if grad_key is not None:
        grad_key[..., chunk.k0 : chunk.k1, :] += torch.matmul(d_scores.transpose(-1, -2), chunk_query.float()).mul_(spec.scaling)


def _forward(query, key, value, mask, spec: ScoreSpec, top_k: int, sum_mode: SumMode, chunks: list[Chunk]):
    """``(out (B, H, Lq, Dv) float32, index, weights)``; the last two ``(B, Hkv, G, Lq, k)``.

    ``index`` holds key positions in ``[0, Lk)``. See the module docstring for the formulas.
    """
    layout = _Layout(query, key.shape[1])
    k = min(top_k, key.shape[-2])
    values = value.float().contiguous()
    query5 = layout.split(query)
    if len(chunks) == 1:  # short inputs: the rows are already in order, nothing to copy
        out, index, weights = _forward_chunk(layout.rows(query5, chunks[0]), key, values, mask, spec, k, sum_mode, chunks[0])
        return out.view(*query.shape[:-1], values.shape[-1]), layout.split(index), layout.split(weights)
    shape5 = (layout.batch, layout.kv_heads, layout.groups, layout.q_len)
    out5 = values.new_empty(*shape5, values.shape[-1])
    index5 = torch.empty(*shape5, k, dtype=torch.long, device=query.device)
    weights5 = values.new_empty(*shape5, k)
    for chunk in chunks:
        chunk_results = _forward_chunk(layout.rows(query5, chunk), key, values, mask, spec, k, sum_mode, chunk)
        for target, rows in zip((out5, index5, weights5), chunk_results):
            layout.put(target, chunk, rows)
    return out5.view(*query.shape[:-1], values.shape[-1]), index5, weights5


def _forward_chunk(chunk_query, key, values, mask, spec: ScoreSpec, k: int, sum_mode: SumMode, chunk: Chunk):
    """One chunk's ``(out, index, weights)``, each ``(B, Hkv, G * rows, .)``; ``index`` in ``[0, Lk)``."""
    scores, _ = _scores(chunk_query, key[..., chunk.k0 : chunk.k1, :], _mask_rows(mask, chunk), spec, chunk)
    probs = _row_probabilities(scores, may_be_empty=mask is not None)
    del scores
    weights, local = top_k_last(probs, k)  # key positions relative to k0; picks of invisible keys have weight 0
    index = local + chunk.k0 if chunk.k0 else local
    out = chunk_sum(sum_mode, local, index, weights, values, chunk.k0, chunk.k1, buffer=probs)  # dense: probs become A
    return out, index, weights


def _backward(ctx, grad_out):
    """Gradients to q, k, v (see the module docstring), chunk by chunk like the forward."""
    query, key, value, mask, index5, weights5 = ctx.saved_tensors
    spec: ScoreSpec = ctx.spec
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    layout = _Layout(query, key.shape[1])
    values = value.float().contiguous()
    keys = key.float()
    grad5 = layout.split(grad_out.float())
    query5 = layout.split(query)
    grad_query5 = layout.split(torch.zeros_like(query, dtype=torch.float32)) if need_q else None
    grad_key = torch.zeros_like(keys) if need_k else None
    grad_value = torch.zeros_like(values) if need_v else None
    for chunk in ctx.chunks:
        grad = layout.rows(grad5, chunk)  # (B, Hkv, G*rows, D)
        index, weights = layout.rows(index5, chunk), layout.rows(weights5, chunk)
        local = index - chunk.k0
        grad_weights = chunk_sum_grads(ctx.sum_mode, grad, local, index, weights, values, grad_value, chunk.k0, chunk.k1, need_weights=need_q or need_k)
        if grad_weights is None:
            continue
        chunk_query = layout.rows(query5, chunk)
        chunk_keys = keys[..., chunk.k0 : chunk.k1, :]
        d_scores, slope = _scores(chunk_query, chunk_keys, _mask_rows(mask, chunk), spec, chunk, cap_slope=True)
        d_scores = _row_probabilities(d_scores, may_be_empty=mask is not None)  # P, zero on invisible keys
        kept = grad_weights * weights  # dW * W on the kept keys
        d_scores.mul_(-kept.sum(dim=-1, keepdim=True)).scatter_add_(-1, local, kept)  # dS
        add_score_grads(d_scores, slope, chunk_query, chunk_keys, chunk, layout, spec, grad_query5, grad_key)
    grad_query = grad_query5.view(query.shape).to(query.dtype) if need_q else None
    return (
        grad_query,
        grad_key.to(key.dtype) if need_k else None,
        grad_value.to(value.dtype) if need_v else None,
        None, None, None, None, None,
    )


class TopKNeighbourSum(torch.autograd.Function):
    """Autograd wrapper of :func:`_forward` with the analytic backward of the module docstring."""

    @staticmethod
    def forward(ctx, query, key, value, mask, spec: ScoreSpec, top_k: int, sum_mode: SumMode, chunks: list[Chunk]):
        out, index, weights = _forward(query, key, value, mask, spec, top_k, sum_mode, chunks)
        ctx.save_for_backward(query, key, value, mask, index, weights)
        ctx.spec, ctx.sum_mode, ctx.chunks = spec, sum_mode, chunks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with float32_region(grad_out.device):  # a backward run inside autocast stays float32
            return _backward(ctx, grad_out)


def topk_neighbour_sum(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    top_k: int,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    sum_mode: str = "auto",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-head top-k GIN neighbour sum straight from the attention's q, k, v.

    Args:
        query: ``(B, H, Lq, D)``; the queries are the last ``Lq`` of the ``Lk`` keys.
        key: ``(B, Hkv, Lk, D)``, *not* repeated to ``H`` heads (``H`` a multiple of ``Hkv``).
        value: the node features ``(B, Hkv, Lk, Dv)``: the attention's values, or features shared by the heads
            expanded to ``Hkv`` (a view); ``Dv`` may differ from ``D``.
        attention_mask: what transformers passes to an attention function (bool, additive float, or ``None``).
        top_k: neighbours kept per query row (all visible keys when fewer).
        scaling: the attention's score scale; softcap, sliding_window: as the model's attention uses them.
        sum_mode: ``"dense"``, ``"gather"`` or ``"auto"`` (:func:`choose_sum_mode`; one decoded token without a
            mask takes the dense decode fast path unless ``"gather"`` is asked for).
        chunk_rows: query rows per chunk (default :data:`QUERY_CHUNK_ROWS`).
    Returns:
        ``(B, H, Lq, Dv)`` float32, equal to the generic chain's ``sum_j A[i, j] v_j`` for the top-k rule; computed
        in float32 under ``torch.autocast`` too (the picks and weights do not depend on the autocast dtype).
    """
    heads, q_len = query.shape[1], query.shape[2]
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads.")
    spec = ScoreSpec(scaling=float(scaling), softcap=softcap, sliding_window=sliding_window, groups=heads // kv_heads, q_len=q_len)
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    with float32_region(query.device):  # float32 throughout, also under mixed precision
        if q_len == 1 and attention_mask is None and not needs_grad and sum_mode != "gather":
            return _decode_step(query, key, value, spec, top_k)  # "auto" takes it: the fastest way for one token
        mode = choose_sum_mode(sum_mode, top_k, k_len)
        chunks = plan_chunks(q_len, k_len, top_k, attention_mask is not None, sliding_window, chunk_rows or QUERY_CHUNK_ROWS)
        if needs_grad:
            return TopKNeighbourSum.apply(query, key, value, attention_mask, spec, top_k, mode, chunks)
        return _forward(query, key, value, attention_mask, spec, top_k, mode, chunks)[0]  # inference


def _decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: ScoreSpec, top_k: int) -> torch.Tensor:
    """One new token against the whole cache, no mask, no autograd: the fewest ATen calls (decoding is bound by
    per-call overhead, not arithmetic). With ``R = B * Hkv`` rows of ``G`` query heads:
    ``s = scaling * q K^T`` as one ``baddbmm`` (``(R, G, Lk)``, the scale folded in as in :func:`_scores` without
    a mask), ``softmax`` then ``topk`` of the probabilities (same picks and weights as :func:`_forward`), the k
    weights scattered into the score buffer, one ``bmm`` with the values (:mod:`gin_adapter.joint_decode` builds
    the same graph together with the attention output)."""
    batch, _, _, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    rows = batch * kv_heads
    if spec.softcap is None:
        scores = decode_scores(query, key, spec.scaling)
    else:
        grouped = query.reshape(batch, kv_heads, spec.groups, dim)
        scores = _scores(grouped, key, None, spec, Chunk(0, 1, 0, k_len))[0].view(rows, spec.groups, k_len)
    adjacency = top_k_adjacency(scores, torch.softmax(scores, dim=-1), top_k)
    return decode_graph_sum(DecodeGraph(adjacency.view(batch, kv_heads, spec.groups, k_len), top_k), value)  # (B, H, 1, Dv)
