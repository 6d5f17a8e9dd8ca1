"""Which modules of a causal LM the adapter wraps: found by structure, not from a table of model types.

**The rule.** A module is wrapped when all of these hold:

1. its class's ``forward`` calls transformers' attention interface (its source names ``ALL_ATTENTION_FUNCTIONS``
   or ``AttentionInterface``): that call is where :mod:`gin_adapter.attention` sees q, k and v. Modules that compute
   attention inline (BLOOM, Falcon, XLNet, ...) and state-space or recurrent mixers (Mamba, RWKV, xLSTM) do not;
2. it is causal self-attention: ``module.is_causal`` is not ``False``. That excludes cross-attention
   (``encoder_attn`` of BART-style decoders), encoders built bidirectional (BERT-style models with
   ``is_decoder=False``) and helper modules that also call the interface (e.g. depth-attention residuals);
3. it belongs to the text decoder: its ``config`` is the text config (``config.get_text_config(decoder=True)``), so
   a multimodal model's vision or audio tower is left alone;
4. it lies inside an element of an ``nn.ModuleList`` (a decoder layer), and no module above it in that layer
   already qualifies (the outermost interface caller is the attention module; BERT-style ``attention.self`` and
   LongCat's per-layer list of two attentions are found too). Hybrid models (attention interleaved with Mamba or
   linear-attention layers) thus get their attention layers only, with their true layer indices.
5. its keys are tokens: an attention with a KV compressor child (DeepSeek-V4's compressed blocks) is left out, since
   the adapter's graph takes key ``j`` to be token ``j`` (measured: the correction was not causal there).

A model whose candidates all fail a rule raises :class:`NoAttentionError` naming the model type and the rule. So do
attention modules that branch on the implementation's *name* (``_attn_implementation in ("eager", "sdpa")``,
DeepSeek-V3.2-style sparse index masks): the adapter runs attention as ``gin_<implementation>``, which would change
their output.

**Why no dry forward at wrap time.** A forward on two tokens would confirm the rule exactly, but ``get_peft_model``
is also called on models whose weights are not materialised yet (DeepSpeed ZeRO-3 partitions, ``init_empty_weights``
/ meta tensors, disk offload), where a forward fails or is slow. The rule above reads only classes and attributes.
It is confirmed at the first real call instead: :class:`~gin_adapter.layer.GinAttentionLayer` raises, naming the
module and the model type, when the wrapped module did not reach the GIN attention function with itself as
``module``; ``tests/test_architectures.py`` runs every causal-LM type of transformers through that check.

**Where the correction lands.** The adapter adds ``delta`` to the attention module's output. In a pre-norm decoder
(Llama, Qwen, Mistral, ...) that is the residual branch: ``h + attn(x) + delta``. Architectures that normalise the
attention output before the residual add (Gemma 2/3, OLMo 2, ...; the generated docs/architectures.md lists them)
give ``h + norm(attn(x) + delta)``; BERT-style blocks give ``LayerNorm(h + dense(attn(x) + delta))``. Identity at
init holds everywhere: the delta is exactly zero while ``scale`` is zero.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn
from transformers import PretrainedConfig

#: Names whose presence in a ``forward``'s source marks a call through transformers' attention interface.
INTERFACE_MARKERS = ("ALL_ATTENTION_FUNCTIONS", "AttentionInterface")

#: A forward that compares the implementation's *name* with "eager"/"sdpa" (DeepSeek-V3.2-style sparse attention
#: builds its index mask only then) would change behaviour under the adapter's ``gin_<impl>`` name.
NAME_BRANCH = re.compile(r"_attn_implementation\s+in\s*[(\[]\s*[\"']eager[\"']\s*,\s*[\"']sdpa[\"']")


class NoAttentionError(ValueError):
    """The model has no module the adapter can wrap by default (the message says which model type and why)."""


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config (multimodal configs nest it, e.g. Gemma 3's ``text_config``)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


@functools.lru_cache(maxsize=None)
def _forward_source(cls: type) -> str:
    forward = getattr(cls, "forward", None)
    if forward is None or cls.forward is nn.Module.forward:
        return ""
    try:
        return inspect.getsource(forward)
    except (OSError, TypeError):  # built-in or generated class: cannot tell, so not by default
        return ""


def _class_calls_interface(cls: type) -> bool:
    return any(marker in _forward_source(cls) for marker in INTERFACE_MARKERS)


def branches_on_implementation_name(module: nn.Module) -> bool:
    """True when ``module``'s forward behaves differently for the implementation names "eager"/"sdpa"."""
    return bool(NAME_BRANCH.search(_forward_source(type(_unwrapped(module)))))


def calls_attention_interface(module: nn.Module) -> bool:
    """True when ``module``'s forward calls transformers' attention interface (rule 1)."""
    return _class_calls_interface(type(_unwrapped(module)))


def _unwrapped(module: nn.Module) -> nn.Module:
    """The original module of a :class:`~gin_adapter.layer.GinAttentionLayer` (a second adapter), else itself."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def _belongs_to_text(module: nn.Module, config: PretrainedConfig, multimodal: bool) -> bool:
    module_config = getattr(module, "config", None)
    if not isinstance(module_config, PretrainedConfig):
        return not multimodal  # cannot tell; only a model with separate towers needs to
    return module_config is config or type(module_config) is type(config)


def _is_target(module: nn.Module, config: PretrainedConfig, multimodal: bool) -> bool:
    """Rules 1, 2, 3 and 5 of the module docstring (rule 4, the position, is the caller's walk)."""
    return (
        calls_attention_interface(module)
        and getattr(module, "is_causal", True) is not False
        and _belongs_to_text(module, config, multimodal)
        and not _compresses_keys(module)
    )


def _compresses_keys(module: nn.Module) -> bool:
    return any("compressor" in type(child).__name__.lower() for child in module.children())


def _layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]


def find_attention_modules(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_modules()``) of the attention modules to wrap, by the rule in the module docstring.

    Raises:
        NoAttentionError: none qualifies; the message names the model type and why.
    """
    config = text_config(model.config)
    multimodal = config is not model.config
    modules = dict(model.named_modules())  # one name per module: a block shared by several layers appears once
    first_name = {id(module): name for name, module in reversed(list(modules.items()))}
    found: list[str] = []
    for list_name, layers in _layer_lists(model):
        for index, layer in enumerate(layers):
            prefix = f"{list_name}.{index}." if list_name else f"{index}."
            taken: list[str] = []
            for name, module in layer.named_modules():
                if not name or any(name.startswith(t + ".") for t in taken) or ".base_layer" in f".{name}":
                    continue
                if _is_target(_unwrapped(module), config, multimodal):
                    taken.append(name)
                    found.append(first_name.get(id(module), prefix + name))
    found = [name for name in dict.fromkeys(found) if not any(name.startswith(other + ".") for other in found if other != name)]
    if not found:
        raise NoAttentionError(_why_nothing(model, config, multimodal))
    by_name = sorted({type(_unwrapped(modules[name])).__name__ for name in found if branches_on_implementation_name(modules[name])})
    if by_name:
        raise NoAttentionError(
            f"gin_adapter cannot wrap model_type={_model_type(model)!r} yet: its attention ({', '.join(by_name)}) branches "
            "on the attention implementation's name ('eager'/'sdpa', e.g. to build a sparse index mask), and the adapter "
            "runs it under the name 'gin_<implementation>', which would change the base model's output."
        )
    return found


def attention_layer_numbers(model: nn.Module, num_layers: int) -> set[int]:
    """Layer-list positions of the modules discovery wraps (hybrids: the attention layers only); all ``num_layers``
    when discovery finds none (the adapter then names its modules through ``target_modules``)."""
    try:
        names = find_attention_modules(model)
    except NoAttentionError:
        return set(range(num_layers))
    return {int(match.group(1)) for name in names if (match := re.search(r"\.(\d+)\.", f".{name}"))}


def target_regex(names: list[str]) -> str:
    """One full-match regex for PEFT's ``target_modules`` (stored in adapter_config.json) matching exactly ``names``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        match = re.fullmatch(r"(.*?)\.(\d+)\.(.+)", name)
        key = (match.group(1), match.group(3)) if match else (name, "")
        groups.setdefault(key, []).append(match.group(2) if match else "")
    parts = []
    for (head, tail), indices in groups.items():
        if not tail:
            parts.append(re.escape(head))
        else:
            alternatives = "|".join(indices)
            parts.append(f"{re.escape(head)}\\.(?:{alternatives})\\.{re.escape(tail)}")
    return parts[0] if len(parts) == 1 else "|".join(f"(?:{part})" for part in parts)


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def _why_nothing(model: nn.Module, config: PretrainedConfig, multimodal: bool) -> str:
    model_type = _model_type(model)
    callers = [m for m in model.modules() if calls_attention_interface(m)]
    named = sorted({type(m).__name__ for m in model.modules() if re.search("attention|attn", type(m).__name__, re.I)})
    how = (
        "Pass GinConfig(target_modules=[...]) naming a causal self-attention module whose forward calls "
        "transformers' attention interface, if the model has one."
    )
    if not callers:
        if named:
            reason = (
                f"its attention ({', '.join(named[:3])}) computes attention itself instead of calling transformers' "
                "attention interface, which is where the adapter reads q, k and v"
            )
        else:
            reason = "it has no attention layers (state-space or recurrent token mixers only)"
    else:
        caller_types = sorted({type(m).__name__ for m in callers})
        text_callers = [m for m in callers if _belongs_to_text(m, config, multimodal)]
        if not text_callers:
            others = [name for name in named if name not in caller_types]
            reason = (
                f"only modules outside its text decoder ({', '.join(caller_types[:3])}) call the attention interface"
                + (f"; the decoder's own attention ({', '.join(others[:3])}) computes attention itself" if others else "")
            )
        elif all(_compresses_keys(m) for m in text_callers):
            reason = (
                f"its attention ({', '.join(sorted({type(m).__name__ for m in text_callers})[:3])}) attends to "
                "compressed KV blocks, not one key per token as the adapter's graph assumes"
            )
        elif all(getattr(m, "is_causal", True) is False for m in text_callers):
            reason = (
                f"its attention modules ({', '.join(sorted({type(m).__name__ for m in text_callers})[:3])}) are not "
                "causal (is_causal=False): an encoder, or a bidirectional configuration (BERT-style models are causal "
                "with is_decoder=True)"
            )
        else:
            reason = f"no causal self-attention module ({', '.join(caller_types[:3])}) sits inside a decoder layer list"
    return f"gin_adapter found no attention module to wrap in model_type={model_type!r}: {reason}. {how}"
