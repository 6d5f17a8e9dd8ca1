"""Experiment 1: *attention is message passing on the complete (causal) graph* (Joshi 2020/2025).

For every self-attention layer of a Hugging Face causal LM, capture ``q, k, v`` exactly as the model computes
them (after RoPE, GQA heads repeated) and the layer's own attention output before ``o_proj``; rebuild the output
with a torch_geometric :class:`~torch_geometric.nn.MessagePassing` layer on the graph with edges ``j -> i`` for
every key ``j <= i`` that is not padding, edge weights the softmax probabilities

.. math::  \\alpha_{ij} = \\mathrm{softmax}_j\\big(s\\, q_i \\cdot k_j + m_{ij}\\big),\\qquad
           h_i = \\sum_{j \\in \\mathcal N(i)} \\alpha_{ij}\\, v_j ,

and report the largest deviation from the model's own output per layer (:func:`attention_as_message_passing`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch_geometric.nn import MessagePassing

from .attention_fn import _attention_implementation, _module_attention_function, _repeat_kv, _unsupported_kwargs, layer_attention_probabilities

logger = logging.getLogger(__name__)

CAPTURE_IMPL = "gin_analysis_capture"
"""Name under which the capturing attention function is registered (temporarily)."""


class AttentionMessagePassing(MessagePassing):
    """Attention as sum aggregation of weighted messages (a GAT layer with given weights).

    .. math:: h_i = \\sum_{(j \\to i) \\in E} \\alpha_{ji}\\, x_j

    ``aggr="add"``, default ``flow="source_to_target"``: messages go from
    ``edge_index[0]`` (key / source token ``j``) to ``edge_index[1]`` (query / target ``i``).

    Shapes:
        x ``(N, F)``, edge_index ``(2, E)``, edge_weight ``(E,)`` -> ``(N, F)``.
    """

    def __init__(self) -> None:
        super().__init__(aggr="add", flow="source_to_target")

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        return self.propagate(edge_index, x=x, edge_weight=edge_weight)

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:  # (E, F)
        return edge_weight.unsqueeze(-1) * x_j


def build_attention_graph(probs: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """One graph per (batch row, head): edges ``j -> i`` for every allowed key ``j`` of query ``i``.

    Node ``(b, h, t)`` has index ``(b * H + h) * T + t``; ``edge_index[0]`` is the key/source
    node, ``edge_index[1]`` the query/target node; the weight is ``probs[b, h, i, j]``.

    Args:
        probs: ``(B, H, T, T)`` (queries and keys are the same ``T`` tokens, no KV cache).
        allowed: bool broadcastable to ``probs``.

    Returns:
        ``edge_index`` long ``(2, E)`` and ``edge_weight`` ``(E,)``.
    """
    b, h, tq, tk = probs.shape
    if tq != tk:
        raise ValueError(f"expected square maps (no KV cache), got Tq={tq}, Tk={tk}")
    bi, hi, qi, kj = allowed.expand_as(probs).nonzero(as_tuple=True)
    base = (bi * h + hi) * tq
    edge_index = torch.stack([base + kj, base + qi])
    return edge_index, probs[bi, hi, qi, kj]


@torch.no_grad()
def attention_as_message_passing(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
) -> list[dict[str, Any]]:
    """Rebuild every self-attention layer's output as PyG message passing on the causal graph.

    One forward pass runs with a capturing attention function that calls the model's
    current implementation (``sdpa``, ``eager``, ...) unchanged and records, per layer,
    ``q (B, H, T, hd)``, ``k, v`` (GQA heads repeated to ``H``), the mask and scale it
    received, and its output ``(B, T, H, hd)`` (what goes into ``o_proj``). Then, per layer,
    :func:`layer_attention_probabilities` gives ``alpha_ij`` from ``q, k``, scale and mask,
    :func:`build_attention_graph` the edges ``j -> i`` (``j <= i``, ``j`` not padding) and
    :class:`AttentionMessagePassing` ``h_i = sum_j alpha_ij v_j``. Queries with no allowed
    key (left-padding positions) have no incoming edge and are left out of the comparison.

    Args:
        model: a Hugging Face causal LM whose attention goes through ``AttentionInterface``
            (Llama, Qwen2/3, Mistral, Gemma, GPT-2, ...).
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)`` with 1 = token, 0 = padding (left or right), or ``None``.

    Returns:
        One dict per layer: ``layer``, ``max_abs_diff`` (max ``|h_mp - h_model|`` over real
        queries, heads and features), ``max_abs_output`` (max ``|h_model|``, for scale),
        ``num_edges`` and ``num_nodes`` of the graph.
    """
    records: list[dict[str, Any]] = []
    previous = model.config._attn_implementation

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        _unsupported_kwargs(kwargs)
        delegate = _module_attention_function(module, previous)
        out, weights = delegate(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        n_rep = query.shape[1] // key.shape[1]
        records.append(
            {
                "layer": getattr(module, "layer_idx", None),
                "query": query.detach(),
                "key": _repeat_kv(key.detach(), n_rep),
                "value": _repeat_kv(value.detach(), n_rep),
                "mask": None if attention_mask is None else attention_mask.detach(),
                "scaling": scaling,
                "softcap": kwargs.get("softcap"),
                "sliding_window": kwargs.get("sliding_window"),
                "output": out.detach(),
            }
        )
        return out, weights

    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    mask_fn = AttentionMaskInterface._global_mapping.get(previous, sdpa_mask)
    with _attention_implementation(model, CAPTURE_IMPL, capture, mask_fn):
        device = next(model.parameters()).device
        model(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            use_cache=False,
        )

    mp = AttentionMessagePassing()
    report: list[dict[str, Any]] = []
    for order, rec in enumerate(records):
        q, v, ref = rec["query"], rec["value"], rec["output"]
        b, h, t, d = v.shape
        probs, allowed = layer_attention_probabilities(
            q, rec["key"], rec["mask"], rec["scaling"], rec["softcap"], rec["sliding_window"]
        )
        edge_index, edge_weight = build_attention_graph(probs, allowed)
        x = v.float().reshape(b * h * t, d)  # node features: value vectors
        out = mp(x, edge_index, edge_weight).view(b, h, t, d).transpose(1, 2)  # (B, T, H, hd)
        real_query = allowed.expand(b, h, t, t).any(dim=-1).transpose(1, 2)  # (B, T, H)
        diff = (out - ref.float()).abs()[real_query]
        report.append(
            {
                "layer": rec["layer"] if rec["layer"] is not None else order,
                "max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
                "max_abs_output": float(ref.float().abs()[real_query].max()) if diff.numel() else 0.0,
                "num_edges": int(edge_index.shape[1]),
                "num_nodes": int(b * h * t),
            }
        )
    logger.info(
        "message passing vs model attention: %d layers, max |diff| = %.3g",
        len(report),
        max((r["max_abs_diff"] for r in report), default=0.0),
    )
    return report
