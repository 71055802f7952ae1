"""Contracts kept by a test rather than by hand: dvc.yaml's deps cover what each stage imports.

A stage's `deps` must list every `mlic` module its script imports, directly or through other
modules' top-level imports, so editing that module re-runs the stage. Imports inside functions
of library modules (e.g. tracking's MLflow logging, which only `track` reaches) and under
`TYPE_CHECKING` are not followed: they do not run when the stage imports the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
# Modules that shape no output, only the console, the local stage journal and the wording of a
# failure (errors.py defines exception classes): editing them must not re-run a training, so they
# are not deps (their own tests cover them).
OUTPUT_NEUTRAL = {"src/mlic/console.py", "src/mlic/journal.py", "src/mlic/errors.py"}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(nodes: list[ast.stmt], deep: bool) -> set[str]:
    """mlic modules imported by these statements; `deep` also looks inside functions and classes."""
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlic":
            if node.module == "mlic":
                found |= {f"mlic.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mlic.")}
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                found |= _imports(node.body + node.orelse, deep)
        elif isinstance(node, (ast.Try,)):
            found |= _imports(node.body + node.orelse + node.finalbody
                              + [s for h in node.handlers for s in h.body], deep)
        elif isinstance(node, (ast.With,)):
            found |= _imports(node.body, deep)
        elif deep and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found |= _imports(node.body, deep)
        elif deep and hasattr(node, "body"):
            found |= _imports(list(getattr(node, "body")), deep)
    return found


def module_file(module: str) -> Path:
    return ROOT / "src" / (module.replace(".", "/") + ".py")


def stage_closure(name: str) -> set[str]:
    """`src/mlic/*.py` files that running stages/<name>.py imports."""
    script = ast.parse((ROOT / "stages" / f"{name}.py").read_text(encoding="utf-8"))
    todo = list(_imports(script.body, deep=True))
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or not module_file(module).is_file():
            continue
        seen.add(module)
        todo += _imports(ast.parse(module_file(module).read_text(encoding="utf-8")).body, deep=False)
    return {str(module_file(m).relative_to(ROOT)) for m in seen}


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_stage_deps_cover_every_mlic_module_it_imports(stage: str) -> None:
    deps = {d for d in DVC["stages"][stage]["deps"] if isinstance(d, str)}
    assert f"stages/{stage}.py" in deps
    # A folder dep (track's `src/mlic`: the packaged model ships the whole package) covers its files.
    missing = {m for m in stage_closure(stage) - deps - OUTPUT_NEUTRAL
               if not any(m.startswith(d.rstrip("/") + "/") for d in deps)}
    assert not missing, f"dvc.yaml stage {stage!r} imports {sorted(missing)} but does not list them in deps"


def test_the_closure_follows_imports_through_modules() -> None:
    # evaluate imports mlic.predictions, whose top level imports mlic.atomic: found through it.
    assert "src/mlic/atomic.py" in stage_closure("evaluate")
    # train checks the store through mlic.store, never reaching how runs are logged.
    assert "src/mlic/tracking.py" not in stage_closure("train")
    assert "src/mlic/store.py" in stage_closure("train")

