"""The ``kernel`` suite: one attention layer's per-head top-k neighbour sum, forward + backward, every way the
package can run it (the generic chain, the fused kernel's sum modes and query chunk sizes, the graph built with the
attention), and the published rule's graph built with the attention, against sdpa itself.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from benchmarks.measure import interleaved_times, median
from gin_adapter import GinConfig, native_attention_graph
from gin_adapter.adjacency import AdjacencyRule
from gin_adapter.joint import attention_with_graph, graph_sum
from gin_adapter.joint_threshold import attention_with_threshold_graph, threshold_graph_sum
from gin_adapter.topk_sum import topk_neighbour_sum

logger = logging.getLogger("benchmarks")

PUBLISHED_WIDTH = GinConfig.published().hidden_dim
"""The published preset's node-feature width (155), for ``joint_published``."""


def kernel_inputs(batch: int, length: int, heads: int = 9, kv_heads: int = 3, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Leaf ``q (B, H, L, D)``, ``k, v (B, Hkv, L, D)`` that require grad, and fixed output weights ``(B, H, L, D)``."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=generator, requires_grad=True) for _ in range(2))
    return q, k, v, torch.randn(batch, heads, length, dim, generator=generator)


def kernel_cases(inputs: tuple[torch.Tensor, ...], top_k: int = 8, chunks: Iterable[int] = (32, 64, 128, 0)) -> dict[str, Callable[[], Any]]:
    """Forward + backward of one attention layer's per-head top-k neighbour sum, every way the package can run it.

    ``sdpa``: the attention itself (``scaled_dot_product_attention``, causal, KV repeated), for scale;
    ``generic``: the generic chain as the core runs it for other rules (checkpointed probabilities, top-k, dense
    sum); ``fused_<mode>_c<rows>``: :func:`gin_adapter.topk_sum.topk_neighbour_sum` with that sum mode and query
    chunk (``c0``: one chunk); ``joint``: what training under sdpa runs in place of sdpa *and* the sum, the
    attention output and the graph from one score computation (:func:`gin_adapter.joint.attention_with_graph`,
    ``sum_mode="auto"``: the compiled kernel of :mod:`gin_adapter.native_attention_graph` where it applies) with
    both outputs in the loss, ``joint_chunked`` the same by ATen's 64-row query chunks (the compiled kernel off),
    and ``joint_keep`` the chunked form keeping the probabilities for backward (``recompute_adjacency=False``); ``joint_published``: the same for the published
    preset's rule (:func:`gin_adapter.joint_threshold.attention_with_threshold_graph`, ``GinConfig.published(graph="gin")``,
    the graph in the form training picks) summing features shared by the heads of the preset's width (155 on
    SmolLM2-135M, fixed random ``(B, 1, L, 155)``), ``joint_published_chunked`` the same by ATen's query chunks;
    compare them with ``sdpa``. Gradients accumulate into
    ``inputs``' q, k, v as in training.
    """
    import torch.nn.functional as F
    import torch.utils.checkpoint

    from gin_adapter.aggregate import neighbour_sums

    q, k, v, weights = inputs
    length, dim, groups = q.shape[2], q.shape[3], q.shape[1] // k.shape[1]
    rule = AdjacencyRule.from_config(GinConfig(top_k=top_k, backend="dense"))

    def backward(out: torch.Tensor) -> None:
        (out * weights).sum().backward()

    def fused(mode: str, rows: int) -> None:
        backward(topk_neighbour_sum(q, k, v, None, top_k=top_k, scaling=dim**-0.5, sum_mode=mode, chunk_rows=rows or length))

    def joint_attention(keep: bool) -> None:
        out, graph = attention_with_graph(q, k, v, None, scaling=dim**-0.5, top_k=top_k, keep_probabilities=keep)
        backward(out + graph_sum(graph, v))

    cases: dict[str, Callable[[], Any]] = {
        "sdpa": lambda: backward(F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True)),
        "generic": lambda: backward(torch.utils.checkpoint.checkpoint(neighbour_sums, q, k, v, None, rule, dim**-0.5, use_reentrant=False, groups=groups)),
    }
    for mode in ("dense", "gather"):
        for rows in chunks:
            if not rows or rows < length:
                cases[f"fused_{mode}_c{rows}"] = functools.partial(fused, mode, rows)
    cases["joint"] = functools.partial(joint_attention, False)
    cases["joint_keep"] = functools.partial(joint_attention, True)

    cases["joint_chunked"] = functools.partial(_chunked, functools.partial(joint_attention, False))
    published = AdjacencyRule.from_config(GinConfig.published(graph="gin"))
    shared = torch.randn(q.shape[0], 1, length, PUBLISHED_WIDTH, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def joint_published() -> None:
        out, graph = attention_with_threshold_graph(q, k, v, None, scaling=dim**-0.5, rule=published)
        ((out * weights).sum() + threshold_graph_sum(graph, shared, groups).sum()).backward()

    cases["joint_published"] = joint_published
    cases["joint_published_chunked"] = functools.partial(_chunked, joint_published)
    return cases


def _chunked(case: Callable[[], Any]) -> None:
    """Run ``case`` with the compiled attention off (ATen's query chunks, :mod:`gin_adapter.joint`)."""
    enabled = native_attention_graph.ENABLED
    native_attention_graph.ENABLED = False
    try:
        case()
    finally:
        native_attention_graph.ENABLED = enabled


def run_kernel(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time :func:`kernel_cases` per shape (interleaved rounds, medians); one row per shape."""
    rows = []
    for shape in args.kernel_shapes:
        batch, length = (int(x) for x in shape.lower().split("x"))
        cases = kernel_cases(kernel_inputs(batch, length, seed=args.seed), chunks=args.kernel_chunks)
        timings = interleaved_times(cases, 1, args.kernel_reps if length < 4096 else 2, lambda: None, what=f"kernel {shape}", collect=False)
        medians = {name: median(t) for name, t in timings.items()}
        rows.append(dict(batch=batch, seq_len=length, ms={name: 1000 * t for name, t in medians.items()},
                         over_sdpa={name: t / medians["sdpa"] for name, t in medians.items()}))
        gc.collect()
    return rows
