"""The compiled per-row top-k (``gin_adapter/native/row_topk.c``), called through ``ctypes``.

:func:`row_top_k` returns ``torch.topk(x, k, dim=-1)``'s values exactly, and the positions in the order
(larger value, NaN first, lower position), so ties go to the lowest position, for float32 CPU tensors that need
no gradient, ``1 <= k <=`` :data:`MAX_K` (24); it returns ``None`` where it does not apply, and callers then use ATen:

- the library was not built (no C compiler at install time; ``pip install -e .`` builds it, ``setup.py``;
  :mod:`gin_adapter.native_library`), or
  ``GIN_ADAPTER_NATIVE=0`` is set, or :data:`ENABLED` is ``False``;
- another device or dtype, autograd would need the values' gradient, or ``torch.compile`` is tracing (the compiled
  graph gets ATen's top-k, which it can fuse).

It splits the rows over ``torch.get_num_threads()`` OpenMP threads (PyTorch's own, see ``row_topk.c``) when a
call holds at least 65,536 elements.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native_library

ENABLED = native_library.ENABLED_BY_ENVIRONMENT
"""Use the compiled top-k where it applies; ``False`` (or ``GIN_ADAPTER_NATIVE=0``) gives ATen's everywhere."""

KERNEL_MAX_K = 64
"""The largest ``k`` the C kernel takes."""

MAX_K = 24
"""The largest ``k`` :func:`row_top_k` computes: above it ATen's two-stage top-k was faster (the ``top_k`` suite of
``benchmarks/run_benchmarks.py`` with ``--top-k-picks``, docs/benchmarks.md): the kernel's bound from the column
maxima costs ``O(k)`` per column, and rows with more than 32 candidates fall back to an insertion."""

PROFILER_LABEL = "gin_adapter::row_top_k"
"""What ``torch.profiler`` calls the kernel's time (it is no ATen operator)."""


@functools.cache
def _kernel():
    """The C function, or ``None`` where the library is missing (:func:`gin_adapter.native_library.library`)."""
    return native_library.function("gin_row_topk_f32", [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])


def available() -> bool:
    """Whether the compiled top-k was built and loads (whatever :data:`ENABLED` says)."""
    return _kernel() is not None


def applies(x: torch.Tensor, k: int) -> bool:
    """Whether :func:`row_top_k` computes ``x``'s top-k rather than returning ``None``."""
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 1 and 1 <= k <= min(MAX_K, KERNEL_MAX_K)
            and k <= x.shape[-1] < 2**31 - 1 and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling() and available())


def row_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, indices)`` of the ``k`` largest entries along the last dimension, each ``(..., k)``, values
    descending; ``None`` where the kernel does not apply (module docstring)."""
    if not applies(x, k):
        return None
    kernel = _kernel()
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < n):
        rows = rows.contiguous()
    values = x.new_empty(rows.shape[0], k)
    index = torch.empty(rows.shape[0], k, dtype=torch.long)
    if rows.shape[0]:
        status = native_library.run(PROFILER_LABEL, kernel, rows.data_ptr(), rows.shape[0], n, rows.stride(0) if rows.shape[0] > 1 else n, k,
                                    values.data_ptr(), index.data_ptr(), torch.get_num_threads())
        if status == 2:
            raise MemoryError(f"gin_adapter's top-k could not allocate its buffers for rows of {n} entries.")
        if status:
            raise RuntimeError(f"gin_adapter's top-k refused rows of {n} entries with k={k} (status {status}); please report this.")
    return values.view(*x.shape[:-1], k), index.view(*x.shape[:-1], k)
