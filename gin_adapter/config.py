"""`GinConfig`: every knob of a Sparse-GIN adapter, validated at construction.

The config is a :class:`peft.PeftConfig`, so PEFT writes it to ``adapter_config.json`` and reads it back.
Its ``peft_type`` is the string ``"GIN"`` (PEFT's ``PeftType`` enum is closed; see :mod:`gin_adapter.model`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional, Union, get_args

from peft import PeftConfig

PEFT_TYPE = "GIN"

HeadReduction = Literal["none", "sum", "mean", "max"]
Sparsify = Literal["topk", "threshold", "none"]
GraphMode = Literal["gin", "reference"]
Backend = Literal["auto", "dense", "gather", "pyg"]
ScaleInit = Literal["zero", "linear"]
Activation = Literal["gelu", "silu", "relu"]


@dataclass
class GinConfig(PeftConfig):
    """Configuration of a Sparse-GIN adapter (Buehler 2025, "Sparse GIN-Attention" fine-tuning).

    Each wrapped attention module turns its attention probabilities ``P[b, h, i, j]`` into a sparse
    adjacency ``A`` and adds ``scale * RMSNorm(out(MLP(GIN(A, X))))`` to its output, with
    ``GIN(A, X)_i = (1 + eps) x_i + sum_{j <= i} A[i, j] x_j``. See :mod:`gin_adapter.layer`.

    Every field raises ``ValueError`` naming the field and the allowed values when it is out of range.
    """

    hidden_dim: int = field(default=32, metadata={"help": "Width of the GIN (the paper used 155). Sets the parameter count."})
    head_reduction: HeadReduction = field(
        default="none",
        metadata={"help": "'none' keeps one adjacency per head; 'sum' (clamped to 1, as published), 'mean' or 'max' share one over heads."},
    )
    sparsify: Sparsify = field(
        default="topk",
        metadata={"help": "'topk' keeps the k strongest keys per query; 'threshold' is the published sharpen-and-threshold rule; 'none' keeps all weights."},
    )
    top_k: int = field(default=8, metadata={"help": "Neighbours kept per query token when sparsify='topk' (self included if among the strongest)."})
    sharpen_alpha: float = field(default=10.0, metadata={"help": "Published rule: A = sigmoid(alpha * (P - tau)); alpha > 0."})
    sharpen_tau: float = field(default=0.1, metadata={"help": "Published rule: the sigmoid's centre tau, in [0, 1]."})
    threshold: float = field(default=0.6, metadata={"help": "Published rule: sharpened entries <= threshold are dropped; in [0, 1)."})
    graph: GraphMode = field(
        default="gin",
        metadata={"help": "'gin': messages flow key j -> query i over the adjacency (intended operator); 'reference': self-loops only, as the published code behaves."},
    )
    backend: Backend = field(
        default="auto",
        metadata={
            "help": "How the neighbour sum is computed. 'dense': masked batched matmul; 'gather': gathers the top-k value "
            "rows (per-head top-k rules only); 'pyg': torch_geometric message passing over an explicit edge_index "
            "(slowest, for comparison); 'auto': the per-head top-k rule uses the fused top-k kernel with 'dense' or "
            "'gather' by sequence length, other rules 'dense' (see docs/benchmarks.md)."
        },
    )
    scale_init: ScaleInit = field(
        default="zero",
        metadata={"help": "'zero': every layer's scale starts at 0 so the model starts as the base model; 'linear': published schedule from 0 (first layer) to scale_max (last)."},
    )
    scale_max: float = field(default=0.5, metadata={"help": "Last layer's initial scale when scale_init='linear'."})
    activation: Activation = field(default="gelu", metadata={"help": "Non-linearity of the GIN MLP."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the GIN MLP's hidden layer, in [0, 1)."})
    recompute_adjacency: bool = field(
        default=True,
        metadata={
            "help": "Recompute the adjacency in backward instead of storing it: nothing of size (B, H, L, L) is kept for "
            "backward. The per-head top-k rule always recomputes (only the scores), whatever this says."
        },
    )
    adjacency_grad: bool = field(
        default=True,
        metadata={
            "help": "Back-propagate through the graph into the attention's queries and keys (as published). False treats "
            "the graph as a constant: the GIN and the values still train, and the backward pass is cheaper."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Attention modules to wrap (names or a regex). None finds them by structure (see gin_adapter.discovery)."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave unwrapped."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only wrap these layer indices (None: all layers)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list when layers_to_transform is set, e.g. 'layers' or 'h'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra base modules to train and save in full (PEFT semantics)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
        self._validate()

    def _validate(self) -> None:
        for f in fields(self):
            literal = _LITERALS.get(f.type) if isinstance(f.type, str) else None
            choices = get_args(literal) if literal is not None else ()
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"GinConfig.{f.name}={getattr(self, f.name)!r} is not allowed; choose one of {list(choices)}.")
        _check_range("hidden_dim", self.hidden_dim, 1, None, integer=True)
        _check_range("top_k", self.top_k, 1, None, integer=True)
        _check_range("sharpen_alpha", self.sharpen_alpha, 0.0, None, low_open=True)
        _check_range("sharpen_tau", self.sharpen_tau, 0.0, 1.0)
        _check_range("threshold", self.threshold, 0.0, 1.0, high_open=True)
        _check_range("scale_max", self.scale_max, 0.0, None)
        _check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        for name in ("recompute_adjacency", "adjacency_grad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GinConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.backend == "gather" and not self.is_per_head_top_k:
            raise ValueError(
                "GinConfig.backend='gather' needs the per-head top-k rule (sparsify='topk', head_reduction='none', "
                f"graph='gin'); got sparsify={self.sparsify!r}, head_reduction={self.head_reduction!r}, graph={self.graph!r}. "
                "Use backend='dense' or 'auto'."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs) -> "GinConfig":
        """PEFT's loader (``PeftModel.from_pretrained`` reads the config first), plus a check that the folder's
        ``adapter_model.safetensors`` is complete, so a truncated or corrupt file is reported in plain words before
        any module is wrapped (local folders; Hub files are checked by :func:`gin_adapter.load_gin_model`)."""
        from .io import WEIGHTS_NAME, check_weights_file

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        weights_file = os.path.join(folder, WEIGHTS_NAME)
        if os.path.isfile(weights_file):
            check_weights_file(Path(weights_file))
        return config

    @property
    def is_per_head_top_k(self) -> bool:
        """True for the rule the fused top-k kernel computes (:mod:`gin_adapter.topk_sum`), the default."""
        return self.sparsify == "topk" and self.head_reduction == "none" and self.graph == "gin"


# dataclass field types are strings under `from __future__ import annotations`; map them back to the Literals.
_LITERALS = {
    "HeadReduction": HeadReduction,
    "Sparsify": Sparsify,
    "GraphMode": GraphMode,
    "Backend": Backend,
    "ScaleInit": ScaleInit,
    "Activation": Activation,
}


def _check_range(
    name: str,
    value: float,
    low: float | None,
    high: float | None,
    *,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``GinConfig.<name>`` and its allowed range when ``value`` is outside it."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"GinConfig.{name} must be an integer, got {value!r}.")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"GinConfig.{name} must be a number, got {value!r}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        allowed = f"{lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}"
        raise ValueError(f"GinConfig.{name}={value!r} is out of range; allowed: {allowed}.")
