"""The project as a newcomer meets it: a real `git clone` of the committed repository, its
committed `dvc.lock` and default params, `dvc repro`, then the MLflow store.

This is how issue 16 broke: `track` had no outputs, so a clone whose reproduced files matched
the committed lock had nothing for DVC to re-run, and the MLflow store stayed empty. Now
`track` owns `reports/track/logged.json` (the fingerprint of the state it logged; not in git),
which a clone lacks. Asserted here, with no MLFLOW_TRACKING_URI (the default store, `mlflow.db`
in the project):
- the first `dvc repro` leaves exactly one complete FINISHED run, and `git status` stays clean
  (the clone reproduced the committed lock byte for byte, `track`'s output included);
- a second `dvc repro` runs nothing and logs nothing;
- back to the committed params after an experiment: `calibrate` is re-computed (DVC 3.67 does not
  run-cache a stage with an uncached output), `track` runs, finds the state's run and logs none.

Slow: it reproduces the default pipeline from nothing (about 6-8 minutes on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import check_complete_run, mlflow_runs, run_ok

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _committed(path: str) -> str:
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


# dvc.lock as the first `dvc repro` of the clone left it (the second test returns to that state).
AFTER_FIRST_REPRO: dict[str, str] = {}


def _out_md5(lock: Path | None, stage: str, path: str) -> str | None:
    """The md5 dvc.lock records for `stage`'s output `path` (lock None: the committed dvc.lock)."""
    text = _committed("dvc.lock") if lock is None else lock.read_text()
    outs = yaml.safe_load(text)["stages"][stage].get("outs", [])
    return next((o.get("md5") for o in outs if o["path"] == path), None)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A `git clone` of this repository's HEAD; the environment a newcomer has (no tracking URI)."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    repo = tmp_path_factory.mktemp("newcomer") / "mlic"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            # the clone's own code, not the checkout this venv was installed from
            "PYTHONPATH": str(repo / "src"),
            "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "newcomer", "GIT_COMMITTER_NAME": "newcomer",
            "GIT_AUTHOR_EMAIL": "newcomer@example.invalid", "GIT_COMMITTER_EMAIL": "newcomer@example.invalid"}
    run_ok(["git", "clone", "-q", str(ROOT), str(repo)], repo.parent, env)
    return repo, env


def test_a_fresh_clone_logs_one_run_and_a_second_repro_none(clone: tuple[Path, dict[str, str]]) -> None:
    repo, env = clone
    assert (repo / "dvc.lock").read_text() == _committed("dvc.lock")
    assert not (repo / "reports/track/logged.json").exists() and not (repo / "mlflow.db").exists()
    started = time.perf_counter()
    run_ok(["dvc", "repro"], repo, env, timeout=3600)
    print(f"fresh clone, dvc repro: {time.perf_counter() - started:.0f} s")
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}   # the default `track` used

    runs = mlflow_runs(store)
    assert [r.info.status for r in runs] == ["FINISHED"]
    check_complete_run(runs[0], store, repo, first_in_store=True)
    assert runs[0].data.tags["mlic.changed"] == "nothing" and runs[0].info.run_name.startswith("as committed")
    # What train ran, as the committed params ask (the defaults resize progressively)
    from mlic.model import flips_at_test_time
    from mlic.params import Train, section_from_dict
    from mlic.training import progressive_plan

    params = yaml.safe_load(_committed("params.yaml"))
    cfg = section_from_dict(Train, params["train"], "train")
    plan = progressive_plan(cfg, params["preprocess"]["image_size"])
    assert runs[0].data.tags["train.progressive"] == (f"{plan[0]} px x {plan[1]} epochs" if plan else "off")
    assert runs[0].data.tags["train.tta_flip"] == ("on" if flips_at_test_time(cfg) else "off")
    from mlic.devices import cores, resolve_intra_op_threads

    threads = resolve_intra_op_threads(cfg.intra_op_threads, 0, cores()) or cores()  # CI has no GPU
    assert runs[0].data.metrics["train/intra_op_threads"] == threads   # what ran, a number
    AFTER_FIRST_REPRO["lock"] = (repo / "dvc.lock").read_text()
    again = run_ok(["dvc", "repro"], repo, env).stdout
    assert "Running stage" not in again, again
    assert [r.info.run_id for r in mlflow_runs(store)] == [runs[0].info.run_id]

    # The clone reproduced the committed state byte for byte, `track`'s fingerprint included...
    status = run_ok(["git", "status", "--porcelain"], repo, env).stdout
    if status and _out_md5(repo / "dvc.lock", "train", "models/model.keras") != _out_md5(
            None, "train", "models/model.keras"):
        # ...unless this CPU trains other weights: floating-point code paths differ between
        # instruction sets (docs/experiments.md), so the state, and with it dvc.lock, is another one. Then
        # only dvc.lock may differ; everything above (one run, a second repro none) still held.
        assert status.split() == ["M", "dvc.lock"], status
        pytest.xfail("this CPU's training gives other weights than the committed dvc.lock's (see docs/experiments.md)")
    assert status == "", status


def test_back_to_a_logged_state_logs_no_second_run(clone: tuple[Path, dict[str, str]]) -> None:
    """An experiment, then back to the committed params. What DVC 3.67 really does: it saves a stage
    to its run-cache only when every plain output is cached, so `calibrate` (uncached reports) is
    re-computed, not restored; `track` runs and finds the state's run in the store."""
    repo, env = clone
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    first = mlflow_runs(store)
    assert len(first) == 1, "the fresh-clone repro did not log its run"
    committed = yaml.safe_load(_committed("params.yaml"))
    committed_beta = committed["calibrate"]["beta"]
    other = 2.0 if committed_beta != 2.0 else 1.0

    run_ok(["dvc", "exp", "run", "-S", f"calibrate.beta={other}"], repo, env)
    runs = mlflow_runs(store)
    assert len(runs) == 2 and runs[-1].data.tags["mlic.changed"] == f"calibrate.beta={other}"
    assert runs[-1].info.run_name.startswith(f"calibrate.beta={other} (")

    back = run_ok(["dvc", "exp", "run", "-S", f"calibrate.beta={committed_beta}"], repo, env)
    out = back.stdout + back.stderr
    assert "Running stage 'calibrate'" in out and "is cached" not in out, out[-3000:]
    assert "Running stage 'track'" in out and "already in the store" in out, out[-3000:]
    assert [r.info.run_id for r in mlflow_runs(store)] == [r.info.run_id for r in runs]   # none added
    # Back to the committed params: dvc.lock as the first repro left it (the committed one, on a CPU
    # that reproduces its weights). DVC rewrites params.yaml in its own style (`null` -> empty,
    # quotes), the values as committed.
    assert (repo / "dvc.lock").read_text() == AFTER_FIRST_REPRO.get("lock", _committed("dvc.lock"))
    assert yaml.safe_load((repo / "params.yaml").read_text()) == committed
