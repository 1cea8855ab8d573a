"""The package stays readable: no function over 60 lines, no module over 400 lines.

Walks ``sparkme/``, ``converters/`` and ``benchmarks/`` (what installs as ``sparkme.*``) with
``ast``; a function's length runs from its ``def`` line to its last line (docstring included,
decorators not).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("sparkme", "converters", "benchmarks")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def package_files() -> list[Path]:
    return sorted(path for folder in PACKAGE_DIRS for path in (ROOT / folder).rglob("*.py"))


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``module:line name (N lines)`` for every function or method of ``path`` longer than ``limit``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_walk_sees_the_package() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in package_files()}
    assert {"sparkme/method/spark.py", "converters/timm_format.py", "benchmarks/suite.py"} <= names


def test_the_length_check_can_fail(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (tmp_path / "long.py").write_text(f"def too_long():\n{body}\n")
    (tmp_path / "short.py").write_text(f"def fits():\n{body[: body.rindex(chr(10))]}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(f"{__name__}.ROOT", tmp_path)
        assert long_functions(tmp_path / "long.py") == ["long.py:1 too_long (61 lines)"]
        assert long_functions(tmp_path / "short.py") == []


def test_no_function_over_60_lines() -> None:
    found = [entry for path in package_files() for entry in long_functions(path)]
    assert not found, "split these functions:\n" + "\n".join(found)


def test_no_module_over_400_lines() -> None:
    found = []
    for path in package_files():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not found, "split these modules:\n" + "\n".join(found)
