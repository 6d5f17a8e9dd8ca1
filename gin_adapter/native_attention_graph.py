"""Causal attention with the adapter's graph in one compiled call per layer and direction (``gin_adapter/native/``).

Two kernels, for plain causal attention on the CPU, on tiles of :data:`TILE_ROWS` query rows whose scores stay
in the thread's cache from the score product through the softmax, the output product and the graph (forward),
or the softmax backward and the three gradient products (backward); shared parts in ``tiles.c``:

* :func:`forward` / :func:`backward` (``attention_graph.c``): the per-head top-k graph of
  :class:`gin_adapter.joint._AttentionWithGraph` (its docstring has the formulas); tiles of one head.
* :func:`threshold_forward` / :func:`threshold_backward` (``threshold_graph.c``): the published rule's graph of
  :class:`gin_adapter.joint_threshold._AttentionWithThresholdGraph`, kept whole or as each row's ``K`` largest
  entries; tiles of every head of a batch row (the rule sums the heads).

The products run on the BLAS ``sgemm`` that PyTorch was built with (MKL in PyTorch's x86-64 Linux wheels), found
in PyTorch's own library (:func:`blas_sgemm`) and checked against ``torch.matmul`` once when first used.

They return ``None`` where they do not apply (:func:`applies`, :func:`threshold_applies`; callers keep ATen's
chunked form then): the library or an sgemm is missing, :data:`ENABLED` is off (``GIN_ADAPTER_NATIVE=0``),
another device or dtype, a mask argument, ``k`` above :data:`gin_adapter.native_top_k.MAX_K` (``K`` above 64
for the published rule), or ``torch.compile`` tracing. The values equal ATen's form up to float32 rounding (the
exp polynomial, the order of the sums; tests), and do not depend on the thread count: the tiles are cut into
:func:`segments` runs of equal work whatever the thread count, and the runs' key and value gradients are summed
in a fixed order.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os

import torch

from . import native_library, native_top_k

logger = logging.getLogger(__name__)

ENABLED = native_library.ENABLED_BY_ENVIRONMENT
"""Use the compiled kernel where it applies; ``False`` (or ``GIN_ADAPTER_NATIVE=0``) gives ATen's chunked form."""

TILE_ROWS = 64
"""Query rows per tile: a tile's scores over 2,048 keys are 512 KiB, and its gradient as much again."""

UNITS_PER_CALL = 32
"""Work units a call is cut into at least (while each head has tiles to spare), for the threads to share."""

FORWARD_LABEL, BACKWARD_LABEL = "gin_adapter::attention_graph", "gin_adapter::attention_graph_backward"
"""What ``torch.profiler`` calls the kernel's time (it is no ATen operator)."""

_INT64, _POINTER, _FLOAT, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_PROBLEM = [_POINTER, _INT64, _INT64, _INT64] * 3 + [_INT64] * 6 + [_FLOAT] + [_INT64] * 3


def blas_sgemm() -> int | None:
    """The address of the Fortran ``sgemm_`` in PyTorch's CPU library, or ``None`` where it exports none."""
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            function = getattr(ctypes.CDLL(path), "sgemm_")
        except (OSError, AttributeError):
            continue
        return ctypes.cast(function, ctypes.c_void_p).value
    return None


@functools.cache
def _kernels():
    """``(forward, backward, threshold forward, threshold backward)`` C functions with an sgemm set and checked,
    or ``None`` (logged once)."""
    forward = native_library.function("gin_attention_graph_forward_f32", _PROBLEM + [_POINTER] * 3 + [_INT])
    if forward is None:  # no library, or one built before these kernels (logged)
        return None
    address = blas_sgemm()
    if address is None:
        logger.info("PyTorch's library exports no sgemm; gin_adapter's compiled attention uses ATen's chunked form.")
        return None
    set_sgemm = native_library.function("gin_set_sgemm", [_POINTER], None)
    set_sgemm(address)
    if not _sgemm_agrees():
        logger.warning("the sgemm found in PyTorch's library disagrees with torch.matmul; gin_adapter's compiled attention is off.")
        set_sgemm(None)
        return None
    backward = native_library.function("gin_attention_graph_backward_f32", _PROBLEM + [_POINTER] * 5 + [_POINTER] * 5 + [_INT])
    rule = [_FLOAT] * 3 + [_INT]
    threshold_forward = native_library.function("gin_threshold_graph_forward_f32", _PROBLEM + rule + [_POINTER] * 3 + [_INT])
    threshold_backward = native_library.function("gin_threshold_graph_backward_f32", _PROBLEM + rule + [_POINTER] * 5 + [_POINTER] * 5 + [_INT])
    return forward, backward, threshold_forward, threshold_backward


def _sgemm_agrees() -> bool:
    """One product of each transposition through the C wrapper against ``torch.matmul``."""
    gemm = native_library.function("gin_gemm_f32", [_INT] * 5 + [_FLOAT, _POINTER, _INT, _POINTER, _INT, _FLOAT, _POINTER, _INT])
    generator = torch.Generator().manual_seed(0)
    for trans_a in (0, 1):
        for trans_b in (0, 1):
            a = torch.randn(5, 3, generator=generator) if trans_a else torch.randn(3, 5, generator=generator)  # op(a): 3 x 5
            b = torch.randn(4, 5, generator=generator) if trans_b else torch.randn(5, 4, generator=generator)  # op(b): 5 x 4
            c = torch.ones(3, 4)
            gemm(trans_a, trans_b, 3, 4, 5, 2.0, a.data_ptr(), a.shape[1], b.data_ptr(), b.shape[1], 0.5, c.data_ptr(), 4)
            expected = 2.0 * (a.T if trans_a else a) @ (b.T if trans_b else b) + 0.5
            if not torch.allclose(c, expected, rtol=1e-5, atol=1e-5):
                return False
    return True


def available() -> bool:
    """Whether the kernel was built and an sgemm found (whatever :data:`ENABLED` says)."""
    return _kernels() is not None


_MAX_INT32 = 2**31 - 1


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, top_k: int) -> bool:
    """Whether :func:`forward` runs: float32 CPU ``query (B, H, L, D)``, ``key (B, Hkv, L, D)``, ``value (B, Hkv,
    L, Dv)`` (none empty; ``H`` a multiple of ``Hkv``; a tile's rows within 32-bit offsets), no mask argument
    (plain causal), ``1 <= top_k <= min(L, 24, TILE_ROWS)``, not while ``torch.compile`` traces."""
    tensors = (query, key, value)
    if not (ENABLED and mask is None and not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 and t.numel() > 0 for t in tensors)):
        return False
    (batch, heads, length, dim), dim_v = query.shape, value.shape[-1]
    return (key.shape == (batch, key.shape[1], length, dim) and value.shape == (batch, key.shape[1], length, dim_v)
            and heads % key.shape[1] == 0 and length < _MAX_INT32 // max(TILE_ROWS, dim)
            and 1 <= top_k <= min(length, native_top_k.MAX_K, TILE_ROWS) and available())


def segments(batch: int, heads: int, length: int) -> int:
    """Runs of tiles each head is cut into: enough for :data:`UNITS_PER_CALL` units, at most half the tiles.
    Depends on the shape only, so the result does not depend on the thread count. The published rule's kernel
    takes ``heads=1`` (its units are batch rows: every head of a tile together)."""
    tiles = math.ceil(length / TILE_ROWS)
    return max(1, min(math.ceil(UNITS_PER_CALL / (batch * heads)), tiles // 2))


def _rows_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` where its rows are contiguous and apart by at least their width (what sgemm takes), else a copy."""
    return x if x.stride(-1) == 1 and x.stride(-2) >= x.shape[-1] else x.contiguous()


def _problem(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, top_k: int, runs: int) -> list:
    batch, heads, length, dim = query.shape
    arguments = []
    for x in (query, key, value):
        arguments += [x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)]
    return arguments + [batch, heads, key.shape[1], length, dim, value.shape[-1], scaling, TILE_ROWS, runs, top_k]


def _key_value_grads(key: torch.Tensor, value: torch.Tensor, runs: int, partial_heads: int) -> list[torch.Tensor]:
    """``dk``, ``dv`` (contiguous, written whole by the kernel) and the runs' partial sums ``(runs, B, heads, L, .)``."""
    batch, length = key.shape[0], key.shape[2]
    return [torch.empty_like(key, memory_format=torch.contiguous_format), torch.empty_like(value, memory_format=torch.contiguous_format),
            key.new_empty(runs, batch, partial_heads, length, key.shape[-1]), value.new_empty(runs, batch, partial_heads, length, value.shape[-1])]


def _check(status: int, what: str) -> None:
    if status == 2:
        raise MemoryError(f"gin_adapter's compiled attention {what} could not allocate its tile buffers.")
    if status:
        raise RuntimeError(f"gin_adapter's compiled attention {what} refused its arguments (status {status}); please report this.")


def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float, top_k: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]] | None:
    """``(O (B, H, L, Dv), W (B, H, L, k), idx (B, H, L, k) int64, inputs)`` of causal attention and its top-k
    graph (:class:`gin_adapter.joint._AttentionWithGraph`; ``mask``: the attention's mask argument, which must be
    ``None``), ``inputs`` the q, k, v the kernel read (to save for
    :func:`backward`); ``None`` where the kernel does not apply (:func:`applies`)."""
    if not applies(query, key, value, mask, top_k):
        return None
    query, key, value = (_rows_last(x) for x in (query, key, value))
    batch, heads, length, _ = query.shape
    out = value.new_empty(batch, heads, length, value.shape[-1])
    weights = query.new_empty(batch, heads, length, top_k)
    index = torch.empty(batch, heads, length, top_k, dtype=torch.long, device=query.device)
    _check(native_library.run(FORWARD_LABEL, _kernels()[0], *_problem(query, key, value, scaling, top_k, segments(batch, heads, length)),
                              out.data_ptr(), weights.data_ptr(), index.data_ptr(), torch.get_num_threads()), "forward")
    return out, weights, index, (query, key, value)


def backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, top_k: int, out: torch.Tensor,
             grad_out: torch.Tensor | None, grad_weights: torch.Tensor | None, weights: torch.Tensor, index: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from what :func:`forward` returned and saved, the output's gradient ``dO (B, H, L, Dv)``
    and the graph weights' ``dW (B, H, L, k)`` (either may be ``None``: no gradient)."""
    batch, heads, length, dim = query.shape
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    graph = [grad_weights.contiguous(), weights, index] if grad_weights is not None else [None] * 3
    grad_query = query.new_empty(batch, heads, length, dim)
    runs = segments(batch, heads, length)
    grads = _key_value_grads(key, value, runs, heads)
    pointers = [None if t is None else t.data_ptr() for t in graph]
    _check(native_library.run(BACKWARD_LABEL, _kernels()[1], *_problem(query, key, value, scaling, top_k, runs), out.data_ptr(), grad_out.data_ptr(),
                              *pointers, grad_query.data_ptr(), *(t.data_ptr() for t in grads), torch.get_num_threads()), "backward")
    return grad_query, grads[0], grads[1]


def threshold_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, form: str, top_k: int,
                      alpha: float = 1.0) -> bool:
    """Whether :func:`threshold_forward` runs: :func:`applies`' conditions with the graph kept whole (``"dense"``)
    or as each row's ``top_k <= 64`` largest entries (``"top_k"``), and a sharpening ``alpha`` above 0 in float32."""
    return (form in ("dense", "top_k") and ctypes.c_float(alpha).value > 0 and applies(query, key, value, mask, 1)
            and (form == "dense" or 1 <= top_k <= min(query.shape[2], 64, TILE_ROWS)))


def _rule_arguments(alpha: float, tau: float, threshold: float, form: str) -> list:
    return [alpha, tau, threshold, int(form == "top_k")]


def threshold_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float, *, alpha: float,
                      tau: float, threshold: float, form: str, top_k: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]] | None:
    """``(O (B, H, L, Dv), graph, idx, inputs)`` of causal attention and the published rule's graph
    (:class:`gin_adapter.joint_threshold._AttentionWithThresholdGraph`): the graph ``(B, L, L)`` for
    ``form="dense"``, or ``(B, L, top_k)`` with its key positions ``idx`` for ``"top_k"``; ``None`` where the
    kernel does not apply (:func:`threshold_applies`)."""
    if not threshold_applies(query, key, value, mask, form, top_k, alpha):
        return None
    query, key, value = (_rows_last(x) for x in (query, key, value))
    batch, heads, length, _ = query.shape
    top_k = top_k if form == "top_k" else 1
    out = value.new_empty(batch, heads, length, value.shape[-1])
    graph = query.new_empty(batch, length, top_k if form == "top_k" else length)
    index = torch.empty(batch, length, top_k, dtype=torch.long, device=query.device) if form == "top_k" else None
    _check(native_library.run(FORWARD_LABEL, _kernels()[2], *_problem(query, key, value, scaling, top_k, segments(batch, 1, length)),
                              *_rule_arguments(alpha, tau, threshold, form), out.data_ptr(), graph.data_ptr(),
                              None if index is None else index.data_ptr(), torch.get_num_threads()), "forward")
    return out, graph, index, (query, key, value)


def threshold_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, *, alpha: float, tau: float,
                       threshold: float, form: str, out: torch.Tensor, grad_out: torch.Tensor | None, grad_graph: torch.Tensor | None,
                       graph: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from what :func:`threshold_forward` returned and saved and the gradients of its output and
    graph (either may be ``None``)."""
    batch, heads, length, dim = query.shape
    top_k = graph.shape[-1] if form == "top_k" else 1
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_graph = None if grad_graph is None else grad_graph.contiguous()
    grad_query = query.new_empty(batch, heads, length, dim)
    runs = segments(batch, 1, length)
    grads = _key_value_grads(key, value, runs, key.shape[1])
    pointers = [None if t is None else t.data_ptr() for t in (grad_graph, graph, index)]
    _check(native_library.run(BACKWARD_LABEL, _kernels()[3], *_problem(query, key, value, scaling, top_k, runs),
                              *_rule_arguments(alpha, tau, threshold, form), out.data_ptr(), grad_out.data_ptr(), *pointers, grad_query.data_ptr(),
                              *(t.data_ptr() for t in grads), torch.get_num_threads()), "backward")
    return grad_query, grads[0], grads[1]
