"""The package's stated structure (docs/architecture.md) holds: the import layering has no cycle and no upward import,
and functions stay short enough to read."""
from __future__ import annotations

import ast
import importlib
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


# --- library internals only in the seams (forgetless/_compat, docs/architecture.md "Library seams") ----------------

SEAM_LIBRARIES = ("ray", "deepspeed", "mlflow", "torch", "atexit")
SEAMS = PACKAGE / "_compat"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library_names(tree: ast.AST) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """The module's names bound to a library's modules or objects (local name -> dotted path), and its imports of a
    private name of one (line, what)."""
    names, uses = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in SEAM_LIBRARIES:
                    if any(_private(p) for p in alias.name.split(".")):
                        uses.append((node.lineno, f"import {alias.name}"))
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in SEAM_LIBRARIES:
            for alias in node.names:
                if any(_private(p) for p in node.module.split(".")) or _private(alias.name):
                    uses.append((node.lineno, f"from {node.module} import {alias.name}"))
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names, uses


def _resolve(dotted: str):
    """The library object a dotted name stands for (None where it cannot be imported)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:  # noqa: BLE001 - not a module (an attribute of one), or not importable here
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def _class_overrides(tree: ast.AST, names: dict[str, str]) -> list[tuple[int, str]]:
    """Private methods of a library's class overridden in a subclass (or called through super() from one)."""
    uses = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        bases = [_resolve(names[b.split(".")[0]] + b[len(b.split(".")[0]):])
                 for b in map(ast.unparse, cls.bases) if b.split(".")[0] in names]
        if not bases:
            continue
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name) \
                    and any(hasattr(base, node.name) for base in bases):
                uses.append((node.lineno, f"{cls.name}.{node.name} overrides a private method"))
            elif isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Call) \
                    and ast.unparse(node.value.func) == "super":
                uses.append((node.lineno, f"super().{node.attr}"))
    return uses


def private_library_uses(source: str) -> list[tuple[int, str]]:
    """Every use of a private name of Ray, DeepSpeed, MLflow, torch or atexit in `source`: imports of one, attribute
    access through a name bound to a library (`ray._private.worker._global_node`, `WorkerGroup._get_...`),
    getattr/hasattr of an underscore name, private methods overridden in a library's subclass."""
    tree = ast.parse(source)
    names, uses = _library_names(tree)
    uses += _class_overrides(tree, names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in names:
                uses.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                and _private(node.args[1].value):
            uses.append((node.lineno, ast.unparse(node)))
    return sorted(set(uses))


def test_the_private_use_finder_finds_each_kind():
    source = (
        "import atexit, ray\nimport torch._dynamo\nfrom mlflow.store.db.utils import _initialize_tables\n"
        "from ray.train.v2._internal.constants import X\nfrom ray.train.torch import TorchTrainer\n"
        "from ray.train.v2.api import WorkerGroup\n"
        "atexit._run_exitfuncs()\nray._private.worker._global_node\nWorkerGroup._get_worker_runtime_env(None)\n"
        "getattr(p, '_hp_mapping', None)\n"
        "class T(TorchTrainer):\n    def _create_default_callbacks(self):\n"
        "        return super()._create_default_callbacks()\n"
        "atexit.register(print)\nray.get_runtime_context().gcs_address\nclass Own:\n    def _mine(self): pass\n")
    found = "\n".join(what for _, what in private_library_uses(source))
    for what in ("import torch._dynamo", "_initialize_tables", "ray.train.v2._internal.constants", "_run_exitfuncs",
                 "_global_node", "WorkerGroup._get_worker_runtime_env", "'_hp_mapping'",
                 "T._create_default_callbacks overrides", "super()._create_default_callbacks"):
        assert what in found, (what, found)
    assert "register" not in found and "gcs_address" not in found and "_mine" not in found


def test_only_the_seams_use_library_internals():
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if SEAMS in path.parents:
            continue
        outside += [f"{path.relative_to(PACKAGE.parent)}:{line} {what}"
                    for line, what in private_library_uses(path.read_text())]
    assert not outside, ("private names of Ray / DeepSpeed / MLflow / torch / CPython outside forgetless/_compat "
                         f"(move them into the library's seam): {outside}")


# Underscore attributes forgetless may use although it does not define them: documented public names of the stdlib
PUBLIC_UNDERSCORE_NAMES = {"os._exit"}


def _names_defined_in_forgetless() -> set[str]:
    own = set()
    for path in PACKAGE.rglob("*.py"):
        own.add(path.stem)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                own.update((a.asname or a.name).split(".")[0] for a in node.names)
    return own


def test_no_underscore_attribute_of_another_library_outside_the_seams():
    """`obj._name` where forgetless defines no `_name` is a library's private attribute (a dataset's
    `_to_mlflow_entity`, a module's `_register_load_state_dict_pre_hook`), whatever the object's name: it goes into
    the library's seam, or the public call is used."""
    own = _names_defined_in_forgetless()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if SEAMS in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own \
                    and ast.unparse(node) not in PUBLIC_UNDERSCORE_NAMES:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert not found, f"private attributes of other libraries outside forgetless/_compat: {found}"
