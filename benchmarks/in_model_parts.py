"""Where a decoded token's time goes inside the whole model: the attention module's parts, timed in place.

Timed alone on one layer's inputs, the GIN block takes about a third of what the same calls take inside a decode
step (docs/benchmarks.md): between two of its calls the base model streams every layer's weights (about 14 MB per
SmolLM2 layer) through the caches, so each operator starts cold. This module times the parts where they run, in
whole-model decode calls: per layer and token, the attention module (``self_attn``: the GIN wrapper, LoRA's
wrapped projections, or the base module), and for GIN its wrapped attention (``base_layer``, which builds the
graph with the attention for one decoded token), the neighbour sum, the node features (projection and feature
cache for hidden-state features) and the block, or, where a decoded token's update with projected features is one
compiled call, that call (``decode_update``: projection, feature cache, neighbour sum and block); ``rest`` is the
wrapper's own remainder (cache checks, the final addition, Python). Wall time (``time.perf_counter``) around each call, summed over ``calls`` decode calls; the
timers add about a microsecond per timed call.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from gin_adapter import layer as gin_layer_module
from gin_adapter import native_block
from gin_adapter.layer import GinAttentionLayer


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every decoder layer's attention module, in order (``*.self_attn``; the GIN wrapper where there is one)."""
    return [module for name, module in model.named_modules() if name.endswith("self_attn")]


@contextlib.contextmanager
def _timing(totals: dict[str, float], model: torch.nn.Module) -> Iterator[None]:
    """Instance-level timers on every attention module's parts (and the neighbour sum); removed afterwards."""
    undo: list[Callable[[], None]] = []

    def wrap(owner: object, attribute: str, key: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start

        had_own = attribute in vars(owner)
        setattr(owner, attribute, timed)
        undo.append(lambda: setattr(owner, attribute, inner) if had_own else delattr(owner, attribute))

    for module in attention_modules(model):
        wrap(module, "forward", "attention_module")
        if isinstance(module, GinAttentionLayer):
            wrap(module.base_layer, "forward", "base_attention")
            wrap(module, "_projected_features", "node_features")
            for block in module.gin_blocks.values():
                wrap(block, "forward", "block")
    wrap(gin_layer_module, "graph_neighbour_sum", "neighbour_sum")
    wrap(native_block, "decode_update", "decode_update")
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def in_model_parts_us(model: torch.nn.Module, decode: Callable[[], None], *, calls: int = 30, warmup: int = 3) -> dict[str, float]:
    """Microseconds per layer and decoded token of each part (see the module docstring), from ``calls`` runs of
    ``decode`` (one cached decode step of the whole model) after ``warmup`` untimed ones."""
    for _ in range(warmup):
        decode()
    totals: dict[str, float] = defaultdict(float)
    with _timing(totals, model):
        for _ in range(calls):
            decode()
    layers = len(attention_modules(model))
    out = {key: seconds / calls / layers * 1e6 for key, seconds in totals.items() if seconds > 0}
    if "base_attention" in out:
        inside = sum(out.get(key, 0.0) for key in ("base_attention", "node_features", "neighbour_sum", "block", "decode_update"))
        out["rest"] = out["attention_module"] - inside
    return out
