"""The GIN block's forward for a few token rows in one compiled call (``gin_adapter/native/block_forward.c``).

Decoding runs each layer's block once per new token: a dozen ATen calls on vectors of 32 to 576 numbers (the input
``c x + n``, two linear maps and activations, the output map, the RMSNorm's five operations), each costing far more
than its arithmetic, and more again inside a model whose weight streaming has just evicted them from cache
(docs/benchmarks.md). :func:`block_forward` computes the same function in one call for either block
(:mod:`gin_adapter.blocks`, formula and shapes there):

    z = c x + n,   h1 = act(W1 z + b1),   h2 = act(W2 h1 + b2 [+ z]),   y = W_out h2 [+ b_out]
    delta = y / sqrt(eps + mean_d y^2) * (w * scale)          (B, L, d)   [added to ``add_to`` in the same pass]

It returns ``None`` where it does not apply, and the block runs its modules then: the library is missing or
:data:`ENABLED` is off (``GIN_ADAPTER_NATIVE=0``), more than :data:`MAX_ROWS` token rows (a training or eval batch:
ATen's matrix products are faster there), a gradient to record, dropout active, another device or dtype, autocast,
``torch.compile`` tracing, or an activation the kernel lacks. The same values as the modules up to float32 rounding
(the order of the additions; tests), the same on any thread count: the published preset's larger block splits each
layer's output rows over PyTorch's threads, each output one thread's dot product.

:func:`decode_update` goes one step further for a decoded token with projected node features (``"hidden"``,
``"input"``): the projection, the feature cache's new row, the neighbour sum over the decode graph and the block in
one call, where the layer would otherwise run the projection's ``linear``, the feature cache, the sum and the block
each with its own Python. A hook on the block or any of its modules, or a parametrization, makes both step aside.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn

from . import native_library

ENABLED = native_library.ENABLED_BY_ENVIRONMENT
"""Use the compiled block forward where it applies; ``False`` (or ``GIN_ADAPTER_NATIVE=0``) gives the modules."""

MAX_ROWS = 32
"""Token rows (batch x new tokens) up to which a call runs compiled: decoding, not a training or eval batch."""

LABEL = "gin_adapter::block_forward"
"""What ``torch.profiler`` calls the kernel's time."""

_ACTIVATION_CODES = {nn.Identity: 0, nn.ReLU: 2, nn.SiLU: 3, nn.PReLU: 4}

_TENSORS, _SIZES = 14, 16  # the C function's three arrays (block_forward.c)
X, N, ADD_TO, OUT = range(4)


UPDATE_LABEL = "gin_adapter::decode_update"
"""What ``torch.profiler`` calls :func:`decode_update`'s kernel."""


@functools.cache
def _kernel():
    """The C function, or ``None`` without the library (or a library built before this kernel)."""
    return native_library.function("gin_block_forward_f32", [ctypes.c_void_p] * 3)


@functools.cache
def _update_kernel():
    """:func:`decode_update`'s C function, or ``None`` without it."""
    return native_library.function("gin_decode_update_f32", [ctypes.c_void_p] * 3)


def available() -> bool:
    """Whether the compiled block forward was built and loads (whatever :data:`ENABLED` says)."""
    return _kernel() is not None


def activation_code(act: nn.Module) -> int | None:
    """The kernel's code for activation module ``act`` (1 for the exact GELU), ``None`` for one it lacks."""
    if isinstance(act, nn.GELU):
        return 1 if act.approximate == "none" else None
    if isinstance(act, nn.PReLU):
        return 4 if act.weight.numel() == 1 else None
    return _ACTIVATION_CODES.get(type(act))


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Each block's :class:`_Plan`, beside the block rather than in it (ctypes arrays cannot be copied or pickled:
``copy.deepcopy(model)`` and ``torch.save(model)`` keep working)."""


_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name, {}) for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))
"""PyTorch's dictionaries of hooks registered for every module (private; mutated in place, so bound once)."""


def _hooked(modules: tuple) -> bool:
    """Whether calling ``modules`` would run something the kernel skips: a forward hook or pre-hook (global or on
    one of them, ``torch.nn.utils.prune``'s mask included) or a parametrization (a weight computed on access)."""
    if _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]:
        return True
    for m in modules:  # (a loop: this runs per layer and decoded token, and a generator costs more)
        if m._forward_hooks or m._forward_pre_hooks or "parametrizations" in m._modules:
            return True
    return False


_data_ptr, _stride = torch.Tensor.data_ptr, torch.Tensor.stride


def _state(block: nn.Module) -> tuple | None:
    """``(layers, tensors the kernel reads, key)`` for the block as it is now, or ``None`` where the kernel cannot
    stand in for its modules (dropout active, hooks, parametrizations). ``key`` names every tensor read by object,
    address and strides (a parameter replaced by ``setattr``, ``load_state_dict(assign=True)`` or
    ``torch.func.functional_call``, moved by ``.to()`` or re-strided by a new ``.data`` changes it), and the
    activation modules (:class:`_Plan` checks them once)."""
    layers = block.decode_layers()
    if layers is None:
        return None
    lin1, lin2, out_proj, acts, skip = layers
    norm = block._modules["norm"]
    if _hooked(block.decode_modules()):
        return None
    # straight from the parameter dictionaries (no parametrization here: _hooked): each Module.__getattr__ costs ~0.5 us
    own, first, second, out = block._parameters, lin1._parameters, lin2._parameters, out_proj._parameters
    slope = acts[0]._parameters["weight"] if isinstance(acts[0], nn.PReLU) else None
    used = (own["eps"], first["weight"], first.get("bias"), second["weight"], second.get("bias"), slope, out["weight"], out.get("bias"),
            norm._parameters["weight"], own["scale"])
    present = [t for t in used if t is not None]
    key = (block.training, *map(id, acts), *[act.__dict__.get("approximate") for act in acts], *map(id, used), *map(_data_ptr, present),
           *map(_stride, present))
    return layers, used, key


class _Plan:
    """One block's arguments for the kernel: its parameters' storage, sizes and constants, worked out once and kept
    while its :func:`_state` key holds; a call rewrites only its own inputs' slots. ``tensors`` is ``None`` where the
    kernel cannot run this block (a parameter not float32, contiguous and on the CPU, an activation it lacks, two
    activations that differ)."""

    __slots__ = ("key", "used", "tensors", "sizes", "scalars", "heads", "width", "model_dim", "lock", "update_tensors", "update_sizes")

    def __init__(self, block: nn.Module, layers: tuple, used: tuple, key: tuple) -> None:
        self.key, self.used, self.tensors = key, used, None  # `used` keeps the tensors alive: ids in the key stay theirs
        self.update_tensors = self.update_sizes = None  # decode_update's arrays, made on its first call
        self.lock = threading.Lock()  # the arrays are rewritten per call: one call at a time (ctypes releases the GIL)
        self.heads, self.width = block.heads_in, block.width_in
        lin1, lin2, out_proj, acts, skip = layers
        codes = {activation_code(act) for act in acts}  # one code for both, and one shared PReLU slope
        code = codes.pop() if len(codes) == 1 and not (isinstance(acts[0], nn.PReLU) and any(act is not acts[0] for act in acts)) else None
        if (code is None or block.norm.eps_t.dtype != torch.float32 or lin1.weight.shape[1] != self.heads * self.width
                or not all(t is None or _usable_contiguous(t) for t in used)):
            return
        self.model_dim = out_proj.weight.shape[0]
        self.tensors = (ctypes.c_void_p * _TENSORS)(None, None, None, None, *(None if t is None else t.data_ptr() for t in used))
        self.sizes = (ctypes.c_int64 * _SIZES)(0, 0, 0, 0, 0, 0, 0, 0, 0, self.heads, self.width, lin1.weight.shape[0], self.model_dim, int(skip), code, 1)
        self.scalars = (ctypes.c_float * 2)(block.self_weight_offset.item(), block.norm.eps)


def _plan(block: nn.Module) -> _Plan | None:
    """``block``'s :class:`_Plan`, rebuilt when its key changed; ``None`` where the kernel cannot stand in."""
    state = _state(block)
    if state is None:
        return None
    layers, used, key = state
    plan = _PLANS.get(block)
    if plan is None or plan.key != key:
        plan = _PLANS[block] = _Plan(block, layers, used, key)
    return plan


def _usable(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_cpu


def _usable_contiguous(t: torch.Tensor) -> bool:
    return _usable(t) and t.is_contiguous()


def block_forward(block: nn.Module, x_self: torch.Tensor, neighbours: torch.Tensor, *, add_to: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
    """``block(x_self, neighbours)`` (``+ add_to`` when given, ``(B, L, d)``) in one compiled call, or ``None`` where
    the kernel does not apply (module docstring). ``x_self (B, Hs, L, F)``, ``neighbours (B, Hn, L, F)`` as for
    :meth:`gin_adapter.blocks._Block.gin_input`; ``block`` a :class:`~gin_adapter.blocks.GinBlock` or
    :class:`~gin_adapter.blocks.PublishedGinBlock`."""
    if not ENABLED or torch.compiler.is_compiling() or not available() or not hasattr(block, "decode_layers"):
        return None
    batch, heads, length, width = neighbours.shape
    _, self_heads, x_length, x_width = x_self.shape
    if (batch * length > MAX_ROWS or x_self.shape[0] != batch or x_length != length or not _usable(x_self) or not _usable(neighbours)
            or torch.is_autocast_enabled("cpu")):
        return None
    plan = _plan(block)
    if (plan is None or plan.tensors is None or width != plan.width or x_width != width or heads not in (1, plan.heads) or plan.heads % self_heads
            or (torch.is_grad_enabled() and (x_self.requires_grad or neighbours.requires_grad or (add_to is not None and add_to.requires_grad)
                                             or any(t is not None and t.requires_grad for t in plan.used)))):
        return None
    if add_to is not None and (add_to.shape != (batch, length, plan.model_dim) or not _usable(add_to)):
        return None
    x_self = x_self if x_self.stride(-1) == 1 else x_self.contiguous()
    neighbours = neighbours if neighbours.stride(-1) == 1 else neighbours.contiguous()
    add_to = None if add_to is None else add_to.contiguous()
    out = x_self.new_empty(batch, length, plan.model_dim)
    tensors, sizes = plan.tensors, plan.sizes
    with plan.lock:
        tensors[X], tensors[N], tensors[OUT] = x_self.data_ptr(), neighbours.data_ptr(), out.data_ptr()
        tensors[ADD_TO] = None if add_to is None else add_to.data_ptr()
        sizes[0], sizes[1], sizes[2] = x_self.stride()[:3]
        sizes[3], sizes[4], sizes[5] = neighbours.stride(0), neighbours.stride(1) if heads > 1 else 0, neighbours.stride(2)
        sizes[6], sizes[7], sizes[8], sizes[15] = batch, length, self_heads, torch.get_num_threads()
        status = native_library.run(LABEL, _kernel(), tensors, sizes, plan.scalars)
    if status:
        raise RuntimeError(f"gin_adapter's compiled block forward refused its arguments (status {status}); set GIN_ADAPTER_NATIVE=0 "
                           "to use the modules and report this.")
    return out


_UPDATE_TENSORS, _UPDATE_SIZES = _TENSORS + 7, _SIZES + 8  # gin_decode_update_f32's arrays: the block's, then its own


def decode_update(block: nn.Module, u0: torch.Tensor, u1: torch.Tensor | None, graph: tuple[torch.Tensor, torch.Tensor | None, int],
                  reserve: Callable[[int], torch.Tensor], *, add_to: torch.Tensor | None = None) -> torch.Tensor | None:
    """A decoded token's whole update with projected node features in one compiled call, or ``None`` where it does not
    apply (then nothing was reserved). For each batch row, ``block_forward.c``'s ``gin_decode_update_f32``:

        u = u0 + u1 (u0 alone without u1)               (B, 1, d_in)   h + attn_out ("hidden") or the attention's input
        x = W_in u + b_in                              (B, 1, F)      written to the feature cache's new row
        n_h = sum_m w[h, m] X[at[h, m] or m]           (B, Hn, F)     over the graph's last ``span`` feature rows
        out = block(x, n) [+ add_to]                   (B, 1, d)      as :func:`block_forward`

    ``graph = (w (B, Hn, m) float32, at (B, Hn, m) int64 key positions in ``[0, span)`` (w's strides; not checked:
    they come from the decode kernels) or None, span)`` with ``Hn`` 1 (one graph for every head) or the block's
    heads; ``reserve(F)`` returns the features of every key ``(B, Lk, F)`` from the
    feature cache (:meth:`gin_adapter.cache.FeatureCacheMixin.gin_reserve`), the last row (the new token's) to be
    written by this call. No gradient may be recorded (the caller checks ``torch.is_grad_enabled()``)."""
    in_proj = block._modules.get("in_proj")
    if not ENABLED or type(in_proj) is not nn.Linear or torch.compiler.is_compiling() or _update_kernel() is None or torch.is_autocast_enabled("cpu"):
        return None
    plan = _plan(block)  # None with a hook or parametrization on the block or any of its modules, in_proj's included
    if plan is None or plan.tensors is None:
        return None
    weights, index, span = graph
    batch, graph_heads, entries = weights.shape
    w_in, b_in = in_proj._parameters["weight"], in_proj._parameters.get("bias")
    if (batch > MAX_ROWS or u0.shape[:2] != (batch, 1) or not _usable(u0) or u0.stride(-1) != 1 or w_in.shape[1] != u0.shape[-1]
            or not _usable(weights) or (weights.stride(-1) != 1 and entries > 1)
            or (u1 is not None and (u1.shape != u0.shape or not _usable(u1) or u1.stride(-1) != 1))
            or (index is not None and (index.dtype != torch.int64 or index.shape != weights.shape or index.stride() != weights.stride()))
            or not _usable_contiguous(w_in) or (b_in is not None and not _usable_contiguous(b_in))):
        return None
    if (graph_heads not in (1, plan.heads) or w_in.shape[0] != plan.width or (index is None and entries != span)
            or (add_to is not None and (add_to.shape != (batch, 1, plan.model_dim) or not _usable(add_to)))):
        return None
    features = reserve(plan.width)  # (B, Lk, F), its last row written below
    k_len, (f_b, f_l, f_f) = features.shape[-2], features.stride()
    if span > k_len or features.shape[0] != batch or features.shape[-1] != plan.width or f_f != 1 or not _usable(features):
        features[..., -1, :].fill_(float("nan"))  # the row left unwritten: visibly so
        raise RuntimeError(f"decode_update: the feature cache returned {tuple(features.shape)} for a graph over {span} rows of {batch} sequences.")
    add_to = None if add_to is None else add_to.contiguous()
    out = u0.new_empty(batch, 1, plan.model_dim)
    first = features.data_ptr()
    with plan.lock:
        if plan.update_tensors is None:
            plan.update_tensors = (ctypes.c_void_p * _UPDATE_TENSORS)(*plan.tensors)
            plan.update_sizes = (ctypes.c_int64 * _UPDATE_SIZES)(*plan.sizes)
        tensors, sizes = plan.update_tensors, plan.update_sizes
        tensors[X], tensors[ADD_TO], tensors[OUT] = first + 4 * (k_len - 1) * f_l, None if add_to is None else add_to.data_ptr(), out.data_ptr()
        tensors[14:21] = (u0.data_ptr(), None if u1 is None else u1.data_ptr(), w_in.data_ptr(), None if b_in is None else b_in.data_ptr(),
                          first + 4 * (k_len - span) * f_l, weights.data_ptr(), None if index is None else index.data_ptr())
        sizes[0], sizes[6], sizes[7], sizes[8], sizes[15] = f_b, batch, 1, 1, torch.get_num_threads()
        sizes[16:24] = (u0.stride(0), 0 if u1 is None else u1.stride(0), f_b, f_l, weights.stride(0), weights.stride(1) if graph_heads > 1 else 0, entries, u0.shape[-1])
        status = native_library.run(UPDATE_LABEL, _update_kernel(), tensors, sizes, plan.scalars)
    if status:
        features[:, -1].fill_(float("nan"))  # the row left unwritten: visibly so, should anything read the cache again
        raise RuntimeError(f"gin_adapter's compiled decode update refused its arguments (status {status}); set GIN_ADAPTER_NATIVE=0 "
                           "to use the modules and report this.")
    return out
