"""Node features kept beside the KV cache, so incremental decoding is exact for every node-feature mode.

Value features need nothing: the KV cache holds every earlier token's values. Hidden-state and input features
(``node_features="hidden"`` or ``"input"``) are not in the KV cache, so each wrapped layer keeps its projected node
features ``(B, L, hidden_dim)`` (one tensor per adapter) inside the transformers cache layer of that layer. The
first time a layer of a :class:`~transformers.DynamicCache` meets a GIN adapter, its class is switched to a subclass
that adds the features (:func:`feature_cache_layer`): transformers' ``Cache`` then reorders (beam search), crops
(assisted decoding), repeats and selects batch rows (``num_return_sequences``, contrastive search) layer by layer,
and this subclass applies the same operation to the features. Nothing is registered globally, and models that
do not use a GIN adapter are untouched.

Alignment: after the KV update, the attention saw ``Lk`` keys, the cache keeps the last ``N`` of them (``N = Lk``
for a plain dynamic layer, ``min(Lk, window - 1)`` for a sliding-window one). :meth:`FeatureCacheMixin.gin_extend`
returns the features of exactly those ``Lk`` keys and keeps the last ``N``, so features and keys stay in step; it
raises if they ever do not.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache, DynamicLayer, EncoderDecoderCache


_OUT_OF_STEP = ("GIN feature cache out of step with the KV cache: {rows} feature rows for {keys} keys. The cache was filled before this "
                "adapter was active (or by another model): generate again with a fresh cache.")


class FeatureCacheMixin:
    """Adds ``gin_features: dict[adapter name, (B, N, F)]`` to a dynamic cache layer, kept in step with its keys
    (the overrides of the cache operations are in :func:`_feature_class`)."""

    __slots__ = ()  # no instance layout of its own: a live cache layer's class can be switched to the subclass
    gin_features: dict[str, torch.Tensor]

    def gin_extend(self, name: str, new: torch.Tensor, k_len: int) -> torch.Tensor:
        """Features of the ``k_len`` keys the attention just saw: the cached ones followed by ``new (B, Lq, F)``.

        Without gradient recording they are appended to a buffer with room to grow (:meth:`gin_reserve`: each token
        costs its own rows, not a copy of every cached one); with it, ``torch.cat`` (autograd follows ``new``)."""
        if not torch.is_grad_enabled():
            return self.gin_reserve(name, new.shape[-2], k_len, new.shape[-1], new, fill=new)
        store = self.__dict__.setdefault("gin_features", {})
        old = store.get(name)
        # (every operator call counts: this runs once per wrapped layer and decoded token)
        full = new if old is None or old.shape[-2] == 0 else torch.cat([old if old.dtype == new.dtype else old.to(new.dtype), new], dim=-2)
        if full.shape[-2] < k_len:
            raise RuntimeError(_OUT_OF_STEP.format(rows=full.shape[-2], keys=k_len))
        if full.shape[-2] > k_len:
            full = full[..., full.shape[-2] - k_len :, :]
        kept = self._kept_keys()
        stored = full if kept == full.shape[-2] else full[..., full.shape[-2] - kept :, :]
        store[name] = stored.detach() if stored.requires_grad else stored
        self.__dict__.get("gin_buffers", {}).pop(name, None)  # the rows live in `stored` now, not in a buffer
        return full

    def gin_reserve(self, name: str, rows: int, k_len: int, width: int, like: torch.Tensor, *, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Features of the ``k_len`` keys the attention just saw ``(B, k_len, F)``, of which the last ``rows`` (the
        new tokens') are ``fill`` when given, else left for the caller to write before anything reads them
        (``rows <= k_len`` then); no gradient may be recorded.

        The features (``width`` each) live in a buffer ``(B, capacity, F)`` with room for more rows (``like`` gives
        batch, dtype and device): appending a token writes its row there (amortised: a new buffer of twice the rows when
        it is full), where ``torch.cat`` would copy every cached row. The kept rows are a view of it; a cache
        operation that replaces them (reorder, crop, batch selection) or a buffer from ``torch.inference_mode`` met
        outside it starts a new buffer from them."""
        store = self.__dict__.setdefault("gin_features", {})
        buffers = self.__dict__.setdefault("gin_buffers", {})
        old = store.get(name)
        have = 0 if old is None else old.shape[-2]
        total = have + rows
        if total < k_len:
            raise RuntimeError(_OUT_OF_STEP.format(rows=total, keys=k_len))
        batch = like.shape[0]
        buffer, start, kept_view = buffers.get(name, (None, 0, None))
        if (buffer is None or kept_view is not old or start + total > buffer.shape[-2] or buffer.shape[0] != batch or buffer.shape[-1] != width
                or buffer.dtype != like.dtype or not (buffer.is_cpu and like.is_cpu or buffer.device == like.device)  # (no device objects on the CPU)
                or (buffer.is_inference() and not torch.is_inference_mode_enabled())):
            buffer, start = like.new_empty(batch, max(2 * total, 64), width), 0
            if have:
                buffer[:, :have].copy_(old)
        every = buffer.narrow(1, start, total)  # (narrow: cheaper than indexing, this runs per layer and decoded token)
        if fill is not None:
            every[:, have:].copy_(fill)
        kept = self._kept_keys()
        stored = every.narrow(1, total - kept, kept) if kept < total else every
        store[name] = stored
        buffers[name] = (buffer, start + total - stored.shape[-2], stored)
        return every.narrow(1, total - k_len, k_len) if k_len < total else every

    def _kept_keys(self) -> int:
        """How many keys the layer keeps (0 before its first update)."""
        return self.keys.shape[-2] if self.keys is not None and self.keys.dim() > 1 else 0

    def _gin_apply(self, fn) -> None:
        self.__dict__.pop("gin_buffers", None)  # the features are replaced: later tokens start a new buffer from them
        store = self.__dict__.get("gin_features")
        if store:
            for name, features in store.items():
                store[name] = fn(features)

    def _gin_crop_rows(self, tokens_to_remove: int) -> None:
        """After the keys were cropped: drop ``|tokens_to_remove|`` rows from the end, then trim the front to the
        keys' length (what both the dynamic and the sliding-window layer do to their keys)."""
        kept = self._kept_keys()
        removed = abs(tokens_to_remove)

        def crop_rows(features: torch.Tensor) -> torch.Tensor:
            features = features[..., : features.shape[-2] - removed, :]
            return features[..., max(features.shape[-2] - kept, 0) :, :]

        self._gin_apply(crop_rows)


_FEATURE_CLASSES: dict[type, type] = {}


def _feature_class(layer_class: type) -> type:
    """``layer_class`` plus the feature tensors: every cache operation first runs as the layer does it, then on the
    features. (The mixin comes after ``layer_class`` in the bases: with it first, CPython refuses to switch a live
    object's class.)"""
    if layer_class in _FEATURE_CLASSES:
        return _FEATURE_CLASSES[layer_class]

    class GinFeatureLayer(layer_class, FeatureCacheMixin):
        __slots__ = ()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            self._gin_apply(lambda f: f.index_select(0, beam_idx.to(f.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._gin_apply(lambda f: f.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            self._gin_apply(lambda f: f[indices.to(f.device) if isinstance(indices, torch.Tensor) else indices, ...])

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            self._gin_crop_rows(tokens_to_remove)

        def reset(self) -> None:
            super().reset()
            self.__dict__.pop("gin_features", None)
            self.__dict__.pop("gin_buffers", None)

        def offload(self) -> None:
            super().offload()
            self._gin_apply(lambda f: f.to("cpu", non_blocking=True))

        def prefetch(self) -> None:
            super().prefetch()
            device = getattr(self, "device", None)
            if device is not None:
                self._gin_apply(lambda f: f.to(device, non_blocking=True))

    GinFeatureLayer.__name__ = GinFeatureLayer.__qualname__ = f"Gin{layer_class.__name__}"
    _FEATURE_CLASSES[layer_class] = GinFeatureLayer
    return GinFeatureLayer


def find_cache(kwargs: dict[str, Any]) -> Cache | None:
    """The KV cache an attention module was called with (``cache`` in transformers >= 5.24, ``past_key_values``
    before; GPT-2 style ``layer_past`` too)."""
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        value = kwargs.get(name)
        if isinstance(value, EncoderDecoderCache):  # a decoder with cross-attention (RoCBert, ...): its self-attention
            return value.self_attention_cache
        if isinstance(value, Cache):
            return value
    return None


def check_supported(cache: Cache, layer_index: int, module_name: str) -> DynamicLayer:
    """The cache layer of ``layer_index``, or a clear error for cache kinds the adapter cannot follow.

    Static caches (``cache_implementation="static"``, compiled generation) return a fixed-size buffer in which the
    current tokens are not the last keys, and quantized caches keep only part of their keys in the layer's tensors:
    with either the adapter would silently compute the wrong graph, so they are refused.
    """
    layer = cache.layers[layer_index] if layer_index < len(cache.layers) else None
    if not isinstance(layer, DynamicLayer) or isinstance(layer, BaseQuantizedLayer):
        kind = type(layer).__name__ if layer is not None else "no layer"
        raise NotImplementedError(
            f"{module_name}: GIN adapters follow transformers' dynamic caches only (DynamicCache, with full and "
            f"sliding-window layers); this cache holds a {kind} for layer {layer_index}. Static and quantized caches "
            "are not supported: generate with the default cache (cache_implementation=None or 'dynamic'), or "
            "use_cache=False."
        )
    return layer


def feature_cache_layer(cache: Cache, layer_index: int, module_name: str) -> FeatureCacheMixin:
    """The dynamic cache layer of ``layer_index``, switched (once) to the subclass that keeps GIN node features."""
    layer = check_supported(cache, layer_index, module_name)
    if not isinstance(layer, FeatureCacheMixin):
        layer.__class__ = _feature_class(type(layer))
    return layer
