"""Hooking into transformers' attention dispatch so the adapter sees q, k, v under any attention implementation.

transformers (>= 5) attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)(module, q, k, v, mask, dropout=, scaling=, **kw)`` with RoPE and the KV-cache update
already applied. :func:`install` registers ``gin_<impl>`` for the model's implementation ``<impl>`` (sdpa, eager,
flash, ...): it runs the original function unchanged and, when the calling module has asked for it through
:func:`capture`, hands it the call's q, k, v, mask, scale, soft-cap and sliding window
(:class:`~gin_adapter.aggregate.GraphInputs`). The wrapper builds the graph from them after the module returns
(:mod:`gin_adapter.aggregate`), when every kind of node feature (values, the hidden state after attention) is
known. Only eager attention returns probabilities, so the adjacency is recomputed from q and k; nothing of size
``(B, H, Lq, Lk)`` is kept for backward (unless ``GinConfig(recompute_adjacency=False)`` asks for it, for the joint
paths below too). One exception saves that recomputation: when a wrapper training under
sdpa asks for the per-head top-k graph or the published rule's graph and the call is plain softmax attention
(:func:`gin_adapter.joint.joint_applies`), the function computes the attention output itself together with the
graph (:mod:`gin_adapter.joint`, :mod:`gin_adapter.joint_threshold`; equal to sdpa's output up to float32
rounding, or the autocast dtype's); so it does for one decoded float32 token with the per-head top-k rule
(:mod:`gin_adapter.joint_decode`) or the published rule
(:func:`gin_adapter.joint_threshold.decode_attention_with_threshold_graph`), on the CPU in one compiled call
(:mod:`gin_adapter.native_decode`). The mask interface is registered too, or no mask is built.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import joint, joint_decode, joint_threshold
from .adjacency import AdjacencyRule
from .aggregate import GraphInputs

PREFIX = "gin_"


@dataclass(slots=True)
class AggregationRequest:
    """A wrapped attention module's request for its own attention call's graph inputs (filled by the function).

    ``joint_rule``: the rule all the wrapper's adapters build their graph with, when the attention may build it
    together with its output (the per-head top-k rule or the published rule, backend ``"auto"``): an sdpa call
    that :func:`gin_adapter.joint.joint_applies` to (or one decoded token that
    :func:`gin_adapter.joint_decode.decode_applies` to) then does.
    """

    module: torch.nn.Module
    graph: GraphInputs | None = None
    joint_rule: AdjacencyRule | None = None


_REQUEST: ContextVar[AggregationRequest | None] = ContextVar("gin_adapter_request", default=None)


class capture:
    """``with capture(request):`` makes ``request`` visible to the attention function for the duration of the module's
    forward (a class rather than ``contextlib.contextmanager``: entered per layer and decoded token)."""

    __slots__ = ("request", "token")

    def __init__(self, request: AggregationRequest) -> None:
        self.request = request

    def __enter__(self) -> AggregationRequest:
        self.token = _REQUEST.set(self.request)
        return self.request

    def __exit__(self, *exc_info) -> None:
        _REQUEST.reset(self.token)


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
        request = _REQUEST.get()
        if request is not None and request.module is not module:
            request = None
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        if request is not None and request.joint_rule is not None and base_implementation == "sdpa":
            built = _attention_with_graph(module, query, key, value, attention_mask, scale, request.joint_rule, kwargs)
            if built is not None:
                output, graph = built
                request.graph = GraphInputs(query, key, value, attention_mask, scaling=scale, softcap=None, sliding_window=None, joint=graph)
                return output, None  # sdpa's layout (B, L, H, D) and dtype, no attention weights
        if base_implementation == "eager":
            base_fn = _model_eager_function(module)
        else:
            base_fn = ALL_ATTENTION_FUNCTIONS[base_implementation]
        output = base_fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if request is not None:
            request.graph = GraphInputs(
                query, key, value, attention_mask, scaling=scale, softcap=kwargs.get("softcap"), sliding_window=kwargs.get("sliding_window"),
            )
        return output

    gin_attention.__name__ = f"{PREFIX}{base_implementation}_attention"
    return gin_attention


def _attention_with_graph(module, query, key, value, mask, scale: float, rule: AdjacencyRule, kwargs: dict):
    """``(attention output in sdpa's layout (B, L, H, Dv) and dtype, graph)`` computed together where that
    reproduces sdpa's call (training, or one decoded token with the per-head top-k rule or the published rule),
    else ``None``."""
    if not joint.ENABLED:
        return None
    if (rule.per_head_top_k or rule.fused_threshold) and joint_decode.decode_applies(query, key, value, mask, kwargs):
        if rule.per_head_top_k:
            return joint_decode.attention_with_graph(query, key, value, scaling=scale, top_k=rule.top_k)
        return joint_threshold.decode_attention_with_threshold_graph(query, key, value, scaling=scale, rule=rule)
    if not joint.joint_applies(module, query, key, mask, kwargs):
        return None
    if rule.per_head_top_k:
        output, graph = joint.attention_with_graph(query, key, value, mask, scaling=scale, top_k=rule.top_k, keep_probabilities=not rule.recompute)
        return joint.sdpa_layout(output), graph
    form = joint_threshold.storage(rule, query, key) if rule.fused_threshold else None
    if form is not None:
        output, graph = joint_threshold.attention_with_threshold_graph(query, key, value, mask, scaling=scale, rule=rule, form=form,
                                                                       keep_probabilities=not rule.recompute)
        return joint.sdpa_layout(output), graph
    return None


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
