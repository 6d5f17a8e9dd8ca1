"""PNG figures for training runs and attention-graph analyses.

Every function draws on a fresh :class:`matplotlib.figure.Figure` attached to an
Agg canvas (no ``pyplot`` global state, so importing this module never switches
the backend of a notebook), writes the PNG to a temporary file next to the
target and moves it into place with :func:`os.replace`: a reader never sees a
half-written file. Parent folders are created. Each function returns the
:class:`pathlib.Path` it wrote.

Functions and their inputs:

* :func:`plot_training_curves` -- ``curves[run]["train_loss" | "val_ppl"] = [(step, value), ...]``
* :func:`plot_scales` -- ``scale_history[run] = [(step, [lambda_0, ..., lambda_{L-1}]), ...]``
  (Buehler 2025, Figs. 10/11: learnable GIN scale per layer)
* :func:`plot_adjacency` -- attention probabilities and sparse adjacency, ``(H, T, T)`` or ``(T, T)``
* :func:`plot_causal_graph` -- one ``(T, T)`` adjacency drawn as a directed token graph (key j -> query i)
* :func:`plot_sparsity_curve` -- perplexity against the fraction of attention edges kept
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import cm, colors

from .canvas import _as_heads, _clean_token, _new_figure, _token_fontsize, _unzip, save_figure

__all__ = [
    "plot_training_curves",
    "plot_scales",
    "plot_adjacency",
    "plot_causal_graph",
    "plot_sparsity_curve",
    "save_figure",
]


# --------------------------------------------------------------------------- training


def plot_training_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | os.PathLike[str]
) -> Path:
    """Training loss and validation perplexity against optimiser step, one line per run.

    Args:
        curves: ``curves[run_name]`` has ``"train_loss"`` and ``"val_ppl"``, each a list of
            ``(step, value)`` pairs; a missing key is skipped for that run.
        path: PNG file to write.

    Returns:
        ``Path(path)``.
    """
    fig = _new_figure(11.0, 4.2)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    for run, series in curves.items():
        steps, loss = _unzip(series.get("train_loss", []))
        if steps:
            ax_loss.plot(steps, loss, label=run, linewidth=1.2)
        steps, ppl = _unzip(series.get("val_ppl", []))
        if steps:
            ax_ppl.plot(steps, ppl, marker="o", markersize=3, label=run, linewidth=1.4)
    ax_loss.set_title("Training loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy (nats / token)")
    ax_ppl.set_title("Validation perplexity")
    ax_ppl.set_xlabel("optimizer step")
    ax_ppl.set_ylabel("perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_scales(
    scale_history: dict[str, list[tuple[int, list[float]]]], path: str | os.PathLike[str]
) -> Path:
    """Learnable per-layer GIN scales ``lambda_k`` (Buehler 2025, Figs. 10/11).

    Panel A: ``lambda_k`` at the last recorded step against layer index ``k`` (one line per run,
    bars when there is a single run). Panels B (one per run): ``lambda_k`` against training
    step, one line per layer, coloured by ``k`` (viridis) with a colorbar.

    Args:
        scale_history: ``scale_history[run] = [(step, [lambda_0, ..., lambda_{L-1}]), ...]``.
        path: PNG file to write.

    Returns:
        ``Path(path)``.
    """
    runs = [(name, hist) for name, hist in scale_history.items() if hist]
    n_b = max(len(runs), 1)
    fig = _new_figure(5.0 + 5.0 * n_b, 4.2)
    axes = fig.subplots(1, 1 + n_b, squeeze=False)[0]
    ax_a = axes[0]

    for name, hist in runs:
        final_step, final = hist[-1]
        layers = np.arange(len(final))
        if len(runs) == 1:
            ax_a.bar(layers, final, color=cm.viridis(layers / max(len(final) - 1, 1)), label=name)
        else:
            ax_a.plot(layers, final, marker="o", markersize=3, label=f"{name} (step {final_step})")
    ax_a.set_title("A  scale per layer, end of training")
    ax_a.set_xlabel("layer index k")
    ax_a.set_ylabel(r"scale $\lambda_k$")
    ax_a.grid(alpha=0.3)
    if runs:
        ax_a.legend(fontsize=8)
    else:
        ax_a.text(0.5, 0.5, "no scale history", ha="center", va="center", transform=ax_a.transAxes)

    for ax, (name, hist) in zip(axes[1:], runs):
        steps = np.array([s for s, _ in hist])
        values = np.array([v for _, v in hist], dtype=np.float64)  # (n_steps, L)
        n_layers = values.shape[1]
        norm = colors.Normalize(vmin=0, vmax=max(n_layers - 1, 1))
        for k in range(n_layers):
            ax.plot(steps, values[:, k], color=cm.viridis(norm(k)), linewidth=1.0)
        mappable = cm.ScalarMappable(norm=norm, cmap="viridis")
        fig.colorbar(mappable, ax=ax, label="layer index k")
        ax.set_title(f"B  scale per layer over training: {name}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(r"scale $\lambda_k$")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- attention graphs


def plot_adjacency(
    attention: Any,
    adjacency: Any,
    tokens: list[str],
    path: str | os.PathLike[str],
    heads: list[int] | None = None,
    title: str = "",
) -> Path:
    """Attention probabilities (row 1) and the sparse adjacency derived from them (row 2).

    One column per selected head; rows of each map are queries ``i``, columns keys ``j``
    (causal maps are lower-triangular). A ``(T, T)`` adjacency (reduced over heads) is shown
    under every column. Token labels run along every x axis and the first column's y axis
    (all panels share the same tokens); one colour scale per row. Zero adjacency entries
    (dropped edges) are drawn in light grey.

    Args:
        attention: probabilities ``P[h, i, j]``, shape ``(H, T, T)`` or ``(T, T)`` (tensor or array).
        adjacency: ``A[h, i, j]``, shape ``(H, T, T)`` or ``(T, T)``.
        tokens: ``T`` token strings, used as tick labels on both axes.
        path: PNG file to write.
        heads: head indices to show; ``None`` shows every head.
        title: figure title.

    Returns:
        ``Path(path)``.
    """
    att = _as_heads(attention, "attention")
    adj = _as_heads(adjacency, "adjacency")
    n_tok = att.shape[-1]
    if adj.shape[-1] != n_tok:
        raise ValueError(f"attention has T={n_tok} but adjacency has T={adj.shape[-1]}")
    if adj.shape[0] not in (1, att.shape[0]):
        raise ValueError(f"adjacency has {adj.shape[0]} heads, attention {att.shape[0]} (expected 1 or equal)")
    if len(tokens) != n_tok:
        raise ValueError(f"got {len(tokens)} tokens for maps with T={n_tok}")
    heads = list(range(att.shape[0])) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < att.shape[0]:
            raise ValueError(f"head {h} out of range for {att.shape[0]} heads")

    labels = [_clean_token(t) for t in tokens]
    size = min(max(2.4, 0.22 * n_tok), 6.0)
    fig = _new_figure(size * len(heads) + 1.6, 2 * size + 1.0)
    axes = fig.subplots(2, len(heads), squeeze=False)
    fs = _token_fontsize(n_tok)
    rows = (
        ("attention", "viridis", [att[h] for h in heads]),
        ("adjacency", "magma", [adj[h] if adj.shape[0] > 1 else adj[0] for h in heads]),
    )
    for row, (name, cmap, mats) in enumerate(rows):
        vmax = max(max(float(m.max()) for m in mats), 1e-12)  # one colour scale per row
        for col, (h, mat) in enumerate(zip(heads, mats)):
            ax = axes[row, col]
            shown = np.where(mat > 0, mat, np.nan) if name == "adjacency" else mat
            im = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=vmax)
            ax.set_facecolor("#f2f2f2")
            ax.set_xticks(range(n_tok), labels, rotation=90, fontsize=fs)
            ax.set_yticks(range(n_tok), labels if col == 0 else [], fontsize=fs)
            suffix = f" ({int((mat > 0).sum())} edges)" if name == "adjacency" else ""
            ax.set_title(f"head {h}: {name}{suffix}", fontsize=9)
            if row == 1:
                ax.set_xlabel("key j (source)", fontsize=8)
            if col == 0:
                ax.set_ylabel("query i (target)", fontsize=8)
        fig.colorbar(im, ax=list(axes[row]), shrink=0.8, label=name)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_causal_graph(
    adjacency: Any,
    tokens: list[str],
    path: str | os.PathLike[str],
    title: str = "",
    min_weight: float = 0.0,
) -> Path:
    """Draw a causal adjacency as a directed token graph.

    Nodes are the ``T`` tokens placed left to right on an upper arc; for every
    ``A[i, j] > min_weight`` with ``j < i`` an arrow goes from key ``j`` to query ``i``
    (the direction messages flow). Edge width and opacity grow with ``A[i, j] / max A``.
    Self-loops (``i == j``) are omitted from the drawing, which the title states.

    Args:
        adjacency: ``(T, T)`` weights (a leading head/batch dim of size 1 is dropped).
        tokens: ``T`` token strings (node labels).
        path: PNG file to write.
        title: figure title (a note on omitted self-loops is appended).
        min_weight: edges with weight ``<= min_weight`` are not drawn.

    Returns:
        ``Path(path)``.
    """
    import networkx as nx

    adj = _as_heads(adjacency, "adjacency")
    if adj.shape[0] != 1:
        raise ValueError(f"plot_causal_graph takes one (T, T) adjacency, got {adj.shape[0]} heads")
    adj = adj[0]
    n_tok = adj.shape[0]
    if len(tokens) != n_tok:
        raise ValueError(f"got {len(tokens)} tokens for an adjacency with T={n_tok}")

    graph = nx.DiGraph()
    graph.add_nodes_from(range(n_tok))
    ii, jj = np.nonzero(np.tril(adj, k=-1) > min_weight)  # query i, key j < i
    weights = adj[ii, jj]
    graph.add_edges_from((int(j), int(i)) for i, j in zip(ii, jj))
    n_self = int((np.diag(adj) > min_weight).sum())

    theta = np.linspace(math.pi * 0.95, math.pi * 0.05, n_tok) if n_tok > 1 else np.array([math.pi / 2])
    pos = {k: (math.cos(t), 0.6 * math.sin(t)) for k, t in enumerate(theta)}

    fig = _new_figure(max(6.0, 0.45 * n_tok), 4.5)
    ax = fig.subplots()
    if len(weights):
        rel = weights / weights.max()
        edge_colors = [(0.12, 0.33, 0.65, float(0.15 + 0.85 * r)) for r in rel]
        nx.draw_networkx_edges(
            graph,
            pos,
            edgelist=[(int(j), int(i)) for i, j in zip(ii, jj)],
            width=list(0.3 + 3.0 * rel),
            edge_color=edge_colors,
            arrows=True,
            arrowsize=8,
            connectionstyle="arc3,rad=0.25",
            node_size=300,
            ax=ax,
        )
    nx.draw_networkx_nodes(graph, pos, node_size=300, node_color="#f5d76e", edgecolors="#555555", ax=ax)
    nx.draw_networkx_labels(
        graph,
        pos,
        labels={k: _clean_token(t) for k, t in enumerate(tokens)},
        font_size=_token_fontsize(n_tok) + 1,
        ax=ax,
    )
    note = f"{len(weights)} edges key j -> query i; {n_self} self-loops omitted from drawing"
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=10)
    ax.set_axis_off()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- sparsity


def plot_sparsity_curve(results: list[dict], path: str | os.PathLike[str]) -> Path:
    """Perplexity against the fraction of causal attention edges kept, one line per rule.

    Args:
        results: items with ``"edge_fraction"``, ``"perplexity"``, ``"rule"`` (``"topk"``,
            ``"threshold"``, ...) and ``"param"`` (k or t). Items with rule ``"dense"`` are
            drawn as a dashed horizontal baseline.
        path: PNG file to write.

    Returns:
        ``Path(path)``.
    """
    fig = _new_figure(7.0, 4.6)
    ax = fig.subplots()
    by_rule: dict[str, list[dict]] = {}
    for r in results:
        by_rule.setdefault(str(r["rule"]), []).append(r)
    markers = {"topk": "o", "threshold": "s"}
    all_ppl = [float(r["perplexity"]) for r in results if math.isfinite(float(r["perplexity"]))]
    for rule, items in by_rule.items():
        if rule == "dense":
            continue
        items = sorted(items, key=lambda r: float(r["edge_fraction"]))
        x = [float(r["edge_fraction"]) for r in items]
        y = [float(r["perplexity"]) for r in items]
        ax.plot(x, y, marker=markers.get(rule, "^"), label=rule)
        prefix = "k=" if rule == "topk" else "t=" if rule == "threshold" else ""
        for xi, yi, r in zip(x, y, items):
            ax.annotate(f"{prefix}{r['param']:g}" if r.get("param") is not None else "",
                        (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for r in by_rule.get("dense", []):
        ax.axhline(float(r["perplexity"]), linestyle="--", color="black", linewidth=1.0,
                   label=f"dense ({float(r['perplexity']):.2f})")
    ax.set_xscale("log")
    if all_ppl and max(all_ppl) / max(min(all_ppl), 1e-12) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("fraction of causal attention edges kept")
    ax.set_ylabel("perplexity")
    ax.set_title("Transformer run as a GAT on sparsified attention graphs")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, path)
