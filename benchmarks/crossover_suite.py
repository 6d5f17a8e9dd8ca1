"""The ``crossover`` suite: the GIN neighbour sum from a given graph, dense (masked matmul) vs torch_geometric
message passing vs a gather over top-k indices, over sequence length and neighbours per token; and the whole
per-head computation (scores, top-k, sum) of the generic chain vs the fused kernel's two sum modes.
Writes ``crossover.png``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import interleaved_times, median
from gin_adapter import GinConfig
from gin_adapter.adjacency import AdjacencyRule
from gin_adapter.chunk_sums import gather_rows
from gin_adapter.topk_sum import topk_neighbour_sum

logger = logging.getLogger("benchmarks")


def random_topk_graph(heads: int, length: int, k: int, dim: int, seed: int = 0):
    """A causal graph with (up to) ``k`` random keys per query and node features.

    Returns ``adjacency (1, H, L, L)`` (duplicate picks summed), ``index``/``weights (1, H, L, k)`` (the same
    graph as a top-k list) and ``x (1, H, L, D)``.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(length).view(1, 1, length, 1)
    index = (torch.rand(1, heads, length, k, generator=generator) * (rows + 1)).long()  # keys 0..i
    weights = torch.rand(1, heads, length, k, generator=generator)
    adjacency = torch.zeros(1, heads, length, length).scatter_add_(-1, index, weights)
    x = torch.randn(1, heads, length, dim, generator=generator)
    return adjacency, index, weights, x


def crossover_memory_gb(heads: int, length: int, k: int, dim: int) -> dict[str, float]:
    """Rough peak bytes per backend (GB), the dense adjacency input included in all."""
    dense_adj = heads * length * length * 4
    edges = heads * length * min(k, length)
    return {
        "dense": (dense_adj + 2 * heads * length * dim * 4) / 1e9,
        "pyg": (dense_adj + heads * length * length + edges * (4 * 8 + 2 * 8 + 4) + 2 * edges * dim * 4) / 1e9,
        "gather": (dense_adj + edges * 8 + 2 * edges * dim * 4) / 1e9,
        "full": (4 * heads * length * length * 4) / 1e9,
    }


def _time_calls(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, float]:
    if not fns:
        return {}
    times = interleaved_times(fns, warmup, reps, lambda: None, what="crossover", collect=False)
    return {name: median(t) for name, t in times.items()}


def run_crossover(args: argparse.Namespace) -> list[dict[str, Any]]:
    from gin_adapter.aggregate import neighbour_sums
    from gin_adapter.gin import _PYG_SUM, adjacency_to_edges, neighbour_sum_dense, neighbour_sum_pyg

    heads, dim = args.crossover_heads, args.crossover_dim
    rows = []
    slow: set[tuple[str, int]] = set()  # (backend, k) that blew the time budget at a shorter length (skip longer ones)
    for length in args.crossover_lens:
        for k in args.crossover_topk:
            if k >= length:
                continue
            budget = crossover_memory_gb(heads, length, k, dim)
            row: dict[str, Any] = dict(seq_len=length, top_k=k, heads=heads, dim=dim, skipped={})
            if budget["dense"] > args.mem_budget_gb:
                row["skipped"]["all"] = f"dense adjacency needs ~{budget['dense']:.1f} GB > {args.mem_budget_gb} GB"
                rows.append(row)
                continue
            adjacency, index, weights, x = random_topk_graph(heads, length, k, dim, seed=args.seed)
            row["edges"] = int((adjacency != 0).sum())
            edge_index, edge_weight = adjacency_to_edges(adjacency, heads)
            flat_x = x.reshape(-1, dim)
            size = (heads * length, heads * length)
            fns: dict[str, Callable[[], Any]] = {"dense": lambda: neighbour_sum_dense(adjacency, x)}
            candidates = {
                "pyg": lambda: neighbour_sum_pyg(adjacency, x),
                "pyg_propagate": lambda: _PYG_SUM(flat_x, edge_index, edge_weight, size=size),
                "gather": lambda: (weights.unsqueeze(-1) * gather_rows(x, index)).sum(-2),
            }
            for name, fn in candidates.items():
                need = budget["gather" if name == "gather" else "pyg"]
                if need > args.mem_budget_gb:
                    row["skipped"][name] = f"needs ~{need:.1f} GB > {args.mem_budget_gb} GB"
                elif (name, k) in slow:
                    row["skipped"][name] = f"slower than {args.time_budget_s} s per call at a shorter length"
                else:
                    fns[name] = fn
            # one correctness check per cell
            reference = neighbour_sum_dense(adjacency, x)
            row["allclose"] = {name: bool(torch.allclose(fn().reshape(reference.shape), reference, atol=1e-4, rtol=1e-4)) for name, fn in fns.items() if name != "dense"}
            reps = args.crossover_reps
            single = {}
            for name, fn in fns.items():  # one untimed call each doubles as warm-up and budget probe
                start = time.perf_counter()
                fn()
                single[name] = time.perf_counter() - start
            if max(single.values()) > 1.0:
                reps = max(1, min(reps, 2))
            timed = _time_calls(fns, reps, warmup=0)
            row.update({f"{name}_ms": 1000 * t for name, t in timed.items()})
            for name, t in single.items():
                if t > args.time_budget_s:
                    slow.add((name, k))
            # the whole neighbour_sums (probabilities + top-k + sum), per backend, forward
            if length <= args.crossover_full_max_len and budget["full"] <= args.mem_budget_gb:
                generator = torch.Generator().manual_seed(args.seed)
                q, key, v = (torch.randn(1, heads, length, dim, generator=generator) for _ in range(3))
                full = {}
                for backend in ("dense", "pyg"):
                    rule = AdjacencyRule.from_config(GinConfig(top_k=k, backend=backend))
                    full[f"full_{backend}"] = lambda rule=rule: neighbour_sums(q, key, v, None, rule, dim**-0.5)
                for mode in ("dense", "gather"):
                    full[f"full_fused_{mode}"] = lambda mode=mode: topk_neighbour_sum(q, key, v, None, top_k=k, scaling=dim**-0.5, sum_mode=mode)
                with torch.no_grad():
                    timed = _time_calls(full, reps, warmup=1)
                row.update({f"{name}_ms": 1000 * t for name, t in timed.items()})
            times = {n: row[f"{n}_ms"] for n in ("dense", "pyg") if f"{n}_ms" in row}
            row["faster_core_backend"] = min(times, key=times.get) if times else None
            logger.info("crossover L=%5d k=%3d edges=%9d  %s", length, k, row["edges"], "  ".join(f"{n}={row[f'{n}_ms']:.1f}ms" for n in ("dense", "pyg", "pyg_propagate", "gather") if f"{n}_ms" in row))
            rows.append(row)
            del adjacency, index, weights, x, edge_index, edge_weight, fns, candidates
            gc.collect()
    return rows


def plot_crossover(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["top_k"] for r in rows})
    colors = dict(zip(ks, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    _plot_panel(axes[0], rows, ks, colors, {"dense": "-", "pyg": "--", "pyg_propagate": ":", "gather": "-."},
                "GIN neighbour sum from a given graph (H=9, D=64)")
    _plot_panel(axes[1], rows, ks, colors, {"full_dense": "-", "full_pyg": "--", "full_fused_dense": "-.", "full_fused_gather": ":"},
                "whole per-head computation: generic chain (dense, pyg) vs fused kernel")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_panel(ax: Any, rows: list[dict[str, Any]], ks: list[int], colors: dict[int, str], styles: dict[str, str], title: str) -> None:
    """Forward time against length, one line per (``<name>_ms`` column, k); labels drop the ``full_`` prefix."""
    for k in ks:
        cells = sorted((r for r in rows if r["top_k"] == k), key=lambda r: r["seq_len"])
        for backend, style in styles.items():
            points = [(r["seq_len"], r[f"{backend}_ms"]) for r in cells if f"{backend}_ms" in r]
            if points:
                ax.plot(*zip(*points), style, color=colors[k], marker="o", markersize=3, label=f"{backend.removeprefix('full_')}, k={k}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward time (ms)", title=title)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
