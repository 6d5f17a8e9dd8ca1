"""The per-head top-k neighbour sum fused with the attention scores, with an analytic backward.

For the default rule (``sparsify="topk"``, ``head_reduction="none"``, ``graph="gin"``) the adapter needs, per head,

    out[b, h, i] = sum_{j in topk_i} P[b, h, i, j] * v[b, h // G, j]                          (B, H, Lq, D)
    P[b, h, i, j] = softmax_j(s[b, h, i, j]) over visible keys,  s = cap(scaling * q_i . k_j)

with ``G = H / Hkv`` query heads per key/value head (grouped-query attention) and ``cap(s) = c * tanh(s / c)`` when
the model soft-caps its logits (Gemma-2). This module computes exactly what the generic chain in
:mod:`gin_adapter.attention` computes for that rule (same values, same gradients to q, k, v), but

* never materialises the probabilities: softmax is monotonic per row, so the top-k of the masked *scores* picks the
  same keys, and the k kept weights are ``exp(s - logsumexp(s))``;
* handles grouped-query attention by viewing the queries as ``(B, Hkv, G * Lq, D)``: keys and values are never
  repeated, and the tensors saved for backward are the q, k, v that the attention itself keeps;
* sums the neighbours either densely (the k weights scattered into the score buffer, one batched matmul: best on
  short sequences) or by gathering the k value rows (``O(L k D)``: best on long sequences with small k);
* recomputes only the scores in backward (one matmul, one ``exp``). With ``W`` the kept weights and ``dW`` their
  gradient, the softmax backward ``dS = P * (dP - sum_j dP_j P_j)`` has ``dP`` non-zero on the k kept keys only, so
  ``dS = scatter(dW * W) - c * P`` with ``c = sum_k dW * W``; then ``dq = scaling * dS k`` and
  ``dk = scaling * dS^T q`` (times ``1 - (s / c)^2`` under soft-capping).

Saved for backward: q, k, v, the attention mask argument (tensors that exist anyway), the top-k indices and weights
``(B, H, Lq, k)`` and the row log-sum-exp ``(B, H, Lq, 1)``. Nothing of size ``(B, H, Lq, Lk)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adjacency import visible_keys

SumMode = str  # "dense" | "gather"

GATHER_MIN_KEYS_PER_NEIGHBOUR = 256
"""``sum_mode="auto"`` gathers when ``Lk >= 256 * k`` (docs/benchmarks.md, crossover: gathering the top-k rows beat
the dense matmul on CPU for k=4 from L=1024 and k=16 from L=4096)."""


@dataclass(frozen=True)
class ScoreSpec:
    """What turns ``q, k`` into masked scores: everything except the tensors."""

    scaling: float
    softcap: float | None
    sliding_window: int | None
    groups: int
    q_len: int


def choose_sum_mode(sum_mode: str, top_k: int, k_len: int) -> SumMode:
    """Resolve ``"auto"`` to ``"dense"`` or ``"gather"`` (see :data:`GATHER_MIN_KEYS_PER_NEIGHBOUR`)."""
    if sum_mode == "auto":
        return "gather" if k_len >= GATHER_MIN_KEYS_PER_NEIGHBOUR * top_k else "dense"
    if sum_mode not in ("dense", "gather"):
        raise ValueError(f"sum_mode={sum_mode!r} is not one of 'auto', 'dense', 'gather'.")
    return sum_mode


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H, Lq, D) -> (B, Hkv, G * Lq, D)``, heads ordered ``h = kv * G + g`` (transformers' ``repeat_kv`` order)."""
    batch, heads, q_len, dim = x.shape
    return x.reshape(batch, heads // groups, groups * q_len, dim)


def _scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, spec: ScoreSpec, cap_slope: bool = False):
    """Masked float32 scores ``(B, Hkv, G * Lq, Lk)``, ``-inf`` on invisible keys, built in place (no autograd).

    With ``cap_slope`` also returns ``1 - (s / c)^2``, the soft-cap's derivative (``None`` without soft-capping).
    """
    scores = torch.matmul(_grouped(query, spec.groups).float() * spec.scaling, key.float().transpose(-1, -2))
    slope = None
    if spec.softcap is not None:
        scores.div_(spec.softcap).tanh_()
        if cap_slope:
            slope = 1.0 - scores.square()
        scores.mul_(spec.softcap)
    k_len = scores.shape[-1]
    if mask is not None or spec.q_len > 1:  # a single decoded token with no mask sees every cached key
        visible = visible_keys(mask, spec.q_len, k_len, scores.device, spec.sliding_window)
        batch, kv_heads = scores.shape[:2]
        vb, vh = visible.shape[:2]
        view = scores.view(batch, kv_heads, spec.groups, spec.q_len, k_len)
        if vh == 1:
            invisible = ~visible.view(vb, 1, 1, spec.q_len, k_len)
        else:
            invisible = ~visible.reshape(vb, kv_heads, spec.groups, spec.q_len, k_len)
        view.masked_fill_(invisible, float("-inf"))
    return scores, slope


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values (B, Hkv, Lk, D)``, ``index (B, Hkv, R, k)`` -> ``(B, Hkv, R, k, D)`` with the indexed rows."""
    batch, kv_heads, rows, k = index.shape
    dim = values.shape[-1]
    flat = index.reshape(batch, kv_heads, rows * k, 1).expand(-1, -1, -1, dim)
    return values.gather(2, flat).view(batch, kv_heads, rows, k, dim)


def _forward(query, key, value, mask, spec: ScoreSpec, top_k: int, sum_mode: SumMode):
    """``(out (B, Hkv, G * Lq, D) float32, index, weights, lse)``; see the module docstring."""
    scores, _ = _scores(query, key, mask, spec)
    k = min(top_k, scores.shape[-1])
    top_scores, index = scores.topk(k, dim=-1)  # (B, Hkv, G*Lq, k)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, Hkv, G*Lq, 1)
    if mask is not None:  # padding queries see no key: lse = -inf; their weights must be 0, not nan
        lse = lse.nan_to_num(neginf=0.0)
    weights = (top_scores - lse).exp_()  # picks of invisible keys (fewer than k visible) have weight exp(-inf) = 0
    values = value.float()
    if sum_mode == "dense":
        out = torch.matmul(scores.zero_().scatter_(-1, index, weights), values)  # the score buffer becomes A
    else:
        out = (weights.unsqueeze(-1) * _gather_rows(values, index)).sum(-2)
    return out, index, weights, lse


class TopKNeighbourSum(torch.autograd.Function):
    """Autograd wrapper of :func:`_forward` with the analytic backward of the module docstring."""

    @staticmethod
    def forward(ctx, query, key, value, mask, spec: ScoreSpec, top_k: int, sum_mode: SumMode):
        out, index, weights, lse = _forward(query, key, value, mask, spec, top_k, sum_mode)
        ctx.save_for_backward(query, key, value, mask, index, weights, lse)
        ctx.spec, ctx.sum_mode = spec, sum_mode
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, mask, index, weights, lse = ctx.saved_tensors
        spec: ScoreSpec = ctx.spec
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad = grad_out.float()  # (B, Hkv, G*Lq, D)
        values = value.float()
        grad_query = grad_key = grad_value = grad_weights = None
        if ctx.sum_mode == "dense":
            if need_q or need_k:
                grad_weights = torch.matmul(grad, values.transpose(-1, -2)).gather(-1, index)
            if need_v:
                adjacency = grad.new_zeros(*index.shape[:-1], values.shape[-2]).scatter_(-1, index, weights)
                grad_value = torch.matmul(adjacency.transpose(-1, -2), grad)
                del adjacency
        else:
            if need_q or need_k:
                grad_weights = (_gather_rows(values, index) * grad.unsqueeze(-2)).sum(-1)
            if need_v:
                batch, kv_heads, rows, k = index.shape
                flat = index.reshape(batch, kv_heads, rows * k, 1).expand(-1, -1, -1, values.shape[-1])
                contributions = (weights.unsqueeze(-1) * grad.unsqueeze(-2)).reshape(batch, kv_heads, rows * k, -1)
                grad_value = torch.zeros_like(values).scatter_add_(2, flat, contributions)
        if grad_value is not None:
            grad_value = grad_value.to(value.dtype)
        if need_q or need_k:
            d_scores, slope = _scores(query, key, mask, spec, cap_slope=True)
            d_scores.sub_(lse).exp_()  # P, zero on invisible keys
            kept = grad_weights * weights  # dW * W on the kept keys
            d_scores.mul_(-kept.sum(dim=-1, keepdim=True)).scatter_add_(-1, index, kept)
            if slope is not None:
                d_scores.mul_(slope)
            if need_q:
                grad_query = (torch.matmul(d_scores, key.float()) * spec.scaling).view(query.shape).to(query.dtype)
            if need_k:
                grouped_query = _grouped(query, spec.groups).float()
                grad_key = (torch.matmul(d_scores.transpose(-1, -2), grouped_query) * spec.scaling).to(key.dtype)
        return grad_query, grad_key, grad_value, None, None, None, None


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
) -> torch.Tensor:
    """Per-head top-k GIN neighbour sum straight from the attention's q, k, v.

    Args:
        query: ``(B, H, Lq, D)``; the queries are the last ``Lq`` of the ``Lk`` keys.
        key, value: ``(B, Hkv, Lk, D)``, *not* repeated to ``H`` heads (``H`` a multiple of ``Hkv``).
        attention_mask: what transformers passes to an attention function (bool, additive float, or ``None``).
        top_k: neighbours kept per query row (all visible keys when fewer).
        scaling: the attention's score scale; softcap, sliding_window: as the model's attention uses them.
        sum_mode: ``"dense"``, ``"gather"`` or ``"auto"`` (:func:`choose_sum_mode`).
    Returns:
        ``(B, H, Lq, D)`` float32, equal to the generic chain's ``sum_j A[i, j] v_j`` for the top-k rule.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads.")
    spec = ScoreSpec(scaling=float(scaling), softcap=softcap, sliding_window=sliding_window, groups=heads // kv_heads, q_len=q_len)
    mode = choose_sum_mode(sum_mode, top_k, k_len)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        out = TopKNeighbourSum.apply(query, key, value, attention_mask, spec, top_k, mode)
    else:  # inference and cached decoding: no autograd bookkeeping
        out = _forward(query, key, value, attention_mask, spec, top_k, mode)[0]
    return out.view(batch, heads, q_len, dim)
