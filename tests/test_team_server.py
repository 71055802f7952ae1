"""A team's tracking server: `mlflow server` over PostgreSQL, artifacts proxied into a folder.

The server command of docs/team.md, for real: a fresh PostgreSQL cluster (initdb, as an unprivileged
account when run as root), `mlflow server --backend-store-uri postgresql+psycopg2://...
--artifacts-destination <folder>` on loopback, then the small project's `track` stage run by DVC
with MLFLOW_TRACKING_URI=http://... as a teammate's machine would. The run on the server must be
as complete as the local one (params, curves, artifacts, datasets, packaged model, registry
version and champion alias); its artifacts and model files must sit under the artifacts
destination (proxied, nothing written beside the project); the rows must be in PostgreSQL; the
model must load back through the server and predict like the local files. Both servers are then
stopped by PID and nothing of them may be left running or listening.

Skips where PostgreSQL cannot run (fails instead under MLIC_REQUIRE_POSTGRES or MLIC_REQUIRE_ALL, as in CI).
Slow: about a minute beside the shared pipeline project (conftest.pipeline_project).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Project, check_complete_run, mlflow_runs
from tracking_server import Service, mlflow_server, postgres_cluster, require_postgres

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class TeamServer:
    database: Service      # the postmaster
    mlflow: Service        # `mlflow server` (leader of its group; uvicorn is its child)
    backend_uri: str       # postgresql+psycopg2://mlflow@127.0.0.1:<port>/mlflow
    artifacts: Path        # --artifacts-destination
    start_seconds: float   # initdb to /health answering


# Session scope, like pipeline_project, so that it is set up first (fixtures of one scope are set up
# in argument order): where PostgreSQL is missing the test skips before the pipeline runs.
@pytest.fixture(scope="session")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    """PostgreSQL + `mlflow server` over it; both stopped by PID (by the last test, else at the end)."""
    pg = require_postgres()
    root = tmp_path_factory.mktemp("team_server")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    started = time.perf_counter()
    with postgres_cluster(pg) as (database, uri), \
            mlflow_server(uri, root / "mlflow-server.log", artifacts_destination=artifacts) as server:
        seconds = time.perf_counter() - started
        print(f"PostgreSQL + mlflow server started in {seconds:.1f} s")
        yield TeamServer(database, server, uri, artifacts, seconds)


def _sql(server: TeamServer, query: str) -> list[tuple]:
    import psycopg2

    con = psycopg2.connect(server.backend_uri.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with con.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        con.close()


def _under(root: Path, uri: str) -> Path:
    """Where a proxied artifact URI (`mlflow-artifacts:/<path>`) is stored under the destination."""
    assert uri.startswith("mlflow-artifacts:/"), uri  # proxied: clients never see the storage
    return root / uri.removeprefix("mlflow-artifacts:").lstrip("/")


def test_pipeline_logs_a_complete_run_to_the_postgres_server(team_server: TeamServer,
                                                            pipeline_project: Project) -> None:
    import mlflow
    import pandas as pd

    from mlic.inference import Predictor

    project, server = pipeline_project, team_server
    remote = {"MLFLOW_TRACKING_URI": server.mlflow.url}
    env = {**project.env, **remote}

    checked = project.run("python", "-m", "mlic.cli", "check", **remote)
    assert "is usable" in checked.stderr + checked.stdout

    started = time.perf_counter()
    # `track` again, now to the server: the pipeline's outputs are already there and unchanged.
    project.run("dvc", "repro", "--force", "--single-item", "track", **remote)
    print(f"track to the server: {time.perf_counter() - started:.1f} s")
    assert project.run("git", "status", "--porcelain").stdout == ""   # dvc.lock as committed

    runs = mlflow_runs(env)
    assert len(runs) == 1
    run = runs[0]
    check_complete_run(run, env, project.repo)
    client = mlflow.MlflowClient(tracking_uri=server.mlflow.url)

    # The same record as the run the pipeline logged to its local store.
    (local,) = mlflow_runs(project.env)
    assert run.data.params == local.data.params
    assert {k: v for k, v in run.data.metrics.items() if not k.startswith("train/")} == \
        {k: v for k, v in local.data.metrics.items() if not k.startswith("train/")}
    history = client.get_metric_history(run.info.run_id, "epoch/val_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(m.step, m.value) for m in sorted(mlflow.MlflowClient(project.env["MLFLOW_TRACKING_URI"])
                                           .get_metric_history(local.info.run_id, "epoch/val_loss"),
                                           key=lambda m: m.step)]

    # Rows in PostgreSQL (the server's backend), files under --artifacts-destination (proxied).
    assert _sql(server, f"SELECT status FROM runs WHERE run_uuid = '{run.info.run_id}'") == [("FINISHED",)]
    assert _sql(server, "SELECT COUNT(*) FROM latest_metrics") == [(len(run.data.metrics),)]
    run_dir = _under(server.artifacts, run.info.artifact_uri)
    for artifact in client.list_artifacts(run.info.run_id):
        assert (run_dir / artifact.path).exists(), artifact.path
    assert (run_dir / "thresholds.json").read_bytes() == \
        (project.repo / "reports/calibrate/thresholds.json").read_bytes()
    assert not any((project.repo / name).exists() for name in ("mlruns", "mlartifacts"))

    # The packaged model: files under the destination, registered, champion of a fresh registry.
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"source_run_id = '{run.info.run_id}'")
    assert (_under(server.artifacts, logged.artifact_location) / "MLmodel").is_file()
    name, version = run.data.tags["registered_model_version"].split("/")
    assert _sql(server, "SELECT name, version FROM model_versions") == [(name, int(version))]
    assert run.data.tags["champion.promoted"] == "true"
    assert client.get_model_version_by_alias(name, "champion").version == version

    # Loaded back through the server, the champion predicts what the pipeline's files predict.
    images = sorted((project.repo / "data/sample/images").rglob("*.*"))[:6]
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(server.mlflow.url)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(before)
    served = model.predict(pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}))
    local_predictor = Predictor.from_files(project.repo / "models/model.keras", project.repo / "models/model_meta.json",
                                           project.repo / "reports/calibrate/thresholds.json")
    expected = local_predictor.predict([p.read_bytes() for p in images])
    assert not expected.errors
    assert [list(labels) for labels in served["labels"]] == [list(labels) for labels in expected.labels]
    probs = served[[f"prob_{c}" for c in local_predictor.classes]].to_numpy()
    assert abs(probs - expected.probabilities).max() <= 1e-6
    print(json.dumps({"server_start_s": round(server.start_seconds, 1)}))


def test_servers_stop_by_pid_leaving_nothing_running(team_server: TeamServer) -> None:
    """What the fixture's teardown does, checked: SIGTERM to the mlflow server's group, SIGINT to
    the postmaster (fast shutdown); no process of either group and no listener on either port."""
    import signal

    server = team_server
    started = time.perf_counter()
    server.mlflow.stop(signal.SIGTERM)
    server.database.stop(signal.SIGINT, whole_group=False)
    print(f"both stopped in {time.perf_counter() - started:.1f} s")
    assert server.mlflow.stopped(), server.mlflow.log_tail()
    assert server.database.stopped(), server.database.log_tail()
    assert server.mlflow.process.returncode == 0 or server.mlflow.process.returncode == -signal.SIGTERM
    assert server.database.process.returncode == 0, server.database.log_tail()  # a clean shutdown
    assert "database system is shut down" in server.database.log_tail()
