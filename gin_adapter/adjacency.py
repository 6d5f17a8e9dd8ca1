"""From attention scores to a sparse, causal adjacency: pure batched functions, no host syncs.

Shapes: ``B`` batch, ``H`` query heads, ``Lq`` query tokens, ``Lk`` key tokens (``Lk >= Lq``: with a KV cache
the queries are the last ``Lq`` keys). Entry ``A[b, h, i, j]`` is the weight of the edge from key token ``j``
(source) to query token ``i`` (target); it is zero unless ``j`` is a visible key of ``i`` (causal, not padding).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import GinConfig


def float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` when it is on (the graph is built in float32 under mixed precision too);
    nothing otherwise, since entering an autocast context costs about 7 us, which adds up over layers and decoded
    tokens."""
    return torch.autocast(device.type, enabled=False) if torch.is_autocast_enabled(device.type) else contextlib.nullcontext()


@dataclass(frozen=True)
class AdjacencyRule:
    """The part of a :class:`GinConfig` that decides the graph (hashable, stored per adapter on each layer)."""

    head_reduction: str
    sparsify: str
    top_k: int
    sharpen_alpha: float
    sharpen_tau: float
    threshold: float
    graph: str
    backend: str
    recompute: bool
    adjacency_grad: bool = True
    per_head_top_k: bool = False  # the per-head top-k graph, either graph mode (not the pyg backend): gin_adapter.joint can build it
    fused_threshold: bool = False  # computed by gin_adapter.threshold_sum (the published rule, backend "auto")

    @property
    def fused_top_k(self) -> bool:
        """Computed by :mod:`gin_adapter.topk_sum` when the attention did not build it: per-head top-k, ``graph="gin"``."""
        return self.per_head_top_k and self.graph == "gin"

    @classmethod
    def from_config(cls, config: GinConfig) -> "AdjacencyRule":
        return cls(
            head_reduction=config.head_reduction,
            sparsify=config.sparsify,
            top_k=config.top_k,
            sharpen_alpha=config.sharpen_alpha,
            sharpen_tau=config.sharpen_tau,
            threshold=config.threshold,
            graph=config.graph,
            backend=config.backend,
            recompute=config.recompute_adjacency,
            adjacency_grad=config.adjacency_grad,
            per_head_top_k=config.sparsify == "topk" and config.head_reduction == "none" and config.backend != "pyg",
            fused_threshold=config.head_reduction == "sum" and config.sparsify == "threshold" and config.backend == "auto",
        )


def visible_keys(
    attention_mask: torch.Tensor | None,
    q_len: int,
    k_len: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean ``(B or 1, 1 or H, Lq, Lk)`` tensor: True where query ``i`` may attend to key ``j``.

    ``attention_mask`` is what transformers hands an attention function: a bool mask (True = attend), an additive
    float mask (0 = attend, very negative = masked), or ``None``. ``None`` means plain causal attention with the
    same alignment as ``scaled_dot_product_attention(is_causal=True)``: query ``i`` sees keys ``0..i`` when
    ``Lq > 1``, and every key when decoding a single token.
    """
    if attention_mask is not None:
        mask = attention_mask[..., :k_len]
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2
    if q_len == 1:
        visible = torch.ones(1, 1, 1, k_len, dtype=torch.bool, device=device)
    else:
        rows = torch.arange(q_len, device=device).unsqueeze(-1)
        cols = torch.arange(k_len, device=device).unsqueeze(0)
        visible = (cols <= rows)
        if sliding_window is not None:
            visible = visible & (rows - cols < sliding_window)
        visible = visible[None, None]
    return visible


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities in float32, exactly zero on invisible keys.

    ``P[b, h, i, j] = softmax_j(scaling * q_i . k_j)`` over visible ``j`` (with Gemma-2 style soft-capping
    ``softcap * tanh(s / softcap)`` when given). Rows with no visible key (padding queries) are all zero.

    Args:
        query: ``(B, H, Lq, D)``.
        key: ``(B, H, Lk, D)``, already repeated to ``H`` heads.
        visible: boolean, broadcastable to ``(B, H, Lq, Lk)``.
    Returns:
        ``(B, H, Lq, Lk)`` float32.
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1) * visible


def reduce_heads(probs: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, H, Lq, Lk) -> (B, 1, Lq, Lk)`` for 'sum' (clamped to 1, as published), 'mean', 'max'; 'none' keeps H."""
    if mode == "none":
        return probs
    if mode == "sum":
        return probs.sum(dim=1, keepdim=True).clamp(max=1.0)
    if mode == "mean":
        return probs.mean(dim=1, keepdim=True)
    if mode == "max":
        return probs.amax(dim=1, keepdim=True)
    raise ValueError(f"head_reduction={mode!r} is not one of 'none', 'sum', 'mean', 'max'.")


def sharpen_and_threshold(weights: torch.Tensor, visible: torch.Tensor, alpha: float, tau: float, threshold: float) -> torch.Tensor:
    """The published rule: ``S = sigmoid(alpha * (W - tau))``, keep ``S`` where ``S > threshold`` and visible."""
    sharpened = torch.sigmoid(alpha * (weights - tau))
    return sharpened * ((sharpened > threshold) & visible)


def top_k_per_row(weights: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest visible weights of each query row, zero elsewhere (fixed shapes, no sync).

    Rows with fewer than ``k`` visible keys keep all of them. Gradients flow to the kept weights.
    """
    k = min(k, weights.shape[-1])
    candidates = weights.masked_fill(~visible, -1.0)
    values, index = candidates.topk(k, dim=-1)
    return torch.zeros_like(weights).scatter(-1, index, values.clamp(min=0.0))


def sparse_adjacency(probs: torch.Tensor, visible: torch.Tensor, rule: AdjacencyRule) -> torch.Tensor:
    """Attention probabilities ``(B, H, Lq, Lk)`` -> adjacency ``(B, H or 1, Lq, Lk)``, zero on invisible keys."""
    weights = reduce_heads(probs, rule.head_reduction)
    if rule.head_reduction != "none":
        visible = visible.any(dim=1, keepdim=True) if visible.shape[1] > 1 else visible
    if rule.sparsify == "topk":
        return top_k_per_row(weights, visible, rule.top_k)
    if rule.sparsify == "threshold":
        return sharpen_and_threshold(weights, visible, rule.sharpen_alpha, rule.sharpen_tau, rule.threshold)
    return weights * visible


def self_index(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Key index of each query token: the queries are the last ``Lq`` keys (no cache, or a cache that appends)."""
    return torch.arange(k_len - q_len, k_len, device=device)
