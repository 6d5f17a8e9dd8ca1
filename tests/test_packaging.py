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


def test_compiled_kernels_are_built_where_a_c_compiler_is_present():
    """The C library is optional at install (no compiler: ATen's operators), so a source that stops compiling would
    only make the kernels' tests skip. On Linux with a C compiler (this project's CI) every kernel must load."""
    import shutil
    import sys

    import pytest

    from gin_adapter import native_attention_graph, native_block, native_decode, native_graph_sum, native_library, native_score_rows, native_top_k

    if sys.platform != "linux" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on Linux here: the package installs without its compiled kernels")
    assert native_library.library() is not None, "gin_adapter._native did not build: run `pip install -e .` and read the compiler's errors"
    missing = [module.__name__ for module in (native_top_k, native_graph_sum, native_score_rows, native_attention_graph, native_decode, native_block)
               if not module.available()]
    assert not missing, f"compiled library built without {missing}: reinstall (pip install -e .) and read the compiler's errors"


def test_a_library_built_before_a_kernel_gives_none_for_it(monkeypatch, caplog):
    """An installed library older than the source (no reinstall since a kernel was added): the missing function is
    ``None`` with a warning saying to reinstall, and its callers take ATen's operators."""
    import logging

    from gin_adapter import native_library

    class OldLibrary:
        gin_row_topk_f32 = object()

    monkeypatch.setattr(native_library, "library", lambda: OldLibrary())
    with caplog.at_level(logging.WARNING, logger="gin_adapter.native_library"):
        assert native_library.function("gin_block_forward_f32", []) is None
    assert "reinstall" in caplog.text and "gin_block_forward_f32" in caplog.text
