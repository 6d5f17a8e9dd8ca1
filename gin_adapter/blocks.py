"""The trainable part of one adapter on one layer: node-feature projection, GIN update, MLP, output, scale.

With node features ``x_j`` (per head or shared), neighbour sums ``n_i = sum_j A[i, j] x_j`` (computed elsewhere,
:mod:`gin_adapter.aggregate`) and self weight ``c = 1 + eps`` (``self_weight="one_plus_eps"``) or ``c = eps``
(``"eps"``, the published code), every block computes ``z_i = c x_i + n_i`` and returns
``delta_i = scale * RMSNorm(f(z_i))`` of the model width, which the wrapper adds to the attention output:

* :class:`GinBlock` (``block="compact"``): ``f(z) = W_out act(W_2 act(W_1 z))``. With value features
  ``z`` is the heads' concatenation ``(B, L, H * D)`` and ``W_1`` is the paper's projection into the GIN width
  fused with the MLP's first layer (two linear maps in a row are one).
* :class:`PublishedGinBlock` (``block="published"``): ``f(z) = W_out drop(act(W_2 act(W_1 z) + z))`` with one
  shared PReLU ``act`` and biases everywhere, as the published Sparse-GIN code (DESIGN.md section 2).

Node features other than the values (``node_features="hidden"`` or ``"input"``, model width ``d``) are first
projected per token, ``x_j = W_in u_j + b_in`` (``(B, L, d) -> (B, L, hidden_dim)``, :meth:`project`), so the sum
runs in the GIN width. ``scale`` starts at ``scale_init`` (0 by default: the wrapped model equals the base model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import native_block
from .activations import ACTIVATIONS
from .config import GinConfig
from .out_norm import inverse_rms, project_and_norm



@dataclass(frozen=True)
class AttentionDims:
    """Sizes of one wrapped attention module: query heads ``H``, head width ``D``, model width ``d``."""

    heads: int
    head_dim: int
    model_dim: int


def feature_heads(config: GinConfig, dims: AttentionDims) -> tuple[int, int]:
    """``(heads, width)`` of the GIN input ``z`` per token: ``(H, D)`` for values, ``(H or 1, hidden_dim)`` else."""
    if config.node_features == "values":
        return dims.heads, dims.head_dim
    return (dims.heads if config.head_reduction == "none" else 1), config.hidden_dim


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; no operator call when it already is (a decoded token runs every call once per layer)."""
    return x if x.dtype == dtype else x.to(dtype)


class ScaledRMSNorm(nn.Module):
    """``scale * weight * y / sqrt(mean_j y_j^2 + eps)`` over the last dimension ``d`` (``weight (d,)``, ``scale``
    given per call: the block's learnable gate, folded into the weight so no normalised copy is kept for its grad).

    For float32 ``y`` the same float operations in the same order as ``F.rms_norm``'s CPU composite (so the same
    numbers), with ``eps`` and ``d`` held as 0-dim float32 buffers and ``eps + sum / d`` in one ``addcdiv``: 7 ATen
    calls instead of 24, since every Python scalar in an operation is first wrapped into a tensor (4 calls), and a
    decoded token pays each call once per layer. Other dtypes use ``F.rms_norm`` (which computes in float32). The
    state dict holds ``weight`` only, as ``nn.RMSNorm``'s.
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.register_buffer("eps_t", torch.tensor(eps), persistent=False)
        self.register_buffer("width_t", torch.tensor(float(width)), persistent=False)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        weight = self.weight * scale
        y = _as(y, weight.dtype)  # fp32 under autocast
        if y.dtype != torch.float32 or self.eps_t.dtype != torch.float32:
            return F.rms_norm(y, (y.shape[-1],), weight, self.eps)
        return y * inverse_rms(y, self.eps_t, self.width_t) * weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _Block(nn.Module):
    """What every block shares: the optional input projection, ``eps``, the RMSNorm and ``scale``."""

    def __init__(self, config: GinConfig, dims: AttentionDims, scale_init: float) -> None:
        super().__init__()
        self.scale_init = scale_init
        self.heads_in, self.width_in = feature_heads(config, dims)
        self.in_proj = nn.Linear(dims.model_dim, config.hidden_dim) if config.node_features != "values" else None
        self.eps = nn.Parameter(torch.zeros(1))
        self.norm = ScaledRMSNorm(dims.model_dim, config.norm_eps)
        self.scale = nn.Parameter(torch.zeros(1))
        # c - eps as a 0-dim tensor (not saved): no Python scalar is wrapped into a tensor on every call
        offset = 1.0 if config.self_weight == "one_plus_eps" else 0.0
        self.register_buffer("self_weight_offset", torch.tensor(offset), persistent=False)

    def reset_parameters(self) -> None:
        """Default init of every linear map (and PReLU slope), ``eps = 0``, unit norm weight, ``scale = scale_init``."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        with torch.no_grad():
            self.eps.zero_()
            self.scale.fill_(self.scale_init)

    def forward(self, x_self: torch.Tensor, neighbours: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """``delta (B, L, d)`` from ``x_self (B, Hs, L, F)`` and ``neighbours (B, Hn, L, F)`` (:meth:`gin_input`), or
        ``add_to + delta`` in ``add_to``'s dtype when given. A few token rows without gradient (decoding) take one
        compiled call (:mod:`gin_adapter.native_block`), everything else the modules (:meth:`delta`)."""
        fused = native_block.block_forward(self, x_self, neighbours, add_to=add_to)
        if fused is not None:
            return fused
        delta = self.delta(x_self, neighbours)
        if add_to is None:
            return delta
        return add_to + (delta if delta.dtype == add_to.dtype else delta.to(add_to.dtype))

    def delta(self, x_self: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_layers(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, tuple[nn.Module, nn.Module], bool] | None:
        """``(W1, W2, W_out, (first, second activation), skip)`` for the compiled forward (``skip``: ``z`` added
        before the second activation), or ``None`` while dropout is active. Looked up in ``_modules`` (this runs
        on every decoded token's call)."""
        raise NotImplementedError

    def decode_modules(self) -> tuple[nn.Module, ...]:
        """The block and every module whose call the compiled forward stands in for: a hook on any of them makes it
        step aside (:mod:`gin_adapter.native_block`). Read from ``_modules`` (this runs on every decoded token's call)."""
        return (self, *self._modules.values())

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """Node features of model width ``(B, L, d)`` -> GIN width ``(B, L, hidden_dim)`` (hidden/input modes)."""
        return self.in_proj(_as(u, self.in_proj.weight.dtype))

    def gin_input(self, x_self: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """``z = c * x_self + neighbours`` per head, merged to ``(B, L, heads_in * width)``.

        ``x_self (B, Hs, L, F)`` with ``Hs`` dividing the neighbours' heads ``Hn`` (values: ``Hs = Hkv``, broadcast
        over the ``Hn / Hs`` query groups without a copy; hidden/input: ``Hs = 1``); ``neighbours (B, Hn, L, F)``
        with ``Hn`` = ``heads_in`` or 1 (one graph shared by every value head, expanded here).
        """
        dtype = self.eps.dtype
        batch, heads, length, dim = neighbours.shape
        if heads < self.heads_in:
            neighbours, heads = neighbours.expand(batch, self.heads_in, length, dim), self.heads_in
        self_heads = x_self.shape[1]
        grouped = _as(neighbours, dtype).view(batch, self_heads, heads // self_heads, length, dim)
        c = self.self_weight_offset + self.eps
        z = torch.addcmul(grouped, c, _as(x_self, dtype).unsqueeze(2))  # grouped + c * x_self: (B, Hs, G, L, F)
        return z.permute(0, 3, 1, 2, 4).reshape(batch, length, heads * dim)  # heads h = s * G + g


class GinBlock(_Block):
    """``block="compact"``: ``delta = scale * RMSNorm(W_out act(W_2 act(W_1 z + b_1) + b_2))``.

    Shapes: ``x_self (B, Hs, L, F)``, ``neighbours (B, Hn, L, F)`` -> ``(B, L, d)``; ``W_1: heads_in * F -> hidden_dim``.
    """

    def __init__(self, config: GinConfig, dims: AttentionDims, scale_init: float = 0.0) -> None:
        super().__init__(config, dims, scale_init)
        act = ACTIVATIONS[config.activation]() if config.activation == "prelu" else None  # one shared slope
        self.mlp = nn.Sequential(
            nn.Linear(self.heads_in * self.width_in, config.hidden_dim),
            act or ACTIVATIONS[config.activation](),
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity(),  # no kernel call for the default 0
            nn.Linear(config.hidden_dim, config.hidden_dim),
            act or ACTIVATIONS[config.activation](),
        )
        self.out_proj = nn.Linear(config.hidden_dim, dims.model_dim, bias=False)
        self.reset_parameters()

    def delta(self, x_self: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        return project_and_norm(self.mlp(self.gin_input(x_self, neighbours)), self.out_proj, self.norm, self.scale)

    def decode_layers(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, tuple[nn.Module, nn.Module], bool] | None:
        mlp = self._modules["mlp"]._modules
        if self.training and isinstance(mlp["2"], nn.Dropout) and mlp["2"].p > 0:
            return None
        return mlp["0"], mlp["3"], self._modules["out_proj"], (mlp["1"], mlp["4"]), False

    def decode_modules(self) -> tuple[nn.Module, ...]:
        return (*super().decode_modules(), *self._modules["mlp"]._modules.values())


class PublishedGinBlock(_Block):
    """``block="published"``: ``delta = scale * RMSNorm(W_out drop(act(W_2 act(W_1 z) + z)) + b_out)``.

    One PReLU ``act`` is used inside the MLP and again after the skip, as published; dropout after it.
    Shapes: ``x_self (B, 1, L, F)``, ``neighbours (B, 1, L, F)`` -> ``(B, L, d)``, ``F = hidden_dim``.
    """

    def __init__(self, config: GinConfig, dims: AttentionDims, scale_init: float = 0.0) -> None:
        super().__init__(config, dims, scale_init)
        width = config.hidden_dim
        self.lin1, self.lin2 = nn.Linear(width, width), nn.Linear(width, width)
        self.act = ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.out_proj = nn.Linear(width, dims.model_dim)
        self.reset_parameters()

    def delta(self, x_self: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        z = self.gin_input(x_self, neighbours)  # (B, L, F)
        y = self.dropout(self.act(self.lin2(self.act(self.lin1(z))) + z))
        return project_and_norm(y, self.out_proj, self.norm, self.scale)

    def decode_layers(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, tuple[nn.Module, nn.Module], bool] | None:
        modules = self._modules
        if self.training and isinstance(modules["dropout"], nn.Dropout) and modules["dropout"].p > 0:
            return None
        return modules["lin1"], modules["lin2"], modules["out_proj"], (modules["act"], modules["act"]), True


BLOCKS = {"compact": GinBlock, "published": PublishedGinBlock}


def make_block(config: GinConfig, dims: AttentionDims, scale_init: float = 0.0) -> _Block:
    """The block ``config.block`` names, sized for a layer of ``dims``."""
    return BLOCKS[config.block](config, dims, scale_init)
