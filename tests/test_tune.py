"""Tests for the `tune` stage: the space's validation, the study's name, best_params.yaml and its
`dvc exp run -S` command, the study with its MLflow runs, resuming after Ctrl-C or kill -9, and
the stage switched off (fast, no TensorFlow).

Most study tests drive `tune.run` with a scripted trainer (each trial reports the values a script
gives, no TensorFlow), over real Optuna and a real MLflow store: the bookkeeping is what they
test. The slow ones train real trials: tiny shards (32 px, 28 train / 12 val records), a
simple_cnn of width 8, 1 epoch a trial; one kills the stage's process with SIGKILL mid-study.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_shards

from mlic import tune
from mlic.params import ParamsError, SearchSpec, Train, Tune, load_section, section_from_dict

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINTS = {"train": "a" * 64, "val": "b" * 64}


def _tune(text: str, tmp_path: Path) -> Tune:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return load_section("tune", path)


# --------------------------------------------------------------------------- the space in params.yaml
@pytest.mark.parametrize("space, check", [
    ("{train: {learning_rate: {type: float, low: 0.0001, high: 0.01, log: true}}}",
     lambda t: t.space["train"]["learning_rate"] == SearchSpec("float", 0.0001, 0.01, log=True)),
    ("{train: {width: {type: int, low: 8, high: 32}}}", lambda t: t.space["train"]["width"].high == 32),
    ("{train: {loss: {type: categorical, choices: [bce, focal]}, augment_flip: {type: categorical, choices: [true, false]}}}",
     lambda t: t.searched() == ["train.loss", "train.augment_flip"]),
    ("{train: {weights: {type: categorical, choices: [null, imagenet]}}}",
     lambda t: t.space["train"]["weights"].choices == [None, "imagenet"]),
    ("{train: {dropout: {type: float, low: 0, high: 0.5}}}", lambda t: t.space["train"]["dropout"].low == 0),
], ids=["float-log", "int", "categorical-text-and-bool", "categorical-null", "int-low-for-float"])
def test_a_valid_space_loads(tmp_path: Path, space: str, check) -> None:
    assert check(_tune(f"tune:\n  space: {space}\n", tmp_path))


@pytest.mark.parametrize("space, words", [
    ("{train: {dropout: {type: float, low: 0.1, high: 1.0}}}",
     ["tune: space.train.dropout", "1.0 fails train.dropout's own check", "out of range", "[0.0, 1.0)"]),
    ("{train: {width: {type: float, low: 8, high: 32}}}", ["space.train.width", "expected an integer"]),
    ("{train: {loss: {type: categorical, choices: [bce, huber]}}}", ["space.train.loss", "'huber'", "use one of"]),
    ("{train: {learning_rat: {type: float, low: 0.001, high: 0.01}}}",
     ["space.train.learning_rat", "train has no param", "did you mean 'learning_rate'"]),
    ("{train: {epochs: {type: int, low: 5, high: 20}}}", ["space.train.epochs", "cannot be searched", "tune.epochs"]),
    ("{preprocess: {image_size: {type: int, low: 32, high: 96}}}", ["space.preprocess", "only train params"]),
    ("{train: {dropout: {low: 0.1, high: 0.5}}}", ["tune.space.train.dropout", "needs `type`"]),
    ("{train: {dropout: {type: float, low: 0.5, high: 0.1}}}", ["tune.space.train.dropout", "low 0.5 must be below high 0.1"]),
    ("{train: {learning_rate: {type: float, low: 0.0, high: 0.1, log: true}}}", ["log: true needs low > 0"]),
    ("{train: {width: {type: int, low: 8, high: 32.5}}}", ["tune.space.train.width", "whole-number"]),
    ("{train: {dropout: {type: float, low: 0.1, high: 0.5, choices: [0.2]}}}", ["not choices"]),
    ("{train: {loss: {type: categorical, choices: []}}}", ["non-empty list `choices`"]),
    ("{train: {loss: {type: categorical, choices: [bce, bce]}}}", ["choices repeat 'bce'"]),
    ("{train: {loss: {type: categorical, choices: [[bce]]}}}", ["not a single value"]),
    ("{train: {dropout: {type: float, low: 0.1, hi: 0.5}}}", ["tune.space.train.dropout", "unknown key(s) hi"]),
], ids=["out-of-param-range", "float-range-over-int", "bad-choice", "typo-with-hint", "epochs", "not-train",
        "no-type", "low-above-high", "log-at-zero", "int-with-float", "float-with-choices", "no-choices",
        "duplicate-choice", "non-scalar-choice", "unknown-key"])
def test_a_bad_space_is_rejected_naming_the_key(tmp_path: Path, space: str, words: list[str]) -> None:
    with pytest.raises(ParamsError) as err:
        _tune(f"tune:\n  space: {space}\n", tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "params.yaml") in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("text, words", [
    ("tune:\n  enabled: true\n  space: {}\n", ["space is empty"]),
    ("tune:\n  n_trials: 0\n", ["tune.n_trials", "out of range"]),
    ("tune:\n  timeout_s: 0\n", ["tune.timeout_s", "out of range"]),
    ("tune:\n  pruner: hyperband\n", ["tune.pruner", "'median' | 'none'"]),
    ("tune:\n  trials: 5\n", ["unknown key(s) trials"]),
])
def test_bad_tune_settings_are_rejected(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ParamsError) as err:
        _tune(text, tmp_path)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_the_shipped_tune_section_is_the_default_and_off() -> None:
    cfg = load_section("tune", ROOT / "params.yaml")
    assert cfg == Tune() and not cfg.enabled and cfg.searched()


# --------------------------------------------------------------------------- the study's name
def _name(cfg: Tune | None = None, train: Train | None = None, seed: int = 1, fingerprints=FINGERPRINTS) -> str:
    return tune.study_name(tune.study_definition(cfg or Tune(), train or Train(), seed, fingerprints))


def test_the_study_name_is_stable() -> None:
    assert _name() == _name() == _name(fingerprints=dict(reversed(FINGERPRINTS.items())))
    assert _name().startswith("mlic-tune-") and len(_name()) == len("mlic-tune-") + 12


@pytest.mark.parametrize("change", [
    lambda c, t: (dataclasses.replace(c, epochs=c.epochs + 1), t),
    lambda c, t: (dataclasses.replace(c, pruner_warmup_epochs=9), t),
    lambda c, t: (dataclasses.replace(c, pruner_startup_trials=9), t),
    lambda c, t: (dataclasses.replace(c, pruner="none"), t),
    lambda c, t: (dataclasses.replace(c, space={"train": {**c.space["train"],
                                                          "dropout": SearchSpec("float", 0.1, 0.4)}}), t),
    lambda c, t: (c, dataclasses.replace(t, width=32)),          # a train param the study does not search
    lambda c, t: (c, dataclasses.replace(t, loss="focal")),
], ids=["trial-epochs", "warmup", "startup", "pruner", "space-bound", "fixed-width", "fixed-loss"])
def test_the_study_name_changes_with_its_definition(change) -> None:
    cfg, train = change(Tune(), Train())
    assert _name(cfg, train) != _name()


def test_the_study_name_changes_with_seed_and_data() -> None:
    assert _name(seed=2) != _name()
    assert _name(fingerprints={**FINGERPRINTS, "val": "c" * 64}) != _name()


@pytest.mark.parametrize("change", [
    lambda c, t: (dataclasses.replace(c, n_trials=99, timeout_s=60.0, enabled=True), t),  # the budget
    lambda c, t: (c, dataclasses.replace(t, learning_rate=0.1, dropout=0.0)),  # searched: trials set them
    lambda c, t: (c, dataclasses.replace(t, epochs=3, resume=False)),          # trials train tune.epochs
], ids=["budget", "searched-train-values", "train-epochs-and-resume"])
def test_the_study_name_ignores_what_does_not_define_it(change) -> None:
    cfg, train = change(Tune(), Train())
    assert _name(cfg, train) == _name()


# --------------------------------------------------------------------------- best_params.yaml and -S
BEST = {"train.learning_rate": 0.0023456789012345, "train.finetune_learning_rate": 1.234e-05,
        "train.dropout": 0.30000000000000004, "train.batch_size": 32, "train.loss": "focal",
        "train.augment_flip": False, "train.weights": None, "train.mixed_precision": "off"}


def _result(values: dict[str, Any] = BEST) -> tune.StudyResult:
    rows = [tune.TrialRow(0, tune.COMPLETE, 0.5, 3, 2, values),
            tune.TrialRow(1, tune.PRUNED, 0.25, 1, None, values),
            tune.TrialRow(2, tune.COMPLETE, 0.75, 3, 1, values),
            tune.TrialRow(3, tune.INTERRUPTED, None, None, None, values, "left RUNNING")]
    return tune.StudyResult("mlic-tune-0123456789ab", rows, rows[2], 1, list(values))


def test_best_params_nest_like_params_yaml_with_the_command_that_applies_them(tmp_path: Path) -> None:
    outputs = tune.Outputs(tmp_path / "best_params.yaml", tmp_path / "trials.csv", tmp_path / "metrics.json")
    tune.write_outputs(outputs, _result(), Tune())
    text = outputs.best_params.read_text()
    doc = yaml.safe_load(text)
    assert doc["train"] == {k.removeprefix("train."): v for k, v in BEST.items()}
    assert (doc["best_value"], doc["best_trial"], doc["best_epoch"], doc["study"]) == (0.75, 2, 1, "mlic-tune-0123456789ab")
    assert doc["trials"] == {"complete": 2, "pruned": 1, "failed": 0, "interrupted": 1}
    assert doc["apply"].startswith("dvc exp run -S train.learning_rate=0.0023456789012345 -S ")
    assert doc["apply"].endswith(" -S tune.enabled=false")  # the training experiment does not search again
    assert f"#   {doc['apply']}\n" in text  # the command in the header too, to copy
    # Every value passes train's validation once applied.
    section_from_dict(Train, doc["train"], "train")
    assert json.loads(outputs.metrics.read_text()) == {
        "best_val_macro_ap": 0.75, "trials_complete": 2, "trials_pruned": 1, "trials_failed": 0,
        "trials_interrupted": 1}
    lines = outputs.trials.read_text().splitlines()
    assert lines[0] == "number,state,value,epochs,best_epoch," + ",".join(BEST) + ",note"
    assert lines[4].startswith("3,interrupted,,,,") and lines[4].endswith(",left RUNNING")


def _apply_with_dvc(command: str, params: Path) -> None:
    """Apply `dvc exp run -S ...` to `params` the way DVC does (its Hydra override code)."""
    from dvc.utils.hydra import apply_overrides

    argv = shlex.split(command)
    assert argv[:3] == ["dvc", "exp", "run"]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    assert len(overrides) == (len(argv) - 3) // 2
    apply_overrides(params, overrides)


@pytest.mark.parametrize("values", [
    BEST,
    {"train.learning_rate": 0.00012345678, "train.width": 24, "train.pool": "avgmax", "train.backbone": "resnet_small"},
    {"train.jit_compile": True, "train.asl_margin": 0.0, "train.lr_schedule": "constant"},
], ids=["mixed", "small-float-int-text", "bool-zero"])
def test_the_apply_command_round_trips_through_dvc_to_the_same_typed_values(tmp_path: Path, values) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("  enabled: false", "  enabled: true"), encoding="utf-8")
    assert load_section("tune", params).enabled is True
    result = dataclasses.replace(_result(values), searched=list(values))
    _apply_with_dvc(tune.best_params_doc(result, Tune())[1]["apply"], params)
    assert load_section("tune", params).enabled is False
    train = load_section("train", params)  # PyYAML, as every stage reads it: types and ranges checked
    for name, value in values.items():
        got = getattr(train, name.removeprefix("train."))
        # YAML 1.1 reads on/off as true/false; Train accepts both spellings for these switches.
        want = {"on": True, "off": False}.get(value, value) if name == "train.mixed_precision" else value
        assert got == want and type(got) is type(want), (name, got, value)
    others = {k: v for k, v in yaml.safe_load((ROOT / "params.yaml").read_text()).items() if k not in ("train", "tune")}
    assert {k: v for k, v in yaml.safe_load(params.read_text()).items() if k not in ("train", "tune")} == others


def test_a_float_dvc_writes_with_an_exponent_applies() -> None:
    # DVC writes 0.00001 as 1e-05; params.yaml's reader takes it as YAML 1.2 does, a number.
    assert tune.apply_command({"train.finetune_learning_rate": 1e-05}).endswith("train.finetune_learning_rate=1e-05")
    with pytest.raises(tune.UserError, match="cannot be applied"):
        tune.apply_command({"train.finetune_learning_rate": float("nan")})


# --------------------------------------------------------------------------- studies with a scripted trainer
class Script:
    """A trainer that plays a script, one entry per trial: a value reported at every epoch, or a
    list of one value per epoch (the trial completes with the last unless pruned), "diverge" (fails), "interrupt" (Ctrl-C after epoch 1),
    "term" (SIGTERM to this process after epoch 1) or "kill" (SIGKILL to it after epoch 1). Records
    the configs it was given."""

    def __init__(self, plan: Sequence[Any]):
        self.plan, self.configs = list(plan), []

    def __call__(self, cfg: Train, report: tune.Report) -> tune.TrialOutcome:
        self.configs.append(cfg)
        step = self.plan.pop(0)
        for epoch in range(cfg.epochs):
            if step == "diverge":
                report(epoch, {"loss": float("nan"), tune.OBJECTIVE: float("nan")})
                return tune.TrialOutcome(None, epoch + 1, failure="diverged: non-finite outputs")
            value = 0.5 if step in ("interrupt", "term", "kill") else step[epoch] if isinstance(step, list) else step
            if report(epoch, {"loss": 1.0 / (epoch + 1), tune.OBJECTIVE: value}):
                return tune.TrialOutcome(None, epoch + 1, pruned=True)
            if step == "interrupt":
                raise KeyboardInterrupt
            if step in ("term", "kill"):
                os.kill(os.getpid(), signal.SIGTERM if step == "term" else signal.SIGKILL)
                time.sleep(30)  # the signal lands meanwhile
        return tune.TrialOutcome(value, cfg.epochs, best_epoch=cfg.epochs - 1)


SMALL = Tune(enabled=True, n_trials=4, epochs=2, pruner_startup_trials=1, pruner_warmup_epochs=0,
             space={"train": {"learning_rate": SearchSpec("float", 0.001, 0.01, log=True),
                              "batch_size": SearchSpec("categorical", choices=[8, 16])}})


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the module (creating one costs seconds); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('tune_mlflow') / 'mlflow.db'}"


@dataclasses.dataclass
class Study:
    root: Path
    tfrecords: Path
    outputs: tune.Outputs
    uri: str
    experiment: str

    def run(self, script: Script, cfg: Tune = SMALL) -> tune.StudyResult:
        return tune.run(cfg, Train(), 5, self.tfrecords, self.outputs, lambda: script, tracking_uri=self.uri,
                        experiment=self.experiment, root=self.root)

    def runs(self) -> tuple[Any, list[Any]]:
        """(the study's parent run, its trial runs by trial number), read from MLflow."""
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.experiment + "-tune")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        parents = [r for r in runs if r.data.tags.get("mlic.tune.role") == "study"]
        assert len(parents) == 1, parents
        trials = sorted((r for r in runs if r.data.tags.get("mlic.tune.role") == "trial"),
                        key=lambda r: int(r.data.tags["mlic.tune.trial"]))
        return parents[0], trials

    def curve(self, run_id: str, key: str) -> list[tuple[int, float]]:
        import mlflow

        return sorted((m.step, m.value) for m in mlflow.MlflowClient(self.uri).get_metric_history(run_id, key))

    def trials_csv(self) -> list[dict[str, str]]:
        with open(self.outputs.trials, newline="") as fh:
            return list(csv.DictReader(fh))


@pytest.fixture
def study(tmp_path: Path, mlflow_db: str, request: pytest.FixtureRequest) -> Study:
    from conftest import write_manifests

    write_manifests(tmp_path / "tfrecords", FINGERPRINTS)
    reports = tmp_path / "reports" / "tune"
    return Study(tmp_path, tmp_path / "tfrecords",
                 tune.Outputs(reports / "best_params.yaml", reports / "trials.csv", reports / "metrics.json"),
                 mlflow_db, request.node.name.replace("[", "-").rstrip("]"))


def test_a_study_prunes_fails_and_picks_the_best_with_a_nested_run_per_trial(study: Study) -> None:
    script = Script([0.6, 0.3, "diverge", 0.8])
    result = study.run(script)
    assert script.plan == [] and result.ran == 4
    # Trial 1 reported 0.3 at epoch 0, under the median (0.6) of the one finished trial: pruned there.
    assert [(r.number, r.state, r.epochs) for r in result.rows] == [
        (0, "complete", 2, ), (1, "pruned", 1), (2, "failed", 1), (3, "complete", 2)]
    assert (result.best.number, result.best.value) == (3, 0.8)
    # Each trial trained with its own values, for tune.epochs, without train's resume state.
    rows = study.trials_csv()
    for cfg, row in zip(script.configs, rows):
        assert (cfg.learning_rate, cfg.batch_size) == (float(row["train.learning_rate"]), int(row["train.batch_size"]))
        assert cfg.epochs == SMALL.epochs and cfg.resume is False
        assert dataclasses.replace(cfg, learning_rate=Train().learning_rate, batch_size=Train().batch_size,
                                   epochs=Train().epochs, resume=True) == Train()
    assert [r["state"] for r in rows] == ["complete", "pruned", "failed", "complete"]
    assert rows[2]["note"].startswith("diverged")
    best = yaml.safe_load(study.outputs.best_params.read_text())
    assert best["best_trial"] == 3 and best["train"]["learning_rate"] == float(rows[3]["train.learning_rate"])

    parent, trials = study.runs()
    assert parent.info.status == "FINISHED" and parent.info.run_name == result.study
    assert parent.data.tags["mlic.tune.study"] == result.study
    assert parent.data.metrics["best/val/macro_ap"] == 0.8 and parent.data.metrics["trials/pruned"] == 1
    assert parent.data.tags["best.train.batch_size"] == rows[3]["train.batch_size"]
    assert parent.data.params["tune.epochs"] == "2" and parent.data.params["seed"] == "5"
    assert "train.learning_rate" not in parent.data.params  # searched: on the trials, not the study
    assert study.curve(parent.info.run_id, "trial/val/macro_ap") == [(0, 0.6), (1, 0.3), (3, 0.8)]
    import mlflow

    artifacts = {a.path for a in mlflow.MlflowClient(study.uri).list_artifacts(parent.info.run_id)}
    assert artifacts == {"best_params.yaml", "trials.csv"}

    assert len(trials) == 4
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert [t.data.tags["mlic.tune.state"] for t in trials] == ["complete", "pruned", "failed", "complete"]
    assert [t.info.status for t in trials] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    assert [t.data.metrics.get("val/macro_ap") for t in trials] == [0.6, 0.3, None, 0.8]
    assert trials[0].data.params == {"train.learning_rate": rows[0]["train.learning_rate"],
                                     "train.batch_size": rows[0]["train.batch_size"]}
    assert study.curve(trials[0].info.run_id, "epoch/val_macro_ap") == [(0, 0.6), (1, 0.6)]
    assert study.curve(trials[1].info.run_id, "epoch/loss") == [(0, 1.0)]


def test_a_trial_is_never_pruned_after_its_last_epoch(study: Study) -> None:
    # Trial 1 is above the median after epoch 0 and below it after epoch 1, its last: it completes.
    result = study.run(Script([0.6, [0.7, 0.3], [0.2, 0.9]]), dataclasses.replace(SMALL, n_trials=3))
    assert [(r.state, r.value, r.epochs) for r in result.rows] == [
        ("complete", 0.6, 2), ("complete", 0.3, 2), ("pruned", 0.2, 1)]


def test_the_same_definition_draws_the_same_trials_and_a_finished_study_runs_nothing(study: Study) -> None:
    first = study.run(Script([0.6, 0.7, 0.5, 0.8]))
    again = study.run(Script([]))  # the same study: loaded, its budget spent, no trial runs
    assert again.ran == 0 and again.rows == first.rows
    other = dataclasses.replace(study, root=study.root / "elsewhere", experiment=study.experiment + "-2")
    fresh = other.run(Script([0.6, 0.7, 0.5, 0.8]))  # another database, the same definition
    assert fresh.study == first.study and [r.values for r in fresh.rows] == [r.values for r in first.rows]
    more = study.run(Script([0.9]), dataclasses.replace(SMALL, n_trials=5))  # a bigger budget continues it
    assert more.ran == 1 and [r.number for r in more.rows] == [0, 1, 2, 3, 4] and more.best.number == 4
    parent, trials = study.runs()  # one parent run for the study, reopened each time
    assert parent.info.status == "FINISHED" and len(trials) == 5


def test_ctrl_c_marks_the_trial_interrupted_and_the_next_run_finishes_the_budget(study: Study) -> None:
    cfg = dataclasses.replace(SMALL, n_trials=3, pruner="none")
    with pytest.raises(KeyboardInterrupt):
        study.run(Script([0.6, "interrupt"]), cfg)
    assert not study.outputs.best_params.exists()  # no output replaced
    parent, trials = study.runs()
    assert parent.info.status == "KILLED"
    assert [(t.data.tags["mlic.tune.state"], t.info.status) for t in trials] == [
        ("complete", "FINISHED"), ("interrupted", "KILLED")]

    script = Script([0.7, 0.65])
    result = study.run(script, cfg)
    assert result.ran == 2 and script.plan == []  # the interrupted trial does not count; the finished one is kept
    assert [(r.number, r.state) for r in result.rows] == [(0, "complete"), (1, "interrupted"), (2, "complete"),
                                                          (3, "complete")]
    parent, trials = study.runs()
    assert parent.info.status == "FINISHED" and len(trials) == 4
    assert [t.info.status for t in trials] == ["FINISHED", "KILLED", "FINISHED", "FINISHED"]
    assert yaml.safe_load(study.outputs.best_params.read_text())["trials"]["interrupted"] == 1


_KILLED_STUDY = """
import sys
sys.path[:0] = {paths!r}
from pathlib import Path
from test_tune import Script, Study, SMALL
from mlic import tune
import dataclasses
study = Study(Path({root!r}), Path({tfrecords!r}), tune.Outputs(*map(Path, {outputs!r})), {uri!r}, {experiment!r})
study.run(Script([0.6, {step!r}]), dataclasses.replace(SMALL, n_trials=3, pruner="none"))
"""


def _study_process(study: Study, step: str) -> subprocess.CompletedProcess:
    """A study in a process of its own whose second trial ends with `step` ("kill", "term")."""
    code = _KILLED_STUDY.format(paths=[str(ROOT / "tests"), str(ROOT / "src")], root=str(study.root),
                                tfrecords=str(study.tfrecords), outputs=[str(p) for p in dataclasses.astuple(study.outputs)],
                                uri=study.uri, experiment=study.experiment, step=step)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_sigterm_ends_the_study_like_ctrl_c(study: Study) -> None:
    proc = _study_process(study, "term")
    # An uncaught KeyboardInterrupt ends Python as SIGINT would (-2); the stage script exits 130.
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt: signal 15" in proc.stderr, proc.stderr[-3000:]
    parent, trials = study.runs()
    assert parent.info.status == "KILLED"
    assert [(t.info.status, t.data.tags["mlic.tune.state"]) for t in trials] == [
        ("FINISHED", "complete"), ("KILLED", "interrupted")]
    result = study.run(Script([0.7, 0.65]), dataclasses.replace(SMALL, n_trials=3, pruner="none"))
    assert result.ran == 2 and result.counts() == {"complete": 3, "pruned": 0, "failed": 0, "interrupted": 1}


def test_kill_9_leaves_a_trial_running_that_the_next_run_marks_interrupted_and_repeats(study: Study) -> None:
    proc = _study_process(study, "kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    parent, trials = study.runs()
    assert parent.info.status == "RUNNING" and [t.info.status for t in trials] == ["FINISHED", "RUNNING"]

    script = Script([0.7, 0.65])
    result = study.run(script, dataclasses.replace(SMALL, n_trials=3, pruner="none"))
    assert result.ran == 2 and script.plan == []
    assert [(r.number, r.state) for r in result.rows] == [(0, "complete"), (1, "interrupted"), (2, "complete"),
                                                          (3, "complete")]
    assert "left RUNNING by process" in result.rows[1].note
    parent, trials = study.runs()
    assert parent.info.status == "FINISHED" and "mlic.settled" not in parent.data.tags  # reopened, completed
    killed = trials[1]
    assert (killed.info.status, killed.data.tags["mlic.tune.state"]) == ("FAILED", "interrupted")
    assert "marked FAILED by a later tune" in killed.data.tags["mlic.settled"]
    assert [t.info.status for t in trials] == ["FINISHED", "FAILED", "FINISHED", "FINISHED"]


def test_a_trial_that_raises_is_failed_and_the_error_goes_on(study: Study) -> None:
    def broken(cfg: Train, report: tune.Report) -> tune.TrialOutcome:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        tune.run(SMALL, Train(), 5, study.tfrecords, study.outputs, lambda: broken, tracking_uri=study.uri,
                 experiment=study.experiment, root=study.root)
    parent, trials = study.runs()
    assert parent.info.status == "FAILED"
    assert [(t.info.status, t.data.tags["mlic.tune.state"]) for t in trials] == [("FAILED", "failed")]
    assert "ValueError: a bug" in trials[0].data.tags["mlic.tune.note"]


def test_no_completed_trial_is_a_clear_error(study: Study) -> None:
    with pytest.raises(tune.UserError, match="no trial of study .* completed .*narrow tune.space"):
        study.run(Script(["diverge"]), dataclasses.replace(SMALL, n_trials=1))
    parent, _ = study.runs()
    assert parent.info.status == "FAILED"


def test_the_study_lives_under_dvc_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    monkeypatch.chdir(tmp_path)
    assert tune.storage_path() == (tmp_path / "repo" / ".mlic" / "tune" / "optuna.db").resolve()


# --------------------------------------------------------------------------- the stage
def _stage_argv(tmp_path: Path) -> tuple[list[str], list[str]]:
    from conftest import dvc_stage

    argv, outputs = dvc_stage("tune")
    return argv, outputs


_TIMED_STAGE = """
import sys, time, json
started = time.perf_counter()
import importlib.util
spec = importlib.util.spec_from_file_location("stage_tune", {script!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
code = module.main({argv!r})
print(json.dumps({{"code": code, "seconds": time.perf_counter() - started,
                   "loaded": sorted(m for m in ("tensorflow", "keras", "optuna", "mlflow") if m in sys.modules)}}))
"""


def test_switched_off_the_stage_says_so_in_about_a_second_without_tensorflow(tmp_path: Path, params_yaml) -> None:
    argv, outputs = _stage_argv(tmp_path)
    params_yaml(tmp_path / "params.yaml")  # no tune section: the default, off
    code = _TIMED_STAGE.format(script=str(ROOT / "stages" / "tune.py"), argv=argv)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    print(f"tune off: main() {report['seconds']:.2f} s, process {wall:.2f} s")
    assert report["code"] == 0 and report["loaded"] == []
    assert report["seconds"] < 1.5, report
    assert "dvc exp run tune -S tune.enabled=true" in proc.stderr
    for path in outputs:  # no shards needed: nothing is read when off
        assert (tmp_path / path).is_file(), path
    written = {Path(p).name: (tmp_path / p).read_text() for p in outputs}
    assert yaml.safe_load(written["best_params.yaml"]) == {"enabled": False}
    assert written["trials.csv"] == (
        "number,state,value,epochs,best_epoch,train.learning_rate,train.dropout,train.batch_size,note\n")
    assert json.loads(written["metrics.json"])["best_val_macro_ap"] is None


def test_tune_is_beside_train_not_upstream_of_it() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    _, outputs = _stage_argv(ROOT)
    assert all(o.startswith("reports/tune/") for o in outputs)
    for name, stage in stages.items():  # no stage reads what tune writes (track reads the MLflow runs of its own)
        deps = [d for d in stage.get("deps", []) if isinstance(d, str)]
        assert not any(d.startswith(("reports/tune", "${paths.tune_reports}")) for d in deps), name
    data_deps = [d for d in stages["tune"]["deps"] if not d.startswith(("src/", "stages/"))]
    assert data_deps == ["${paths.tfrecords}"]
    assert stages["tune"]["params"] == ["common", "train", "tune"]


# --------------------------------------------------------------------------- real trials (TensorFlow)
REAL_TRAIN = {"epochs": 1, "batch_size": 8, "width": 8, "early_stopping_patience": 0, "shuffle_buffer": 64}
REAL_TUNE = {"enabled": True, "n_trials": 3, "epochs": 1, "pruner": "none",
             "space": {"train": {"learning_rate": {"type": "float", "low": 0.001, "high": 0.03, "log": True},
                                 "dropout": {"type": "float", "low": 0.0, "high": 0.5}}}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, make_set) -> Path:
    """Tiny shards: 28 train / 12 val records of 32 px, 4 classes."""
    root = tmp_path_factory.mktemp("tune_shards")
    image_set = make_set(root / "raw", n=40, seed=11)
    write_shards(image_set, root / "tfrecords", {"train": range(28), "val": range(28, 40)}, seed=3)
    return root / "tfrecords"


@pytest.mark.slow
def test_a_real_trial_repeats_itself_and_scores_val_map_as_evaluate_does(shards: Path) -> None:
    import keras

    from mlic import dataset, metrics, predictions, trial
    from mlic import model as mlic_model
    from mlic.tfrecords import Manifest

    # Op determinism is process-wide and irreversible: off here (the tiny model repeats itself
    # anyway on CPU); the stage test below runs with it, as DVC would.
    cfg = dataclasses.replace(Train(), **{**REAL_TRAIN, "epochs": 2}, deterministic_ops=False)
    trainer = trial.Trainer(shards, seed=3)
    reported: list[list[dict]] = [[], []]
    outcomes = []
    started = time.perf_counter()
    for seen in reported:
        outcomes.append(trainer(cfg, lambda epoch, logs, seen=seen: seen.append(dict(logs)) or False))
    print(f"two real trials of 2 epochs: {time.perf_counter() - started:.1f} s")
    assert outcomes[0] == outcomes[1] and reported[0] == reported[1]  # same params, same data: same trial
    out = outcomes[0]
    assert out.epochs == 2 and not out.pruned and out.failure is None
    assert out.value == reported[0][out.best_epoch][tune.OBJECTIVE] and 0.0 < out.value <= 1.0
    assert {"loss", "val_loss", "val_auc_pr", "learning_rate", tune.OBJECTIVE} <= set(reported[0][-1])

    # The per-epoch objective is evaluate's val/macro_ap of the model as it stands.
    val = Manifest.read(shards, "val")
    model = mlic_model.build_model("simple_cnn", len(val.classes), val.image_size, seed=1, width=8)
    scorer = trial.ValidationAP(dataset.make_dataset(val, 4), lambda epoch, logs: False)
    scorer.set_model(model)
    logs: dict = {}
    scorer.on_epoch_end(0, logs)
    pred = predictions.predict_split(model, val, 4)
    assert logs[tune.OBJECTIVE] == metrics.compute_metrics(pred.y_true, pred.y_prob)["macro_ap"]
    # With the test-time flip, the model train would save: evaluate's score of the wrapped model.
    flipped = trial.ValidationAP(dataset.make_dataset(val, 4), lambda epoch, logs: False, flip=True)
    flipped.set_model(model)
    logs = {}
    flipped.on_epoch_end(0, logs)
    pred = predictions.predict_split(mlic_model.with_flip_tta(model), val, 4)
    assert logs[tune.OBJECTIVE] == pytest.approx(metrics.compute_metrics(pred.y_true, pred.y_prob)["macro_ap"], abs=1e-6)
    keras.backend.clear_session()


# Read-write connections: after a kill -9 mid-write the database has a hot journal, which only a
# connection that may write can roll back (a read-only one fails to read).
def _optuna_states(db: Path) -> list[str]:
    if not db.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            return [row[0] for row in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:
        return []


def _mlflow_running(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            return con.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _wait(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.05)


@pytest.mark.slow
def test_the_stage_killed_mid_study_resumes_and_runs_only_the_rest(tmp_path: Path, shards: Path, params_yaml) -> None:
    """`python stages/tune.py` as DVC runs it: SIGKILL once a trial has finished and the next one is
    training (its MLflow run open), then run again: it finishes the budget and no more."""
    import shutil

    import mlflow

    argv, outputs = _stage_argv(tmp_path)
    shutil.copytree(shards, tmp_path / argv[argv.index("--tfrecords") + 1])
    params_yaml(tmp_path / "params.yaml", train=REAL_TRAIN, tune=REAL_TUNE, tracking={"experiment": "real"})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("DVC_ROOT", None)
    command = [sys.executable, str(ROOT / "stages" / "tune.py"), *argv]
    optuna_db = tmp_path / ".mlic" / "tune" / "optuna.db"

    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(proc, lambda: _optuna_states(optuna_db) == ["COMPLETE", "RUNNING"]
              and _mlflow_running(tmp_path / "mlflow.db") == 2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    first = time.perf_counter() - started
    assert proc.returncode == -signal.SIGKILL, "tune ended before it could be killed"
    assert _optuna_states(optuna_db) == ["COMPLETE", "RUNNING"]
    for path in outputs:
        assert not (tmp_path / path).exists(), path

    started = time.perf_counter()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    second = time.perf_counter() - started
    print(f"real study: killed after {first:.1f} s (1 trial done), resumed run {second:.1f} s for 2 trials")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "marked 1 trial(s) a killed tune left RUNNING as interrupted" in again.stderr
    assert "1 of 3 trials finished; continuing it" in again.stderr
    assert _optuna_states(optuna_db) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]

    files = {Path(p).name: tmp_path / p for p in outputs}
    with open(files["trials.csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["state"] for r in rows] == ["complete", "interrupted", "complete", "complete"]
    best = yaml.safe_load(files["best_params.yaml"].read_text())
    values = {int(r["number"]): float(r["value"]) for r in rows if r["state"] == "complete"}
    assert best["best_value"] == max(values.values()) and values[best["best_trial"]] == best["best_value"]
    assert set(best["train"]) == {"learning_rate", "dropout"}
    section_from_dict(Train, {**REAL_TRAIN, **best["train"]}, "train")

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("real-tune")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags["mlic.tune.role"] == "study"]
    trials = sorted((r for r in runs if r.data.tags["mlic.tune.role"] == "trial"),
                    key=lambda r: int(r.data.tags["mlic.tune.trial"]))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["mlic.tune.study"] == best["study"]
    assert [t.data.tags["mlflow.parentRunId"] for t in trials] == [parents[0].info.run_id] * 4
    assert [(t.info.status, t.data.tags["mlic.tune.state"]) for t in trials] == [
        ("FINISHED", "complete"), ("FAILED", "interrupted"), ("FINISHED", "complete"), ("FINISHED", "complete")]
    for t in (trials[0], trials[2], trials[3]):
        assert t.data.metrics["val/macro_ap"] == values[int(t.data.tags["mlic.tune.trial"])]
        assert {"epoch/loss", "epoch/val_auc_pr", "epoch/val_macro_ap", "epoch/learning_rate"} <= set(t.data.metrics)
