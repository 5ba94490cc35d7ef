"""The size limits of the style guide: no function over 80 lines (package and CLI), no module
of the package over 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION, MAX_MODULE = 80, 500


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_function_over_80_lines():
    long = []
    for path in _files("dynopool_convert", "cli/dynopool_cli"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_module_over_500_lines():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _files("dynopool_convert")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE]
    assert not long, long
