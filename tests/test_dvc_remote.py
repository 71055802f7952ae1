"""Remote data: `dvc push` to a remote, `git clone` + `dvc pull` elsewhere, and the clone is the
project as it was committed, with nothing to re-run but `track`'s look into the MLflow store.

The remote is a local folder (the same `dvc remote add` a bucket takes, without the network):
the test proves what a teammate relies on, whatever the storage: every cached output comes back
byte-identical, `dvc status` reports only `track` (its output, the fingerprint of the state it
logged, lives in no git and no cache: a clone has yet to log its run), and `dvc repro` runs only
`track`, which finds the state's run in the shared store, logs nothing and touches no other file. Slow only through the shared pipeline project (conftest.pipeline_project); the round
trip itself takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import Project, mlflow_runs, run_ok

pytestmark = pytest.mark.slow

LOGGED = "reports/track/logged.json"   # track's output (see dvc.yaml)


def _outputs(repo: Path) -> list[str]:
    """Every output path dvc.lock records (cached ones and those kept in git)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    return sorted(out["path"] for stage in lock["stages"].values() for out in stage.get("outs", []))


def _files(repo: Path, outputs: list[str]) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under the outputs."""
    found = {}
    for out in outputs:
        root = repo / out
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                found[path.relative_to(repo).as_posix()] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                            path.stat().st_mtime_ns)
    return found


def test_push_clone_pull_gives_the_same_outputs_and_nothing_to_run(pipeline_project: Project,
                                                                   tmp_path: Path) -> None:
    project = pipeline_project
    storage = tmp_path / "remote"
    project.run("dvc", "remote", "add", "-d", "storage", str(storage))
    project.run("git", "commit", "-q", "-m", "DVC remote", ".dvc/config")
    started = time.perf_counter()
    pushed = project.run("dvc", "push").stdout
    print(f"dvc push: {time.perf_counter() - started:.1f} s")
    assert "pushed" in pushed, pushed
    outputs = [out for out in _outputs(project.repo) if not out.startswith(LOGGED)]
    assert {"data/sample", "data/tfrecords", "models/model.keras"} <= set(outputs)
    before = _files(project.repo, outputs)
    assert any(name.endswith(".tfrecord") for name in before)
    runs_before = [r.info.run_id for r in mlflow_runs(project.env)]

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(project.repo), str(clone)], tmp_path, project.env)
    assert not (clone / "models/model.keras").exists() and not (clone / "data/tfrecords").exists()  # not in git
    assert not (clone / LOGGED).exists()                           # in no git and no cache
    started = time.perf_counter()
    pulled = run_ok(["dvc", "pull"], clone, project.env).stdout
    print(f"dvc pull: {time.perf_counter() - started:.1f} s")
    assert "added" in pulled or "fetched" in pulled, pulled
    after = _files(clone, outputs)
    assert {name: digest for name, (digest, _) in after.items()} == \
        {name: digest for name, (digest, _) in before.items()}

    # A teammate's Python writes bytecode beside the sources (here PYTHONDONTWRITEBYTECODE may be
    # set): `track` depends on the whole src/mlic folder, and __pycache__ must not count.
    run_ok(["python", "-m", "compileall", "-q", "src/mlic", "stages"], clone, project.env)
    assert list((clone / "src/mlic/__pycache__").glob("*.pyc"))
    status = run_ok(["dvc", "status", "--json"], clone, project.env).stdout
    assert list(json.loads(status)) == ["track"], status           # only its output is missing
    done = run_ok(["dvc", "repro"], clone, project.env)
    repro = done.stdout
    assert "already in the store" in done.stdout + done.stderr, done.stderr[-3000:]
    assert repro.count("Running stage") == 1 and "Running stage 'track'" in repro, repro
    stages = yaml.safe_load((clone / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in set(stages) - {"track"}:
        assert f"Stage '{stage}' didn't change" in repro, (stage, repro)
    assert _files(clone, outputs) == after                       # not one output rewritten
    assert (clone / LOGGED).read_bytes() == (project.repo / LOGGED).read_bytes()
    assert run_ok(["git", "status", "--porcelain"], clone, project.env).stdout == ""  # dvc.lock as committed
    # the shared store held this state's run already: `track` found it and logged none
    assert [r.info.run_id for r in mlflow_runs(project.env)] == runs_before
    assert json.loads((clone / ".mlic" / "mlflow_run.json").read_text())["run_id"] == runs_before[-1]
