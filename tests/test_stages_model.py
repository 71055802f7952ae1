"""Tests for the model-side stage scripts (`train`, `evaluate`, `calibrate`) and the predictions CSV.

The stages are called through `main(argv)` with the argv that dvc.yaml's `cmd` passes, in a
temporary project folder: tiny TFRecords (32 px, 24 train / 8 val / 8 test records), a tiny
params.yaml (1 epoch, batch 8) and the MLflow store in that folder. calibrate runs on synthetic
predictions CSVs, so it needs no model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import write_shards

from mlic import calibration, metrics, thresholds, tfrecords
from mlic.params import load_section
from mlic.predictions import Predictions, read_predictions, write_predictions

ROOT = Path(__file__).resolve().parents[1]
SIZE, SEED, SHARD_SIZE = 32, 3, 5  # shards of 5: val and test span two shards each
SPLITS = {"train": range(0, 24), "val": range(24, 32), "test": range(32, 40)}
TRAIN = {"epochs": 1, "batch_size": 8, "early_stopping_patience": 0, "shuffle_buffer": 64,
         # Op determinism is process-wide and irreversible: keep it out of the rest of the session.
         "deterministic_ops": False,
         # params.yaml's head, optimizer and saved model (the dataclass defaults keep the old ones)
         "pool": "attention", "weight_decay": 0.2, "tta_flip": True}
TRACKING = {"experiment": "test", "log_model": False}


def _load_stage(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _stray(folder: Path) -> list[str]:
    """Temp files/folders the atomic writers (and the train checkpoint) leave behind only on failure."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob(".*")
            if p.suffix in (".tmp", ".old", ".keras")]


def _strict_json(path: Path) -> Any:
    """Parse JSON, refusing NaN/Infinity (which json.dump would write but strict JSON has not)."""
    def refuse(name: str) -> None:
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def assert_metrics_equal(written: dict[str, Any], expected: dict[str, float]) -> None:
    """A metrics section as written (NaN as null) equals `expected` key for key, to 1e-9."""
    assert set(written) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert written[key] is None, key
        else:
            assert written[key] == pytest.approx(value, abs=1e-9), key


# --- a project with tiny TFRecords, trained once -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Project:
    root: Path
    tfrecords: Path
    classes: list[str]
    labels: dict[str, np.ndarray]       # filename -> the labels written into the records
    order: dict[str, list[str]]         # split -> filenames in manifest (record) order
    train_argv: list[str]
    train_outputs: list[str]


def _write_tfrecords(image_set, out: Path) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    y = image_set.y.copy()
    y[list(SPLITS["test"]), -1] = 0  # a class with no test positive: AP undefined, ROC-AUC undefined
    write_shards(image_set, out, SPLITS, size=SIZE, shard_size=SHARD_SIZE, seed=SEED, y=y)
    order = {}
    for split, rows in SPLITS.items():
        names = [image_set.filenames[i] for i in rows]
        order[split] = [names[i] for i in tfrecords.record_order(names, SEED)]
    return dict(zip(image_set.filenames, y)), order


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, make_set, params_yaml, dvc_stages) -> Project:
    """A project folder with tiny TFRecords and the train stage run once (MLflow store in the folder)."""
    root = tmp_path_factory.mktemp("stages_model")
    image_set = make_set(root / "raw", n=40, seed=11)
    params_yaml(root / "params.yaml", train=TRAIN, tracking=TRACKING, evaluate={"batch_size": 3})
    argv, outputs = dvc_stages("train")
    labels, order = _write_tfrecords(image_set, root / _arg(argv, "--tfrecords"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        assert _load_stage("train").main(argv) == 0
    return Project(root, root / _arg(argv, "--tfrecords"), image_set.classes, labels, order, argv, outputs)


# --- train ---------------------------------------------------------------------------------------


def test_train_writes_model_meta_history_and_metrics(project: Project) -> None:
    root, argv = project.root, project.train_argv
    for path in project.train_outputs:
        assert (root / path).is_file(), path
    assert _stray(root) == []

    meta = json.loads((root / _arg(argv, "--meta")).read_text())
    manifest = tfrecords.Manifest.read(project.tfrecords, "train")
    assert meta["classes"] == manifest.classes == project.classes
    assert meta["image_size"] == SIZE and meta["seed"] == SEED
    assert meta["train"] == dataclasses.asdict(load_section("train", root / "params.yaml"))
    assert meta["train"]["epochs"] == 1 and meta["train"]["batch_size"] == 8
    assert meta["data_fingerprints"]["train"] == manifest.fingerprint

    history = pd.read_csv(root / _arg(argv, "--history"))
    assert history["epoch"].tolist() == [0]
    assert history["phase"].tolist() == ["full"]
    assert {"loss", "val_loss", "val_auc_pr", "val_f1", "learning_rate"} <= set(history.columns)

    result = json.loads((root / _arg(argv, "--metrics")).read_text())
    assert result["epochs_run"] == len(history) == 1
    assert result["best_epoch"] == 0
    assert result["best_val_auc_pr"] == pytest.approx(history["val_auc_pr"].max(), abs=1e-6)
    # nothing that changes from run to run: timing lives in the journal, not in a DVC metric
    assert set(result) == {"best_epoch", "epochs_run", "best_val_auc_pr"}
    assert "Total params" in (root / _arg(argv, "--summary")).read_text(encoding="utf-8")

    import keras

    import mlic.model  # noqa: F401 - registers the custom objects

    model = keras.models.load_model(root / _arg(argv, "--model"), compile=False)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert model.output_shape == (None, len(project.classes))
    assert meta["parameters"] == model.count_params() > 0
    # train.tta_flip (on, with augment_flip): the saved model averages each image with its mirror
    # image, so it cannot tell them apart
    assert meta["train"]["tta_flip"] and meta["train"]["augment_flip"] and model.name.endswith("_flip_tta")
    x = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), model.predict(x[:, :, ::-1], verbose=0), atol=1e-6)


def test_train_stops_before_training_when_the_tracking_store_is_unreachable(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    shutil.copytree(project.tfrecords, tmp_path / project.tfrecords.relative_to(project.root))
    shutil.copy(project.root / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.perf_counter()
    with caplog.at_level(logging.ERROR):
        assert _load_stage("train").main(project.train_argv) == 2
    assert time.perf_counter() - start < 30
    assert "127.0.0.1:9" in caplog.text and "not reachable" in caplog.text
    for path in project.train_outputs:
        assert not (tmp_path / path).exists(), path


def test_train_failing_midway_leaves_no_model_and_no_stray_checkpoint(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlic import training

    def fit_then_crash(model, *args, checkpoint: Path, **kwargs):
        model.save(checkpoint)  # as ModelCheckpoint does after a good epoch
        raise RuntimeError("interrupted after a checkpoint")

    shutil.copytree(project.tfrecords, tmp_path / project.tfrecords.relative_to(project.root))
    shutil.copy(project.root / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(training, "fit", fit_then_crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        _load_stage("train").main(project.train_argv)
    for path in project.train_outputs:
        assert not (tmp_path / path).exists(), path
    assert _stray(tmp_path) == []


# --- train: resume after a kill -------------------------------------------------------------------

RESUME_EPOCHS = 5


def _train_project(project: Project, folder: Path, params_yaml, **train: Any) -> Path:
    """A copy of the project's TFRecords with a params.yaml of RESUME_EPOCHS epochs (and `train`)."""
    shutil.copytree(project.tfrecords, folder / project.tfrecords.relative_to(project.root))
    params_yaml(folder / "params.yaml", train={**TRAIN, "epochs": RESUME_EPOCHS, **train}, tracking=TRACKING)
    return folder


def _resume_states(folder: Path) -> list[Path]:
    return sorted((folder / ".mlic" / "train-resume").glob("*/epoch-*"))


def test_train_killed_after_an_epoch_resumes_there_and_writes_what_a_run_through_writes(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params_yaml, caplog) -> None:
    from mlic import training

    class Killed(Exception):
        pass

    through = _train_project(project, tmp_path / "through", params_yaml)
    killed = _train_project(project, tmp_path / "killed", params_yaml)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(through)
    assert _load_stage("train").main(project.train_argv) == 0
    assert not (through / ".mlic" / "train-resume").exists()

    # Killed once epoch 2 (0-based 1) is saved: the in-process stand-in for kill -9 (tested below).
    record = training.EpochRecorder.on_epoch_end

    def record_then_die(self, epoch, logs=None):
        record(self, epoch, logs)
        if epoch == 1:
            raise Killed

    monkeypatch.chdir(killed)
    with monkeypatch.context() as mp:
        mp.setattr(training.EpochRecorder, "on_epoch_end", record_then_die)
        with pytest.raises(Killed):
            _load_stage("train").main(project.train_argv)
    assert [p.name for p in _resume_states(killed)] == ["epoch-0002"]
    assert _stray(killed) == []
    with caplog.at_level(logging.INFO):
        assert _load_stage("train").main(project.train_argv) == 0
    assert "resuming from epoch 3 (2 epochs done)" in caplog.text

    # In one process Keras numbers auto-named layers on (input_layer_1, adam_3...), so the model
    # file and summary differ by those names here: weights are compared instead, and the kill -9
    # test below compares every byte.
    model, summary = _arg(project.train_argv, "--model"), _arg(project.train_argv, "--summary")
    for path in project.train_outputs:
        if path not in (model, summary):
            assert (killed / path).read_bytes() == (through / path).read_bytes(), path
    import keras

    for a, b in zip(keras.models.load_model(killed / model, compile=False).get_weights(),
                    keras.models.load_model(through / model, compile=False).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (killed / ".mlic" / "train-resume").exists()


@pytest.mark.slow
def test_train_killed_with_sigkill_resumes_and_ends_like_a_run_through(
        project: Project, tmp_path: Path, params_yaml) -> None:
    """The real thing: `python stages/train.py` as DVC runs it, with op determinism, killed by
    SIGKILL once an epoch's state is on disk, then run again."""
    train = {"deterministic_ops": True, "epochs": 12}
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, str(ROOT / "stages" / "train.py"), *project.train_argv]

    def train_in(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)

    through = _train_project(project, tmp_path / "through", params_yaml, **train)
    done = train_in(through)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = _train_project(project, tmp_path / "killed", params_yaml, **train)
    proc = subprocess.Popen(command, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not _resume_states(killed) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "train ended before it could be killed"
    states = _resume_states(killed)
    assert len(states) == 1, states
    n_done = int(states[0].name.removeprefix("epoch-"))
    assert 1 <= n_done < train["epochs"]
    for path in project.train_outputs:
        assert not (killed / path).exists(), path

    again = train_in(killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from epoch {n_done + 1} ({n_done} epochs done)" in again.stderr
    for path in project.train_outputs:  # model bytes too: make_deterministic fixes the zip's times
        assert (killed / path).read_bytes() == (through / path).read_bytes(), path
    assert not (killed / ".mlic" / "train-resume").exists()


# --- evaluate ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(project: Project, dvc_stages) -> tuple[list[str], list[str]]:
    argv, outputs = dvc_stages("evaluate")
    assert _arg(argv, "--model") == _arg(project.train_argv, "--model")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project.root)
        assert _load_stage("evaluate").main(argv) == 0
    return argv, outputs


def test_evaluate_writes_every_declared_output(project: Project, evaluated) -> None:
    argv, outputs = evaluated
    for path in outputs:
        assert (project.root / path).exists(), path
    folder = project.root / _arg(argv, "--predictions")
    assert sorted(p.name for p in folder.iterdir()) == ["test.csv", "val.csv"]
    assert _stray(project.root) == []


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluate_predictions_follow_the_manifest_with_the_written_labels(project: Project, evaluated,
                                                                          split: str) -> None:
    argv, _ = evaluated
    path = project.root / _arg(argv, "--predictions") / f"{split}.csv"
    frame = pd.read_csv(path, dtype={"filename": str})
    assert list(frame.columns) == (["filename"] + [f"true_{c}" for c in project.classes]
                                   + [f"prob_{c}" for c in project.classes])
    assert frame["filename"].tolist() == project.order[split]  # one row per record, manifest order
    assert len(frame) == tfrecords.Manifest.read(project.tfrecords, split).count
    expected = np.stack([project.labels[name] for name in frame["filename"]])
    np.testing.assert_array_equal(frame[[f"true_{c}" for c in project.classes]].to_numpy(), expected)
    prob = frame[[f"prob_{c}" for c in project.classes]].to_numpy()
    assert ((prob >= 0) & (prob <= 1)).all()


def test_evaluate_metrics_are_recomputable_from_the_predictions(project: Project, evaluated) -> None:
    argv, _ = evaluated
    report = _strict_json(project.root / _arg(argv, "--metrics"))
    assert set(report) == {"val", "test", "baseline"} and set(report["baseline"]) == {"val", "test"}
    threshold = load_section("evaluate", project.root / "params.yaml").threshold
    train_m = tfrecords.Manifest.read(project.tfrecords, "train")
    prevalence = np.array([train_m.positives[c] for c in train_m.classes]) / train_m.count
    for split in ("val", "test"):
        pred = read_predictions(project.root / _arg(argv, "--predictions") / f"{split}.csv")
        assert_metrics_equal(report[split], metrics.compute_metrics(pred.y_true, pred.y_prob, threshold))
        baseline = metrics.prevalence_baseline(prevalence, len(pred.filenames))
        assert_metrics_equal(report["baseline"][split],
                             metrics.compute_metrics(pred.y_true, baseline, threshold))
    assert report["test"]["n_classes_undefined_ap"] == 1  # the class without test positives
    # the DVC metrics file is the headline part of the full report, value for value
    headline = _strict_json(project.root / _arg(argv, "--headline"))
    assert headline == {section: {name: report[section][name] for name in names}
                        for section, names in metrics.HEADLINE.items() if section in report}
    assert set(headline) == {"test", "val"}


def test_evaluate_writes_pr_curves_for_classes_with_positives(project: Project, evaluated) -> None:
    argv, _ = evaluated
    curves = pd.read_csv(project.root / _arg(argv, "--pr-curves"))
    assert list(curves.columns) == ["class", "recall", "precision"]
    assert curves["class"].unique().tolist() == project.classes[:-1]  # the last has no test positive
    assert ((curves["precision"] >= 0) & (curves["precision"] <= 1)).all()


def test_evaluate_per_class_table_has_one_row_per_class(project: Project, evaluated) -> None:
    argv, _ = evaluated
    table = pd.read_csv(project.root / _arg(argv, "--per-class"))
    assert table["class"].tolist() == project.classes
    pred = read_predictions(project.root / _arg(argv, "--predictions") / "test.csv")
    np.testing.assert_array_equal(table["support"], pred.y_true.sum(axis=0))
    assert math.isnan(table["ap"].iloc[-1])  # no test positive: written as an empty cell


def test_evaluate_metrics_match_the_csv_when_rounding_moves_a_score(project: Project, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    dvc_stages) -> None:
    """A score just below the threshold that the CSV's 6 d.p. round up to it: the metrics JSON
    must describe the predictions that were saved (anything recomputed from the CSV must agree)."""
    import keras

    k = len(project.classes)
    p = np.float32(0.4999997)  # float32 sigmoid output in [0.4999995, 0.5): written as 0.5
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(k, activation="sigmoid", kernel_initializer="zeros",
                                 bias_initializer=keras.initializers.Constant(float(np.log(p / (1 - p)))))(x)
    model_path = tmp_path / "constant.keras"
    keras.Model(inputs, outputs).save(model_path)

    argv, _ = dvc_stages("evaluate")
    argv[argv.index("--model") + 1] = str(model_path)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(project.tfrecords, tmp_path / project.tfrecords.relative_to(project.root))
    shutil.copy(project.root / "params.yaml", tmp_path / "params.yaml")
    assert _load_stage("evaluate").main(argv) == 0

    pred = read_predictions(tmp_path / _arg(argv, "--predictions") / "test.csv")
    assert (pred.y_prob == 0.5).all()
    report = _strict_json(tmp_path / _arg(argv, "--metrics"))
    assert_metrics_equal(report["test"], metrics.compute_metrics(pred.y_true, pred.y_prob, 0.5))
    assert report["test"]["mean_labels_pred"] == k  # every score is at the threshold: all predicted


# --- calibrate -----------------------------------------------------------------------------------

CLASSES = ["cloud", "dirt road", "wäter", "野原"]


def synthetic(n: int, seed: int, classes: list[str] = CLASSES) -> Predictions:
    """Scores that carry signal about the labels, with class-dependent shifts so 0.5 is not optimal."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    y = (rng.random((n, k)) < np.linspace(0.5, 0.15, k)).astype(np.int64)
    y[0] = 1  # every class has a positive
    shift = np.linspace(-0.25, 0.2, k)
    p = np.clip(0.3 * y + 0.7 * rng.random((n, k)) + shift, 0.0, 1.0)
    return Predictions([f"img_{i:03d}.jpg" for i in range(n)], list(classes), y, p)


CALIBRATE = {"beta": 1.0, "default_threshold": 0.5, "strategy": "fbeta", "min_support": 5,
             "temperature": "global"}


def write_train_manifest(folder: Path, classes: list[str], positives: list[int], count: int) -> None:
    """A train manifest holding what calibrate reads from it: classes and positives (prevalence)."""
    folder.mkdir(parents=True, exist_ok=True)
    tfrecords.Manifest(schema_version=tfrecords.SCHEMA_VERSION, split="train", count=count,
                       classes=list(classes), image_size=32, channels=3, resize_mode="pad", encoding="png",
                       jpeg_quality=None, positives=dict(zip(classes, positives)), shards=[],
                       fingerprint="0" * 64, directory=folder).write()


@pytest.fixture
def calibrate_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params_yaml, dvc_stages):
    """tmp_path as the project; `run(val, test, **calibrate)` writes the predictions CSVs, a train
    manifest and params, and runs the stage."""
    monkeypatch.chdir(tmp_path)
    argv, outputs = dvc_stages("calibrate")

    def run(val: Predictions, test: Predictions, **calibrate: Any) -> int:
        params_yaml(tmp_path / "params.yaml", calibrate={**CALIBRATE, **calibrate}, evaluate={"threshold": 0.5})
        folder = tmp_path / _arg(argv, "--predictions")
        write_predictions(folder / "val.csv", val)
        write_predictions(folder / "test.csv", test)
        write_train_manifest(tmp_path / _arg(argv, "--tfrecords"), test.classes, [40, 30, 20, 10], 100)
        return _load_stage("calibrate").main(argv)

    return run, argv, outputs


def test_calibrate_fits_thresholds_on_val_and_reports_test(calibrate_run, tmp_path: Path) -> None:
    run, argv, outputs = calibrate_run
    assert run(synthetic(80, seed=1), synthetic(60, seed=2), temperature="none") == 0
    for path in outputs:
        assert (tmp_path / path).is_file(), path
    # What the stage saw: the CSVs, probabilities rounded to 6 d.p.
    val = read_predictions(tmp_path / _arg(argv, "--predictions") / "val.csv")
    test = read_predictions(tmp_path / _arg(argv, "--predictions") / "test.csv")
    fitted = thresholds.fit(val.y_true, val.y_prob, "fbeta", beta=1.0, min_support=5).thresholds
    assert (val.y_true.sum(axis=0) >= 5).all()  # no fallback: today's per-class F-beta thresholds
    np.testing.assert_array_equal(fitted, thresholds.fit_thresholds(val.y_true, val.y_prob, beta=1.0))

    path = tmp_path / _arg(argv, "--thresholds")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["format"] == 2 and list(saved["thresholds"]) == CLASSES  # by class name, in column order
    assert saved["rule"] == dict.fromkeys(CLASSES, "fbeta") and saved["temperature"] == dict.fromkeys(CLASSES, 1.0)
    cal = calibration.Calibration.from_dict(saved, CLASSES)
    np.testing.assert_array_equal(cal.thresholds, fitted)
    assert "wäter" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes

    report = _strict_json(tmp_path / _arg(argv, "--metrics"))
    # test at 0.5 is evaluate's `test`
    assert set(report) == {"test_calibrated", "val_calibrated", "baseline", "test_probability"}
    assert_metrics_equal(report["test_calibrated"], metrics.compute_metrics(test.y_true, test.y_prob, fitted))
    assert_metrics_equal(report["val_calibrated"], metrics.compute_metrics(val.y_true, val.y_prob, fitted))
    # The trivial predictor calibrated the same way: a constant score per class, so its fitted
    # F-beta threshold predicts every class for every image.
    prior = metrics.prevalence_baseline(np.array([40, 30, 20, 10]) / 100, len(test.filenames))
    assert_metrics_equal(report["baseline"]["test_calibrated"], metrics.compute_metrics(test.y_true, prior, 0.0))
    headline = _strict_json(tmp_path / _arg(argv, "--headline"))
    assert headline == {"test_calibrated": {k: report["test_calibrated"][k]
                                            for k in metrics.HEADLINE["test_calibrated"]}}
    curves = pd.read_csv(tmp_path / _arg(argv, "--fbeta-curves"), keep_default_na=False)
    assert curves["class"].unique().tolist() == CLASSES and len(curves) == 99 * len(CLASSES)

    # On val, where they were fitted, the thresholds are at least as good as 0.5 for every class.
    at_fitted = metrics.per_class_table(val.y_true, val.y_prob, CLASSES, fitted)["f1"].to_numpy()
    at_half = metrics.per_class_table(val.y_true, val.y_prob, CLASSES, 0.5)["f1"].to_numpy()
    assert (at_fitted >= at_half - 1e-12).all()
    assert (at_fitted > at_half).any()  # the shifted scores make 0.5 suboptimal somewhere
    val_default = metrics.compute_metrics(val.y_true, val.y_prob, 0.5)
    assert report["val_calibrated"]["macro_f1"] >= val_default["macro_f1"]

    table = pd.read_csv(tmp_path / _arg(argv, "--per-class"), keep_default_na=False)
    assert table["class"].tolist() == CLASSES and table["rule"].tolist() == ["fbeta"] * 4
    np.testing.assert_allclose(table["threshold"], fitted, atol=1e-6)
    # No temperature: nothing changes, and the reliability table says so.
    assert report["test_probability"]["ece_before"] == report["test_probability"]["ece_after"]
    rel = pd.read_csv(tmp_path / _arg(argv, "--reliability"))
    assert list(rel.columns) == ["probabilities", "bin", "lower", "upper", "confidence", "frequency", "count"]
    assert (rel.groupby("probabilities")["count"].sum() == test.y_true.size).all()


def test_calibrate_applies_the_temperature_before_fitting_thresholds(calibrate_run, tmp_path: Path) -> None:
    """Thresholds live on the scaled probabilities, and test is scored on those."""
    run, argv, outputs = calibrate_run
    assert run(synthetic(80, seed=1), synthetic(60, seed=2), temperature="global", strategy="global") == 0
    val = read_predictions(tmp_path / _arg(argv, "--predictions") / "val.csv")
    test = read_predictions(tmp_path / _arg(argv, "--predictions") / "test.csv")
    t = calibration.fit_temperature(val.y_true, val.y_prob)
    assert abs(t - 1) > 0.05  # the synthetic scores are not calibrated: a real temperature
    cal = calibration.Calibration.from_dict(
        json.loads((tmp_path / _arg(argv, "--thresholds")).read_text(encoding="utf-8")), CLASSES)
    np.testing.assert_allclose(cal.temperature, t)
    scaled = calibration.apply(val.y_prob, t)
    assert len(set(cal.thresholds)) == 1 and cal.rules == ["global"] * 4
    assert cal.thresholds[0] == thresholds.fit_global(val.y_true, scaled)
    report = _strict_json(tmp_path / _arg(argv, "--metrics"))
    q = calibration.apply(test.y_prob, t)
    assert_metrics_equal(report["test_calibrated"], metrics.compute_metrics(test.y_true, q, cal.thresholds))
    pr = report["test_probability"]
    assert pr["brier_before"] == pytest.approx(calibration.brier(test.y_true, test.y_prob))
    assert pr["brier_after"] == pytest.approx(calibration.brier(test.y_true, q))
    assert pr["ece_after"] == pytest.approx(calibration.ece(test.y_true, q))


def test_calibrate_refuses_val_and_test_with_different_classes(calibrate_run, tmp_path: Path, caplog) -> None:
    run, argv, outputs = calibrate_run
    other = synthetic(60, seed=2, classes=["cloud", "dirt road", "water", "野原"])
    with caplog.at_level(logging.ERROR):
        assert run(synthetic(80, seed=1), other) == 2
    assert "different classes" in caplog.text
    for path in outputs:
        assert not (tmp_path / path).exists(), path


# --- the predictions CSV -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "classes, filenames",
    [
        (["cloud", "road"], ["a.jpg", "sub/b.png"]),
        (["dirt road", " leading space", "comma, quote\""], ["with space.jpg", "x,y.png"]),
        (["wäter", "野原", "naïve café"], ["ä/ö.jpg", "日本.png"]),
        (["1", "2"], ["007", "NA"]),  # names pandas would read as numbers or missing values
    ],
    ids=["plain", "spaces-and-csv-specials", "unicode", "numeric-looking"],
)
def test_predictions_round_trip(tmp_path: Path, classes: list[str], filenames: list[str]) -> None:
    rng = np.random.default_rng(0)
    n, k = len(filenames), len(classes)
    y = rng.integers(0, 2, (n, k))
    p = rng.random((n, k))
    p[0, 0], p[-1, -1] = 0.0, 1.0
    path = tmp_path / "preds.csv"
    write_predictions(path, Predictions(filenames, classes, y, p))
    back = read_predictions(path)
    assert back.filenames == filenames
    assert back.classes == classes
    assert back.y_true.dtype == np.int64 and back.y_prob.dtype == np.float64
    np.testing.assert_array_equal(back.y_true, y)
    np.testing.assert_array_equal(back.y_prob, np.round(p, 6))  # exact after rounding to 6 d.p.
    assert np.abs(back.y_prob - p).max() <= 5e-7
