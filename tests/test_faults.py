"""Fault injection: `kill -9` of each stage's process mid-run, then `dvc repro` gives what an
uninterrupted run gave.

One tiny project (300 images of 32-48 px, 32 px inputs, 2 epochs) is run once through real
`dvc repro`; its dvc.lock and every output file are the reference. Then, stage by stage, the stage
is made to run again (its dvc.lock entry made stale, as if it had never completed), `dvc repro` is
started, and the stage's own python process (the child of `dvc`, not `dvc` itself: killing `dvc`
would leave its locks behind) is killed with SIGKILL at a point where it is mid-work. A second
`dvc repro` must then succeed, run that stage only (its outputs come out byte-identical, so DVC
sees nothing downstream changed), leave dvc.lock and every output byte-identical to the
reference (shards, splits, model, metrics), and leave no temp files behind. Both runs pass
`--no-run-cache`: as after a first run that was killed, there is no finished run to restore.

For `track` a killed run leaves its MLflow run RUNNING; after the rerun no run is RUNNING (the
rerun marks it FAILED; `test_tracking.py` covers the rule itself). Resuming `train` from its last
epoch is `test_training.py`'s; here a killed `train` must only end with the same model and metrics.

Slow: about 3 minutes on 2 cores. Cases share one project and run in pipeline order; each leaves it
as the reference was, so a failing case can make the later ones fail too: read the first failure.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import mlflow_runs, make_project, run_ok

pytestmark = pytest.mark.slow

TINY = {
    # images of 96-128 px: enough decoding for preprocess to be caught mid-work (it resizes to 32)
    "sample": {"n_images": 300, "min_size": 96, "max_size": 128},
    "preprocess": {"image_size": 32, "shard_size": 10, "workers": 3},  # 31 shards; a pool of 2 + the stage
    "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
    "evaluate": {"batch_size": 64},
}
OUTPUT_DIRS = ("data/splits", "data/tfrecords", "models", "reports")
# What atomic.py leaves while writing (and a killed stage leaves behind until its next run).
TEMP_NAME = re.compile(r"^\..+\.(tmp|old|keras)$")
REPRO = ["dvc", "repro", "--no-run-cache"]


class Project:
    """The fault project: its folder, environment and the reference run."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        self.repo, self.env = repo, env
        self.lock: dict = {}
        self.files: dict[str, bytes] = {}

    def snapshot(self) -> dict[str, bytes]:
        """Every output file (what DVC tracks under the output folders), by relative path."""
        return {p.relative_to(self.repo).as_posix(): p.read_bytes()
                for d in OUTPUT_DIRS for p in sorted((self.repo / d).rglob("*"))
                if p.is_file() and p.name != ".gitignore"}

    def read_lock(self) -> dict:
        return yaml.safe_load((self.repo / "dvc.lock").read_text(encoding="utf-8"))

    def running_runs(self) -> list[str]:
        """Ids of MLflow runs in the store whose status is RUNNING."""
        db = self.env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            return [r[0] for r in con.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'")]

    def stage_seconds(self, stage: str) -> float:
        """How long the stage took in the reference run (its journal entry, written by run_stage)."""
        entry = json.loads((self.repo / ".mlic" / "stages" / f"{stage}.json").read_text(encoding="utf-8"))
        return entry["ended"] - entry["started"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The tiny project after one uninterrupted `dvc repro`, committed: the reference."""
    repo = tmp_path_factory.mktemp("faults") / "project"
    env = make_project(repo, TINY, who="faults")
    env["PYTHONUNBUFFERED"] = "1"  # stage output arrives as printed: some kill points wait for a line
    run_ok(REPRO, repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-q", "-m", "reference run"], repo, env)
    proj = Project(repo, env)
    proj.lock, proj.files = proj.read_lock(), proj.snapshot()
    assert any(name.endswith(".tfrecord") for name in proj.files) and "models/model.keras" in proj.files
    assert proj.running_runs() == []
    return proj


# --- when a stage is mid-work ---------------------------------------------------------------------
# Each sign gets the stage's process, the output so far and the project, and says "kill now".
Sign = Callable[[psutil.Process, str, Project], bool]


def line(text: str) -> Sign:
    """The stage has printed `text` (and has more to do after it)."""
    return lambda proc, output, project: text in output


def temp_dir(pattern: str) -> Sign:
    """The stage's atomic temp folder exists: it is writing that output."""
    return lambda proc, output, project: any(project.repo.glob(pattern))


def encoding(proc: psutil.Process, output: str, project: Project) -> bool:
    """preprocess: both pool workers are up and some shards, not all, are in its temp folder."""
    workers = [c for c in proc.children() if "spawn_main" in " ".join(c.cmdline())]
    done = [p for temp in project.repo.glob("data/.tfrecords.*.tmp") for p in temp.glob("*.tfrecord")]
    return len(workers) == 2 and 0 < len(done) < 20


def early(proc: psutil.Process, output: str, project: Project) -> bool:
    """The stage has run for a third as long as it took in the reference run, at most a second
    (so that a reference taken on a busier machine cannot put the kill after the end)."""
    return time.time() - proc.create_time() > min(1.0, project.stage_seconds(stage_of(proc)) / 3)


def mlflow_run_open(proc: psutil.Process, output: str, project: Project) -> bool:
    """track: its MLflow run exists and is RUNNING (it is logging)."""
    try:
        return bool(project.running_runs())
    except sqlite3.OperationalError:  # the store is being written: ask again
        return False


def stage_of(proc: psutil.Process) -> str:
    return next(Path(a).stem for a in proc.cmdline() if a.startswith("stages/"))


SIGNS: dict[str, Sign] = {
    "split": line("labelled images"),             # labels read; splitting and writing to come
    "preprocess": encoding,                       # workers encoding images, shards to come
    "train": line("Epoch 2/2"),                   # epoch 1 done, epoch 2 running
    "evaluate": temp_dir("reports/evaluate/.predictions.*.tmp"),  # predicting val and test
    "calibrate": early,                           # no temp folder or log line before it is done
    "track": mlflow_run_open,
}


def start_and_kill(project: Project, stage: str, timeout: float = 120) -> str:
    """Start `dvc repro`, kill -9 the stage's python process once SIGNS[stage] says it is mid-work;
    return what `dvc repro` printed. Fails if the stage finished before it could be killed."""
    dvc = subprocess.Popen(REPRO, cwd=project.repo, env=project.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(iter(dvc.stdout.readline, "")), daemon=True)
    reader.start()
    script = f"stages/{stage}.py"
    killed, deadline = None, time.time() + timeout
    try:
        while killed is None and dvc.poll() is None and time.time() < deadline:
            try:
                child = next((c for c in psutil.Process(dvc.pid).children(recursive=True)
                              if script in c.cmdline()), None)  # python's argv, not `sh -c "..."`
                if child is not None and SIGNS[stage](child, "".join(printed), project):
                    child.kill()
                    killed = child
            except psutil.NoSuchProcess:  # a process ended while we looked: look again
                pass
            time.sleep(0.01)
        dvc.wait(timeout=timeout)
    finally:
        if dvc.poll() is None:
            dvc.kill()
            dvc.wait()
    reader.join(timeout=10)
    output = "".join(printed)
    assert killed is not None, f"{stage} finished (or never started) before it could be killed:\n{output[-3000:]}"
    assert dvc.returncode != 0, output[-3000:]
    return output


def forget_logged_runs(project: Project) -> None:
    """Delete the store's runs (MLflow keeps them, marked deleted, out of every search)."""
    from mlflow import MlflowClient

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    for run in mlflow_runs(project.env):
        client.delete_run(run.info.run_id)


def temp_leftovers(repo: Path) -> list[str]:
    return sorted(p.relative_to(repo).as_posix() for p in repo.rglob(".*")
                  if TEMP_NAME.match(p.name) and not {".git", ".dvc"} & set(p.relative_to(repo).parts))


@pytest.mark.parametrize("stage", list(SIGNS))
def test_kill_9_mid_stage_then_repro_gives_the_uninterrupted_outputs(project: Project, stage: str) -> None:
    lock = project.read_lock()
    assert lock == project.lock, "an earlier case left the project changed"
    lock["stages"][stage]["cmd"] = "not run yet"  # as if it had never completed: the next repro runs it
    (project.repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")
    runs_before = project.running_runs()
    if stage == "track":  # a state the store lacks, so `track` logs (it finds a logged one and stops)
        forget_logged_runs(project)

    killed_output = start_and_kill(project, stage)
    assert "Traceback" not in killed_output, killed_output[-3000:]  # the stage's workers end quietly
    left = temp_leftovers(project.repo)
    print(f"{stage}: killed; left {left}")
    if SIGNS[stage] in (encoding, SIGNS["evaluate"]):  # killed while writing into its temp folder
        assert left, "the kill left no temp folder: was the stage really mid-write?"
    if stage == "track":
        assert len(project.running_runs()) == len(runs_before) + 1  # the killed run, left RUNNING

    rerun = run_ok(REPRO, project.repo, project.env).stdout
    assert re.findall(r"Running stage '(\w+)'", rerun) == [stage], rerun  # downstream saw nothing change
    assert project.read_lock() == project.lock
    now = project.snapshot()
    changed = sorted(name for name in project.files.keys() | now.keys() if project.files.get(name) != now.get(name))
    assert changed == [], f"outputs differ from the uninterrupted run's: {changed}"
    assert temp_leftovers(project.repo) == []
    assert project.running_runs() == []
    if stage == "track":  # the killed run settled FAILED, the rerun's complete
        assert sorted(r.info.status for r in mlflow_runs(project.env)) == ["FAILED", "FINISHED"]
    assert run_ok(["git", "status", "--porcelain"], project.repo, project.env).stdout == ""
