"""The layout holds: who imports whom inside gin_adapter, and no long source file without a reason.

    gin_adapter/            the adapter (what a PEFT user imports): imports none of the packages below
    gin_adapter/embedded/   offline model and corpus: imports nothing else of gin_adapter
    gin_adapter/analysis/   the seminar experiments, figures, gin-analysis: the adapter and embedded
    gin_adapter/compare/    the harness train.py drives: anything above

Imports are read with ``ast`` (module level and inside functions, relative ones resolved), so a lazy import counts
too; a subprocess also checks that importing every adapter module loads none of the three packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gin_adapter"
MAX_LINES = 400

# Which of the sub-packages each part of gin_adapter may import (the adapter's top-level modules may import each other).
SUBPACKAGES = ("gin_adapter.compare", "gin_adapter.analysis", "gin_adapter.embedded")
MAY_IMPORT = {
    "gin_adapter": (),
    "gin_adapter.embedded": ("gin_adapter.embedded",),
    "gin_adapter.analysis": ("gin_adapter.analysis", "gin_adapter.embedded"),
    "gin_adapter.compare": SUBPACKAGES,
}
MAY_IMPORT_ADAPTER = {"gin_adapter": True, "gin_adapter.embedded": False, "gin_adapter.analysis": True, "gin_adapter.compare": True}

# Source files allowed over MAX_LINES: each must hold one algorithm that reads best in one place, and its module
# docstring must say so (the words "in one file" and why). Empty: every file is within the limit.
LONG_FILES_ALLOWED: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``), relative imports resolved."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _part(module: str) -> str:
    """``gin_adapter`` (the adapter) or the sub-package a ``gin_adapter`` module belongs to."""
    return next((p for p in SUBPACKAGES if module == p or module.startswith(p + ".")), "gin_adapter")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_imports_only_what_the_layout_allows() -> None:
    offenders = []
    for path in _package_files():
        part = _part(_module_name(path))
        for name in sorted(_imports(path)):
            if not _within(name, "gin_adapter"):
                continue
            target = _part(name)
            if target == "gin_adapter":
                if not MAY_IMPORT_ADAPTER[part]:
                    offenders.append(f"{path.relative_to(ROOT)} imports the adapter ({name})")
            elif target not in MAY_IMPORT[part] and target != part:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_adapter_modules_import_no_harness_analysis_or_embedded_code() -> None:
    adapter = [p for p in _package_files() if p.parent == PACKAGE]
    assert {"config.py", "model.py", "layer.py", "io.py", "hub.py"} <= {p.name for p in adapter}
    offenders = [f"{p.name}: {name}" for p in adapter for name in _imports(p) if any(_within(name, s) for s in SUBPACKAGES)]
    assert not offenders, offenders


def test_importing_every_adapter_module_loads_none_of_the_other_packages() -> None:
    names = ["gin_adapter"] + [f"gin_adapter.{p.stem}" for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.startswith({SUBPACKAGES!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def _source_files() -> list[Path]:
    """Python files git tracks or would track (untracked, not ignored), outside tests/."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in listed if f and not f.startswith("tests/") and (ROOT / f).is_file()]


def test_no_source_file_outside_tests_is_longer_than_the_limit_without_a_reason() -> None:
    files = _source_files()
    assert any(f.name == "train.py" for f in files)
    too_long = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES and relative not in LONG_FILES_ALLOWED:
            too_long.append(f"{relative}: {lines} lines")
    assert not too_long, f"over {MAX_LINES} lines (split them, or allow one with its reason in LONG_FILES_ALLOWED): {too_long}"
    for relative in LONG_FILES_ALLOWED:
        path = ROOT / relative
        assert path.is_file(), f"{relative} is allowed to be long but does not exist; remove it from LONG_FILES_ALLOWED"
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        assert "in one file" in docstring, f"{relative}: its docstring must say why it is kept in one file"
