"""One query chunk's neighbour sum over its ``k`` picked keys, and its gradients (the fused kernel's and the joint path's).

A chunk of ``R`` query rows (grouped per KV head: ``(B, Hkv, R, .)``) picked ``k`` keys per row: key positions
``local (B, Hkv, R, k)`` inside the chunk's key range and weights ``W (B, Hkv, R, k)``. Its neighbour sum
``n_r = sum_m W[r, m] X[local[r, m]]`` over features ``X (B, Hkv, keys, F)`` is formed either

* densely: ``A = scatter(W)`` of shape ``(B, Hkv, R, keys)``, then one batched matmul ``A X`` (:func:`scatter_adjacency`,
  backward :func:`dense_sum_grads`: ``dW = (dn X^T)[local]``, ``dX = A^T dn``); best for short sequences;
* or by gathering the ``k`` feature rows (:func:`gather_rows`, :func:`weighted_rows`, backward
  :func:`gathered_sum_grads`: ``dW[r, m] = dn_r . X[local[r, m]]``, ``dX[local[r, m]] += W[r, m] dn_r``):
  ``O(R k F)``, best when ``keys >> k``.

On the CPU both take the compiled sum where it applies (:mod:`gin_adapter.native_graph_sum`: ``k F`` multiply-adds
a row, nothing copied); the two ATen ways are the fallback.
"""

from __future__ import annotations

import torch

from . import native_graph_sum


def flat_rows(index: torch.Tensor, k_len: int) -> torch.Tensor:
    """Key indices ``(B, Hkv, R, k)`` into ``Lk`` keys -> row numbers of the flattened ``(B * Hkv * Lk, D)`` values."""
    batch, kv_heads = index.shape[:2]
    offsets = torch.arange(0, batch * kv_heads * k_len, k_len, device=index.device).view(batch, kv_heads, 1, 1)
    return (index + offsets).reshape(-1)


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values (B, Hkv, Lk, D)`` (contiguous), ``index (B, Hkv, R, k)`` -> the indexed rows ``(B, Hkv, R, k, D)``."""
    dim = values.shape[-1]
    rows = values.reshape(-1, dim).index_select(0, flat_rows(index, values.shape[-2]))
    return rows.view(*index.shape, dim)


def weighted_rows(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``sum_m weights[..., m] * rows[..., m, :]``: ``(B, Hkv, R, k)``, ``(B, Hkv, R, k, D)`` -> ``(B, Hkv, R, D)``."""
    return torch.matmul(weights.unsqueeze(-2), rows).squeeze(-2)


def scatter_adjacency(buffer: torch.Tensor, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One chunk's dense adjacency ``A (B, Hkv, R, keys)``: row ``r`` holds its ``k`` weights at the key positions
    ``local (B, Hkv, R, k)`` and zeros elsewhere; written into ``buffer`` (same shape as ``A``), which is returned."""
    return buffer.zero_().scatter_(-1, local, weights)


def dense_sum_grads(grad: torch.Tensor, local: torch.Tensor, weights: torch.Tensor, features: torch.Tensor, *,
                    need_weights: bool, need_features: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of one chunk's ``n = A X`` (``A`` from :func:`scatter_adjacency`, ``X`` the chunk's features
    ``(B, Hkv, keys, F)``, ``grad = dn (B, Hkv, R, F)``): ``(dW = (dn X^T)[local], dX = A^T dn)``, each ``None``
    when not needed."""
    grad_weights = torch.matmul(grad, features.transpose(-1, -2)).gather(-1, local) if need_weights else None
    grad_features = None
    if need_features:
        adjacency = scatter_adjacency(grad.new_empty(*local.shape[:-1], features.shape[-2]), local, weights)
        grad_features = torch.matmul(adjacency.transpose(-1, -2), grad)
    return grad_weights, grad_features


def gathered_sum_grads(grad: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, features: torch.Tensor,
                       grad_features: torch.Tensor | None, *, need_weights: bool) -> torch.Tensor | None:
    """Backward of one chunk's gathered sum ``n_r = sum_m W[r, m] X[index[r, m]]`` (``index (B, Hkv, R, k)`` into
    all ``Lk`` keys of the contiguous ``features (B, Hkv, Lk, F)``, ``grad = dn (B, Hkv, R, F)``).

    Returns ``dW[r, m] = dn_r . X[index[r, m]]`` (``None`` unless ``need_weights``) and adds ``W[r, m] dn_r`` into
    row ``index[r, m]`` of ``grad_features`` (same shape as ``features``, contiguous) when it is given. ``dW`` is
    a multiply and a sum, not a batched matmul: ``(R, k, F) @ (R, F, 1)`` runs as ``R`` separate small matmuls on
    CPU, 5x slower (docs/benchmarks.md).
    """
    grad_weights = (gather_rows(features, index) * grad.unsqueeze(-2)).sum(dim=-1) if need_weights else None
    if grad_features is not None:
        width = features.shape[-1]
        contributions = (weights.unsqueeze(-1) * grad.unsqueeze(-2)).reshape(-1, width)
        grad_features.view(-1, width).index_add_(0, flat_rows(index, features.shape[-2]), contributions)
    return grad_weights


def chunk_sum(sum_mode: str, local: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, features: torch.Tensor,
              k0: int, k1: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk's ``n (B, Hkv, R, F)``: ``sum_mode`` ``"dense"`` (``A X`` over the chunk's keys ``[k0, k1)``, ``A``
    scattered into ``buffer`` ``(B, Hkv, R, k1 - k0)`` when given, e.g. the chunk's spent probabilities) or
    ``"gather"`` (the ``k`` rows of all of ``features (B, Hkv, Lk, F)``, contiguous). ``local = index - k0``.
    The compiled sum instead where it applies, whatever ``sum_mode``."""
    native = native_graph_sum.graph_sum(weights, index, features)
    if native is not None:
        return native
    if sum_mode == "dense":
        if buffer is None:
            buffer = features.new_empty(*local.shape[:-1], k1 - k0)
        return torch.matmul(scatter_adjacency(buffer, local, weights), features[..., k0:k1, :])
    return weighted_rows(weights, gather_rows(features, index))


def chunk_sum_grads(sum_mode: str, grad: torch.Tensor, local: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                    features: torch.Tensor, grad_features: torch.Tensor | None, k0: int, k1: int, *, need_weights: bool) -> torch.Tensor | None:
    """Backward of :func:`chunk_sum`: returns ``dW`` (``None`` unless ``need_weights``) and adds ``dX`` into
    ``grad_features`` (same shape as ``features``) when it is given. The compiled backward where it applies."""
    done, grad_weights = native_graph_sum.graph_sum_grad(grad, weights, index, features, grad_features, need_weights=need_weights)
    if done:
        return grad_weights
    if sum_mode == "dense":
        grad_weights, grad_chunk = dense_sum_grads(grad, local, weights, features[..., k0:k1, :], need_weights=need_weights,
                                                   need_features=grad_features is not None)
        if grad_chunk is not None:
            grad_features[..., k0:k1, :] += grad_chunk
        return grad_weights
    return gathered_sum_grads(grad, index, weights, features, grad_features, need_weights=need_weights)
