"""Remote data: `dvc push` to a remote, `git clone` + `dvc pull` elsewhere, and the clone is the
project as it was committed, with nothing to re-run.

The remote is a local folder (the same `dvc remote add` a bucket takes, without the network):
the test proves what a teammate relies on, whatever the storage: every cached output comes back
byte-identical, `dvc status` has nothing to report, and `dvc repro` runs no stage and touches
no file. Slow only through the shared pipeline project (conftest.pipeline_project); the round
trip itself takes a few seconds.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import yaml
from conftest import Project, run_ok

pytestmark = pytest.mark.slow


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
    outputs = _outputs(project.repo)
    assert {"data/sample", "data/tfrecords", "models/model.keras"} <= set(outputs)
    before = _files(project.repo, outputs)
    assert any(name.endswith(".tfrecord") for name in before)

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(project.repo), str(clone)], tmp_path, project.env)
    assert not (clone / "models/model.keras").exists() and not (clone / "data/tfrecords").exists()  # not in git
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
    status = run_ok(["dvc", "status"], clone, project.env).stdout
    assert "Data and pipelines are up to date" in status, status
    repro = run_ok(["dvc", "repro"], clone, project.env).stdout
    assert "Running stage" not in repro, repro
    stages = yaml.safe_load((clone / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in stages:
        assert f"Stage '{stage}' didn't change" in repro, (stage, repro)
    assert _files(clone, outputs) == after                       # not one output rewritten
    assert run_ok(["git", "status", "--porcelain"], clone, project.env).stdout == ""  # dvc.lock as committed
    assert not (clone / ".mlic" / "mlflow_run.json").exists()     # `track` did not run: no new MLflow run
