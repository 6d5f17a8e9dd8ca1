"""The top-k graph's neighbour sum and its backward, compiled (``gin_adapter/native/graph_sum.c``, via ``ctypes``).

For ``M`` graphs (one per batch element and key/value head) of ``Q`` query rows with ``k`` picks each, weights
``W (M, Q, k)``, key positions ``idx (M, Q, k)`` and node features ``X (M, Lk, F)``:

    N[b, r] = sum_m W[b, r, m] X[b, idx[b, r, m]]                                      (M, Q, F)
    dW[b, r, m] = dN[b, r] . X[b, idx[b, r, m]],   dX[b, idx[b, r, m]] += W[b, r, m] dN[b, r]

``k F`` multiply-adds per row and nothing copied, where the ATen way (:mod:`gin_adapter.chunk_sums`) scatters the
weights into a dense ``(Q, Lk)`` adjacency and runs products of the attention's size, or gathers feature rows
through ``index_select``. The same values up to float32 rounding (the order of the additions; tests).

:func:`graph_sum` and :func:`graph_sum_grad` return ``None`` where they do not apply, and callers use ATen then:
the library is missing (:mod:`gin_adapter.native_library`) or :data:`ENABLED` is off (``GIN_ADAPTER_NATIVE=0``),
another device or dtype, a tensor autograd would track, or ``torch.compile`` tracing. Rows split over
``torch.get_num_threads()`` OpenMP threads when a call holds at least 65,536 multiply-adds.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from . import native_library

ENABLED = native_library.ENABLED_BY_ENVIRONMENT
"""Use the compiled neighbour sum where it applies; ``False`` (or ``GIN_ADAPTER_NATIVE=0``) gives ATen's."""

SUM_LABEL, GRAD_LABEL = "gin_adapter::graph_sum", "gin_adapter::graph_sum_grad"
"""What ``torch.profiler`` calls the two kernels' time (they are no ATen operators)."""

_INT64, _POINTER = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _kernels():
    """``(sum, grad)`` C functions, or ``None`` without the library."""
    forward = native_library.function("gin_graph_sum_f32", [_POINTER] * 4 + [_INT64] * 5 + [ctypes.c_int])
    backward = native_library.function("gin_graph_sum_grad_f32", [_POINTER] * 6 + [_INT64] * 5 + [ctypes.c_int])
    return None if forward is None else (forward, backward)


def available() -> bool:
    """Whether the compiled neighbour sum was built and loads (whatever :data:`ENABLED` says)."""
    return _kernels() is not None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels run on these tensors: float32 (positions int64) on the CPU, none tracked by autograd."""
    return (ENABLED and not torch.compiler.is_compiling() and available()
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64) and not (t.requires_grad and torch.is_grad_enabled())
                    for t in tensors))


def _shapes(weights: torch.Tensor, index: torch.Tensor, features: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(M, Q, k, Lk, F)`` of ``weights``/``index`` ``(..., Q, k)`` and ``features (..., Lk, F)`` with the same
    leading ``M`` graphs; raises ``ValueError`` on shapes that do not fit together."""
    *lead, rows, k = weights.shape
    *feature_lead, keys, width = features.shape
    if index.shape != weights.shape or tuple(lead) != tuple(feature_lead) or weights.dtype != torch.float32 or index.dtype != torch.int64:
        raise ValueError(f"graph_sum: weights {tuple(weights.shape)} {weights.dtype}, positions {tuple(index.shape)} {index.dtype} and features "
                         f"{tuple(features.shape)} do not fit: need float32 (..., Q, k), int64 (..., Q, k) and (..., Lk, F).")
    return math.prod(lead), rows, k, keys, width


def _check(status: int, what: str, keys: int) -> None:
    if status:
        raise IndexError(f"gin_adapter's compiled {what} got a key position outside [0, {keys}) or bad sizes (status {status}).")


def graph_sum(weights: torch.Tensor, index: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
    """``N (..., Q, F)`` from ``weights``/``index (..., Q, k)`` and ``features (..., Lk, F)`` (module docstring);
    ``None`` where the kernel does not apply."""
    if not applies(weights, index, features):
        return None
    graphs, rows, k, keys, width = _shapes(weights, index, features)
    weights, index, features = weights.contiguous(), index.contiguous(), features.contiguous()
    out = features.new_empty(*weights.shape[:-1], width)
    _check(native_library.run(SUM_LABEL, _kernels()[0], weights.data_ptr(), index.data_ptr(), features.data_ptr(), out.data_ptr(), graphs, rows, k,
                              keys, width, torch.get_num_threads()), "neighbour sum", keys)
    return out


def small_graph_sum(weights: torch.Tensor, index: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
    """:func:`graph_sum` for a decoded token, ``weights``/``index (M, R, k)`` contiguous (the compiled decode step's
    picks, :mod:`gin_adapter.native_decode`) and features ``(M, Lk, F)``, on the calling thread and without
    :func:`graph_sum`'s checks of every tensor, which cost more than the sum does at this size (the kernel still
    checks the sizes and every key position); ``None`` where it does not apply (switched off, other devices or
    dtypes, gradients, ``torch.compile`` tracing)."""
    if (not ENABLED or torch.compiler.is_compiling() or not available() or features.dtype != torch.float32 or features.device.type != "cpu"
            or (torch.is_grad_enabled() and features.requires_grad)):
        return None
    graphs, rows, picks = weights.shape
    keys, width = features.shape[-2:]
    features = features.contiguous()
    out = features.new_empty(graphs, rows, width)
    _check(native_library.run(SUM_LABEL, _kernels()[0], weights.data_ptr(), index.data_ptr(), features.data_ptr(), out.data_ptr(), graphs, rows,
                              picks, keys, width, 1), "neighbour sum", keys)
    return out


def graph_sum_grad(grad: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, features: torch.Tensor, grad_features: torch.Tensor | None,
                   *, need_weights: bool) -> tuple[bool, torch.Tensor | None]:
    """Backward of :func:`graph_sum` from ``dN (..., Q, F)``: adds ``dX`` into ``grad_features`` (contiguous, the
    shape of ``features``) when given and returns ``(True, dW or None)``; ``(False, None)`` (nothing touched) where
    the kernel does not apply."""
    tensors = [grad, weights, index, features] + ([grad_features] if grad_features is not None else [])
    if not applies(*tensors) or (grad_features is not None and not grad_features.is_contiguous()):
        return False, None
    graphs, rows, k, keys, width = _shapes(weights, index, features)
    grad, weights, index, features = grad.contiguous(), weights.contiguous(), index.contiguous(), features.contiguous()
    grad_weights = weights.new_empty(weights.shape) if need_weights else None
    _check(native_library.run(GRAD_LABEL, _kernels()[1], grad.data_ptr(), weights.data_ptr(), index.data_ptr(), features.data_ptr(),
                              None if grad_weights is None else grad_weights.data_ptr(), None if grad_features is None else grad_features.data_ptr(),
                              graphs, rows, k, keys, width, torch.get_num_threads()), "neighbour sum backward", keys)
    return True, grad_weights
