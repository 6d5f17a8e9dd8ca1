"""The causal mask and the softmax backward of a query chunk's scores, compiled (``gin_adapter/native/score_rows.c``).

A chunk's scores ``s (B, Hkv, R, n)`` hold ``R = G * rows`` rows per key/value head (its ``G`` query heads stacked,
:class:`gin_adapter.topk_sum._Layout`); row ``r`` is query position ``q0 + r % rows``, column ``j`` key ``k0 + j``,
visible when ``k0 + j <= q0 + r % rows`` (plain causal attention, no mask argument).

* :func:`hide_future_` writes ``value`` where a key comes after its query, in place: the ``masked_fill_`` of
  :func:`gin_adapter.topk_sum.hide_future_keys`, touching only the entries it changes.
* :func:`softmax_grad_` turns ``dP = dO v^T`` into the scores' gradient in place, for the graph built with the
  attention (:mod:`gin_adapter.joint`): with the picks ``idx``, their weights ``W = P[idx]`` and gradient ``dW``,

      c_r = sum_e dO[r, e] O[r, e] + sum_m dW[r, m] W[r, m],
      dS[r, j] = P[r, j] (dP[r, j] - c_r) + sum_{m: idx_m = k0 + j} W[r, m] dW[r, m],

  one pass where ATen takes ``mul``, ``sum``, ``scatter_add_``, ``sub_`` and ``mul_``.

Both return ``False`` without touching anything where they do not apply (callers use ATen then): the library is
missing (:mod:`gin_adapter.native_library`) or :data:`ENABLED` is off (``GIN_ADAPTER_NATIVE=0``), another device
or dtype, a non-contiguous tensor, one autograd would track, or ``torch.compile`` tracing. The same values as the
ATen way up to float32 rounding (the order of the row term's additions; tests).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native_library

ENABLED = native_library.ENABLED_BY_ENVIRONMENT
"""Use the compiled passes where they apply; ``False`` (or ``GIN_ADAPTER_NATIVE=0``) gives ATen's."""

HIDE_LABEL, GRAD_LABEL = "gin_adapter::hide_future", "gin_adapter::softmax_grad"
"""What ``torch.profiler`` calls the two kernels' time (they are no ATen operators)."""

_INT64, _POINTER = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _kernels():
    """``(hide, grad)`` C functions, or ``None`` without the library."""
    hide = native_library.function("gin_hide_future_f32", [_POINTER] + [_INT64] * 6 + [ctypes.c_float, ctypes.c_int])
    grad = native_library.function("gin_softmax_grad_f32", [_POINTER, _POINTER] + [_INT64] * 5 + [_POINTER, _POINTER, _INT64, _INT64]
                                   + [_POINTER] * 3 + [_INT64, _INT64, ctypes.c_int])
    return None if hide is None else (hide, grad)


def available() -> bool:
    """Whether the compiled passes were built and load (whatever :data:`ENABLED` says)."""
    return _kernels() is not None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels run on these tensors: contiguous float32 (positions int64) on the CPU, none tracked by
    autograd."""
    return (ENABLED and not torch.compiler.is_compiling() and available()
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64) and t.is_contiguous()
                    and not (t.requires_grad and torch.is_grad_enabled()) for t in tensors))


def _check(status: int, what: str) -> None:
    if status:
        raise RuntimeError(f"gin_adapter's compiled {what} refused its arguments (status {status}); please report this.")


def hide_future_(scores: torch.Tensor, rows: int, q0: int, k0: int, value: float) -> bool:
    """Write ``value`` into the entries of ``scores (..., R, n)`` whose key comes after their query (module
    docstring); ``False`` (untouched) where the kernel does not apply."""
    if scores.dim() < 2 or scores.dtype != torch.float32 or not applies(scores):
        return False
    R, n = scores.shape[-2:]
    _check(native_library.run(HIDE_LABEL, _kernels()[0], scores.data_ptr(), scores.numel() // max(R * n, 1), R, n, rows, q0, k0, value,
                              torch.get_num_threads()), "causal mask")
    return True


def softmax_grad_(d_probs: torch.Tensor, probs: torch.Tensor, grad_rows: torch.Tensor, out5: torch.Tensor, q0: int, rows: int, k0: int,
                  kept: torch.Tensor | None, weights: torch.Tensor | None, index: torch.Tensor | None) -> bool:
    """``dP (B, Hkv, R, n)`` -> ``dS`` in place (module docstring), from ``P`` (same shape), the chunk's output
    gradient rows ``dO (B, Hkv, R, Dv)``, the whole output ``O (B, Hkv, G, Lq, Dv)``, and the graph's gradient
    ``dW``, weights ``W`` and absolute key positions ``idx`` ``(B, Hkv, R, k)`` (all ``None``: no gradient reaches
    the graph). ``False`` (untouched) where the kernel does not apply."""
    graph = [kept.contiguous(), weights.contiguous(), index.contiguous()] if kept is not None else []
    grad_rows = grad_rows.contiguous()
    if not applies(d_probs, probs, grad_rows, out5, *graph) or d_probs.shape != probs.shape:
        return False
    R, n = d_probs.shape[-2:]
    pointers = [t.data_ptr() for t in graph] if graph else [None, None, None]
    _check(native_library.run(GRAD_LABEL, _kernels()[1], d_probs.data_ptr(), probs.data_ptr(), d_probs.numel() // max(R * n, 1), R, n, rows, q0,
                              grad_rows.data_ptr(), out5.data_ptr(), out5.shape[-2], out5.shape[-1], *pointers, k0,
                              graph[0].shape[-1] if graph else 0, torch.get_num_threads()), "softmax backward")
    return True
