"""GinConfig validation: every range and every closed choice is refused with a message naming the field and what is allowed."""

from __future__ import annotations

import re

import pytest

from gin_adapter import GinConfig

# field, bad value, the allowed values or range the message must state
RANGE_CASES = [
    ("hidden_dim", 0, "[1, inf]"),
    ("hidden_dim", 2.5, "integer"),
    ("top_k", 0, "[1, inf]"),
    ("top_k", True, "integer"),
    ("sharpen_alpha", 0.0, "(0.0, inf]"),
    ("sharpen_alpha", "big", "number"),
    ("sharpen_tau", -0.1, "[0.0, 1.0]"),
    ("sharpen_tau", 1.5, "[0.0, 1.0]"),
    ("threshold", 1.0, "[0.0, 1.0)"),
    ("threshold", -0.01, "[0.0, 1.0)"),
    ("scale_max", -1.0, "[0.0, inf]"),
    ("dropout", 1.0, "[0.0, 1.0)"),
    ("dropout", -0.5, "[0.0, 1.0)"),
    ("norm_eps", 0.0, "(0.0, inf]"),
    ("recompute_adjacency", "yes", "True or False"),
    ("adjacency_grad", 1, "True or False"),
]

CHOICE_CASES = [
    ("head_reduction", ["none", "sum", "mean", "max"]),
    ("sparsify", ["topk", "threshold", "none"]),
    ("graph", ["gin", "reference"]),
    ("backend", ["auto", "dense", "gather", "pyg"]),
    ("scale_init", ["zero", "linear"]),
    ("activation", ["gelu", "silu", "relu", "prelu"]),
    ("node_features", ["values", "hidden", "input"]),
    ("block", ["compact", "published"]),
    ("self_weight", ["one_plus_eps", "eps"]),
]


@pytest.mark.parametrize("name,value,allowed", RANGE_CASES, ids=lambda x: str(x))
def test_out_of_range_values_name_the_field_and_range(name, value, allowed):
    with pytest.raises(ValueError, match=rf"GinConfig\.{name}\b.*{re.escape(allowed)}"):
        GinConfig(**{name: value})


@pytest.mark.parametrize("name,choices", CHOICE_CASES)
def test_unknown_choices_name_the_field_and_every_allowed_value(name, choices):
    with pytest.raises(ValueError, match=rf"GinConfig\.{name}='bogus'.*{re.escape(str(choices))}"):
        GinConfig(**{name: "bogus"})
    for choice in choices:  # and every allowed value is accepted (alone or with what it needs)
        needs = {
            ("backend", "gather"): dict(sparsify="topk", head_reduction="none", graph="gin"),
            ("block", "published"): dict(node_features="hidden", head_reduction="sum"),
        }.get((name, choice), {})
        assert getattr(GinConfig(**{**needs, name: choice}), name) == choice


def test_every_closed_choice_and_range_is_covered():
    """A new field with a Literal type or a range check must be added to the cases above."""
    from gin_adapter.config import _LITERALS

    literal_fields = {f for f, t in GinConfig.__annotations__.items() if isinstance(t, str) and t in _LITERALS}
    assert literal_fields <= {name for name, _ in CHOICE_CASES}
    numeric_fields = {f for f, t in GinConfig.__annotations__.items() if t in ("int", "float", "bool")}
    assert numeric_fields <= {name for name, _, _ in RANGE_CASES}


def test_gather_needs_the_per_head_top_k_rule():
    with pytest.raises(ValueError, match=r"GinConfig\.backend='gather' needs the per-head top-k rule.*backend='dense' or 'auto'"):
        GinConfig(backend="gather", sparsify="threshold")


@pytest.mark.parametrize("fields", [dict(node_features="values"), dict(node_features="hidden", head_reduction="none")])
def test_published_block_needs_projected_features_and_one_graph(fields):
    with pytest.raises(ValueError, match=r"GinConfig\.block='published'.*node_features 'hidden' or 'input' and head_reduction 'sum', 'mean' or 'max'"):
        GinConfig(block="published", **{"head_reduction": "sum", **fields})


def test_published_preset_is_the_published_computation_and_takes_overrides():
    config = GinConfig.published()
    assert (config.node_features, config.block, config.hidden_dim, config.self_weight) == ("hidden", "published", 155, "eps")
    assert (config.activation, config.dropout, config.norm_eps) == ("prelu", 0.1, 1e-5)
    assert (config.head_reduction, config.sparsify, config.sharpen_alpha, config.sharpen_tau, config.threshold) == ("sum", "threshold", 10.0, 0.1, 0.6)
    assert (config.scale_init, config.scale_max, config.graph) == ("linear", 0.5, "reference")
    assert GinConfig.published(graph="gin").graph == "gin"
    with pytest.raises(ValueError, match="GinConfig.graph"):
        GinConfig.published(graph="both")
