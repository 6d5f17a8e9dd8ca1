"""The drawing surface every figure of :mod:`gin_adapter.analysis.plotting` shares.

A fresh :class:`matplotlib.figure.Figure` attached to an Agg canvas (no ``pyplot`` global state, so importing
this never switches the backend of a notebook), written to PNG atomically (:func:`save_figure`), and the small
array and token-label helpers the figures use.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def _new_figure(width: float, height: float) -> Figure:
    """A figure bound to an Agg canvas, independent of ``pyplot``."""
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file + ``os.replace``).

    Args:
        fig: the figure to save.
        path: target file; parent folders are created.

    Returns:
        The resolved target path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp_name, format="png")
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a figure is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    logger.info("wrote %s", path)
    return path


def _to_numpy(x: Any) -> np.ndarray:
    """torch tensor / array-like -> float64 numpy array (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_heads(x: Any, name: str) -> np.ndarray:
    """Bring a ``(T, T)`` or ``(H, T, T)`` map (a leading batch dim of 1 is dropped) to ``(H, T, T)``."""
    a = _to_numpy(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must have shape (H, T, T) or (T, T), got {tuple(a.shape)}")
    return a


def _token_fontsize(n_tokens: int) -> float:
    """Font size for per-token tick labels: 9 pt for short sequences, down to 4 pt."""
    return float(max(4.0, min(9.0, 200.0 / max(n_tokens, 1))))


def _clean_token(tok: str) -> str:
    """Make byte-level BPE tokens readable (``Ġ`` = space, ``Ċ`` = newline)."""
    return tok.replace("Ġ", "␣").replace("Ċ", "↵").replace("\n", "↵") or "∅"


def _unzip(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    if not points:
        return [], []
    steps, values = zip(*points)
    return list(steps), [float(v) for v in values]
