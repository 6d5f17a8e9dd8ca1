"""PEFT integration: the GIN tuner, which modules it wraps per architecture, and ``get_gin_model``.

PEFT's ``PeftType`` enum is closed, but its three registration mappings accept a string key and its save, load and
Hub paths work with a string ``peft_type``. Importing :mod:`gin_adapter` registers ``"GIN"`` there, so
``PeftModel.from_pretrained(base, path)`` loads GIN adapters after ``import gin_adapter``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from . import attention, discovery
from .config import PEFT_TYPE, GinConfig
from .blocks import BLOCKS, AttentionDims
from .layer import GinAttentionLayer

logger = logging.getLogger(__name__)

PREFIX = "gin_"


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config (multimodal configs nest it, e.g. Gemma 3's ``text_config``)."""
    return discovery.text_config(config)


def _layer_index(module: nn.Module, name: str) -> int:
    index = getattr(module, "layer_idx", None)
    if not isinstance(index, int) or index < 0:  # Zamba 2's shared attention block says -1: use its layer's place
        numbers = re.findall(r"\.(\d+)(?:\.|$)", name)
        if not numbers:
            raise ValueError(f"Cannot tell which layer {name!r} belongs to; wrap modules inside numbered layer lists.")
        index = int(numbers[-1])
    return int(index)


def initial_scale(config: GinConfig, layer_index: int, num_layers: int) -> float:
    """0 everywhere for ``scale_init='zero'``; ``scale_max * k / (N - 1)`` for the published linear schedule."""
    if config.scale_init == "zero" or num_layers <= 1:
        return 0.0
    return config.scale_max * layer_index / (num_layers - 1)


class GinModel(BaseTuner):
    """PEFT tuner that wraps attention modules with :class:`~gin_adapter.layer.GinAttentionLayer`."""

    prefix: str = PREFIX
    tuner_layer_cls = GinAttentionLayer
    target_module_mapping: dict[str, list[str]] = {}  # no table: gin_adapter.discovery finds the modules

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Find the attention modules (:mod:`gin_adapter.discovery`) when ``target_modules`` is not given, then wrap.

        Discovery runs here rather than in ``_prepare_adapter_config``, which PEFT hands only the config dict; this
        also covers ``add_adapter``. The found names become one regex in ``target_modules``, so the saved
        adapter_config.json names exactly the wrapped modules.
        """
        config = self.peft_config[adapter_name]
        if config.target_modules is None:
            names = discovery.find_attention_modules(model)
            config.target_modules = discovery.target_regex(names)
            logger.info("gin_adapter wraps %d attention modules of %s: %s", len(names), _model_type(model), names)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _pre_injection_hook(self, model: nn.Module, config: GinConfig, adapter_name: str) -> None:
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
        gin_name = attention.install(implementation)
        for module in model.modules():
            module_config = getattr(module, "config", None)
            if isinstance(module_config, PretrainedConfig):
                _set_attn_implementation(module_config, gin_name)

    def _create_and_replace(self, peft_config: GinConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        if not _looks_like_attention(target):
            raise ValueError(
                f"{current_key!r} ({type(target).__name__}) is not an attention module; GinConfig.target_modules must "
                "name self-attention modules (e.g. 'self_attn')."
            )
        model_config = text_config(self.model.config)
        layer_index = _layer_index(target, current_key)
        scale = initial_scale(peft_config, layer_index, model_config.num_hidden_layers)
        if isinstance(target, GinAttentionLayer):
            target.update_layer(adapter_name, peft_config, scale_init=scale)
            return
        new_module = GinAttentionLayer(target, adapter_name, peft_config, dims=attention_dims(target, model_config), scale_init=scale, layer_index=layer_index)
        new_module.target_description = f"{current_key!r} ({type(target).__name__}) of model_type={_model_type(self.model)!r}"
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
        new_module.watch_layer_input(parent)  # the decoder layer: its input h is what node_features="hidden" adds to

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, GinAttentionLayer):
            super()._replace_module(parent, child_name, new_module, child)
        else:  # unloading: put the original attention module back as it was
            if isinstance(child, GinAttentionLayer):
                child.stop_watching()
            setattr(parent, child_name, new_module)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Model key -> checkpoint key: ``...gin_blocks.<adapter>.mlp.0.weight`` -> ``...gin_blocks.mlp.0.weight``.

        PEFT's default only drops the adapter name from the last two key components, which left it inside the keys
        of the block's sub-modules, so an adapter loaded under another name missed its MLP weights.
        """
        marker = f".gin_blocks.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".gin_blocks.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: GinConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint keys -> model keys; files written by gin_adapter 0.1.0 (``gin_blocks.<saved name>.mlp...``) too."""
        renamed = {}
        for key, tensor in state_dict.items():
            legacy = _LEGACY_KEY.search(key)
            if legacy and legacy.group(2) not in _BLOCK_TOP_NAMES:
                key = key[: legacy.start()] + f".gin_blocks.{legacy.group(3)}"
            renamed[key] = tensor
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, renamed)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "A GIN adapter cannot be merged into the base model: its correction depends on each input's attention "
            "graph, so there is no weight delta to add. Use `unload()` to get the base model back, or keep the "
            "PeftModel for inference."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(merge=merge, **kwargs)
        for module in model.modules():
            module_config = getattr(module, "config", None)
            if isinstance(module_config, PretrainedConfig):
                _set_attn_implementation(module_config, attention.base_implementation(module_config._attn_implementation or "eager"))
        return model


_LEGACY_KEY = re.compile(r"\.gin_blocks\.(([^.]+)\.((?:[^.]+\.)*[^.]+))$")
_BLOCK_TOP_NAMES = frozenset(
    name.split(".")[0]
    for block in BLOCKS
    for name in BLOCKS[block](GinConfig(block=block, node_features="hidden", head_reduction="sum", activation="prelu"), AttentionDims(1, 2, 2)).state_dict()
)


def _set_attn_implementation(config: PretrainedConfig, name: str) -> None:
    config._attn_implementation = name
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig):
            sub._attn_implementation = name


def _looks_like_attention(module: nn.Module) -> bool:
    if isinstance(module, GinAttentionLayer) or discovery.calls_attention_interface(module):
        return True
    return "attention" in type(module).__name__.lower() or "attn" in type(module).__name__.lower()


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def attention_dims(module: nn.Module | None, config: PretrainedConfig) -> AttentionDims:
    """Query heads, value-head width and model width of one attention module (from the module, else its config)."""
    heads = config.num_attention_heads
    # value heads: multi-head latent attention (DeepSeek V2/V3, MiniCPM3, ...) gives values their own width
    head_dim = (
        getattr(module, "v_head_dim", None) or getattr(config, "v_head_dim", None)
        or getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    )
    return AttentionDims(heads=heads, head_dim=head_dim, model_dim=config.hidden_size)


def register() -> None:
    """Make PEFT know the ``"GIN"`` type (idempotent; runs on ``import gin_adapter``)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = GinConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = GinModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX


def get_gin_model(model: PreTrainedModel, config: GinConfig, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """Wrap ``model``'s attention modules with a Sparse-GIN adapter; only the adapter trains.

    Returns a :class:`peft.PeftModel` (``print_trainable_parameters``, ``save_pretrained``, ``push_to_hub``,
    ``add_adapter``/``set_adapter``, ``disable_adapter()``, ``unload()``). Works with any attention
    implementation the model was loaded with.
    """
    if not isinstance(config, GinConfig):
        raise TypeError(f"get_gin_model needs a GinConfig, got {type(config).__name__}.")
    register()
    peft_model = get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    logger.info("Wrapped %d attention modules with GIN adapter %r", len(gin_layers(peft_model)), adapter_name)
    return peft_model


def gin_layers(model: nn.Module) -> list[GinAttentionLayer]:
    """The wrapped attention modules, in layer order."""
    layers = [m for m in model.modules() if isinstance(m, GinAttentionLayer)]
    return sorted(layers, key=lambda layer: layer.layer_index)


def layer_scales(model: nn.Module, adapter_name: str | None = None) -> list[float]:
    """The learnable per-layer scale of ``adapter_name`` (default: the active adapter), in layer order."""
    layers = gin_layers(model)
    if not layers:
        raise ValueError("The model has no GIN layers; wrap it with get_gin_model first.")
    name = adapter_name or layers[0].active_adapters[0]
    return [float(layer.gin_blocks[name].scale.detach().float().item()) for layer in layers if name in layer.gin_blocks]


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
