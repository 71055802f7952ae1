"""A sweep as one thing in MLflow: every run of it tagged, and one parent run, created exactly once.

A sweep is the experiments one `dvc exp run --queue -S tracking.sweep=NAME -S ...` queued (DVC's
environment cannot tell them apart from other experiments of the same commit: it gives each run
only its own name, DVC_EXP_NAME, and the commit it derives from, DVC_EXP_BASELINE_REV). Each
run's `track` gets the tag `mlic.sweep=NAME` and becomes a child (`mlflow.parentRunId`) of one
parent run named NAME, so the runs table folds the sweep into one row and filters it with
`tags.mlic.sweep = 'NAME'`.

The parent is created by whichever queue worker gets there first, and only by it. MLflow has no
"create a run unless one exists" and no compare-and-set; the one thing any MLflow store keeps
unique is an experiment's name (a database unique constraint, for SQLite and for a server over
any database alike, deleted experiments included). So the worker that succeeds in creating the
experiment named by `lock_name` creates the parent; the others wait for the parent to appear.
The lock experiment is deleted at once (out of the UI's lists); its name stays taken, which is
the point. A worker never creates a parent without holding that name, so there is never a second.

Functions take an `MlflowClient`; this module never imports mlflow itself.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

SWEEP_TAG = "mlic.sweep"            # on every run of the sweep, the parent included
PARENT_TAG = "mlic.sweep_parent"    # "true" on the parent only
MLFLOW_PARENT = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under that parent
LOCK_PREFIX = "mlic-sweep-lock"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
# How long a worker that lost the race waits for the winner's parent. Creating it takes the
# winner two calls (well under a second, seconds on a busy server).
WAIT_S = 30.0
ALL_RUNS = 3  # mlflow.entities.ViewType.ALL: active and deleted runs


def lock_name(experiment_id: str, sweep: str) -> str:
    """The experiment name whose creation entitles one worker to create the sweep's parent."""
    return f"{LOCK_PREFIX}/{experiment_id}/{sweep}"


def _parent(client: Any, experiment_id: str, sweep: str) -> Any | None:
    """The sweep's parent run (active or deleted), or None."""
    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = 'true' and tags.`{SWEEP_TAG}` = '{sweep}'",
                              run_view_type=ALL_RUNS, max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def _usable(run: Any, sweep: str) -> str | None:
    if run.info.lifecycle_stage == "deleted":
        log.warning("the parent run %s of sweep %r is deleted: this run is logged without a parent "
                    "(restore it with MlflowClient().restore_run(%r) to group the sweep again)",
                    run.info.run_id, sweep, run.info.run_id)
        return None
    return run.info.run_id


def parent_run(client: Any, experiment_id: str, sweep: str, *, started_ms: int | None = None,
               wait_s: float = WAIT_S, poll_s: float = 0.25) -> str | None:
    """The id of sweep `sweep`'s parent run in the experiment, created if this is the first run.

    Returns None (and warns) when there is no usable parent: it was deleted, or the worker that
    took the lock never created it (killed in between; the warning says how to clear the lock).
    The run is logged anyway, tagged with the sweep: a missing parent costs grouping, not data.
    """
    found = _parent(client, experiment_id, sweep)
    if found is not None:
        return _usable(found, sweep)
    name = lock_name(experiment_id, sweep)
    try:
        lock_id = client.create_experiment(name)
    except Exception as exc:
        if getattr(exc, "error_code", None) != ALREADY_EXISTS:
            raise
        # Another worker holds the lock: its parent appears within moments.
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(poll_s)
            found = _parent(client, experiment_id, sweep)
            if found is not None:
                return _usable(found, sweep)
        lock = client.get_experiment_by_name(name)
        log.warning("sweep %r: no parent run appeared within %.0f s although the MLflow experiment %r "
                    "(id %s) says one is being made; this run is logged without a parent. If the process "
                    "that made it was killed, remove it for good (`mlflow gc --experiment-ids %s`) and "
                    "the next run of the sweep creates the parent", sweep, wait_s, name,
                    getattr(lock, "experiment_id", "?"), getattr(lock, "experiment_id", "ID"))
        return None
    client.delete_experiment(lock_id)  # out of the UI's experiment list; the name stays taken
    tags = {SWEEP_TAG: sweep, PARENT_TAG: "true",
            "mlflow.note.content": (
                f"Sweep `{sweep}`: each child run is one DVC experiment of the sweep "
                f"(`dvc exp run --queue -S tracking.sweep={sweep} ...`). Compare them: expand this row, "
                f"select the children, Compare; or filter the runs with tags.mlic.sweep = '{sweep}'.")}
    run = client.create_run(experiment_id, start_time=started_ms, run_name=sweep, tags=tags)
    # A parent holds no results of its own: FINISHED at once, so it is never taken for a run a
    # killed process left RUNNING.
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("created the parent run %s of sweep %r", run.info.run_id, sweep)
    return run.info.run_id
