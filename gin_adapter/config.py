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
Activation = Literal["gelu", "silu", "relu", "prelu"]
NodeFeatures = Literal["values", "hidden", "input"]
Block = Literal["compact", "published"]
SelfWeight = Literal["one_plus_eps", "eps"]

#: The published Sparse-GIN computation (DESIGN.md section 2), as GinConfig fields; see GinConfig.published.
PUBLISHED = dict(
    node_features="hidden",
    block="published",
    hidden_dim=155,
    self_weight="eps",
    activation="prelu",
    dropout=0.1,
    norm_eps=1e-5,
    head_reduction="sum",
    sparsify="threshold",
    sharpen_alpha=10.0,
    sharpen_tau=0.1,
    threshold=0.6,
    scale_init="linear",
    scale_max=0.5,
    graph="reference",
)


@dataclass
class GinConfig(PeftConfig):
    """Configuration of a Sparse-GIN adapter (Buehler 2025, "Sparse GIN-Attention" fine-tuning).

    Each wrapped attention module turns its attention probabilities ``P[b, h, i, j]`` into a sparse
    adjacency ``A`` and adds ``scale * RMSNorm(out(MLP(GIN(A, X))))`` to its output, with
    ``GIN(A, X)_i = (1 + eps) x_i + sum_{j <= i} A[i, j] x_j``. See :mod:`gin_adapter.layer`.

    The fields come in four groups: the node features ``X`` (``node_features``), the GIN block (``block``,
    ``hidden_dim``, ``self_weight``, ``activation``, ``dropout``, ``norm_eps``, ``scale_init``, ``scale_max``), the
    graph ``A`` (``head_reduction``, ``sparsify``, ``top_k``, ``sharpen_*``, ``threshold``, ``graph``) and how it is
    computed (``backend``, ``recompute_adjacency``, ``adjacency_grad``), then PEFT's placement fields.
    :meth:`published` gives the published Sparse-GIN computation field by field.

    Every field raises ``ValueError`` naming the field and the allowed values when it is out of range.
    """

    # --- node features
    node_features: NodeFeatures = field(
        default="values",
        metadata={
            "help": "What the graph aggregates. 'values': the attention's own value vectors (from the KV cache; note "
            "that the top-k neighbour sum of values nearly equals the attention output the model already has); "
            "'hidden': the decoder layer's hidden state after attention, h + attn_out (the published choice); "
            "'input': the normed layer input the attention receives. 'hidden' and 'input' are projected to hidden_dim "
            "per token (with bias) before aggregation and kept beside the KV cache for decoding."
        },
    )
    # --- the GIN block
    block: Block = field(
        default="compact",
        metadata={
            "help": "'compact': MLP(z) = act(W2 act(W1 z)), out projection without bias; 'published': the published "
            "block, MLP(z) = W2 act(W1 z) + z, then act (one shared PReLU), dropout, out projection with bias. "
            "'published' needs node_features 'hidden' or 'input' and a head_reduction other than 'none'."
        },
    )
    hidden_dim: int = field(default=32, metadata={"help": "Width of the GIN (the paper used 155). Sets the parameter count."})
    self_weight: SelfWeight = field(
        default="one_plus_eps",
        metadata={"help": "'one_plus_eps': z_i = (1 + eps) x_i + sum_j A[i, j] x_j (the GIN paper); 'eps': z_i = eps x_i + sum_j ... (what the published code computes). eps is learnable and starts at 0."},
    )
    scale_init: ScaleInit = field(
        default="zero",
        metadata={"help": "'zero': every layer's scale starts at 0 so the model starts as the base model; 'linear': published schedule from 0 (first layer) to scale_max (last)."},
    )
    scale_max: float = field(default=0.5, metadata={"help": "Last layer's initial scale when scale_init='linear'."})
    activation: Activation = field(default="gelu", metadata={"help": "Non-linearity of the GIN MLP ('prelu': one learnable slope, shared by every use in the block)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout in the GIN block, in [0, 1): on the MLP's hidden layer ('compact'), after the block's last activation ('published')."})
    norm_eps: float = field(default=1e-6, metadata={"help": "Epsilon of the RMSNorm on the block's output, > 0 (the published code uses 1e-5)."})
    # --- the graph
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
    # --- how the graph is computed (same numbers whatever these say, except adjacency_grad in backward)
    backend: Backend = field(
        default="auto",
        metadata={
            "help": "How the neighbour sum is computed. 'dense': masked batched matmul; 'gather': gathers the top-k value "
            "rows (per-head top-k rules only); 'pyg': torch_geometric message passing over an explicit edge_index "
            "(slowest, for comparison); 'auto': the per-head top-k rule uses the fused top-k kernel with 'dense' or "
            "'gather' by sequence length, the published rule (head_reduction='sum', sparsify='threshold') its fused "
            "kernel, other rules 'dense' (see docs/benchmarks.md)."
        },
    )
    recompute_adjacency: bool = field(
        default=True,
        metadata={
            "help": "Recompute the adjacency in backward instead of storing it: nothing of size (B, H, L, L) is kept for "
            "backward. False keeps the attention probabilities for backward instead (about B * H * L^2 / 2 floats per "
            "layer): where the graph is built with the attention (training under sdpa, the per-head top-k and the "
            "published rule) backward then skips scoring the keys again, in ATen's query chunks. On the CPU the default "
            "is faster: there the compiled attention with its graph recomputes inside one call per layer (plain causal "
            "attention; docs/benchmarks.md), which False turns off. Before that kernel False saved 3-6 % of a CPU training step "
            "for 163 MiB more peak memory (+8 % of LoRA's total) at 4 x 256 tokens on SmolLM2, the trade-off that remains where "
            "it does not apply (padding masks; other devices, not measured); the fused kernels (sdpa + a separate kernel, "
            "eager) always recompute."
        },
    )
    adjacency_grad: bool = field(
        default=True,
        metadata={
            "help": "Back-propagate through the graph into the attention's queries and keys (as published). False treats "
            "the graph as a constant: the GIN and the values still train, and the backward pass is cheaper."
        },
    )
    # --- placement (PEFT semantics)
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
        _check_range("norm_eps", self.norm_eps, 0.0, None, low_open=True)
        for name in ("recompute_adjacency", "adjacency_grad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GinConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.backend == "gather" and not self.is_per_head_top_k:
            raise ValueError(
                "GinConfig.backend='gather' needs the per-head top-k rule (sparsify='topk', head_reduction='none', "
                f"graph='gin'); got sparsify={self.sparsify!r}, head_reduction={self.head_reduction!r}, graph={self.graph!r}. "
                "Use backend='dense' or 'auto'."
            )

        if self.block == "published" and (self.node_features == "values" or self.head_reduction == "none"):
            raise ValueError(
                "GinConfig.block='published' aggregates one graph of projected node features: it needs node_features "
                f"'hidden' or 'input' and head_reduction 'sum', 'mean' or 'max'; got node_features={self.node_features!r}, "
                f"head_reduction={self.head_reduction!r}. Use GinConfig.published() or block='compact'."
            )

    @classmethod
    def published(cls, **overrides) -> "GinConfig":
        """The published Sparse-GIN computation (Buehler 2025; DESIGN.md section 2), field by field.

        Hidden-state node features ``u = h + attn_out`` projected ``Linear(d, 155)`` with bias; adjacency summed over
        heads, clamped to 1, sharpened ``sigmoid(10 (A - 0.1))`` and kept where ``> 0.6``; one GIN layer
        ``z = eps x + sum_j A[i, j] x_j`` (eps from 0), ``MLP(z) = W2 PReLU(W1 z) + z``, the same PReLU again, dropout
        0.1, ``Linear(155, d)`` with bias, RMSNorm (eps 1e-5), and a per-layer scale from 0 (first layer) to 0.5
        (last). ``graph="reference"`` (the default here) is the published code's behaviour, self-loops only;
        ``graph="gin"`` the intended operator with messages from key j to query i. On SmolLM2-135M: 228,230 trainable
        parameters per layer. ``overrides`` replace any field.
        """
        return cls(**{**PUBLISHED, **overrides})

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
    "NodeFeatures": NodeFeatures,
    "Block": Block,
    "SelfWeight": SelfWeight,
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
