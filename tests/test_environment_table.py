"""docs/environment.md lists every environment variable forgetless reads or sets: a variable name the code holds (a
string such as "FORGETLESS_NO_PROGRESS_S" given to os.environ / a runtime env) must be in the page's variable
section, and a FORGETLESS_* variable on the page must still be in the code."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "environment.md"
# the families of variables the table covers (issue 28): forgetless's own and the libraries' it reads or sets
VARIABLE = re.compile(r"(?:FORGETLESS|RAY|DS|TORCH|HF|MLFLOW|AWS|TRANSFORMERS|TUNE|MASTER)_[A-Z0-9_]+")


def variables_in_code() -> dict[str, str]:
    """Variable name -> the first file that holds it as a whole string constant (docstrings and messages are longer
    strings and do not count; an f-string's parts are not constants)."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "forgetless").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and VARIABLE.fullmatch(node.value):
                found.setdefault(node.value, str(path.relative_to(REPO)))
    return found


def variables_on_page() -> set[str]:
    section = PAGE.read_text().split("## Environment variables", 1)[1]
    return set(re.findall(rf"`({VARIABLE.pattern})`", section))


def test_every_variable_the_code_names_is_in_the_table():
    missing = {name: where for name, where in variables_in_code().items() if name not in variables_on_page()}
    assert not missing, (f"environment variables the code reads or sets but docs/environment.md does not list: "
                         f"{missing}; add a row (default and why) to its 'Environment variables' section")


def test_every_forgetless_variable_in_the_table_is_still_in_the_code():
    stale = {n for n in variables_on_page() if n.startswith("FORGETLESS_")} - set(variables_in_code())
    assert not stale, f"docs/environment.md lists {sorted(stale)}, which no code under forgetless/ names any more"


def test_the_scan_sees_variables_read_through_constants_and_calls():
    code = variables_in_code()
    # read directly (os.environ.get("...")), through a module constant, and set for the cluster's processes
    assert {"FORGETLESS_NO_PROGRESS_S", "FORGETLESS_VERBOSE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"} <= set(code)
    assert len([n for n in code if n.startswith("FORGETLESS_")]) >= 10
