"""Experiment 2: *run the transformer as a GAT*.

Keep each head's graph but drop edges (top-k per query row, or probabilities below a threshold), renormalise each
row to sum to one, and measure the base model's perplexity against the fraction of causal edges kept
(:func:`gat_sparsity_sweep`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_fn import _attention_implementation, _materialised_bool_mask, _repeat_kv, _unsupported_kwargs, layer_attention_probabilities

logger = logging.getLogger(__name__)

GAT_IMPL = "gin_analysis_gat"
"""Name under which the sparsified (GAT) attention function is registered (temporarily)."""

RULES = ("dense", "topk", "threshold")


def _check_rule(rule: str, param: float | None) -> None:
    """Raise ``ValueError`` for an unknown rule or an out-of-range parameter."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "topk" and (param is None or int(param) != param or int(param) < 1):
        raise ValueError(f"topk needs an integer k >= 1, got {param!r}")
    if rule == "threshold" and (param is None or not 0.0 <= float(param) <= 1.0):
        raise ValueError(f"threshold needs 0 <= t <= 1, got {param!r}")


def sparsify_attention(probs: Tensor, allowed: Tensor, rule: str, param: float | None) -> tuple[Tensor, Tensor]:
    """Restrict each head's attention graph and renormalise each query row.

    * ``dense``: keep every allowed edge.
    * ``topk`` (``param = k``): keep the ``k`` largest ``P[i, j]`` among allowed keys ``j``.
    * ``threshold`` (``param = t``): keep ``P[i, j] >= t`` and always the row maximum,
      so no non-empty row becomes empty.

    Then ``P'[i, j] = P[i, j] * keep[i, j] / sum_j' P[i, j'] * keep[i, j']``.

    Args:
        probs: float ``(B, H, Tq, Tk)`` probabilities (rows of allowed keys sum to 1).
        allowed: bool, broadcastable to ``probs``.
        rule: ``"dense"``, ``"topk"`` or ``"threshold"``.
        param: ``k`` (int >= 1) or ``t`` (in [0, 1]); ignored for ``dense``.

    Returns:
        ``(sparse_probs, keep)`` with ``keep`` bool ``(B, H, Tq, Tk)``.
    """
    _check_rule(rule, param)
    allowed = allowed.expand_as(probs)
    if rule == "dense":
        keep = allowed
    elif rule == "topk":
        k = min(int(param), probs.shape[-1])
        idx = probs.masked_fill(~allowed, -1.0).topk(k, dim=-1).indices
        keep = torch.zeros_like(allowed).scatter_(-1, idx, True) & allowed
    else:  # threshold
        row_max = probs.amax(dim=-1, keepdim=True)
        keep = ((probs >= float(param)) | (probs == row_max)) & allowed
    sparse = probs * keep
    sparse = sparse / sparse.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(sparse.dtype).tiny)
    return sparse, keep


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, eval_batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Perplexity ``exp(sum NLL / number of label tokens)`` over all batches.

    Labels are ``input_ids`` shifted by one; a position counts only when both the context
    token ``t`` and the label token ``t + 1`` are real (``attention_mask == 1``), so padding
    (left or right) never contributes.

    Returns:
        ``{"perplexity", "nll", "tokens"}``.
    """
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for batch in eval_batches:
        ids = batch["input_ids"].to(device)  # (B, T)
        am = batch.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am.to(device)
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits  # (B, T, V)
        valid = (am[:, :-1] > 0) & (am[:, 1:] > 0)  # (B, T-1)
        nll += float(F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid], reduction="sum"))
        tokens += int(valid.sum())
    if tokens == 0:
        raise ValueError("no label tokens in eval_batches")
    return {"perplexity": math.exp(nll / tokens), "nll": nll, "tokens": tokens}


def _sparse_attention_function(
    rule: str, param: float | None, stats: dict[int, list[float]]
) -> Callable[..., tuple[Tensor, None]]:
    """Attention function ``P' V`` with ``P'`` from :func:`sparsify_attention`.

    Appends ``kept / allowed`` edges (over heads and batch rows) of each call to
    ``stats[layer_idx]``.
    """
    counter = {"calls": 0}

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        _unsupported_kwargs(kwargs)
        probs, allowed = layer_attention_probabilities(
            query, key, attention_mask, scaling, kwargs.get("softcap"), kwargs.get("sliding_window")
        )
        sparse, keep = sparsify_attention(probs, allowed, rule, param)
        n_allowed = int(allowed.expand_as(probs).sum())
        layer = getattr(module, "layer_idx", None)
        layer = counter["calls"] if layer is None else layer
        counter["calls"] += 1
        if n_allowed:
            stats.setdefault(layer, []).append(int(keep.sum()) / n_allowed)
        v = _repeat_kv(value, query.shape[1] // value.shape[1])
        out = torch.matmul(sparse, v.float()).to(value.dtype)  # (B, H, Tq, hd)
        return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, hd)

    return attend


@torch.no_grad()
def gat_sparsity_sweep(
    model: torch.nn.Module,
    eval_batches: Iterable[dict[str, Tensor]],
    rules: Sequence[tuple[str, float]],
    include_dense: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity of the base model when every head attends only over its sparsified graph.

    For each setting, every attention layer computes ``P = softmax(s q k^T + mask)`` per head,
    applies :func:`sparsify_attention` (top-k per row or threshold, then row renormalisation)
    and returns ``P' V``; the model is then evaluated with :func:`evaluate_perplexity`.

    Args:
        model: a Hugging Face causal LM using ``AttentionInterface``.
        eval_batches: dicts with ``input_ids`` ``(B, T)`` and ``attention_mask`` ``(B, T)``;
            materialised once and reused for every setting.
        rules: ``[("topk", k), ("threshold", t), ...]``.
        include_dense: prepend the dense baseline (rule ``"dense"``, param ``None``) unless
            ``rules`` already has one.

    Returns:
        One dict per setting: ``rule``, ``param``, ``perplexity``, ``nll``, ``tokens``,
        ``edge_fraction`` (kept / allowed causal edges, mean over layers and batches; each
        (layer, batch) ratio pools heads, which equals the mean over heads) and
        ``edge_fraction_per_layer``.
    """
    batches = list(eval_batches)
    settings: list[tuple[str, float | None]] = [(str(r), None if r == "dense" else float(p)) for r, p in rules]
    for rule, param in settings:
        _check_rule(rule, param)  # fail before any forward pass
    if include_dense and not any(r == "dense" for r, _ in settings):
        settings.insert(0, ("dense", None))

    results: list[dict[str, Any]] = []
    for rule, param in settings:
        stats: dict[int, list[float]] = {}
        fn = _sparse_attention_function(rule, param, stats)
        with _attention_implementation(model, GAT_IMPL, fn, _materialised_bool_mask):
            ppl = evaluate_perplexity(model, batches)
        per_layer = [sum(v) / len(v) for _, v in sorted(stats.items())]
        results.append(
            {
                "rule": rule,
                "param": None if param is None else (int(param) if rule == "topk" else param),
                **ppl,
                "edge_fraction": sum(per_layer) / len(per_layer) if per_layer else float("nan"),
                "edge_fraction_per_layer": per_layer,
            }
        )
        logger.info(
            "%-9s %-6s edges kept %.4f  perplexity %.4f",
            rule, "" if param is None else f"{param:g}", results[-1]["edge_fraction"], ppl["perplexity"],
        )
    return results
