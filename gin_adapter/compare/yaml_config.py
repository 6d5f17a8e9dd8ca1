"""Reading experiment YAML: ``1e-4``-style floats, and ``dotted.key=value`` command-line overrides."""

from __future__ import annotations

import re
from typing import Any

import yaml


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``2e-4`` as a float (PyYAML's YAML 1.1 rules make it a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely, with ``1e-4``-style floats."""
    return yaml.load(text, Loader=_YamlLoader)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place; list items are addressed by index (``runs.0.gin.hidden_dim=16``)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value, e.g. max_steps=10 or data.block_size=128.")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i])} has {len(node)} items; {part!r} is not a valid index.")
            index = int(part)
            if last:
                node[index] = load_yaml(value)
            else:
                node = node[index]
        else:
            if last:
                node[part] = load_yaml(value)
            else:
                node = node.setdefault(part, {})
                if node is None:
                    raise ValueError(f"override {item!r}: {part!r} is null in the config.")
