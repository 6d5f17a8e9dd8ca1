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
"""

from __future__ import annotations

import ctypes
import functools
import threading

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


@functools.cache
def _kernel():
    """The C function, or ``None`` without the library (or a library built before this kernel)."""
    loaded = native_library.library()
    if loaded is None or not hasattr(loaded, "gin_block_forward_f32"):
        return None
    return native_library.function("gin_block_forward_f32", [ctypes.c_void_p] * 3)


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


_GENERATION = [0]
"""Counts parameter registrations anywhere in the process (a parameter replaced by a new object: ``setattr``,
``load_state_dict(assign=True)``); a block's plan is rebuilt when it changed since the plan was made."""


def _parameter_registered(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_parameter_registered)


class _Plan:
    """One block's arguments for the kernel: its parameters' storage, sizes and constants, worked out once and kept
    while they hold (:meth:`current`); a call rewrites only its own inputs' slots. ``tensors`` is ``None`` where the
    kernel cannot run this block (dropout active, an activation it lacks, a parameter not float32, contiguous and on
    the CPU)."""

    __slots__ = ("training", "generation", "parameters", "addresses", "tensors", "sizes", "scalars", "heads", "width", "model_dim", "lock")

    def __init__(self, block: nn.Module) -> None:
        self.training, self.generation, self.tensors = block.training, _GENERATION[0], None
        self.lock = threading.Lock()  # the arrays are rewritten per call: one call at a time (ctypes releases the GIL)
        self.parameters = list(block.parameters())
        self.addresses = [t.data_ptr() for t in self.parameters]
        self.heads, self.width = block.heads_in, block.width_in
        layers = block.decode_layers()
        if layers is None:
            return
        lin1, lin2, out_proj, act, skip = layers
        code = activation_code(act)
        slope = act.weight if code == 4 else None
        used = [block.eps, lin1.weight, lin1.bias, lin2.weight, lin2.bias, slope, out_proj.weight, out_proj.bias, block.norm.weight, block.scale]
        if (code is None or block.norm.eps_t.dtype != torch.float32 or lin1.weight.shape[1] != self.heads * self.width
                or not all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()) for t in used)):
            return
        self.model_dim = out_proj.weight.shape[0]
        self.tensors = (ctypes.c_void_p * _TENSORS)(None, None, None, None, *(None if t is None else t.data_ptr() for t in used))
        self.sizes = (ctypes.c_int64 * _SIZES)(0, 0, 0, 0, 0, 0, 0, 0, 0, self.heads, self.width, lin1.weight.shape[0], self.model_dim, int(skip), code, 1)
        self.scalars = (ctypes.c_float * 2)(block.self_weight_offset_value, block.norm.eps)

    def current(self, block: nn.Module) -> bool:
        """Whether the block is still as planned: the same mode, no parameter replaced, every one at its address
        (``.to()``, a new ``.data`` move it)."""
        return (block.training == self.training and _GENERATION[0] == self.generation
                and all(t.data_ptr() == address for t, address in zip(self.parameters, self.addresses)))


def _plan(block: nn.Module) -> _Plan:
    """``block``'s :class:`_Plan`, rebuilt when it no longer holds."""
    plan = block.__dict__.get("_native_plan")
    if plan is None or not plan.current(block):
        plan = block.__dict__["_native_plan"] = _Plan(block)
    return plan


def _usable(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


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
    if (plan.tensors is None or width != plan.width or x_width != width or heads not in (1, plan.heads) or plan.heads % self_heads
            or (torch.is_grad_enabled() and (x_self.requires_grad or neighbours.requires_grad or any(t.requires_grad for t in plan.parameters)))):
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
