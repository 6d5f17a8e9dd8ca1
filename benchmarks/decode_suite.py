"""The ``decode`` suite: where one decoded token's time goes, per layer, for each variant.

One timed call is one cached forward of the whole model on one new token after a ``--gen-prompt``-token prompt
(the KV cache is cropped back after each call, the same work for every variant). From the medians:

    overhead per layer = (t_variant - t_base) / layers                                   (seconds per layer and token)

and, from one profiled call per variant, the ATen operator calls per layer above the base
(``(calls_variant - calls_base) / layers``): decoding one token costs a few microseconds per operator whatever
its size, so the operator count, not arithmetic, sets the adapter's decode cost on a CPU. For ``gin`` the suite
also times the adapter's two parts alone on the first layer's captured decode inputs (best of repeats): the
neighbour sum over the top-k graph (:func:`gin_adapter.aggregate.graph_neighbour_sum`) and the block.
"""

from __future__ import annotations

import gc
import logging
import timeit
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from benchmarks.in_model_parts import in_model_parts_us
from benchmarks.measure import Timings, interleaved_times, median, synchronizer
from benchmarks.variants import LABELS, Variant, build_variants, reset_switches
from gin_adapter import gin_layers
from gin_adapter.aggregate import graph_neighbour_sum

logger = logging.getLogger("benchmarks")


def _set_scales(model: torch.nn.Module, value: float) -> None:
    """Non-zero GIN scales: the block runs either way, but the decoded logits then depend on it."""
    with torch.no_grad():
        for layer in gin_layers(model):
            for block in layer.gin_blocks.values():
                block.scale.fill_(value)


def _decode_call(model: torch.nn.Module, prompt: torch.Tensor, token: torch.Tensor, variant: Variant | None = None):
    """A function decoding ``token`` after the cached ``prompt`` (the cache is restored after each call), with
    ``variant``'s switches of the package (joint path, compiled kernels; the defaults without one)."""
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=prompt, cache=cache, use_cache=True)

    def call() -> None:
        if variant is None:
            reset_switches()
        else:
            variant.use_switches()
        with torch.inference_mode():
            model(input_ids=token, cache=cache, use_cache=True)
            cache.crop(-token.shape[-1])

    return call


def _aten_calls(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def _best_us(fn, number: int = 50, repeat: int = 9) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def gin_parts_us(model: torch.nn.Module, prompt: torch.Tensor, token: torch.Tensor) -> dict[str, float]:
    """Best-of-repeats microseconds of the first wrapped layer's neighbour sum and block on one decoded token
    (value features; the inputs are captured from a real decode step)."""
    layer = gin_layers(model)[0]
    name = next(iter(layer.gin_blocks))
    captured: dict[str, Any] = {}
    handle = layer.base_layer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs, hidden_states=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    call = _decode_call(model, prompt, token)
    call()
    handle.remove()
    hidden = captured.pop("hidden_states")
    with torch.inference_mode():
        _, graph = layer.attend(hidden, **captured)
    cache = next(v for v in captured.values() if isinstance(v, DynamicCache))
    cache.crop(-token.shape[-1])
    rule, block = layer.gin_rules[name], layer.gin_blocks[name]
    features = graph.value
    x_self = features[..., graph.k_len - graph.q_len :, :]
    with torch.inference_mode():
        neighbours = graph_neighbour_sum(graph, features, rule)

    def neighbour_sum() -> None:
        with torch.inference_mode():
            graph_neighbour_sum(graph, features, rule)

    def run_block() -> None:
        with torch.inference_mode():
            block(x_self, neighbours)

    return dict(neighbour_sum_us=_best_us(neighbour_sum), block_us=_best_us(run_block))


def time_decode_calls(fns: dict[str, Callable[[], None]], *, warmup: int, rounds: int, device: torch.device, layers: int
                      ) -> tuple[Timings, dict[str, tuple[float, float]]]:
    """Interleaved rounds of the decode calls (``fns`` must hold ``"base"``); returns the timings and, per variant,
    ``(median seconds per token, overhead per layer above base in us)``."""
    times = interleaved_times(fns, warmup, rounds, synchronizer(device), what="decode", collect=False)
    base_s = median(times["base"])
    return times, {name: (median(t), (median(t) - base_s) / layers * 1e6) for name, t in times.items()}


def run_decode(base, prompt: torch.Tensor, names: list[str], *, warmup: int, steps: int, device: torch.device, in_model_calls: int = 30
               ) -> dict[str, Any]:
    """Per variant: seconds per decoded token (median of interleaved rounds), ATen calls per token, the
    overhead per layer above ``base`` (which the list must hold), and the attention module's parts timed inside
    the model over ``in_model_calls`` calls (:mod:`benchmarks.in_model_parts`)."""
    if "base" not in names:
        names = ["base", *names]
    variants = build_variants(base, names)
    token = prompt[:, -1:]
    fns, calls = {}, {}
    for name, variant in variants.items():
        model = variant.model.eval()
        _set_scales(model, 0.5)
        fns[name] = _decode_call(model, prompt[:, :-1], token, variant)
        fns[name]()  # first call outside the timing
        calls[name] = _aten_calls(fns[name])
    rounds = 20 * steps  # one call is a few ms: many rounds for a stable median
    layers = base.config.num_hidden_layers
    times, per_token = time_decode_calls(fns, warmup=warmup, rounds=rounds, device=device, layers=layers)
    rows = []
    for name, t in times.items():
        rows.append(dict(variant=name, label=LABELS[name], prompt=prompt.shape[1] - 1, layers=layers, token_s=per_token[name][0], token_s_all=t,
                         aten_calls=calls[name], overhead_us_per_layer=per_token[name][1],
                         aten_calls_per_layer=(calls[name] - calls["base"]) / layers, timer=times.primary))
    in_model = {name: in_model_parts_us(variant.model, fns[name], calls=in_model_calls) for name, variant in variants.items()}
    reset_switches()
    parts = gin_parts_us(variants["gin"].model, prompt[:, :-1], token) if "gin" in variants else {}
    del variants, fns
    gc.collect()
    return dict(rows=rows, gin_parts=parts, in_model=in_model)
