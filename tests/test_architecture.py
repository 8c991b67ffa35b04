"""The package's stated structure (docs/architecture.md) holds: the import layering has no cycle and no upward import,
and functions stay short enough to read."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "forgetless"
MAX_FUNCTION_LINES = 60


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports (import-linter) is not installed; it is in the test extras: pip install -e .[test]")
    out = subprocess.run([lint, "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_functions_are_short_and_classes_are_not_nested_in_functions():
    too_long, nested = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in _functions(tree):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name} ({lines} lines)")
            nested += [f"{path.relative_to(PACKAGE.parent)}:{c.lineno} {c.name} in {fn.name}"
                       for c in ast.walk(fn) if isinstance(c, ast.ClassDef)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"
    assert not nested, f"classes defined inside functions: {nested}"
