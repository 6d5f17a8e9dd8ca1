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


class FeatureCacheMixin:
    """Adds ``gin_features: dict[adapter name, (B, N, F)]`` to a dynamic cache layer, kept in step with its keys
    (the overrides of the cache operations are in :func:`_feature_class`)."""

    __slots__ = ()  # no instance layout of its own: a live cache layer's class can be switched to the subclass
    gin_features: dict[str, torch.Tensor]

    def gin_extend(self, name: str, new: torch.Tensor, k_len: int) -> torch.Tensor:
        """Features of the ``k_len`` keys the attention just saw: the cached ones followed by ``new (B, Lq, F)``."""
        store = self.__dict__.setdefault("gin_features", {})
        old = store.get(name)
        # (every operator call counts: this runs once per wrapped layer and decoded token)
        full = new if old is None or old.shape[-2] == 0 else torch.cat([old if old.dtype == new.dtype else old.to(new.dtype), new], dim=-2)
        if full.shape[-2] < k_len:
            raise RuntimeError(
                f"GIN feature cache out of step with the KV cache: {full.shape[-2]} feature rows for {k_len} keys. "
                "The cache was filled before this adapter was active (or by another model): generate again with a "
                "fresh cache."
            )
        if full.shape[-2] > k_len:
            full = full[..., full.shape[-2] - k_len :, :]
        kept = self.keys.shape[-2] if self.keys is not None and self.keys.dim() > 1 else 0
        stored = full if kept == full.shape[-2] else full[..., full.shape[-2] - kept :, :]
        store[name] = stored.detach() if stored.requires_grad else stored
        return full

    def _gin_apply(self, fn) -> None:
        store = self.__dict__.get("gin_features")
        if store:
            for name, features in store.items():
                store[name] = fn(features)

    def _gin_crop_rows(self, tokens_to_remove: int) -> None:
        """After the keys were cropped: drop ``|tokens_to_remove|`` rows from the end, then trim the front to the
        keys' length (what both the dynamic and the sliding-window layer do to their keys)."""
        kept = self.keys.shape[-2] if self.keys is not None and self.keys.dim() > 1 else 0
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
