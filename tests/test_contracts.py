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
    # tune imports its trainer (TensorFlow) inside run(), and only when tuning is on: still followed.
    # Its MLflow runs (tracking.py, imported inside mlic.tune's functions) shape no output.
    assert {"src/mlic/trial.py", "src/mlic/training.py"} <= stage_closure("tune")
    assert "src/mlic/tracking.py" not in stage_closure("tune")



# --------------------------------------------------------------------------- params sections
def _stage_module(name: str):
    from conftest import _load_stage

    return _load_stage(name)


def _dvc_params(stage: str) -> set[str] | None:
    """The sections dvc.yaml declares for `stage`; None when it declares the whole params file."""
    sections: set[str] = set()
    for entry in DVC["stages"][stage].get("params", []):
        if isinstance(entry, dict):  # `- params.yaml:` (the whole file) or `- other.yaml: [keys]`
            if any(v is None for v in entry.values()):
                return None
            sections |= {str(k).split(".")[0] for keys in entry.values() for k in keys}
        else:
            sections.add(str(entry).split(".")[0])
    return sections


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_stage_params_are_exactly_the_sections_it_loads(stage: str) -> None:
    main = _stage_module(stage).main
    declared = _dvc_params(stage)
    if declared is None:  # the whole file (track logs every param): whatever it reads is covered
        return
    assert set(main.sections) == declared, (
        f"stages/{stage}.py reads params {sorted(main.sections)} but dvc.yaml declares {sorted(declared)}")
    # Sections read only for a pre-flight check are, by design, not DVC params of the stage.
    assert not set(main.checks) & declared


def _params_attributes(stage: str) -> set[str]:
    """The attributes the stage's `run(args, params)` reads from `params` (its second argument)."""
    tree = ast.parse((ROOT / "stages" / f"{stage}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"):
        name = fn.args.args[1].arg
        found |= {n.attr for n in ast.walk(fn)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == name}
    return found


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_stage_reads_only_the_params_sections_it_declares(stage: str) -> None:
    main = _stage_module(stage).main
    source = (ROOT / "stages" / f"{stage}.py").read_text(encoding="utf-8")
    # Params come through the skeleton only (loaded whole, validated once); no second reader.
    assert "load_section" not in source and "read_params_file" not in source and "import yaml" not in source
    read = _params_attributes(stage) - {"path"}
    assert read, f"stages/{stage}.py: no params read through its `run(args, params)`"
    assert read <= set(main.sections) | set(main.checks), (
        f"stages/{stage}.py reads params {sorted(read - set(main.sections) - set(main.checks))} it does not declare")


def test_reading_an_undeclared_section_is_a_bug_not_a_silent_default(tmp_path) -> None:
    from mlic.stage import Params

    params = Params({"train": object()}, tmp_path / "params.yaml")
    params.train
    with pytest.raises(AttributeError, match="'data' was not declared"):
        params.data
