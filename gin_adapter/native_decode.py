"""One decoded token's attention, its per-head top-k graph and the values' neighbour sum in one compiled call per
layer (``gin_adapter/native/decode_graph.c``).

:func:`gin_adapter.joint_decode.attention_with_graph` computes, for the new token's query ``q (B, H, 1, D)`` over
the cached ``k (B, Hkv, Lk, D)`` and ``v (B, Hkv, Lk, Dv)``, with ``R = B * Hkv`` rows of ``G = H / Hkv`` heads:

    P = softmax_j(scaling q K^T)                  (R, G, Lk)
    O = P V                                       (R, G, Dv)   sdpa's output, in its layout (B, 1, H, Dv)
    W, idx = top-k_j P                            (R, G, k)    the graph: the k largest probabilities and their keys
    n = sum_m W[m] v[idx[m]]                      (R, G, Dv)   the neighbour sum of the values (node_features="values")

by ATen's operators (about ten calls, each costing more than its arithmetic at this size); :func:`attention_with_graph`
here does all four in one call, one head at a time. The same values up to float32 rounding (the exp polynomial,
the order of the sums; tests), and the same picks up to ties. It returns ``None`` where it does not apply
(:func:`applies`) and the caller keeps ATen's operators.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from . import native_library

ENABLED = native_library.ENABLED_BY_ENVIRONMENT
"""Use the compiled decode step where it applies; ``False`` (or ``GIN_ADAPTER_NATIVE=0``) gives ATen's operators."""

MAX_K = 64
"""The most picks per row the kernel keeps (``row_topk.h``)."""

LABEL = "gin_adapter::decode_attention"
"""What ``torch.profiler`` calls the kernel's time."""

_ARRAYS = threading.local()  # each thread's argument arrays, rewritten per call


@functools.cache
def _kernel():
    """The C function, or ``None`` without the library (or a library built before this kernel)."""
    loaded = native_library.library()
    if loaded is None or not hasattr(loaded, "gin_decode_attention_f32"):
        return None
    return native_library.function("gin_decode_attention_f32", [ctypes.c_void_p] * 3)


def available() -> bool:
    """Whether the compiled decode step was built and loads (whatever :data:`ENABLED` says)."""
    return _kernel() is not None


def _arrays() -> tuple:
    arrays = getattr(_ARRAYS, "value", None)
    if arrays is None:
        arrays = _ARRAYS.value = ((ctypes.c_void_p * 7)(), (ctypes.c_int64 * 15)(), (ctypes.c_float * 1)())
    return arrays


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, top_k: int) -> bool:
    """Whether :func:`attention_with_graph` runs on a call that
    :func:`gin_adapter.joint_decode.decode_applies` accepted (one float32 query row, nothing autograd tracks): CPU
    tensors with contiguous last dimensions, ``H`` a multiple of ``Hkv``, ``1 <= top_k <= 64``, not while
    ``torch.compile`` traces."""
    return (ENABLED and 1 <= top_k <= MAX_K and not torch.compiler.is_compiling() and available()
            and query.device.type == key.device.type == value.device.type == "cpu"
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1 and query.shape[1] % key.shape[1] == 0 and key.shape[2] > 0)


def attention_with_graph(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float, top_k: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(O (B, 1, H, Dv), W (B, Hkv, G, k), idx (B, Hkv, G, k) int64, n (B, H, 1, Dv))`` for one decoded token
    (module docstring), ``k = min(top_k, Lk)``, where :func:`gin_adapter.joint_decode.decode_applies` holds;
    ``None`` where the kernel does not apply (:func:`applies`)."""
    if not applies(query, key, value, top_k):
        return None
    batch, heads, _, _ = query.shape
    kv_heads, keys, dim_v = key.shape[1], key.shape[2], value.shape[-1]
    picks = min(top_k, keys)
    out = query.new_empty(batch, 1, heads, dim_v)
    weights = query.new_empty(batch, kv_heads, heads // kv_heads, picks)
    index = torch.empty(weights.shape, dtype=torch.int64)
    sums = query.new_empty(batch, heads, 1, dim_v)
    tensors, sizes, scalars = _arrays()
    tensors[0], tensors[1], tensors[2], tensors[3] = query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr()
    tensors[4], tensors[5], tensors[6] = weights.data_ptr(), index.data_ptr(), sums.data_ptr()
    sizes[0], sizes[1] = query.stride(0), query.stride(1)
    sizes[2], sizes[3], sizes[4] = key.stride()[:3]
    sizes[5], sizes[6], sizes[7] = value.stride()[:3]
    sizes[8], sizes[9], sizes[10], sizes[11], sizes[12], sizes[13], sizes[14] = batch, heads, kv_heads, keys, query.shape[-1], dim_v, picks
    scalars[0] = scaling
    status = native_library.run(LABEL, _kernel(), tensors, sizes, scalars)
    if status:
        raise RuntimeError(f"gin_adapter's compiled decode attention refused its arguments (status {status}); set GIN_ADAPTER_NATIVE=0 to use "
                           "ATen's operators and report this.")
    return out, weights, index, sums
