"""Tiny random models of every type in transformers' causal-LM auto mapping (for tests/test_architectures.py and
scripts/architecture_report.py).

:func:`tiny_config` shrinks a type's default config generically: every common size field the config class has
(hidden size, layers, heads, experts, MLA ranks, Mamba widths, ...) is set to a small value, special token ids are
moved inside the small vocabulary, and nested sub-configs (``text_config``, ``vision_config``, ...) are shrunk the
same way. ``FIXES`` holds the few per-type overrides that cannot be avoided (hybrids whose attention period would
leave no attention layer in two layers, configs with coupled fields). :func:`build` returns the model or a reason
why it cannot be built tiny on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
import zlib
from typing import Any

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128
#: Where special token ids are moved to (the last 8 ids): multimodal placeholders among them are replaced by the
#: model (with no image or audio given) differently with and without a KV cache, so generation never emits them.
SPECIAL_IDS = range(VOCAB - 8, VOCAB)
MAX_PARAMETERS = 20_000_000  # bigger means the shrinker missed a size field: too slow for the suite

#: Applied to every config class that has the field (names differ between model families).
SIZES: dict[str, Any] = {
    # widths
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "n_embed": 64, "embed_dim": 64, "dim": 64, "model_dim": 64,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "d_ff": 128, "ffn_hidden_size": 128, "inner_hidden_size": 128,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_decoder_layers": 2,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "kv_channels": 16,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16, "global_head_dim": 16,
    # positions
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_sequence_length": 256,
    "sliding_window": 8, "sliding_window_size": 8,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "moe_k": 2, "moe_intermediate_size": 32, "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32, "n_shared_experts": 1,
    "num_shared_experts": 1, "moe_num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    # state-space and linear-attention layers
    "state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
    "mamba_chunk_size": 16, "chunk_size": 16, "time_step_rank": 8, "mamba_expand": 2, "expand": 2,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "num_mtp_layers": 0,
    # vision and audio towers of multimodal configs
    "image_size": 32, "patch_size": 8, "num_channels": 3, "projection_dim": 64, "vision_output_dim": 64,
    "out_hidden_size": 64, "num_mel_bins": 16,
    # per-layer input embeddings (Gemma 3n / 4)
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
}

#: Per-type fields that no generic rule can find (set after SIZES, on the top-level config).
FIXES: dict[str, dict[str, Any]] = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "zamba2": dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"]),
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16),
    "falcon_h1": dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_ssm=128),
    "mamba2": dict(num_heads=8),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], attention_window_size=8),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    "codegen": dict(rotary_dim=8),
    "gptj": dict(rotary_dim=8),
    "longcat_flash": dict(qk_head_dim=16),
    "zaya": dict(num_experts_per_tok=1),
    "xlstm": dict(embedding_dim=64),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "dots3_note": dict(num_key_value_heads=4),
    "dots3_note_text": dict(num_key_value_heads=4),
    "axk2": dict(index_n_heads=4),
    "deepseek_v32": dict(index_n_heads=4),
    "glm_moe_dsa": dict(index_n_heads=4),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=16, layer_types=["mamba", "attention"]),
}


def model_types() -> list[str]:
    """Every type in transformers' causal-LM auto mapping, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _field_names(config_class: type) -> set[str]:
    try:
        return {f.name for f in dataclasses.fields(config_class)}
    except TypeError:  # a config class that is not a dataclass: fall back to its defaults' attributes
        return set(vars(config_class()))


def _shrunk_kwargs(config_class: type, defaults: Any) -> dict[str, Any]:
    names = _field_names(config_class)
    kwargs = {name: value for name, value in SIZES.items() if name in names}
    if "vocab_size" in names:
        kwargs["vocab_size"] = VOCAB
    if "is_decoder" in names:  # encoder families as causal LMs (their *ForCausalLM warns without it)
        kwargs["is_decoder"] = True
    for name in names:
        try:
            value = getattr(defaults, name, None)
        except Exception:  # noqa: BLE001 - per-layer attributes (Gemma 4) refuse a global read
            value = None
        if name.endswith("token_id") or name.endswith("token_index"):
            if isinstance(value, int) and value >= VOCAB - 8:
                kwargs[name] = VOCAB - 1 - zlib.crc32(name.encode()) % 6  # not hash(): it changes per process
            elif isinstance(value, list) and any(isinstance(v, int) and v >= VOCAB - 8 for v in value):
                kwargs[name] = [2]
        elif name == "layer_types" or name.endswith("_layer_types") or name == "layers_block_type":
            kwargs[name] = _two_layers(value)
    for key, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        sub_default = getattr(defaults, key, None)
        if sub_default is not None and not isinstance(sub_default, dict):
            sub_class = type(sub_default)  # AutoConfig-typed slots: the class the default actually holds
        if sub_class is None or not isinstance(sub_class, type) or sub_class.__name__ == "AutoConfig":
            continue
        if sub_default is None and key != "text_config":
            continue
        sub_kwargs = _shrunk_kwargs(sub_class, sub_default if sub_default is not None else sub_class())
        if "model_type" in getattr(sub_class, "__dict__", {}) or hasattr(sub_class, "model_type"):
            sub_kwargs.setdefault("model_type", sub_class.model_type)
        kwargs[key] = sub_kwargs
    return kwargs


def _is_attention(layer_type: object) -> bool:
    text = str(layer_type)
    return ("attention" in text and "linear" not in text) or text in ("attention", "hybrid")


def _two_layers(value: object) -> object:
    """A per-layer type list for two layers: one non-attention and one attention layer when the default mixes them
    (hybrids keep both kinds), else the first two; ``None`` (derived from the depth) when there is no default list."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    attention = next((v for v in value if _is_attention(v)), None)
    other = next((v for v in value if v != attention), None)
    if attention is not None and other is not None:
        return [other, attention]
    return list(value[:2]) if len(value) >= 2 else list(value) * 2


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The type's config with every size field made small (see module docstring)."""
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class()
    kwargs = _shrunk_kwargs(config_class, defaults)
    kwargs.update(FIXES.get(model_type, {}))
    return config_class(**kwargs)


@contextlib.contextmanager
def _quiet():
    """transformers logs and warns a lot while building odd configs; keep the test output readable."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


def build(model_type: str, seed: int = 0) -> tuple[torch.nn.Module | None, str]:
    """``(model, "")`` for a tiny fp32 eval-mode model of ``model_type``, or ``(None, why it cannot be built)``.

    sdpa where the architecture supports it, eager otherwise.
    """
    try:
        with _quiet():
            config = tiny_config(model_type)
    except Exception as error:  # noqa: BLE001 - the reason goes into the report
        return None, f"config: {type(error).__name__}: {_short(error)}"
    last = ""
    for implementation in ("sdpa", "eager"):
        try:
            torch.manual_seed(seed)
            with _quiet():
                model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=torch.float32)
            count = sum(p.numel() for p in model.parameters())
            if count > MAX_PARAMETERS:
                return None, f"not tiny: {count / 1e6:.0f}M parameters with the shrunk config (a size field the generic shrinker does not know)"
            return model.eval(), ""
        except ImportError as error:
            return None, f"needs an extra package: {_short(error)}"
        except Exception as error:  # noqa: BLE001
            last = f"{type(error).__name__}: {_short(error)}"
    return None, f"build: {last}"


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


logging.getLogger(__name__).addHandler(logging.NullHandler())
