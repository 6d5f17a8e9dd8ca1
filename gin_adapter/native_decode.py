"""One decoded token's attention, its per-head top-k graph and the values' neighbour sum in one compiled call per
layer (``gin_adapter/native/decode_graph.c``).

:func:`gin_adapter.joint_decode.attention_with_graph` computes, for the new token's query ``q (B, H, 1, D)`` over
the cached ``k (B, Hkv, Lk, D)`` and ``v (B, Hkv, Lk, Dv)``, with ``R = B * Hkv`` rows of ``G = H / Hkv`` heads:

    P = softmax_j(scaling q K^T)                  (R, G, Lk)
    O = P V                                       (R, G, Dv)   sdpa's output, in its layout (B, 1, H, Dv)
    W, idx = top-k_j P                            (R, G, k)    the graph: the k largest probabilities and their keys
    n = sum_m W[m] v[idx[m]]                      (R, G, Dv)   the neighbour sum of the values (node_features="values")

by ATen's operators (about ten calls, each costing more than its arithmetic at this size); :func:`attention_with_graph`
here does all four in one call, one head at a time. :func:`threshold_attention` does the same for the published
rule's graph (``A = S [S > threshold]``, ``S = sigmoid(alpha (min(1, sum_h P_h) - tau))``, shared by the heads). The same values up to float32 rounding (the exp polynomial,
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

LABEL, THRESHOLD_LABEL = "gin_adapter::decode_attention", "gin_adapter::decode_threshold_attention"
"""What ``torch.profiler`` calls the kernels' time."""

_ARRAYS = threading.local()  # each thread's argument arrays, rewritten per call


@functools.cache
def _kernels():
    """``(top-k step, threshold step)`` C functions, or ``None`` without the library (or one built before them)."""
    kernels = tuple(native_library.function(name, [ctypes.c_void_p] * 3) for name in ("gin_decode_attention_f32", "gin_decode_threshold_f32"))
    return None if None in kernels else kernels


def available() -> bool:
    """Whether the compiled decode step was built and loads (whatever :data:`ENABLED` says)."""
    return _kernels() is not None


def _arrays() -> tuple:
    arrays = getattr(_ARRAYS, "value", None)
    if arrays is None:
        arrays = _ARRAYS.value = ((ctypes.c_void_p * 7)(), (ctypes.c_int64 * 16)(), (ctypes.c_float * 4)())
    return arrays


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, top_k: int) -> bool:
    """Whether :func:`attention_with_graph` runs on a call that
    :func:`gin_adapter.joint_decode.decode_applies` accepted (one float32 query row, nothing autograd tracks): CPU
    tensors with contiguous last dimensions and matching sizes (none empty, ``H`` a multiple of ``Hkv``), ``1 <=
    top_k <= 64``, not while ``torch.compile`` traces."""
    if not (ENABLED and 1 <= top_k <= MAX_K and query.is_cpu and key.is_cpu and value.is_cpu and not torch.compiler.is_compiling() and available()):
        return False
    (batch, heads, _, dim), (kv_batch, kv_heads, keys, key_dim) = query.shape, key.shape
    return (query.stride(-1) == key.stride(-1) == value.stride(-1) == 1 and batch > 0 and keys > 0 and kv_heads > 0 and heads % kv_heads == 0
            and key_dim == dim and kv_batch == batch and value.shape[:3] == key.shape[:3])


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
    tensors, sizes, scalars = _arguments(query, key, value, out)
    tensors[4], tensors[5], tensors[6] = weights.data_ptr(), index.data_ptr(), sums.data_ptr()
    sizes[14], scalars[0] = picks, scaling
    _check(native_library.run(LABEL, _kernels()[0], tensors, sizes, scalars))
    return out, weights, index, sums


def threshold_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float, alpha: float, tau: float,
                        threshold: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(O (B, 1, H, Dv), A (B, Lk))`` for one decoded token with the published rule's graph, shared by the heads:
    ``A = S [S > threshold]``, ``S = sigmoid(alpha (min(1, sum_h P_h) - tau))``
    (:func:`gin_adapter.joint_threshold.decode_attention_with_threshold_graph`), where
    :func:`gin_adapter.joint_decode.decode_applies` holds; ``None`` where the kernel does not apply."""
    if not applies(query, key, value, 1):
        return None
    out = query.new_empty(query.shape[0], 1, query.shape[1], value.shape[-1])
    adjacency = query.new_empty(query.shape[0], key.shape[2])
    tensors, sizes, scalars = _arguments(query, key, value, out)
    tensors[4], tensors[5], tensors[6] = adjacency.data_ptr(), None, None
    scalars[0], scalars[1], scalars[2], scalars[3] = scaling, alpha, tau, threshold
    _check(native_library.run(THRESHOLD_LABEL, _kernels()[1], tensors, sizes, scalars))
    return out, adjacency


def _arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor) -> tuple:
    """This thread's argument arrays with the inputs' addresses, strides and sizes and the output's address set."""
    tensors, sizes, scalars = _arrays()
    tensors[0:4] = query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr()  # (slices: one ctypes call each)
    (batch, heads, _, dim), (_, kv_heads, keys, _), (k_b, k_h, k_l, _), (v_b, v_h, v_l, _) = query.shape, key.shape, key.stride(), value.stride()
    sizes[0:14] = query.stride(0), query.stride(1), k_b, k_h, k_l, v_b, v_h, v_l, batch, heads, kv_heads, keys, dim, value.shape[-1]
    sizes[15] = torch.get_num_threads()
    return tensors, sizes, scalars


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"gin_adapter's compiled decode attention refused its arguments (status {status}); set GIN_ADAPTER_NATIVE=0 to use "
                           "ATen's operators and report this.")
