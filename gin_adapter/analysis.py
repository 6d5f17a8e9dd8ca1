"""Two experiments on "transformers are graph neural networks", plus run plots.

1. :func:`attention_as_message_passing` -- *attention is message passing on the
   complete (causal) graph* (Joshi 2020/2025). For every self-attention layer of
   a Hugging Face causal LM, capture ``q, k, v`` exactly as the model computes
   them (after RoPE, GQA heads repeated) and the layer's own attention output
   before ``o_proj``; rebuild the output with a torch_geometric
   :class:`~torch_geometric.nn.MessagePassing` layer on the graph with edges
   ``j -> i`` for every key ``j <= i`` that is not padding, edge weights the
   softmax probabilities

   .. math::  \\alpha_{ij} = \\mathrm{softmax}_j\\big(s\\, q_i \\cdot k_j + m_{ij}\\big),\\qquad
              h_i = \\sum_{j \\in \\mathcal N(i)} \\alpha_{ij}\\, v_j ,

   and report the largest deviation from the model's own output per layer.

2. :func:`gat_sparsity_sweep` -- *run the transformer as a GAT*: keep each
   head's graph but drop edges (top-k per query row, or probabilities below a
   threshold), renormalise each row to sum to one, and measure the base model's
   perplexity against the fraction of causal edges kept.

3. :func:`plot_run` -- ``curves.png`` and ``scales.png`` from a training run's
   ``results.json``.

Both experiments swap in a custom attention function through
``transformers.AttentionInterface`` (and the matching
``AttentionMaskInterface`` entry, without which transformers builds no mask at
all), switch the model to it with ``model.set_attn_implementation`` and always
restore the previous implementation.

CLI::

    python -m gin_adapter.analysis message-passing --model embedded --text "The cat sat on the mat."
    python -m gin_adapter.analysis gat-sparsity --model embedded --out runs/sparsity \\
        --topk 1,2,4,8,16,32 --thresholds 0.01,0.05,0.1,0.3 --max-tokens 2048
    python -m gin_adapter.analysis plots runs/my_run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MessagePassing

from gin_adapter.adjacency import attention_probabilities as adjacency_probabilities
from gin_adapter.adjacency import visible_keys

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionMessagePassing",
    "layer_attention_probabilities",
    "build_attention_graph",
    "sparsify_attention",
    "attention_as_message_passing",
    "gat_sparsity_sweep",
    "evaluate_perplexity",
    "plot_run",
    "main",
]

CAPTURE_IMPL = "gin_analysis_capture"
"""Name under which the capturing attention function is registered (temporarily)."""
GAT_IMPL = "gin_analysis_gat"
"""Name under which the sparsified (GAT) attention function is registered (temporarily)."""
RULES = ("dense", "topk", "threshold")


# --------------------------------------------------------------------------- attention maths


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``(B, KV, T, hd) -> (B, KV * n_rep, T, hd)``, head ``h`` uses KV head ``h // n_rep`` (as HF)."""
    if n_rep == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


def layer_attention_probabilities(
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The softmax probabilities a causal LM's attention function computes from what it receives.

    .. math:: P_{bhij} = \\mathrm{softmax}_{j \\in V(i)}\\big(\\mathrm{cap}(s\\, q_{bhi} \\cdot k_{bhj})\\big)

    ``V(i)`` are the visible keys (:func:`gin_adapter.adjacency.visible_keys`: the bool
    mask, an additive mask's non-masked entries, or plain causality when the mask is ``None``).
    Rows with no visible key (left-padding queries) are all zeros, as PyTorch's SDPA returns.
    Additive masks are read as 0 / masked, which is what transformers builds for causal LMs.

    Args:
        query: ``(B, H, Tq, hd)``.
        key: ``(B, KV, Tk, hd)``; KV heads are repeated to ``H`` (GQA).
        attention_mask: bool ``(B, 1, Tq, Tk)`` (True = attend), additive float mask, or ``None``.
        scaling: ``s``; ``None`` means ``hd ** -0.5`` (as SDPA).
        softcap: optional logit soft-capping ``c * tanh(x / c)`` (Gemma 2).
        sliding_window: window of a sliding-window layer, used only when the mask is ``None``.

    Returns:
        ``probs`` float32 ``(B, H, Tq, Tk)`` and ``visible`` bool broadcastable to it.
    """
    key = _repeat_kv(key, query.shape[1] // key.shape[1])
    visible = visible_keys(attention_mask, query.shape[2], key.shape[2], query.device, sliding_window)
    s = query.shape[-1] ** -0.5 if scaling is None else scaling
    return adjacency_probabilities(query, key, visible, s, softcap), visible


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


# --------------------------------------------------------------------------- message passing


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


def _module_attention_function(module: torch.nn.Module, implementation: str | None) -> Callable[..., Any]:
    """The attention function ``module`` would call for ``implementation``, looked up as its
    modelling file does: that file's ``ALL_ATTENTION_FUNCTIONS`` (which may hold local
    overrides) and its own ``eager_attention_forward`` (Llama's as a fallback) for eager."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    source = sys.modules.get(type(module).__module__)
    eager = getattr(source, "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    if implementation in (None, "eager"):
        return eager
    interface = getattr(source, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    if not isinstance(interface, AttentionInterface):  # pragma: no cover - unusual modelling file
        interface = ALL_ATTENTION_FUNCTIONS
    return interface.get_interface(implementation, eager)


@contextlib.contextmanager
def _attention_implementation(
    model: torch.nn.Module, name: str, attn_fn: Callable[..., Any], mask_fn: Callable[..., Any]
) -> Iterator[str]:
    """Register ``attn_fn``/``mask_fn`` under ``name``, switch ``model`` to it, restore afterwards.

    Yields the previous implementation name. The model is put in eval mode inside and its
    training flag restored; the registrations are removed on exit.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    previous = model.config._attn_implementation
    was_training = model.training
    AttentionInterface.register(name, attn_fn)
    AttentionMaskInterface.register(name, mask_fn)
    try:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise RuntimeError(
                f"{type(model).__name__} cannot switch its attention implementation "
                f"(still {model.config._attn_implementation!r}); it does not use AttentionInterface"
            )
        model.eval()
        yield previous
    finally:
        model.set_attn_implementation(previous)
        model.train(was_training)
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def _materialised_bool_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """``sdpa_mask`` that always builds the bool ``(B, 1, Tq, Tk)`` mask (no ``is_causal`` skip)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _unsupported_kwargs(kwargs: dict[str, Any]) -> None:
    """Attention sinks and position biases change the softmax; neither experiment models them."""
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention with {name!r} is not supported by gin_adapter.analysis")


# --------------------------------------------------------------------------- experiment 1


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


# --------------------------------------------------------------------------- experiment 2


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


# --------------------------------------------------------------------------- run plots


def plot_run(results_dir: str | Path) -> list[Path]:
    """Write ``curves.png`` and ``scales.png`` (and ``sparsity.png`` if ``sparsity.json`` exists).

    ``results_dir/results.json`` has ``"curves"`` (input of
    :func:`gin_adapter.plotting.plot_training_curves`) and ``"scale_history"`` (input of
    :func:`gin_adapter.plotting.plot_scales`); a missing or empty key is skipped.

    Returns:
        The paths written.
    """
    from gin_adapter import plotting

    results_dir = Path(results_dir)
    written: list[Path] = []
    results_file = results_dir / "results.json"
    if results_file.is_file():
        data = json.loads(results_file.read_text(encoding="utf-8"))
        if data.get("curves"):
            written.append(plotting.plot_training_curves(data["curves"], results_dir / "curves.png"))
        if data.get("scale_history"):
            written.append(plotting.plot_scales(data["scale_history"], results_dir / "scales.png"))
    sparsity_file = results_dir / "sparsity.json"
    if sparsity_file.is_file():
        data = json.loads(sparsity_file.read_text(encoding="utf-8"))
        written.append(plotting.plot_sparsity_curve(data["results"], results_dir / "sparsity.png"))
    if not written:
        raise FileNotFoundError(f"nothing to plot in {results_dir} (no results.json or sparsity.json)")
    return written


# --------------------------------------------------------------------------- CLI


def _load(model_name: str, device: str, dtype: str) -> tuple[Any, Any]:
    """Model (eval, sdpa) and tokenizer from a local folder, a Hub id or an embedded alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from gin_adapter.embedded import resolve_model_path
    except ImportError:  # pragma: no cover - embedded.py is part of the package
        resolve_model_path = str
    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _parse_list(text: str, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def _eval_batches(
    tokenizer: Any, texts: Iterable[str], max_tokens: int, block_size: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """Concatenate texts (EOS between them), cut at ``max_tokens``, split into blocks and batches."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    blocks = [blk for blk in blocks if len(blk) >= 2]
    batches: list[dict[str, Tensor]] = []
    full = [blk for blk in blocks if len(blk) == block_size]
    rest = [blk for blk in blocks if len(blk) != block_size]
    for i in range(0, len(full), batch_size):
        x = torch.tensor(full[i : i + batch_size])
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    for blk in rest:
        x = torch.tensor([blk])
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    return batches


def _cmd_message_passing(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model, args.device, args.dtype)
    enc = tokenizer(args.text, return_tensors="pt")
    report = attention_as_message_passing(model, enc["input_ids"], enc.get("attention_mask"))
    print(f"{'layer':>5}  {'max |diff|':>11}  {'max |out|':>10}  {'edges':>7}")
    for r in report:
        print(f"{r['layer']:>5}  {r['max_abs_diff']:>11.3e}  {r['max_abs_output']:>10.3e}  {r['num_edges']:>7}")
    worst = max(r["max_abs_diff"] for r in report)
    print(f"tokens: {enc['input_ids'].shape[1]}  layers: {len(report)}  worst max |diff|: {worst:.3e}")
    return 0


def _cmd_gat_sparsity(args: argparse.Namespace) -> int:
    from gin_adapter import plotting

    model, tokenizer = _load(args.model, args.device, args.dtype)
    if args.text_file:
        texts: list[str] = [Path(args.text_file).read_text(encoding="utf-8")]
    else:
        from gin_adapter.embedded import load_wiki_articles

        texts = [f"{title}\n{extract}" for title, extract in load_wiki_articles()]
    batches = _eval_batches(tokenizer, texts, args.max_tokens, args.block_size, args.batch_size)
    rules = [("topk", float(k)) for k in _parse_list(args.topk, int)]
    rules += [("threshold", t) for t in _parse_list(args.thresholds, float)]
    results = gat_sparsity_sweep(model, batches, rules)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": args.model,
        "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "block_size": args.block_size,
        "results": results,
    }
    (out / "sparsity.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    png = plotting.plot_sparsity_curve(results, out / "sparsity.png")
    print(f"{'rule':>9}  {'param':>6}  {'edges kept':>10}  {'perplexity':>10}")
    for r in results:
        param = "" if r["param"] is None else f"{r['param']:g}"
        print(f"{r['rule']:>9}  {param:>6}  {r['edge_fraction']:>10.4f}  {r['perplexity']:>10.4f}")
    print(f"wrote {out / 'sparsity.json'} and {png}")
    return 0


def _cmd_plots(args: argparse.Namespace) -> int:
    for path in plot_run(args.results_dir):
        print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gin-analysis", description="Attention-as-message-passing experiments and run plots."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="embedded", help="local folder, Hub id, or 'embedded' (SmolLM2-135M)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    mp = sub.add_parser("message-passing", help="rebuild each layer's attention as PyG message passing")
    model_args(mp)
    mp.add_argument("--text", default="Graphs are everywhere: attention is message passing on a complete graph.")
    mp.set_defaults(func=_cmd_message_passing)

    gs = sub.add_parser("gat-sparsity", help="perplexity with sparsified per-head attention graphs")
    model_args(gs)
    gs.add_argument("--out", required=True, help="output folder for sparsity.json and sparsity.png")
    gs.add_argument("--topk", default="1,2,4,8,16,32", help="comma-separated k values")
    gs.add_argument("--thresholds", default="0.01,0.05,0.1,0.3", help="comma-separated thresholds")
    gs.add_argument("--max-tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    gs.add_argument("--block-size", type=int, default=256, help="tokens per sequence (default 256)")
    gs.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    gs.add_argument("--text-file", default=None, help="evaluate on this text instead of the embedded Wikipedia intros")
    gs.set_defaults(func=_cmd_gat_sparsity)

    pl = sub.add_parser("plots", help="curves.png and scales.png from a run's results.json")
    pl.add_argument("results_dir")
    pl.set_defaults(func=_cmd_plots)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gin-analysis`` / ``python -m gin_adapter.analysis``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
