"""The versions scripts/setup.sh pins (scripts/constraints.txt) are ones pyproject.toml allows."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    lines = (ROOT / "scripts" / "constraints.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert all(len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==" for pin in pins), "pin exact versions"
    return {canonicalize_name(pin.name): next(iter(pin.specifier)).version for pin in pins}


def test_pinned_versions_lie_in_the_ranges_pyproject_allows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])}
    pins = _pins()
    assert {"transformers", "peft", "accelerate", "torch-geometric", "datasets", "evaluate"} <= set(pins)
    outside = {name: version for name, version in pins.items() if name in ranges and not ranges[name].contains(version)}
    assert not outside, f"scripts/constraints.txt pins versions pyproject.toml excludes: {outside}"
