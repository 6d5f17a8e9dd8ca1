"""What both experiments share: the probabilities an attention function computes, and swapping one in.

:func:`layer_attention_probabilities` recomputes a layer's softmax probabilities from what its attention function
receives. :func:`_attention_implementation` registers a custom attention function through
``transformers.AttentionInterface`` (and the matching ``AttentionMaskInterface`` entry, without which
transformers builds no mask at all), switches the model to it with ``model.set_attn_implementation`` and always
restores the previous implementation.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from gin_adapter.adjacency import attention_probabilities as adjacency_probabilities
from gin_adapter.adjacency import visible_keys


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``(B, KV, T, hd) -> (B, KV * n_rep, T, hd)``, head ``h`` uses KV head ``h // n_rep`` (as HF)."""
    if n_rep == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


def layer_attention_probabilities(
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The softmax probabilities a causal LM's attention function computes from what it receives.

    .. math:: P_{bhij} = \\mathrm{softmax}_{j \\in V(i)}\\big(\\mathrm{cap}(s\\, q_{bhi} \\cdot k_{bhj})\\big)

    ``V(i)`` are the visible keys (:func:`gin_adapter.adjacency.visible_keys`: the bool
    mask, an additive mask's non-masked entries, or plain causality when the mask is ``None``).
    Rows with no visible key (left-padding queries) are all zeros, as PyTorch's SDPA returns.
    Additive masks are read as 0 / masked, which is what transformers builds for causal LMs.

    Args:
        query: ``(B, H, Tq, hd)``.
        key: ``(B, KV, Tk, hd)``; KV heads are repeated to ``H`` (GQA).
        attention_mask: bool ``(B, 1, Tq, Tk)`` (True = attend), additive float mask, or ``None``.
        scaling: ``s``; ``None`` means ``hd ** -0.5`` (as SDPA).
        softcap: optional logit soft-capping ``c * tanh(x / c)`` (Gemma 2).
        sliding_window: window of a sliding-window layer, used only when the mask is ``None``.

    Returns:
        ``probs`` float32 ``(B, H, Tq, Tk)`` and ``visible`` bool broadcastable to it.
    """
    key = _repeat_kv(key, query.shape[1] // key.shape[1])
    visible = visible_keys(attention_mask, query.shape[2], key.shape[2], query.device, sliding_window)
    s = query.shape[-1] ** -0.5 if scaling is None else scaling
    return adjacency_probabilities(query, key, visible, s, softcap), visible


def _module_attention_function(module: torch.nn.Module, implementation: str | None) -> Callable[..., Any]:
    """The attention function ``module`` would call for ``implementation``, looked up as its
    modelling file does: that file's ``ALL_ATTENTION_FUNCTIONS`` (which may hold local
    overrides) and its own ``eager_attention_forward`` (Llama's as a fallback) for eager."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    source = sys.modules.get(type(module).__module__)
    eager = getattr(source, "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    if implementation in (None, "eager"):
        return eager
    interface = getattr(source, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    if not isinstance(interface, AttentionInterface):  # pragma: no cover - unusual modelling file
        interface = ALL_ATTENTION_FUNCTIONS
    return interface.get_interface(implementation, eager)


@contextlib.contextmanager
def _attention_implementation(
    model: torch.nn.Module, name: str, attn_fn: Callable[..., Any], mask_fn: Callable[..., Any]
) -> Iterator[str]:
    """Register ``attn_fn``/``mask_fn`` under ``name``, switch ``model`` to it, restore afterwards.

    Yields the previous implementation name. The model is put in eval mode inside and its
    training flag restored; the registrations are removed on exit.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    previous = model.config._attn_implementation
    was_training = model.training
    AttentionInterface.register(name, attn_fn)
    AttentionMaskInterface.register(name, mask_fn)
    try:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise RuntimeError(
                f"{type(model).__name__} cannot switch its attention implementation "
                f"(still {model.config._attn_implementation!r}); it does not use AttentionInterface"
            )
        model.eval()
        yield previous
    finally:
        model.set_attn_implementation(previous)
        model.train(was_training)
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def _materialised_bool_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """``sdpa_mask`` that always builds the bool ``(B, 1, Tq, Tk)`` mask (no ``is_causal`` skip)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _unsupported_kwargs(kwargs: dict[str, Any]) -> None:
    """Attention sinks and position biases change the softmax; neither experiment models them."""
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention with {name!r} is not supported by gin_adapter.analysis")
