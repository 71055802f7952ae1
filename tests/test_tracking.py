"""The `track` stage and mlic.tracking: one complete MLflow run from synthetic pipeline files.

The module fixture builds a tiny project in a temporary git repo (params, history, metrics
JSONs with a null, per-class tables and curves, thresholds, dvc.lock, manifests, a journal of
stage runs, a real 3-class .keras model), runs `stages/track.py`'s main once against a sqlite
store in tmp, and the tests read the run back with MlflowClient. The naming rules themselves
are tested in test_record.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import git, write_text
from mlic import journal, store, tracking
from mlic.record import data_fingerprint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

PARAMS_YAML = """\
common:
  seed: 42
data:
  classes: [cat, dog, bird]
  skip_bad_images: false
split:
  val_fraction: 0.15
train:
  learning_rate: 0.001
  weights: null
tracking:
  experiment: mlic-test
  log_model: true
  registered_model: mlic-test-model
"""
HISTORY = pd.DataFrame({
    "epoch": [0, 1, 2],
    "loss": [0.9, 0.6, 0.5],
    "val_loss": [0.95, 0.7, 0.65],
    "val_f1": [0.2, 0.5, 0.6],
    "learning_rate": [0.001, 0.001, 0.0005],
    "phase": ["head", "head", "finetune"],
})
TRAIN_METRICS = {"best_epoch": 2, "epochs_run": 3, "stopped_early": True}
EVALUATE_METRICS = {"val": {"macro_f1": 0.8, "micro_f1": 0.85, "macro_ap": 0.7, "hamming_loss": 0.1,
                            "n_samples": 10},
                    "test": {"macro_f1": 0.75, "macro_ap": 0.72, "auc_pr": None, "n_samples": 10,
                             "per_class": {"cat": {"f1": 0.7}}},
                    "baseline": {"test": {"macro_f1": 0.5, "lrap": 0.4}, "val": {"macro_f1": 0.45}}}
CALIBRATE_METRICS = {"test_calibrated": {"macro_f1": 0.78, "macro_ap": 0.72},
                     "val_calibrated": {"macro_f1": 0.82}}
FINGERPRINTS = {"train": "a" * 64, "val": "b" * 64, "test": "c" * 64}
EXPERIMENT = "mlic-test"
# The journal: train ran 5 minutes before track, preprocess before the previous track.
NOW = time.time()
JOURNAL = {"preprocess": (NOW - 4000, NOW - 3900, {}), "track": (NOW - 3800, NOW - 3700, {}),
           "train": (NOW - 300, NOW - 60, {"images_per_second": 250.0, "fit_seconds": 230.0})}


def _build_project(root: Path) -> None:
    from conftest import make_model_dir, write_manifests

    write_text(root / "params.yaml", PARAMS_YAML)
    write_text(root / "dvc.lock", "schema: '2.0'\nstages: {}\n")
    write_text(root / "reports/train/history.csv", HISTORY.to_csv(index=False))
    write_text(root / "reports/train/metrics.json", json.dumps(TRAIN_METRICS))
    write_text(root / "reports/evaluate/metrics.json", json.dumps(EVALUATE_METRICS))
    write_text(root / "reports/calibrate/metrics.json", json.dumps(CALIBRATE_METRICS))
    per_class = "class,support,prevalence,f1,ap\ncat,3,0.3,0.7,0.8\ndog,4,0.4,0.8,0.9\nbird,2,0.2,0.6,0.5\n"
    for stage in ("evaluate", "calibrate"):
        write_text(root / f"reports/{stage}/per_class_test.csv", per_class)
    grid = np.linspace(0, 1, 11)
    write_text(root / "reports/evaluate/pr_curves.csv", pd.DataFrame(
        {"class": np.repeat(["cat", "dog", "bird"], 11), "recall": np.tile(grid, 3),
         "precision": np.tile(1 - grid / 2, 3)}).to_csv(index=False))
    write_text(root / "reports/calibrate/fbeta_vs_threshold.csv", pd.DataFrame(
        {"class": np.repeat(["cat", "dog", "bird"], 11), "threshold": np.tile(grid, 3),
         "f_beta": np.tile(grid * (1 - grid) * 4, 3)}).to_csv(index=False))
    write_manifests(root / "data/tfrecords", FINGERPRINTS)
    for stage, (started, ended, facts) in JOURNAL.items():
        journal.write(root, journal.StageRun(stage, started, ended, facts))
    # A real mlic model (models/model.keras, model_meta.json) and calibrate's thresholds.json.
    make_model_dir(root, image_size=32, classes=("cat", "dog", "bird"), thresholds=(0.4, 0.5, 0.3))
    write_text(root / "models/model_summary.txt", "Model: a 3-class test model\n")   # train writes it


def _track_argv(root: Path) -> list[str]:
    return [
        "--params", "params.yaml", "--history", "reports/train/history.csv",
        "--metrics", "train=reports/train/metrics.json", "reports/evaluate/metrics.json",
        "reports/calibrate/metrics.json",
        "--artifacts", "dvc.lock", "reports/evaluate/per_class_test.csv",
        "reports/calibrate/per_class_test.csv", "reports/calibrate/thresholds.json",
        "models/model_meta.json",
        "--pr-curves", "reports/evaluate/pr_curves.csv",
        "--per-class-default", "reports/evaluate/per_class_test.csv",
        "--per-class-calibrated", "reports/calibrate/per_class_test.csv",
        "--fbeta-curves", "reports/calibrate/fbeta_vs_threshold.csv",
        "--model", "models/model.keras", "--meta", "models/model_meta.json",
        "--summary", "models/model_summary.txt", "--thresholds", "reports/calibrate/thresholds.json", "--manifests-dir", "data/tfrecords",
        "--note", ".mlic/mlflow_run.json", "--logged", "reports/track/logged.json",
    ]


def _load_stage():
    spec = importlib.util.spec_from_file_location("track_stage", ROOT / "stages" / "track.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Run the stage once; yield (project root, tracking uri, client, run)."""
    from mlflow import MlflowClient

    base = tmp_path_factory.mktemp("track")
    project = base / "project"
    project.mkdir()
    uri = f"sqlite:///{base.as_posix()}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.setenv("GIT_CEILING_DIRECTORIES", str(base))
        mp.setenv("DVC_EXP_NAME", "brisk-otter")
        mp.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
        mp.chdir(project)
        _build_project(project)
        git(project, "init", "-q")
        git(project, "add", "-A")
        git(project, "commit", "-q", "-m", "synthetic project")
        started = time.perf_counter()
        assert _load_stage().main(_track_argv(project)) == 0
        print(f"track stage with model: {time.perf_counter() - started:.1f} s")
        client = MlflowClient(uri)
        run_id = json.loads((project / ".mlic/mlflow_run.json").read_text())["run_id"]
        yield project, uri, client, client.get_run(run_id)


# --------------------------------------------------------------------------- the logged run
def test_every_param_is_logged_flattened(tracked):
    _, _, _, run = tracked
    assert run.data.params == {
        "common.seed": "42",
        "data.classes": '["cat","dog","bird"]',
        "data.skip_bad_images": "false",
        "split.val_fraction": "0.15",
        "train.learning_rate": "0.001",
        "train.weights": "null",
        "tracking.experiment": "mlic-test",
        "tracking.log_model": "true",
        "tracking.registered_model": "mlic-test-model",
        # the packaged model's image limit (its model_config, which MLflow logs as params too): the
        # default here, as this params.yaml does not set it
        "data.max_image_pixels": "100000000",
    }


@pytest.mark.parametrize("column", ["loss", "val_loss", "val_f1", "learning_rate"])
def test_history_columns_are_curves_by_epoch(tracked, column):
    _, _, client, run = tracked
    history = sorted(client.get_metric_history(run.info.run_id, f"epoch/{column}"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx(HISTORY[column].tolist())


def test_summary_metrics_are_hierarchical_and_kept_to_the_rules(tracked):
    _, _, _, run = tracked
    summary = {k: v for k, v in run.data.metrics.items() if not k.startswith("epoch/")}
    assert summary == pytest.approx({
        "val/macro_f1": 0.8, "val/micro_f1": 0.85, "val/macro_ap": 0.7,     # not val/hamming_loss
        "test/macro_f1": 0.75, "test/macro_ap": 0.72, "test/per_class/cat/f1": 0.7,
        "test_calibrated/macro_f1": 0.78,                 # not its macro_ap: equal to test/macro_ap
        # no baseline/: the trivial predictor is a contrast, stated in the description
        "train/best_epoch": 2, "train/epochs_run": 3, "train/stopped_early": 1.0,
        # from the journal: train ran after the previous track; preprocess before it
        "train/images_per_second": 250.0, "train/fit_seconds": 230.0,
    })  # no n_samples (a data fact), no test/auc_pr (null), no val_calibrated (in-sample)


def test_run_spans_the_stages_that_ran_since_the_last_track(tracked):
    _, _, _, run = tracked
    train_started, _, _ = JOURNAL["train"]
    assert run.info.start_time == int(train_started * 1000)
    assert run.info.end_time - run.info.start_time >= 300 * 1000 - 1
    assert run.data.tags["pipeline_stages"] == "train"


def test_splits_are_dataset_inputs_with_their_fingerprints(tracked):
    _, _, _, run = tracked
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train", "val"]
    for split, fp in FINGERPRINTS.items():
        d = inputs[split]
        assert d.dataset.digest == fp[:tracking.DIGEST_CHARS]
        assert json.loads(d.dataset.profile)["fingerprint"] == fp
        assert json.loads(d.dataset.profile)["records"] == 10
        assert json.loads(d.dataset.source) == {"uri": f"data/tfrecords/{split}.manifest.json"}
        assert [t.value for t in d.tags if t.key == "mlflow.data.context"] == [split]


def test_figures_are_logged_as_png(tracked):
    _, _, client, run = tracked
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    figures = {"learning_curves.png", "pr_curves.png", "f1_per_class.png", "fbeta_vs_threshold.png"}
    assert figures <= listed
    for name in figures:
        data = Path(client.download_artifacts(run.info.run_id, name)).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_artifacts_are_top_level_and_unique(tracked):
    _, _, client, run = tracked
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "params.yaml", "history.csv", "dvc.lock.yaml", "thresholds.json", "model_meta.json",
        "evaluate_per_class_test.csv", "calibrate_per_class_test.csv",
        "train_metrics.json", "evaluate_metrics.json", "calibrate_metrics.json",
        "train.manifest.json", "val.manifest.json", "test.manifest.json",
    } <= listed
    assert not any(client.list_artifacts(run.info.run_id, "reports"))


def test_logged_model_is_the_package_and_predicts_like_the_files(tracked):
    import base64
    import io

    import mlflow.pyfunc
    from PIL import Image

    from mlic.inference import Predictor

    project, uri, _, run = tracked
    mlflow.set_tracking_uri(uri)
    rng = np.random.default_rng(0)
    files = []
    for shape in [(40, 60, 3), (32, 32, 3), (90, 20, 3)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
        files.append(buf.getvalue())
    from mlic.serving import resolve_model_uri

    # the run's id is enough: `runs:/<id>` finds the model it logged (named after the run)
    logged = mlflow.pyfunc.load_model(resolve_model_uri(f"runs:/{run.info.run_id}"))
    model = mlflow.get_logged_model(resolve_model_uri(f"runs:/{run.info.run_id}").split("/")[-1])
    assert model.name == tracking.model_name(run.info.run_name) and "mlic predict" in model.tags["mlflow.note.content"]
    # its page lists the datasets it was scored on: the split metrics carry dataset and model
    scored = {(m.key, m.dataset_name) for m in model.metrics if m.dataset_name}
    assert ("test/macro_f1", "test") in scored and ("val/macro_ap", "val") in scored, scored
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert all(m.dataset_digest == digests[m.dataset_name] for m in model.metrics if m.dataset_name)
    assert all(len(d) == 12 for d in digests.values())
    # MLmodel names the pipeline's files, never a temporary folder of this machine
    mlmodel = Path(mlflow.artifacts.download_artifacts(f"{model.artifact_location}/MLmodel")).read_text()
    assert "mlic-package" not in mlmodel and "models/model_summary.txt" in mlmodel, mlmodel
    frame = logged.predict(pd.DataFrame({"image": [base64.b64encode(f).decode() for f in files]}))
    direct = Predictor.from_files(project / "models/model.keras", project / "models/model_meta.json",
                                  project / "reports/calibrate/thresholds.json").predict(files)
    np.testing.assert_allclose(frame[["prob_cat", "prob_dog", "prob_bird"]].to_numpy(), direct.probabilities,
                               atol=1e-6)
    assert [list(x) for x in frame["labels"]] == direct.labels


def test_model_is_registered_as_champion_with_its_headline_metrics(tracked):
    _, _, client, run = tracked
    version = client.get_model_version_by_alias("mlic-test-model", "champion")
    assert version.run_id == run.info.run_id
    assert version.tags["val/macro_ap"] == "0.7" and version.tags["test_calibrated/macro_f1"] == "0.78"
    assert version.tags["champion_decision"].startswith("promoted: no champion yet")
    assert "val/macro_ap 0.7" in version.description and "promoted" in version.description
    # it says what it is before the run id (the list cuts long text); the model says what it is for
    assert version.description.startswith(f"{run.info.run_name}: ") and version.description.endswith(run.info.run_id + ".")
    assert "mlic predict" in client.get_registered_model("mlic-test-model").description
    assert run.data.tags["champion.promoted"] == "true"
    assert run.data.tags["registered_model_version"] == f"mlic-test-model/{version.version}"
    decision = json.loads(Path(client.download_artifacts(run.info.run_id, "champion.json")).read_text())
    assert decision["metric"] == "val/macro_ap" and decision["promoted"] is True


def test_tags_record_git_dvc_and_data(tracked):
    project, _, _, run = tracked
    tags = run.data.tags
    assert tags["git_commit"] == git(project, "rev-parse", "HEAD")
    assert tags["git_dirty"] == "false"
    assert tags["dvc_exp_name"] == "brisk-otter"
    assert tags["dvc_exp_baseline_rev"] == "0" * 40
    assert tags["mlflow.runName"] == "as committed (brisk-otter)" and tags["mlic.changed"] == "nothing"
    assert tags["mlflow.source.name"] == "dvc exp run"
    assert tags["data_fingerprint"] == data_fingerprint(FINGERPRINTS)
    assert tags["model_parameters"].isdigit()


def test_experiment_is_a_model_training_experiment(tracked):
    _, _, client, run = tracked
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_exactly_one_finished_run_and_its_record(tracked):
    project, uri, client, run = tracked
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert run.info.status == "FINISHED"
    record = json.loads((project / ".mlic/mlflow_run.json").read_text())
    champion = record.pop("champion")
    assert record == {
        "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
        "experiment": EXPERIMENT, "run_name": "as committed (brisk-otter)", "tracking_uri": uri,
        "git_commit": run.data.tags["git_commit"], "model_uri": f"models:/{record['model_uri'].split('/')[-1]}",
        "registered_model": "mlic-test-model", "model_version": champion["version"],
    }
    assert champion["promoted"] is True


def test_the_logged_file_is_the_fingerprint_of_the_state_and_nothing_of_the_machine(tracked):
    project, _, _, run = tracked
    text = (project / "reports/track/logged.json").read_text()
    logged = json.loads(text)
    assert logged["fingerprint"] == run.data.tags["mlic.fingerprint"] and len(logged["fingerprint"]) == 64
    assert logged["experiment"] == EXPERIMENT
    assert str(project) not in text and run.info.run_id not in text   # the same bytes in every clone


def test_a_state_already_in_the_store_is_not_logged_twice(tracked, monkeypatch, caplog):
    """`dvc exp apply` of an old experiment, a forced re-run, a clone of a logged state: `track`
    runs, finds the state's run, logs nothing new and says which run holds it."""
    project, _, client, run = tracked
    monkeypatch.chdir(project)
    logged = (project / "reports/track/logged.json").read_bytes()
    (project / "reports/track/logged.json").unlink()
    gone = subprocess.Popen(["true"])
    gone.wait()                                      # a `track` killed while logging (kill -9) left this
    abandoned = client.create_run(run.info.experiment_id,
                                  tags={**tracking.owner_tags(), tracking.OWNER_PID: str(gone.pid)}).info.run_id
    caplog.set_level(logging.INFO)
    assert _load_stage().main(_track_argv(project)) == 0
    assert client.get_run(abandoned).info.status == "FAILED"      # settled, though nothing was logged
    client.delete_run(abandoned)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    assert (project / "reports/track/logged.json").read_bytes() == logged
    assert json.loads((project / ".mlic/mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert any("already in the store" in r.getMessage() and run.info.run_id in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("uri, first", [("sqlite:////x/mlflow.db", "  open the UI: mlflow ui --backend-store-uri"),
                                        ("http://user:pw@mlflow.internal:5000/", "  runs table:  http://")])
def test_the_links_are_one_a_line_and_carry_no_password(uri, first):
    info = tracking.RunInfo("r" * 32, "7", "mlic", "n", uri, "c")
    lines = tracking.ui_hint(info)
    assert lines[0].startswith(first) and all("\n" not in line and "pw" not in line for line in lines)
    assert lines[-1].endswith("#/experiments/7/runs/" + "r" * 32 + "?workflowType=machine_learning")


def test_the_headline_is_logged_first_for_the_compare_views_default_plot(tracked):
    """MLflow's parallel-coordinates plot takes the first metric in logged order (store order)."""
    _, _, _, run = tracked
    assert next(iter(run.data.metrics)) == tracking.LEAD_METRIC == "test_calibrated/macro_f1"


def test_consecutive_runs_get_different_colours(tracked):
    _, uri, client, run = tracked
    assert run.data.tags[tracking.RUN_COLOR_TAG] == tracking.RUN_COLORS[0]      # the experiment's first run
    experiment_id = client.create_experiment("mlic-colours")
    colours = []
    for _ in range(len(tracking.RUN_COLORS) + 1):
        colour = tracking.next_run_color(client, experiment_id)
        client.create_run(experiment_id, tags={tracking.RUN_COLOR_TAG: colour})
        colours.append(colour)
    assert colours[:-1] == list(tracking.RUN_COLORS) and colours[-1] == tracking.RUN_COLORS[0]


@pytest.mark.parametrize("name, expected", [
    ("as committed @16a7bd8", "as-committed-16a7bd8"),
    ("calibrate.beta=2.0 (beta2)", "calibrate-beta-2-0-beta2"),
    ("lr/train.learning_rate=0.001, train.dropout=0.2 +1 more (minus-pyre)",
     "lr-train-learning_rate-0-001-train-dropout-0-2-1-more-minus-pyre"),
    ("///", "model"),
])
def test_model_names_follow_the_run(name, expected):
    from mlflow.utils.validation import _validate_logged_model_name

    assert tracking.model_name(name) == expected[:tracking.MAX_MODEL_NAME]
    _validate_logged_model_name(tracking.model_name(name))          # what the store checks on log_model


@pytest.mark.parametrize("metric, split", [("test/macro_f1", "test"), ("test_calibrated/macro_f1", "test"),
                                           ("test_probability/ece_after", "test"), ("val/macro_ap", "val"),
                                           ("train/best_epoch", ""), ("epoch/val_loss", ""), ("testing/x", "")])
def test_metric_split(metric, split):
    assert tracking.metric_split(metric) == split


def test_failure_half_way_marks_the_run_failed(tracked, monkeypatch):
    from mlflow import MlflowClient

    from mlic.record import build_record

    project, uri, client, _ = tracked
    monkeypatch.chdir(project)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_artifacts", broken)
    run = build_record(params_file=Path("params.yaml"), history_csv=Path("reports/train/history.csv"),
                       metrics_files=[("", Path("reports/evaluate/metrics.json"))], project_root=project)
    with pytest.raises(OSError, match="disk full"):
        tracking.log_record(run, tracking_uri=uri, experiment="mlic-failing")
    experiment = client.get_experiment_by_name("mlic-failing")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.metrics["test/macro_f1"] == 0.75  # it got half-way: logged, then failed


def test_a_missing_passed_file_fails_before_any_run(tracked, monkeypatch, tmp_path):
    project, uri, client, _ = tracked
    monkeypatch.chdir(project)
    params = write_text(tmp_path / "params.yaml", "tracking:\n  experiment: mlic-missing\n")
    argv = ["--params", str(params), "--metrics", "reports/nope.json", "--note", str(tmp_path / "o.json"),
            "--logged", str(tmp_path / "logged.json")]
    assert _load_stage().main(argv) == 2
    assert client.get_experiment_by_name("mlic-missing") is None
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "logged.json").exists()


def test_an_unwritable_artifact_folder_is_one_line_and_a_failed_run(tracked, monkeypatch, tmp_path, caplog):
    """Root writes anywhere, so the folder's refusal is injected where MLflow creates it."""
    import errno

    from mlflow.store.artifact import local_artifact_repo

    project, uri, client, _ = tracked
    monkeypatch.chdir(project)

    def refuse(root, name=None):
        target = os.path.join(root, name) if name else root
        raise PermissionError(errno.EACCES, "Permission denied", target)

    monkeypatch.setattr(local_artifact_repo, "mkdir", refuse)
    params = write_text(tmp_path / "params.yaml", "tracking:\n  experiment: mlic-unwritable\n")
    argv = ["--params", str(params), "--artifacts", "dvc.lock", "--note", str(tmp_path / "o.json"),
            "--logged", str(tmp_path / "logged.json")]
    assert _load_stage().main(argv) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "permission denied" in error and "mlruns" in error and "\n" not in error
    runs = client.search_runs([client.get_experiment_by_name("mlic-unwritable").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "logged.json").exists()


# --------------------------------------------------------------------------- tracking store
@pytest.mark.parametrize(
    "env, params_uri, expected",
    [
        ("http://env:5000", "http://params:5000", "http://env:5000"),
        (None, "http://params:5000", "http://params:5000"),
        (None, None, "sqlite:///{root}/mlflow.db"),
        ("", None, "sqlite:///{root}/mlflow.db"),
    ],
)
def test_tracking_uri_precedence_env_then_params_then_project_db(monkeypatch, tmp_path, env, params_uri, expected):
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert store.resolve_tracking_uri(params_uri, tmp_path) == expected.format(root=tmp_path.resolve().as_posix())


def test_default_store_follows_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert store.resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow.db"


def test_unreachable_server_fails_fast_in_one_line():
    started = time.perf_counter()
    with pytest.raises(store.TrackingUnavailable) as info:
        store.check_store("http://127.0.0.1:9", timeout_s=5.0)
    assert time.perf_counter() - started < 6.0
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("MLflow tracking store http://127.0.0.1:9 is not reachable: ")
    assert message.endswith("start the server or unset MLFLOW_TRACKING_URI to use the local mlflow.db")


def test_writable_sqlite_folder_passes_and_creates_nothing(tmp_path):
    store.check_store(f"sqlite:///{tmp_path.as_posix()}/mlflow.db")
    assert list(tmp_path.iterdir()) == []


def test_sqlite_in_missing_folder_fails(tmp_path):
    with pytest.raises(store.TrackingUnavailable, match="does not exist"):
        store.check_store(f"sqlite:///{tmp_path.as_posix()}/nope/mlflow.db")


def _as_nobody(fn) -> str:
    """`fn()` in a forked child that dropped root for `nobody`: root writes anywhere, so an
    unwritable folder is only unwritable to someone else. The child only calls `fn` (no import,
    no exec: the interpreter under /root is out of nobody's reach); returns what it raised, or "OK"."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                fn()
                message = "OK"
            except Exception as exc:  # noqa: BLE001 - handed to the parent
                message = f"{type(exc).__name__}: {exc}"
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    os.waitpid(pid, 0)
    return message


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_sqlite_in_read_only_folder_fails(tmp_path):
    if os.geteuid() != 0:
        tmp_path.chmod(0o500)
        try:
            with pytest.raises(store.TrackingUnavailable, match="not writable"):
                store.check_store(f"sqlite:///{tmp_path.as_posix()}/mlflow.db")
        finally:
            tmp_path.chmod(0o700)
        return
    # As root (CI): a folder nobody may enter but not write, checked as nobody.
    outer = Path(tempfile.mkdtemp(prefix="mlic-readonly-"))
    try:
        outer.chmod(0o755)
        folder = outer / "store"
        folder.mkdir(mode=0o555)
        uri = f"sqlite:///{folder.as_posix()}/mlflow.db"
        got = _as_nobody(lambda: store.check_store(uri))
        assert got.startswith("TrackingUnavailable") and f"folder {folder} is not writable" in got, got
        assert _as_nobody(lambda: store.check_store(f"sqlite:///{outer.as_posix()}/x.db")).startswith(
            "TrackingUnavailable")   # 0o755 root's: not nobody's to write either
        (outer / "open").mkdir(mode=0o777)
        (outer / "open").chmod(0o777)
        assert _as_nobody(lambda: store.check_store(f"sqlite:///{(outer / 'open').as_posix()}/x.db")) == "OK"
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def test_mlic_check_exits_2_with_the_message_and_0_on_a_usable_store(monkeypatch, tmp_path, caplog):
    from mlic import cli

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert cli.main(["check", "--params", str(tmp_path / "absent.yaml"), "--timeout", "2"]) == 2
    assert "is not reachable" in caplog.text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.as_posix()}/mlflow.db")
    assert cli.main(["check", "--params", str(tmp_path / "absent.yaml")]) == 0
    assert "is usable" in caplog.text


def test_password_is_redacted():
    assert store.redact_uri("https://me:secret@host:8443/x") == "https://me:***@host:8443/x"
    assert store.redact_uri("sqlite:////a/b.db") == "sqlite:////a/b.db"


# --------------------------------------------------------------------------- tracking never lies
def _record(project: Path, sweep: str | None = None):
    from mlic.record import build_record

    return build_record(params_file=Path("params.yaml"), metrics_files=[("", Path("reports/evaluate/metrics.json"))],
                        project_root=project, sweep=sweep)


def test_sigterm_while_logging_marks_the_run_killed(tracked, monkeypatch):
    import signal

    from mlflow import MlflowClient

    project, uri, client, _ = tracked
    monkeypatch.chdir(project)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)   # `kill <pid>`, a CI timeout, `dvc queue kill`
        time.sleep(5)

    monkeypatch.setattr(MlflowClient, "log_artifacts", terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        tracking.log_record(_record(project), tracking_uri=uri, experiment="mlic-sigterm")
    assert signal.getsignal(signal.SIGTERM) is before          # the handler is put back
    runs = client.search_runs([client.get_experiment_by_name("mlic-sigterm").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_runs_left_running_by_a_killed_track_are_settled_by_the_next(tracked, monkeypatch):
    project, uri, client, _ = tracked
    monkeypatch.chdir(project)
    experiment_id = client.create_experiment("mlic-abandoned")
    gone = subprocess.Popen(["true"])
    gone.wait()                                                # a pid that no longer runs
    abandoned = client.create_run(experiment_id, tags={**tracking.owner_tags(), tracking.OWNER_PID: str(gone.pid)})
    alive = client.create_run(experiment_id, tags=tracking.owner_tags())   # a parallel worker, still writing
    elsewhere = client.create_run(experiment_id, tags={**tracking.owner_tags(), tracking.OWNER_HOST: "other-host"})
    tracking.log_record(_record(project), tracking_uri=uri, experiment="mlic-abandoned")
    status = {r.info.run_id: r.info.status for r in client.search_runs([experiment_id])}
    assert status[abandoned.info.run_id] == "FAILED"
    assert "no longer runs" in client.get_run(abandoned.info.run_id).data.tags["mlic.settled"]
    assert status[alive.info.run_id] == status[elsewhere.info.run_id] == "RUNNING"
    assert sorted(status.values()) == ["FAILED", "FINISHED", "RUNNING", "RUNNING"]


FIRST_WRITER = """
import sys
from pathlib import Path
from mlflow import MlflowClient
from mlic import store, tracking
uri = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()                               # both open the fresh store at the parent's word
with store.first_use(uri):
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, "race", uri)
run = client.create_run(experiment_id)
client.set_terminated(run.info.run_id)
"""


@pytest.mark.parametrize("trial", range(2))
def test_two_first_time_writers_to_a_fresh_store_both_succeed(tmp_path, trial):
    import sys

    uri = f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_WRITER, uri], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    # Both have imported mlflow and mlic, however long that took under load: now both go at once.
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outcomes
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert store.sqlite_schema_problem(tmp_path / "mlflow.db") is None


def test_check_verifies_the_schema_not_just_the_file(tracked, tmp_path):
    import sqlite3

    _, uri, _, _ = tracked
    store.check_store(uri)                                   # the fixture's healthy store
    half = tmp_path / "half.db"
    with sqlite3.connect(half) as db:                           # creation interrupted after one table
        db.execute("CREATE TABLE experiments (experiment_id INTEGER)")
    with pytest.raises(store.TrackingUnavailable, match="missing tables: alembic_version"):
        store.check_store(f"sqlite:///{half.as_posix()}")
    junk = write_text(tmp_path / "junk.db", "not a database at all, but long enough to be read " * 20)
    with pytest.raises(store.TrackingUnavailable, match="not a readable SQLite database"):
        store.check_store(f"sqlite:///{junk.as_posix()}")
    old = tmp_path / "old.db"
    db_file = store.sqlite_path(uri)
    old.write_bytes(db_file.read_bytes())
    known, heads = store.mlflow_schema_heads()
    older = sorted(known - heads)[0]
    with sqlite3.connect(old) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (older,))
    with pytest.raises(store.TrackingUnavailable, match="older MLflow schema .* mlflow db upgrade"):
        store.check_store(f"sqlite:///{old.as_posix()}")


def test_runs_of_a_sweep_are_children_of_one_parent(tracked, monkeypatch):
    project, uri, client, _ = tracked
    monkeypatch.chdir(project)
    record = _record(project, sweep="lr-dropout")
    infos = [tracking.log_record(record, tracking_uri=uri, experiment="mlic-sweep") for _ in range(2)]
    tracking.log_record(_record(project), tracking_uri=uri, experiment="mlic-sweep")   # not in the sweep
    runs = client.search_runs([infos[0].experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlic.sweep_parent") == "true"]
    assert len(runs) == 4 and len(parents) == 1 and parents[0].info.run_name == "lr-dropout"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_id for r in children) == sorted(i.run_id for i in infos)
    assert all(r.data.tags["mlic.sweep"] == "lr-dropout" and r.info.status == "FINISHED" for r in children)
