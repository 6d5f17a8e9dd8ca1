"""Prototype of a faster top-k GIN neighbour sum, measured against the core in ``run_benchmarks.py``.

Not part of the package: it exists to put a number on a recommended change to ``gin_adapter/attention.py``
(see docs/benchmarks.md, "Recommended core changes"). It computes exactly what
``gin_adapter.attention.neighbour_sums`` computes for ``sparsify="topk", head_reduction="none", graph="gin"``
(same values, same gradients to q, k and v), but

* never materialises the softmax probabilities in forward: top-k of the masked *scores* equals top-k of the
  probabilities (softmax is monotonic per row), and the k kept weights are ``exp(s - logsumexp(s))``;
* sums the neighbours by gathering the k kept value vectors (``O(L k D)``) instead of a dense
  ``(L, L) @ (L, D)`` matmul over a scattered adjacency (``O(L^2 D)`` plus two ``L^2`` fills);
* handles grouped-query attention by viewing the queries as ``(B, Hkv, G * Lq, D)``: keys and values are never
  repeated, so nothing is copied and the saved tensors are the ones sdpa already keeps;
* has an analytic backward (a custom ``autograd.Function``) that recomputes only the scores:
  ``dS = P * (dP - sum_j dP P)`` where ``dP`` is non-zero on the k kept keys only, so the row term is a sum of k
  products and ``dS = scatter(dW * W) - c * P``; then ``dq = scale * dS k``, ``dk = scale * dS^T q``.

Saved for backward: q, k, v (the same tensors sdpa saves, so no extra memory), the top-k indices and weights
``(B, H, Lq, k)`` and the row log-sum-exp ``(B, H, Lq)``. Nothing of size ``(B, H, Lq, Lk)``.
"""

from __future__ import annotations

import torch

import gin_adapter.attention as core_attention
from gin_adapter.adjacency import AdjacencyRule, self_index, visible_keys


def _grouped(query: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H, Lq, D) -> (B, Hkv, G * Lq, D)`` with heads ordered ``h = kv * G + g`` (``repeat_interleave`` order)."""
    batch, heads, q_len, dim = query.shape
    return query.reshape(batch, heads // groups, groups * q_len, dim)


def _masked_scores(qg: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, scaling: float, groups: int, q_len: int) -> torch.Tensor:
    """Scaled scores ``(B, Hkv, G * Lq, Lk)`` with ``-inf`` on invisible keys (computed in place, no autograd)."""
    scores = torch.matmul(qg.float() * scaling, key.float().transpose(-1, -2))
    batch, kv_heads, rows, k_len = scores.shape
    view = scores.view(batch, kv_heads, groups, q_len, k_len)
    # visible: (B or 1, 1 or H, Lq, Lk) -> (B or 1, Hkv or 1, G or 1, Lq, Lk)
    vb, vh = visible.shape[0], visible.shape[1]
    mask = visible.view(vb, 1, 1, q_len, k_len) if vh == 1 else visible.reshape(vb, kv_heads, groups, q_len, k_len)
    view.masked_fill_(~mask, float("-inf"))
    return scores


class TopKNeighbourSum(torch.autograd.Function):
    """``out[b, h, i] = sum_{j in topk_i} P[b, h, i, j] v[b, h // G, j]`` with ``P`` the masked softmax of q k^T.

    ``sum_mode``: ``"dense"`` scatters the k weights into an ``(Lq, Lk)`` buffer and uses batched matmuls for the
    sum and its gradients (best at short L on CPU); ``"gather"`` gathers the k value vectors (``O(L k D)``, best
    at long L with small k).
    """

    @staticmethod
    def forward(ctx, query, key, value, visible, scaling: float, top_k: int, sum_mode: str = "dense"):
        batch, heads, q_len, dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        groups = heads // kv_heads
        qg = _grouped(query, groups)
        scores = _masked_scores(qg, key, visible, scaling, groups, q_len)  # (B, Hkv, G*Lq, Lk)
        k = min(top_k, k_len)
        top_scores, index = scores.topk(k, dim=-1)  # (B, Hkv, G*Lq, k)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, Hkv, G*Lq, 1)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows with no visible key
        weights = torch.exp(top_scores - lse)  # invisible picks have score -inf -> weight 0
        values = value.float()
        if sum_mode == "dense":
            out = torch.matmul(scores.zero_().scatter_(-1, index, weights), values)  # reuse the scores buffer as A
        else:
            out = _gather_sum(values, index, weights)  # (B, Hkv, G*Lq, D)
        del scores
        ctx.save_for_backward(query, key, value, visible, index, weights, lse)
        ctx.scaling, ctx.groups, ctx.sum_mode = scaling, groups, sum_mode
        return out.view(batch, heads, q_len, dim)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, visible, index, weights, lse = ctx.saved_tensors
        scaling, groups = ctx.scaling, ctx.groups
        batch, heads, q_len, dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        grad = _grouped(grad_out.float(), groups)  # (B, Hkv, G*Lq, D)
        values = value.float()
        rows, k = index.shape[2], index.shape[3]
        need_graph = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_value = grad_weights = None
        if ctx.sum_mode == "dense":
            if need_graph:
                grad_weights = torch.matmul(grad, values.transpose(-1, -2)).gather(-1, index)  # dL/dW at the kept keys
            if ctx.needs_input_grad[2]:
                adjacency = grad.new_zeros(batch, kv_heads, rows, k_len).scatter_(-1, index, weights)
                grad_value = torch.matmul(adjacency.transpose(-1, -2), grad).to(value.dtype)
                del adjacency
        else:
            flat_index = index.reshape(batch, kv_heads, rows * k, 1).expand(-1, -1, -1, dim)
            if need_graph:
                gathered = values.gather(2, flat_index).view(batch, kv_heads, rows, k, dim)
                grad_weights = (gathered * grad.unsqueeze(-2)).sum(-1)  # dL/dW at the kept keys
                del gathered
            if ctx.needs_input_grad[2]:
                contrib = (weights.unsqueeze(-1) * grad.unsqueeze(-2)).reshape(batch, kv_heads, rows * k, dim)
                grad_value = torch.zeros_like(values).scatter_add_(2, flat_index, contrib).to(value.dtype)
        grad_query = grad_key = None
        if need_graph:
            qg = _grouped(query, groups)
            # P = exp(s - lse), then dS = P * (dP - c) with dP sparse: dS = -c P, plus dW * W on the kept keys.
            d_scores = _masked_scores(qg, key, visible, scaling, groups, q_len)
            d_scores.sub_(lse).exp_()
            row_term = (grad_weights * weights).sum(dim=-1, keepdim=True)  # (B, Hkv, G*Lq, 1)
            d_scores.mul_(-row_term)
            d_scores.scatter_add_(-1, index, grad_weights * weights)
            if ctx.needs_input_grad[0]:
                grad_query = (torch.matmul(d_scores, key.float()) * scaling).view(batch, heads, q_len, dim).to(query.dtype)
            if ctx.needs_input_grad[1]:
                grad_key = (torch.matmul(d_scores.transpose(-1, -2), qg.float()) * scaling).to(key.dtype)
        return grad_query, grad_key, grad_value, None, None, None, None


def _gather_sum(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_m weights[..., r, m] * values[..., index[..., r, m], :]``: values ``(B, Hkv, Lk, D)``, index ``(B, Hkv, R, k)``."""
    batch, kv_heads, rows, k = index.shape
    dim = values.shape[-1]
    gathered = values.gather(2, index.reshape(batch, kv_heads, rows * k, 1).expand(-1, -1, -1, dim))
    return (weights.unsqueeze(-1) * gathered.view(batch, kv_heads, rows, k, dim)).sum(-2)


def fused_topk_neighbour_sums(query, key, value, attention_mask, top_k: int, scaling: float, sum_mode: str | None = None) -> torch.Tensor:
    """Drop-in for ``neighbour_sums(q, repeat(k), repeat(v), mask, rule)`` with a top-k per-head rule; k, v unrepeated.

    ``sum_mode=None`` picks ``"gather"`` when ``Lk >= GATHER_MIN_KEYS`` and ``k <= Lk / 16``, else ``"dense"``.
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    visible = visible_keys(attention_mask, q_len, k_len, query.device)
    if sum_mode is None:
        sum_mode = "gather" if (k_len >= GATHER_MIN_KEYS and top_k * 16 <= k_len) else "dense"
    return TopKNeighbourSum.apply(query, key, value, visible, scaling, top_k, sum_mode)


GATHER_MIN_KEYS = 1024


def fused_supported(rule: AdjacencyRule, kwargs: dict) -> bool:
    """The rules the prototype covers (the package default among them)."""
    return (
        rule.sparsify == "topk"
        and rule.head_reduction == "none"
        and rule.graph == "gin"
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
    )


def fused_gin_features(module, query, key, value, attention_mask, scaling, kwargs, rule: AdjacencyRule, graph_grad: bool = True):
    """Same contract as ``gin_adapter.attention._gin_features`` (``(x_self, neighbour_sum)``, each ``(B, Lq, H*D)``).

    ``graph_grad=False`` treats the graph as a constant (q, k detached): the GIN parameters and the values still get
    their gradients, but nothing flows back through the attention weights (a proposed ``GinConfig`` option).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if not graph_grad:
        query, key = query.detach(), key.detach()
    summed = fused_topk_neighbour_sums(query, key, value, attention_mask, rule.top_k, scaling)
    q_len, k_len = query.shape[-2], key.shape[-2]
    value_rep = core_attention.repeat_heads(value[..., k_len - q_len :, :], groups)  # a slice, not an index gather
    return core_attention._merge_heads(value_rep.float()), core_attention._merge_heads(summed)


def lean_block_forward(block, x_self: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """``GinBlock.forward`` with the scale folded into the RMSNorm weight: ``scale * (n(y) * w) = n(y) * (scale * w)``.

    Same numbers; autograd no longer keeps the normalised output for the scale's gradient (one ``(B, L, d)``
    tensor less per layer).
    """
    dtype = block.out_proj.weight.dtype
    z = (1 + block.eps) * x_self.to(dtype) + neighbours.to(dtype)
    y = block.out_proj(block.mlp(z))
    return torch.nn.functional.rms_norm(y, block.norm.normalized_shape, block.norm.weight * block.scale, block.norm.eps)


_ORIGINAL_GIN_FEATURES = core_attention._gin_features


def _dispatching_gin_features(module, query, key, value, attention_mask, scaling, kwargs, rule):
    mode = getattr(module, "_bench_fused_topk", None)
    if mode and fused_supported(rule, kwargs):
        return fused_gin_features(module, query, key, value, attention_mask, scaling, kwargs, rule, graph_grad=mode != "detached")
    return _ORIGINAL_GIN_FEATURES(module, query, key, value, attention_mask, scaling, kwargs, rule)


def enable_fused_prototype(model: torch.nn.Module, graph_grad: bool = True, lean_block: bool = True) -> int:
    """Route ``model``'s GIN layers (only this model's) through the prototype; returns how many layers.

    Patches ``gin_adapter.attention._gin_features`` in this process with a dispatcher that falls back to the
    original for every module not marked, so other models in the same process keep the core path. With
    ``lean_block`` the model's GIN blocks also use :func:`lean_block_forward` (instance attribute, no class change).
    """
    import types

    from gin_adapter.model import gin_layers

    core_attention._gin_features = _dispatching_gin_features
    layers = gin_layers(model)
    for layer in layers:
        layer.base_layer._bench_fused_topk = "graph" if graph_grad else "detached"
        if lean_block:
            for block in layer.gin_blocks.values():
                block.forward = types.MethodType(lean_block_forward, block)
    return len(layers)


__all__ = ["TopKNeighbourSum", "enable_fused_prototype", "fused_gin_features", "fused_supported", "fused_topk_neighbour_sums", "lean_block_forward", "self_index"]
