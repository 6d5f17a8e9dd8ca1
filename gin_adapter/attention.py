"""Hooking into transformers' attention dispatch so the adapter sees q, k, v under any attention implementation.

transformers (>= 5) attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)(module, q, k, v, mask, dropout=, scaling=, **kw)`` with RoPE and the KV-cache update
already applied. :func:`install` registers ``gin_<impl>`` for the model's implementation ``<impl>`` (sdpa, eager,
flash, ...): it runs the original function unchanged and, when the calling module has asked for it through
:func:`capture`, also computes the GIN neighbourhood sums from the same q, k, v. Only eager attention returns
probabilities, so they are recomputed here; nothing of size ``(B, H, Lq, Lk)`` is kept for backward (the per-head
top-k kernel recomputes its scores in backward; other rules are checkpointed when ``recompute`` is on). The mask interface is registered too, or no mask is built.
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.utils.checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .adjacency import AdjacencyRule, attention_probabilities, sparse_adjacency, visible_keys
from .gin import NEIGHBOUR_SUMS, neighbour_sum_reference
from .topk_sum import topk_neighbour_sum

PREFIX = "gin_"


@dataclass
class AggregationRequest:
    """What a wrapped attention module asks of the attention function during one forward call."""

    module: torch.nn.Module
    rules: dict[str, AdjacencyRule]
    # filled by the attention function: per adapter, x_self (B, Hkv, Lq, D) and neighbour_sum (B, H, Lq, D)
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


_REQUEST: ContextVar[AggregationRequest | None] = ContextVar("gin_adapter_request", default=None)


@contextlib.contextmanager
def capture(request: AggregationRequest) -> Iterator[AggregationRequest]:
    """Make ``request`` visible to the attention function for the duration of the module's forward."""
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, Hkv, L, D) -> (B, Hkv * groups, L, D)`` (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def neighbour_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rule: AdjacencyRule,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """GIN neighbourhood sum ``sum_j A[i, j] v_j`` per head, from the attention's own q, k, v.

    Args:
        query: ``(B, H, Lq, D)``; key, value: ``(B, H / groups, Lk, D)``, repeated here to ``H`` heads (inside the
            checkpoint, so only the unrepeated KV tensors are kept for backward).
    Returns:
        ``(B, H, Lq, D)`` float32.
    """
    key, value = repeat_heads(key, groups), repeat_heads(value, groups)
    q_len, k_len = query.shape[-2], key.shape[-2]
    visible = visible_keys(attention_mask, q_len, k_len, query.device, sliding_window)
    probs = attention_probabilities(query, key, visible, scaling, softcap)
    adjacency = sparse_adjacency(probs, visible, rule)
    values = value.float()
    if rule.graph == "reference":
        return neighbour_sum_reference(adjacency, values)
    backend = "pyg" if rule.backend == "pyg" else "dense"
    return NEIGHBOUR_SUMS[backend](adjacency, values)


def _gin_features(module, query, key, value, attention_mask, scaling, kwargs, rule: AdjacencyRule):
    """``(x_self (B, Hkv, Lq, D), neighbour_sum (B, H, Lq, D) float32)`` for one adapter.

    The per-head top-k rule goes through the fused kernel (:mod:`gin_adapter.topk_sum`); every other rule through
    the generic chain :func:`neighbour_sums`, checkpointed when ``rule.recompute`` so its ``(B, H, Lq, Lk)``
    intermediates are rebuilt in backward instead of kept. ``x_self`` stays un-repeated over KV groups (the
    :class:`~gin_adapter.layer.GinBlock` broadcasts it): the queries are the last ``Lq`` keys.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    softcap, sliding_window = kwargs.get("softcap"), kwargs.get("sliding_window")
    graph_query, graph_key = (query, key) if rule.adjacency_grad else (query.detach(), key.detach())
    if rule.fused_top_k:
        summed = topk_neighbour_sum(
            graph_query, graph_key, value, attention_mask, top_k=rule.top_k, scaling=scaling, softcap=softcap,
            sliding_window=sliding_window, sum_mode=rule.backend if rule.backend in ("dense", "gather") else "auto",
        )
    else:
        args = (graph_query, graph_key, value, attention_mask)
        options = dict(rule=rule, scaling=scaling, softcap=softcap, sliding_window=sliding_window, groups=groups)
        if rule.recompute and torch.is_grad_enabled():
            summed = torch.utils.checkpoint.checkpoint(neighbour_sums, *args, use_reentrant=False, **options)
        else:
            summed = neighbour_sums(*args, **options)
    q_len, k_len = query.shape[-2], key.shape[-2]
    return value[..., k_len - q_len :, :], summed


def _model_eager_function(module: torch.nn.Module) -> Callable:
    """The ``eager_attention_forward`` of the module's own modeling file (they differ per architecture)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(
            f"{type(module).__name__} is in eager mode but its modeling file has no eager_attention_forward; "
            "load the model with attn_implementation='sdpa'."
        )
    return fn


def make_attention_function(base_implementation: str) -> Callable:
    """An attention function that runs ``base_implementation`` and serves pending GIN requests."""

    def gin_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if base_implementation == "eager":
            base_fn = _model_eager_function(module)
        else:
            base_fn = ALL_ATTENTION_FUNCTIONS[base_implementation]
        output = base_fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        request = _REQUEST.get()
        if request is not None and request.module is module:
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            for name, rule in request.rules.items():
                request.results[name] = _gin_features(module, query, key, value, attention_mask, scaling, kwargs, rule)
        return output

    gin_attention.__name__ = f"{PREFIX}{base_implementation}_attention"
    return gin_attention


def install(base_implementation: str) -> str:
    """Register ``gin_<base>`` with transformers' attention and mask interfaces; returns the new name."""
    if base_implementation.startswith(PREFIX):
        return base_implementation
    name = f"{PREFIX}{base_implementation}"
    if base_implementation != "eager" and base_implementation not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"Attention implementation {base_implementation!r} is not registered in transformers' AttentionInterface; "
            "load the model with attn_implementation='sdpa' or 'eager'."
        )
    if base_implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"transformers has no attention mask function for {base_implementation!r}; use 'sdpa' or 'eager'.")
    AttentionInterface.register(name, make_attention_function(base_implementation))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_implementation])
    return name


def base_implementation(name: str) -> str:
    """Inverse of :func:`install`'s naming."""
    return name.removeprefix(PREFIX)
