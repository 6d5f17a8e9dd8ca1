"""Attention and the top-k graph from one score computation (training with sdpa; the fused kernel's rule).

When a wrapped module trains, the attention and the adapter's graph need the same probabilities
``P = softmax(cap(scaling * Q K^T) + mask)``. :func:`attention_with_graph` computes them once per query chunk and
returns both the attention output and the graph:

    O[b, h, i] = sum_j P[b, h, i, j] v[b, h // G, j]                         (B, H, Lq, Dv), the attention output
    W[b, h, i, m] = P[b, h, i, idx_m],  idx = top-k_j P[b, h, i, j]           (B, Hkv, G, Lq, k), the graph

and :func:`graph_sum` forms the neighbour sum ``n_i = sum_m W[i, m] x[idx_m]`` for any node features ``x`` later,
once they are known (the hidden state after attention needs ``O`` first). Backward recomputes ``P`` once and
shares the softmax backward between the two uses of ``P``:

    dP = dO v^T + scatter(dW),   dS = P * (dP - sum_j dP_j P_j),   sum_j dP_j P_j = sum_d dO O + sum_m dW W,
    dq = scaling dS k,  dk = scaling dS^T q,  dv = P^T dO,

so one layer runs ten ``(rows x keys x D)`` matmuls instead of the seven of sdpa's forward and backward plus the
seven of the separate kernel (:mod:`gin_adapter.topk_sum`), and one softmax each way instead of two.

On the CPU, for plain causal attention with ``k <= 24``, all of it runs in one compiled call per layer and
direction (:mod:`gin_adapter.native_attention_graph`: tiles of 64 query rows of one head whose scores stay in
cache, the products on PyTorch's sgemm); elsewhere in query chunks of ATen operators, with the causal mask, the
softmax backward (``dS`` from ``dP``, one pass) compiled (:mod:`gin_adapter.native_score_rows`). The neighbour
sum and its backward (every row of a layer in one call) are compiled on the CPU either way
(:mod:`gin_adapter.native_graph_sum`).
The values, picks and gradients equal sdpa followed by the separate kernel up to float32 rounding (tests).
Saved for backward: q, k, v, the mask argument, ``O`` (which sdpa keeps too), the top-k indices and weights; with
``keep_probabilities`` (``GinConfig(recompute_adjacency=False)``; always in query chunks) also every chunk's probabilities ``P``, about
``B H L^2 / 2`` floats per layer under causal attention, so that backward skips the score matmul, the mask and the
softmax it would otherwise recompute (docs/benchmarks.md: 3-6 % of a training step, for 163 MiB more peak memory,
+8 % of LoRA's total, at 4 x 256 tokens on SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native_attention_graph, native_graph_sum, native_score_rows, topk_sum
from .adjacency import float32_region, self_index
from .chunk_sums import chunk_sum, chunk_sum_grads
from .top_k import top_k_last
from .topk_sum import Chunk, ScoreSpec, SumMode, _Layout, add_score_grads, _mask_rows, _row_probabilities, _scores, choose_sum_mode, plan_chunks


ENABLED = True
"""Build the graph together with the attention where :func:`joint_applies` (or, decoding,
:func:`gin_adapter.joint_decode.decode_applies`); set ``False`` to time the separate path."""


@dataclass
class TopKGraph:
    """The graph :func:`attention_with_graph` built: weights ``(B, Hkv, G, Lq, k)`` (differentiable) and key indices."""

    weights: torch.Tensor
    index: torch.Tensor
    chunks: list[Chunk]
    top_k: int


def joint_applies(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether sdpa's computation for this call is plain causal or bool-masked softmax attention that
    :func:`attention_with_graph` reproduces: training (a gradient is needed), float32 or under ``torch.autocast``
    (then computed in float32 and rounded to the autocast dtype, see :func:`attention_with_graph`), no KV cache, no
    dropout, soft-cap, sliding window, position bias or attention sinks, the module causal."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    return (
        ENABLED
        and needs_grad
        and (query.dtype == key.dtype == torch.float32 or torch.is_autocast_enabled(query.device.type))
        and query.shape[-2] == key.shape[-2] > 1
        and not kwargs.get("dropout")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("is_causal", None) in (None, True)
        and not any(name in kwargs for name in ("s_aux", "sinks"))
        and kwargs.get("sliding_window") is None
        and getattr(module, "is_causal", True)
        and (mask is None or mask.dtype == torch.bool)
    )


class _AttentionWithGraph(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, spec: ScoreSpec, top_k: int, chunks: list[Chunk], keep: bool):
        layout = _Layout(query, key.shape[1])
        k = min(top_k, key.shape[-2])
        shape5 = (layout.batch, layout.kv_heads, layout.groups, layout.q_len)
        compiled = None if keep else native_attention_graph.forward(query, key, value, mask, spec.scaling, k)
        ctx.compiled = compiled is not None
        if compiled is not None:  # every tile of the layer in one compiled call
            out, weights, index, inputs = compiled
            ctx.save_for_backward(*inputs, out, weights, index)
            ctx.spec, ctx.top_k = spec, k
            ctx.set_materialize_grads(False)
            ctx.mark_non_differentiable(index)
            return out.view(*query.shape[:-1], value.shape[-1]), weights.view(*shape5, k), index.view(*shape5, k)
        query5 = layout.split(query)
        out5 = value.new_empty(*shape5, value.shape[-1])
        index5 = torch.empty(*shape5, k, dtype=torch.long, device=query.device)
        weights5 = query.new_empty(*shape5, k)
        kept_probs = []
        for chunk in chunks:
            values = value[..., chunk.k0 : chunk.k1, :]
            scores, _ = _scores(layout.rows(query5, chunk), key[..., chunk.k0 : chunk.k1, :], _mask_rows(mask, chunk), spec, chunk)
            probs = _row_probabilities(scores, may_be_empty=mask is not None)
            del scores
            layout.put(out5, chunk, torch.matmul(probs, values))
            weights, local = top_k_last(probs, k)
            layout.put(weights5, chunk, weights)
            layout.put(index5, chunk, local + chunk.k0)
            if keep:
                kept_probs.append(probs)
        ctx.save_for_backward(query, key, value, mask, out5, index5, weights5, *kept_probs)
        ctx.spec, ctx.chunks = spec, chunks
        ctx.set_materialize_grads(False)  # no zero-filled gradient for unused weights (adjacency_grad=False)
        ctx.mark_non_differentiable(index5)
        return out5.view(*query.shape[:-1], value.shape[-1]), weights5, index5

    @staticmethod
    def backward(ctx, grad_out, grad_weights5, _grad_index):
        if grad_out is None and grad_weights5 is None:
            return (None,) * 8
        with float32_region((grad_out if grad_out is not None else grad_weights5).device):  # a backward run inside autocast stays float32
            return _AttentionWithGraph._backward(ctx, None if grad_out is None else grad_out.float(), grad_weights5)

    @staticmethod
    def _backward(ctx, grad_out, grad_weights5):
        if ctx.compiled:
            query, key, value, out, weights, index = ctx.saved_tensors
            grad_weights = None if grad_weights5 is None else grad_weights5.reshape(weights.shape)
            grad_query, grad_key, grad_value = native_attention_graph.backward(query, key, value, ctx.spec.scaling, ctx.top_k, out,
                                                                               grad_out, grad_weights, weights, index)
            return grad_query, grad_key, grad_value, None, None, None, None, None
        query, key, value, mask, out5, index5, weights5, *kept_probs = ctx.saved_tensors
        spec: ScoreSpec = ctx.spec
        layout = _Layout(query, key.shape[1])
        grad5 = torch.zeros_like(out5) if grad_out is None else layout.split(grad_out)  # (an unused attention output)
        query5 = layout.split(query)
        grad_query5 = layout.split(torch.empty_like(query))  # every chunk writes its rows
        grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
        for number, chunk in enumerate(ctx.chunks):
            chunk_query, chunk_keys = layout.rows(query5, chunk), key[..., chunk.k0 : chunk.k1, :]
            if kept_probs:
                probs = kept_probs[number]
            else:
                scores, _ = _scores(chunk_query, chunk_keys, _mask_rows(mask, chunk), spec, chunk)
                probs = _row_probabilities(scores, may_be_empty=mask is not None)
                del scores
            d_scores = _score_grads(probs, layout.rows(grad5, chunk), value, out5, grad_value, chunk, layout,
                                    *((None,) * 3 if grad_weights5 is None else (layout.rows(g, chunk) for g in (grad_weights5, weights5, index5))))
            add_score_grads(d_scores, None, chunk_query, chunk_keys, chunk, layout, spec, grad_query5, grad_key)
        return grad_query5.view(query.shape), grad_key, grad_value, None, None, None, None, None


def _score_grads(probs: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, out5: torch.Tensor, grad_value: torch.Tensor, chunk: Chunk,
                 layout: _Layout, kept: torch.Tensor | None, weights: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
    """One chunk's ``dS (B, Hkv, G * rows, keys)`` (module docstring) from its probabilities ``P``, output gradient
    rows ``dO``, the whole output ``out5`` and, when the graph gets a gradient, its rows of ``dW``, ``W`` and the
    key positions ``idx``; adds ``dv = P^T dO`` into ``grad_value``. The softmax backward in one compiled pass on
    the CPU (:mod:`gin_adapter.native_score_rows`), else ATen's operators."""
    d_probs = probability_grads(probs, grad, value, grad_value, chunk)
    if native_score_rows.softmax_grad_(d_probs, probs, grad, out5, chunk.q0, chunk.rows, chunk.k0, kept, weights, index):
        return d_probs
    row = (grad * layout.rows(out5, chunk)).sum(dim=-1, keepdim=True)
    if kept is not None:
        d_probs.scatter_add_(-1, index - chunk.k0, kept)
        row += (kept * weights).sum(dim=-1, keepdim=True)
    return d_probs.sub_(row).mul_(probs)


def probability_grads(probs: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, grad_value: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """One chunk's share of the attention output's backward, ``O = P v``: adds ``dv = P^T dO`` into ``grad_value``
    and returns ``dP = dO v^T`` ``(B, Hkv, G * rows, keys)``."""
    grad_value[..., chunk.k0 : chunk.k1, :] += torch.matmul(probs.transpose(-1, -2), grad)
    return torch.matmul(grad, value[..., chunk.k0 : chunk.k1, :].transpose(-1, -2))


def attention_output_grads(probs: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, out_rows: torch.Tensor, grad_value: torch.Tensor,
                           chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`probability_grads`, and the softmax backward's row term ``sum_j dP_j P_j = dO . O``
    ``(B, Hkv, G * rows, 1)``, for the graph's gradient to be added to before ``dS = P (dP - row)``."""
    return probability_grads(probs, grad, value, grad_value, chunk), (grad * out_rows).sum(dim=-1, keepdim=True)


def attention_with_graph(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, *, scaling: float,
                         top_k: int, keep_probabilities: bool = False) -> tuple[torch.Tensor, TopKGraph]:
    """``(attention output (B, H, Lq, Dv), the top-k graph)`` from ``query (B, H, L, D)``, ``key``/``value``
    ``(B, Hkv, L, .)`` and a bool mask or ``None`` (plain causal); ``keep_probabilities``: keep every chunk's
    probabilities for backward instead of recomputing them there. See the module docstring.

    Computed in float32 whatever the inputs' dtype and under ``torch.autocast`` too, so the graph is the one the
    separate kernel builds from the same q and k. The output is float32; :func:`sdpa_layout` rounds it to the
    autocast dtype, as sdpa's would be (sdpa itself would round q and k to that dtype first, so under autocast
    the two outputs differ by that dtype's rounding)."""
    heads, q_len = query.shape[1], query.shape[2]
    spec = ScoreSpec(scaling=float(scaling), softcap=None, sliding_window=None, groups=heads // key.shape[1], q_len=q_len)
    chunks = plan_chunks(q_len, key.shape[2], top_k, mask is not None, None, topk_sum.QUERY_CHUNK_ROWS)
    with float32_region(query.device):
        out, weights, index = _AttentionWithGraph.apply(query.float(), key.float(), value.float(), mask, spec, top_k, chunks, keep_probabilities)
    return out, TopKGraph(weights, index, chunks, top_k)


def sdpa_layout(out: torch.Tensor) -> torch.Tensor:
    """:func:`attention_with_graph`'s output ``(B, H, L, Dv)`` in the layout and dtype an sdpa call returns:
    ``(B, L, H, Dv)`` contiguous, in the autocast dtype under ``torch.autocast`` (float32 otherwise)."""
    device_type = out.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else out.dtype
    out = out.transpose(1, 2)  # Tensor.to(memory_format=...) leaves this view as it is: contiguous() copies it
    return (out if out.dtype == dtype else out.to(dtype)).contiguous()


class _GraphSum(torch.autograd.Function):
    """``n_i = sum_m W[i, m] x[idx_m]``; gradients to the weights and to ``x``. On the CPU every row in one call of
    the compiled sum (:mod:`gin_adapter.native_graph_sum`); otherwise per query chunk, dense (``A x`` with the k
    weights scattered into the chunk's ``(rows, keys)``) or gathered (:mod:`gin_adapter.chunk_sums`)."""

    @staticmethod
    def forward(ctx, weights5, index5, features, chunks: list[Chunk], sum_mode: SumMode):
        layout = _Layout.of_split(weights5)
        ctx.save_for_backward(weights5, index5, features)
        ctx.chunks, ctx.layout, ctx.sum_mode = chunks, layout, sum_mode
        native = native_graph_sum.graph_sum(_graph_rows(weights5), _graph_rows(index5), features)  # every row in one call
        if native is not None:
            return native.view(*weights5.shape[:4], features.shape[-1])
        out5 = features.new_empty(*weights5.shape[:4], features.shape[-1])
        for chunk in chunks:
            weights, index = layout.rows(weights5, chunk), layout.rows(index5, chunk)
            layout.put(out5, chunk, chunk_sum(sum_mode, index - chunk.k0, index, weights, features, chunk.k0, chunk.k1))
        return out5

    @staticmethod
    def backward(ctx, grad5):
        with float32_region(grad5.device):  # a backward run inside autocast stays float32
            return _GraphSum._backward(ctx, grad5.float())

    @staticmethod
    def _backward(ctx, grad5):
        weights5, index5, features = ctx.saved_tensors
        layout = ctx.layout
        grad_features = torch.zeros_like(features) if ctx.needs_input_grad[2] else None
        done, grad_weights = native_graph_sum.graph_sum_grad(_graph_rows(grad5), _graph_rows(weights5), _graph_rows(index5), features, grad_features,
                                                             need_weights=ctx.needs_input_grad[0])
        if done:
            return None if grad_weights is None else grad_weights.view(weights5.shape), None, grad_features, None, None
        grad_weights5 = torch.zeros_like(weights5) if ctx.needs_input_grad[0] else None
        for chunk in ctx.chunks:
            grad, weights, index = layout.rows(grad5, chunk), layout.rows(weights5, chunk), layout.rows(index5, chunk)
            grad_weights = chunk_sum_grads(ctx.sum_mode, grad, index - chunk.k0, index, weights, features, grad_features, chunk.k0, chunk.k1,
                                           need_weights=grad_weights5 is not None)
            if grad_weights is not None:
                layout.put(grad_weights5, chunk, grad_weights)
        return grad_weights5, None, grad_features, None, None


def _graph_rows(x5: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, G, Lq, n) -> (B, Hkv, G * Lq, n)``: every query row of a key/value head's graph."""
    return x5.flatten(2, 3)


def graph_sum(graph: TopKGraph, features: torch.Tensor, sum_mode: str = "auto") -> torch.Tensor:
    """``n_i = sum_m W[i, m] x[idx_m]``: features ``(B, Hkv, Lk, F)`` (shared ones expanded) -> ``(B, H, Lq, F)`` float32.

    ``sum_mode``: ``"dense"``, ``"gather"`` or ``"auto"`` (:func:`gin_adapter.topk_sum.choose_sum_mode`: gathered
    on long sequences, as the separate kernel). Float32 under ``torch.autocast`` too."""
    mode = choose_sum_mode(sum_mode, graph.top_k, features.shape[-2])
    features = features.float()
    if mode == "gather" or features.stride(1) == 0 or (features.device.type == "cpu" and native_graph_sum.ENABLED):
        features = features.contiguous()  # rows gathered by flat index (compiled or ATen); shared features: one copy per head
    with float32_region(features.device):  # float32 under mixed precision too
        out5 = _GraphSum.apply(graph.weights, graph.index, features, graph.chunks, mode)
    batch, kv_heads, groups, q_len, dim = out5.shape
    return out5.view(batch, kv_heads * groups, q_len, dim)


def self_loop_sum(graph: TopKGraph, features: torch.Tensor) -> torch.Tensor:
    """``graph="reference"`` on the top-k graph (self-loops only, the published code's effective operator):

        n[b, h, i] = W[b, h, i, self(i)] x[b, h // G, self(i)]    (0 where query i's own key is not among its top k)

    features ``(B, Hkv or 1, Lk, F)`` -> ``(B, H, Lq, F)`` float32, the rows of
    :func:`gin_adapter.gin.neighbour_sum_reference` on the same graph; gradients to the weights (by autograd) and
    the features."""
    weights, index = graph.weights, graph.index  # (B, Hkv, G, Lq, k)
    batch, kv_heads, groups, q_len, _ = weights.shape
    own = self_index(q_len, features.shape[-2], weights.device)  # (Lq,)
    with float32_region(features.device):
        self_weight = (weights * (index == own[:, None])).sum(-1)  # (B, Hkv, G, Lq)
        out5 = self_weight.unsqueeze(-1) * features[..., own, :].float().unsqueeze(2)  # (B, Hkv, G, Lq, F)
    return out5.reshape(batch, kv_heads * groups, q_len, out5.shape[-1])
