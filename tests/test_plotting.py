"""Tests for gin_adapter.analysis.plotting: every function writes a complete, non-trivial PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from gin_adapter.analysis import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, expected, min_bytes: int = 8_000) -> tuple[int, int]:
    """Check path, magic bytes, size, no temp file left; return (height, width) in pixels."""
    assert path == expected
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    height, width = mpimg.imread(path).shape[:2]
    return height, width


def _causal_probs(heads: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(heads, t, t, generator=g) * 2
    logits = logits.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return torch.softmax(logits, -1)


def test_plot_training_curves(tmp_path) -> None:
    curves = {
        "gin": {"train_loss": [(s, 3.0 * 0.97**s) for s in range(50)], "val_ppl": [(s, 16.4 - 0.05 * s) for s in range(0, 50, 10)]},
        "lora": {"train_loss": [(s, 3.0 * 0.975**s) for s in range(50)], "val_ppl": [(s, 16.4 - 0.04 * s) for s in range(0, 50, 10)]},
    }
    target = tmp_path / "nested" / "dir" / "curves.png"  # parents are created
    h, w = _assert_png(plotting.plot_training_curves(curves, target), target)
    assert w > h  # two panels side by side
    # overwriting an existing file works and leaves no temp file behind
    _assert_png(plotting.plot_training_curves({"only": {"train_loss": [(0, 1.0), (1, 0.5)]}}, target), target, 4_000)


def test_plot_scales(tmp_path) -> None:
    n_layers = 30
    history = {
        "gin": [(s, list(np.linspace(0, 0.5, n_layers) + 0.001 * s)) for s in range(0, 200, 20)],
        "gin-topk": [(s, list(np.linspace(0, 0.5, n_layers) - 0.001 * s)) for s in range(0, 200, 20)],
    }
    target = tmp_path / "scales.png"
    h2, w2 = _assert_png(plotting.plot_scales(history, target), target)
    h1, w1 = _assert_png(plotting.plot_scales({"gin": history["gin"]}, target), target)
    assert w2 > w1  # one panel B per run


@pytest.mark.parametrize("as_numpy", [False, True])
def test_plot_adjacency(tmp_path, as_numpy: bool) -> None:
    t = 10
    probs = _causal_probs(4, t)
    adj = torch.where(probs > 0.2, probs, torch.zeros(()))
    if as_numpy:
        probs, adj = probs.numpy(), adj.numpy()
    tokens = [f"tok{i}" for i in range(t)]
    target = tmp_path / "adj3.png"
    h3, w3 = _assert_png(plotting.plot_adjacency(probs, adj, tokens, target, heads=[0, 2, 3], title="layer 5"), target)
    target1 = tmp_path / "adj1.png"
    h1, w1 = _assert_png(plotting.plot_adjacency(probs[1], adj[1], tokens, target1), target1)
    assert w3 > 2 * w1 * 0.8 and h3 == pytest.approx(h1, rel=0.2)
    # a head-reduced (T, T) adjacency under per-head attention
    target_r = tmp_path / "adj_reduced.png"
    _assert_png(plotting.plot_adjacency(probs, adj.max(0) if as_numpy else adj.amax(0), tokens, target_r), target_r)


def test_plot_adjacency_validates_shapes(tmp_path) -> None:
    probs = _causal_probs(2, 5)
    with pytest.raises(ValueError, match="tokens"):
        plotting.plot_adjacency(probs, probs, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="head 7"):
        plotting.plot_adjacency(probs, probs, list("abcde"), tmp_path / "x.png", heads=[7])
    with pytest.raises(ValueError, match="shape"):
        plotting.plot_adjacency(torch.ones(5, 4), torch.ones(5, 4), list("abcde"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_causal_graph(tmp_path) -> None:
    t = 12
    adj = _causal_probs(1, t, seed=3)[0]
    tokens = ["The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", ".", "Ċ", "It", "Ġwas", "Ġhappy", "."]
    target = tmp_path / "graph.png"
    _assert_png(plotting.plot_causal_graph(adj, tokens, target, title="layer 3 head 1", min_weight=0.05), target)
    # a graph with only self-loops still draws (nodes, no edges)
    target2 = tmp_path / "diag.png"
    _assert_png(plotting.plot_causal_graph(np.eye(4), list("abcd"), target2), target2, 3_000)
    with pytest.raises(ValueError, match="tokens"):
        plotting.plot_causal_graph(adj, tokens[:3], tmp_path / "bad.png")


def test_plot_sparsity_curve(tmp_path) -> None:
    results = [{"rule": "dense", "param": None, "edge_fraction": 1.0, "perplexity": 14.2}]
    results += [{"rule": "topk", "param": k, "edge_fraction": min(1.0, k / 40), "perplexity": 14.2 + 30 / k}
                for k in (1, 2, 4, 8, 16, 32)]
    results += [{"rule": "threshold", "param": t, "edge_fraction": 0.5 * (1 - t), "perplexity": 14.2 + 40 * t}
                for t in (0.01, 0.05, 0.1, 0.3)]
    target = tmp_path / "sparsity.png"
    _assert_png(plotting.plot_sparsity_curve(results, target), target)
    target2 = tmp_path / "sparsity_nodense.png"
    _assert_png(plotting.plot_sparsity_curve(results[1:3], target2), target2, 4_000)
