"""One decoded token's attention and top-k graph from one score computation (cached inference under sdpa).

Decoding a token costs a few microseconds per operator call whatever its size (docs/benchmarks.md), and the
adapter needs the same probabilities as the attention. So when a wrapped module decodes one new token with the
per-head top-k rule, the attention function computes both from one ``baddbmm``. With ``R = B * Hkv`` rows of
``G = H / Hkv`` query heads, the new query ``q (R, G, D)`` and the ``Lk`` cached keys and values:

    s = scaling * q K^T                           (R, G, Lk)    one baddbmm
    P = softmax_j(s)                              (R, G, Lk)    every cached key is visible (no mask)
    O = P V                                       (R, G, Dv)    the attention output: sdpa's up to float32 rounding
    A = scatter_j(top-k_j P)                      (R, G, Lk)    k non-zeros per row: the graph (in s's buffer)

and :func:`decode_graph_sum` forms any node features' neighbour sum ``n = A X`` once they are known (the hidden
state after attention needs ``O`` first). ``s``, ``P`` and ``A`` are the ones the separate decode step
(:func:`gin_adapter.topk_sum.topk_neighbour_sum`) builds (on the compiled path up to float32 rounding, and ties
broken to the lower key), so the neighbour sums are its sums. Against sdpa
followed by that step, one decoded token makes one attention-sized call fewer per layer. On the CPU the four lines
are one compiled call (:mod:`gin_adapter.native_decode`), which also forms the values' neighbour sum and keeps
the graph as its picks (``k`` weights and key positions a row) instead of the dense ``A``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native_decode, native_graph_sum
from .chunk_sums import scatter_adjacency


@dataclass(slots=True)
class DecodeGraph:
    """The graph :func:`attention_with_graph` built for one decoded token, in one of two forms: ``adjacency (B, Hkv,
    G, Lk)``, float32, the top-k probabilities of each query head and zeros elsewhere (ATen's operators), or the picks
    alone, ``weights`` and key positions ``index (B, Hkv, G, k)``, with ``value_sums (B, H, 1, Dv)``, the neighbour
    sum of ``value`` (the compiled step, :mod:`gin_adapter.native_decode`)."""

    adjacency: torch.Tensor | None
    top_k: int
    weights: torch.Tensor | None = None
    index: torch.Tensor | None = None
    value: torch.Tensor | None = None
    value_sums: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The graph as ``adjacency (B, Hkv, G, Lk)`` whatever its form."""
        if self.adjacency is not None:
            return self.adjacency
        *lead, _ = self.weights.shape
        keys = self.value.shape[-2]
        return scatter_adjacency(self.weights.new_empty(*lead, keys), self.index, self.weights)


def decode_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether sdpa's computation for this call is plain softmax attention of one new token over every cached key,
    which :func:`attention_with_graph` reproduces: no gradient, one query, no mask, float32 q, k, v outside
    ``torch.autocast`` (sdpa would compute in the inputs' dtype), no dropout, soft-cap, sliding window, position bias
    or attention sinks. (The caller checks :data:`gin_adapter.joint.ENABLED`.)"""
    return (
        query.shape[-2] == 1
        and mask is None
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
        and query.dtype == key.dtype == value.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu" if query.is_cpu else query.device.type)  # (no device object on the CPU)
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("sliding_window") is None
        and "s_aux" not in kwargs
        and "sinks" not in kwargs
    )


def decode_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s = scaling * q K^T`` as ``(R, G, Lk)`` float32 from ``query (B, H, 1, D)`` and ``key (B, Hkv, Lk, D)``:
    one ``baddbmm`` with the scale folded in."""
    batch, heads, _, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    rows = batch * kv_heads
    grouped = (query if query.dtype == torch.float32 else query.float()).reshape(rows, heads // kv_heads, dim)
    keys = (key if key.dtype == torch.float32 else key.float()).reshape(rows, k_len, dim)
    return torch.baddbmm(grouped.new_empty(rows, heads // kv_heads, k_len), grouped, keys.transpose(1, 2), beta=0.0, alpha=scaling)


def top_k_adjacency(scores: torch.Tensor, probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """``A``: the ``top_k`` largest probabilities of each row of ``probs (R, G, Lk)`` at their keys, zeros elsewhere,
    written into ``scores``' buffer (which is returned)."""
    weights, index = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return scatter_adjacency(scores, index, weights)


def attention_with_graph(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float, top_k: int
                         ) -> tuple[torch.Tensor, DecodeGraph]:
    """``(attention output (B, 1, H, Dv) in sdpa's layout, the top-k graph)`` for ``query (B, H, 1, D)`` and the
    cached ``key``/``value (B, Hkv, Lk, .)``, all float32 (:func:`decode_applies`). See the module docstring; one
    compiled call where :mod:`gin_adapter.native_decode` applies (the graph as its picks, with the values'
    neighbour sum), else ATen's operators (the graph dense)."""
    compiled = native_decode.attention_with_graph(query, key, value, scaling=scaling, top_k=top_k)
    if compiled is not None:
        out, weights, index, sums = compiled
        return out, DecodeGraph(None, top_k, weights, index, value, sums)
    batch, heads = query.shape[:2]
    kv_heads, k_len = key.shape[1], key.shape[2]
    out, scores, probs = decode_attention(query, key, value, scaling)
    adjacency = top_k_adjacency(scores, probs, top_k)
    return out, DecodeGraph(adjacency.view(batch, kv_heads, heads // kv_heads, k_len), top_k)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(O (B, 1, H, Dv) in sdpa's layout, s (R, G, Lk), P (R, G, Lk))`` for one decoded float32 token: the
    module docstring's first three lines (``s``'s buffer is free for the graph)."""
    batch, heads = query.shape[:2]
    kv_heads, k_len, width = key.shape[1], key.shape[2], value.shape[-1]
    scores = decode_scores(query, key, scaling)
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, value.reshape(batch * kv_heads, k_len, width))  # (R, G, Dv)
    return out.view(batch, 1, heads, width), scores, probs


def decode_graph_sum(graph: DecodeGraph, features: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
    """The neighbour sum over one decoded token's graph: features ``(B, Hkv or 1, Lk, F)`` -> ``(B, H, 1, F)`` float32.

    ``graph="gin"``: ``n[b, h] = sum_j A[b, h, j] x[b, h // G, j]`` (features shared by the heads are multiplied
    once for all ``H`` rows): the compiled step's own sums when ``features`` are its values, the compiled sum over
    the picks (:func:`gin_adapter.native_graph_sum.small_graph_sum`) for other features, else one ``bmm`` with the dense graph.
    ``reference`` (``graph="reference"``, self-loops only): ``n[b, h] = A[b, h, Lk - 1] x[b, h // G, Lk - 1]``, the
    new token being the last key.
    """
    x = features if features.dtype == torch.float32 else features.float()
    if graph.adjacency is None and not reference:
        if features is graph.value and graph.value_sums is not None:
            return graph.value_sums
        picked = _picks_sum(graph, x)
        if picked is not None:
            return picked
    adjacency = graph.dense()  # (B, Hkv, G, Lk)
    batch, kv_heads, groups, k_len = adjacency.shape
    width = x.shape[-1]
    if reference:
        out = adjacency[..., -1:] * x[..., -1:, :]  # (B, Hkv, G, 1) * (B, Hkv or 1, 1, F) -> (B, Hkv, G, F)
    elif x.shape[1] == 1:
        out = torch.bmm(adjacency.view(batch, kv_heads * groups, k_len), x.reshape(batch, k_len, width))
    else:
        out = torch.bmm(adjacency.view(batch * kv_heads, groups, k_len), x.reshape(batch * kv_heads, k_len, width))
    return out.view(batch, kv_heads * groups, 1, width)


def _picks_sum(graph: DecodeGraph, x: torch.Tensor) -> torch.Tensor | None:
    """``sum_m W[m] x[idx[m]]`` per query head by the compiled neighbour sum, ``(B, H, 1, F)``; ``None`` where it
    does not apply."""
    batch, kv_heads, groups, picks = graph.weights.shape
    k_len, width = x.shape[-2:]
    if x.shape[1] == 1:  # shared by the heads: one graph per batch element, every head's picks its rows
        out = native_graph_sum.small_graph_sum(graph.weights.view(batch, kv_heads * groups, picks), graph.index.view(batch, kv_heads * groups, picks),
                                               x.reshape(batch, k_len, width))
    else:
        out = native_graph_sum.small_graph_sum(graph.weights.view(batch * kv_heads, groups, picks), graph.index.view(batch * kv_heads, groups, picks),
                                               x.reshape(batch * kv_heads, k_len, width))
    return None if out is None else out.view(batch, kv_heads * groups, 1, width)
