"""mlic.record and mlic.journal: what a run holds, without any tracking backend."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import git, write_manifests, write_text
from mlic import journal, metrics, record
from mlic.record import build_record


def _commit_all(repo):
    """A git repo in `repo` with everything in it committed."""
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a")


# --------------------------------------------------------------------------- naming rules
@pytest.mark.parametrize(
    "value, text",
    [
        (0.001, "0.001"), (42, "42"), (True, "true"), (None, "null"), ("pad", "pad"),
        (["a", "b"], '["a","b"]'), ({"k": 1}, '{"k":1}'),
    ],
)
def test_param_values_read_like_yaml(value, text):
    assert record.param_value(value) == text


def test_long_param_values_are_cut_visibly():
    text = record.param_value(["x" * 50] * 200)
    assert len(text) == record.MAX_PARAM_VALUE and "cut" in text[-60:]


def test_metrics_flatten_hierarchically_and_skip_what_is_not_a_number():
    values, skipped = record.flatten_metrics(
        {"test": {"f1": 0.5, "auc": None, "nan": float("nan"), "ok": True, "name": "x",
                  "list": [1, 2], "per class": {"t-shirt/top": 0.1}}}, prefix="p")
    assert values == {"p/test/f1": 0.5, "p/test/ok": 1.0, "p/test/per class/t-shirt_top": 0.1}
    assert sorted(skipped) == ["p/test/auc", "p/test/list", "p/test/name", "p/test/nan"]


def _full_report() -> dict:
    """The sections evaluate and calibrate write, each with every key compute_metrics returns."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = (rng.random((40, 4)) < 0.4).astype(int)
    y[0] = 1  # every class has a positive
    p = rng.random((40, 4))
    one = metrics.nan_to_none(metrics.compute_metrics(y, p))
    return {"test": one, "val": one, "baseline": {"test": one, "val": one, "test_calibrated": one},
            "test_calibrated": one, "val_calibrated": one,
            "test_probability": {"ece_before": 0.02, "ece_after": 0.01, "brier_before": 0.06, "brier_after": 0.05}}


def test_summary_keeps_the_numbers_worth_comparing_and_stays_small():
    flat, _ = record.flatten_metrics(_full_report())
    kept = sorted(k for k in flat if record.keep_summary_metric(k))
    top3 = sum(k.startswith("test/") and k.endswith("_top3") for k in flat)
    assert top3 == 6 and set(record.TOP3_KEPT) < {k.partition("/")[2] for k in flat if k.endswith("_top3")}
    n_model = (len(_full_report()["test"]) - len(metrics.DATA_FACTS) - len(metrics.ALIASES)
               - (top3 - len(record.TOP3_KEPT)))  # per section
    threshold_dependent = n_model - len(metrics.THRESHOLD_FREE) - len(record.TOP3_KEPT)
    assert len(kept) == n_model + len(record.VAL_KEPT) + threshold_dependent + 4
    assert len(kept) <= 56                                        # room for train/ and facts under 60
    # the trivial predictor is a contrast stated in the description, not metrics that lead every list
    assert not any(k.startswith("baseline/") for k in kept)
    assert {"test_probability/ece_before", "test_probability/brier_after"} <= set(kept)
    assert not any(k.rpartition("/")[2] in metrics.ALIASES for k in kept)
    assert "test/cf1" in kept and "test_calibrated/cf1" in kept and "test_calibrated/cf1_top3" not in kept
    assert "test/of1_top3" in kept and "test/cp_top3" not in kept
    assert not any(k.rpartition("/")[2] in metrics.DATA_FACTS for k in kept)
    assert "test_calibrated/macro_f1" in kept and "test_calibrated/macro_ap" not in kept
    assert not any(k.startswith(("val_calibrated/", "baseline/val/")) for k in kept)
    assert set(metrics.headline_names()) <= set(kept)             # the headline is always logged
    assert "train/best_epoch" not in flat and record.keep_summary_metric("train/best_epoch")


@pytest.mark.parametrize(
    "paths, names",
    [
        (["a/x.csv", "b/y.csv"], ["x.csv", "y.csv"]),
        (["r/evaluate/t.csv", "r/calibrate/t.csv"], ["evaluate_t.csv", "calibrate_t.csv"]),
        (["a/m/t.csv", "b/m/t.csv", "c.csv"], ["a_m_t.csv", "b_m_t.csv", "c.csv"]),
        (["dvc.lock", "params.yaml"], ["dvc.lock.yaml", "params.yaml"]),   # the UI previews .yaml
    ],
)
def test_artifact_names_are_unique_short_and_previewable(paths, names):
    assert list(record.artifact_names([Path(p) for p in paths]).values()) == names


def test_data_fingerprint_ignores_listing_order():
    fps = {"train": "a" * 64, "val": "b" * 64}
    forward = record.data_fingerprint(fps)
    assert forward == record.data_fingerprint(dict(reversed(list(fps.items()))))
    assert forward != record.data_fingerprint({**fps, "val": "d" * 64})


def test_git_info_outside_a_repo_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert record.git_info(tmp_path) == record.GitInfo("unknown", "unknown")


def test_untracked_file_makes_the_tree_dirty(monkeypatch, tmp_path):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    write_text(tmp_path / "a.txt", "a")
    _commit_all(tmp_path)
    assert record.git_info(tmp_path).dirty == "false"
    write_text(tmp_path / "new.txt", "b")
    assert record.git_info(tmp_path) == record.GitInfo(git(tmp_path, "rev-parse", "HEAD"), "true", ("new.txt",))


@pytest.mark.parametrize(
    "env, label, name, source",
    [
        ({"DVC_EXP_NAME": "brisk-otter"}, "calibrate.beta=2.0", "calibrate.beta=2.0 (brisk-otter)", "dvc exp run"),
        ({"DVC_EXP_NAME": "brisk-otter"}, "", "brisk-otter", "dvc exp run"),
        ({"DVC_STAGE": "track"}, "as committed", "as committed @abcdef1", "dvc repro"),
        ({}, "train.epochs=2", "train.epochs=2 @abcdef1", "python stages/track.py"),
    ],
)
def test_run_names_say_what_changed_and_where_from(env, label, name, source):
    run_name, tags = record.run_context(env, "abcdef1234" + "0" * 30, label)
    assert (run_name, tags["mlflow.source.name"]) == (name, source)
    assert tags["dvc_exp_name"] == env.get("DVC_EXP_NAME", "workspace")


def test_run_name_without_git():
    assert record.run_context({}, "unknown")[0] == "repro @nogit"


@pytest.mark.parametrize(
    "now, committed, changes, label",
    [
        ({"a.x": "1"}, {"a.x": "1"}, [], "as committed"),
        ({"a.x": "2", "b.y": "q"}, {"a.x": "1", "b.y": "q"}, ["a.x=2"], "a.x=2"),
        ({"a.x": "2", "b.y": "r", "c.z": "3"}, {"a.x": "1", "b.y": "q", "c.z": "0"}, ["a.x=2", "b.y=r", "c.z=3"],
         "a.x=2, b.y=r +1 more"),
        ({"a.x": "1", "n.new": "5"}, {"a.x": "1", "o.old": "4"}, ["n.new=5", "o.old=(removed)"],
         "n.new=5, o.old=(removed)"),
        # where a run is filed is not what it is
        ({"tracking.sweep": "lr"}, {"tracking.sweep": "null"}, [], "as committed"),
    ],
)
def test_changed_params_against_the_committed_file(now, committed, changes, label):
    assert record.changed_params(now, committed) == changes
    assert record.change_label(changes) == label


def test_nothing_to_compare_with_gives_no_label():
    assert record.change_label(None) == ""


def test_committed_params_read_from_head(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    write_text(tmp_path / "params.yaml", "train:\n  epochs: 80\n  learning_rate: 0.00001\n")
    assert record.committed_params(tmp_path / "params.yaml", tmp_path) is None      # no git yet
    _commit_all(tmp_path)
    # `dvc exp run -S` writes floats as Python's repr: 1e-05 must not count as a change
    write_text(tmp_path / "params.yaml", "train:\n  epochs: 2\n  learning_rate: 1e-05\n")
    committed = record.committed_params(tmp_path / "params.yaml", tmp_path)
    assert committed == {"train.epochs": "80", "train.learning_rate": "1e-05"}
    now = record.flatten_params(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    assert record.changed_params(now, committed) == ["train.epochs=2"]


def test_the_contrast_names_both_numbers():
    flat = {"test_calibrated/macro_f1": 0.8904, "baseline/test_calibrated/macro_f1": 0.3731, "test/macro_ap": 0.9,
            "baseline/test/macro_ap": 0.31}
    assert record.contrast_sentence(flat) == ("Calibrated test macro-F1 0.890 (trivial predictor 0.373); "
                                              "test mAP 0.900 (trivial predictor 0.310)")
    assert record.contrast_sentence({"test/macro_ap": 0.9}) == ""


def test_state_fingerprint_is_values_and_content_not_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        write_text(root / "m.json", "{}")
        write_text(root / "d" / "x.csv", "1")
    params = {"calibrate.beta": "1.0"}
    fp = record.state_fingerprint(params, {"m.json": a / "m.json", "d": a / "d"})
    assert fp == record.state_fingerprint(dict(params), {"d": b / "d", "m.json": b / "m.json"})
    assert fp != record.state_fingerprint({"calibrate.beta": "2.0"}, {"m.json": a / "m.json", "d": a / "d"})
    assert fp != record.state_fingerprint(params, {"n.json": a / "m.json", "d": a / "d"})
    write_text(b / "d" / "x.csv", "2")
    assert fp != record.state_fingerprint(params, {"m.json": b / "m.json", "d": b / "d"})
    write_text(b / "d" / "x.csv", "1")
    (b / "d" / "x.csv").rename(b / "d" / "y.csv")                    # a renamed file is another state
    assert fp != record.state_fingerprint(params, {"m.json": b / "m.json", "d": b / "d"})


def _state(root, params_text, model="weights"):
    """The fingerprint `track` computes for a small project in `root`."""
    write_text(root / "params.yaml", params_text)
    write_text(root / "reports" / "e.json", json.dumps({"test": {"macro_f1": 0.5}}))
    write_text(root / "models" / "model.keras", model)
    write_text(root / "code" / "mod.py", "x = 1\n")
    write_text(root / "dvc.lock", f"schema: '2.0'\n# {root}\n")            # logged, never fingerprinted
    run = build_record(params_file=root / "params.yaml", metrics_files=[("", root / "reports" / "e.json")],
                       artifacts=[root / "dvc.lock"], project_root=root, env={})
    files = record.state_files(run, [root / "models" / "model.keras", None], root / "code", root)
    assert set(files) == {"e.json", "input/models/model.keras", "code/mod.py"}
    return record.state_fingerprint(run.params, files)


def test_the_same_state_in_two_clones_has_one_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    committed = "calibrate:\n  beta: 1.0\ndata:\n  classes: null   # null: from the header\n"
    # DVC's own rewrite of params.yaml (`dvc exp run -S ...` reformats the whole file): same values
    rewritten = "calibrate:\n  beta: 1.0\ndata:\n  classes:        # null: from the header\n"
    here = _state(tmp_path / "one", committed)
    assert here == _state(tmp_path / "two", committed) == _state(tmp_path / "three", rewritten)
    assert here != _state(tmp_path / "four", committed.replace("1.0", "2.0"))
    assert here != _state(tmp_path / "five", committed, model="weightz")       # one byte of the model


# --------------------------------------------------------------------------- datasets
def test_datasets_come_from_the_manifests_with_relative_sources(tmp_path):
    fps = {"test": "c" * 64, "train": "a" * 64, "val": "b" * 64}
    write_manifests(tmp_path / "data/tfrecords", fps)
    found = record.read_datasets(tmp_path / "data/tfrecords", tmp_path)
    assert [d.name for d in found] == ["train", "val", "test"]
    train = found[0]
    assert (train.fingerprint, train.source, train.records) == ("a" * 64, "data/tfrecords/train.manifest.json", 10)
    assert train.profile["prevalence"] == {"cat": 0.1, "dog": 0.2, "bird": 0.3}
    assert str(tmp_path) not in json.dumps([d.profile for d in found])


def test_no_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `dvc repro preprocess`"):
        record.read_datasets(tmp_path, tmp_path)


# --------------------------------------------------------------------------- journal
def test_journal_keeps_the_last_success_of_each_stage(tmp_path):
    journal.write(tmp_path, journal.StageRun("train", 10.0, 20.0, {"images_per_second": 5.0}))
    journal.write(tmp_path, journal.StageRun("train", 30.0, 45.0, {"images_per_second": 6.0}))
    runs = journal.read(tmp_path)
    assert runs == {"train": journal.StageRun("train", 30.0, 45.0, {"images_per_second": 6.0})}
    assert runs["train"].seconds == 15.0


def test_since_the_last_track_only(tmp_path):
    for stage, started, ended in [("split", 1, 2), ("track", 3, 4), ("train", 5, 9), ("calibrate", 10, 11)]:
        journal.write(tmp_path, journal.StageRun(stage, started, ended))
    assert [r.stage for r in journal.since(journal.read(tmp_path))] == ["train", "calibrate"]
    assert [r.stage for r in journal.since({})] == []


def test_under_dvc_only_the_own_invocation_counts(tmp_path):
    # a train forced alone yesterday (session a) must not stretch today's calibrate-only run (b)
    journal.write(tmp_path, journal.StageRun("train", 1.0, 100.0, {"images_per_second": 9.0}, "a"))
    journal.write(tmp_path, journal.StageRun("calibrate", 500.0, 502.0, {}, "b"))
    runs = journal.read(tmp_path)
    assert [r.stage for r in journal.since(runs, current="b")] == ["calibrate"]
    assert [r.stage for r in journal.since(runs, current="a")] == ["train"]
    assert [r.stage for r in journal.since(runs)] == ["train", "calibrate"]   # by hand: all since track


def test_the_session_is_the_dvc_process_above(tmp_path):
    """A stage run by a process named `dvc` records that process as its session."""
    import sys

    fake = tmp_path / "dvc"
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                    "sys.exit(subprocess.run([sys.executable, '-c', 'from mlic import journal; "
                    "print(journal.session())']).returncode)\n", encoding="utf-8")
    fake.chmod(0o755)
    out = subprocess.run([str(fake)], capture_output=True, text=True, check=True).stdout.strip()
    pid, _, started = out.partition("-")
    assert pid.isdigit() and float(started) > 0
    assert journal.session() == ""          # pytest is not run by dvc


def test_an_unreadable_entry_is_skipped_not_fatal(tmp_path, caplog):
    write_text(tmp_path / journal.JOURNAL_DIR / "train.json", "{not json")
    journal.write(tmp_path, journal.StageRun("split", 1.0, 2.0))
    assert list(journal.read(tmp_path)) == ["split"]
    assert "unreadable stage record" in caplog.text


def test_facts_are_taken_once():
    journal.take_facts()  # whatever a stage run in-process by an earlier test noted
    journal.note(images_per_second=3)
    assert journal.take_facts() == {"images_per_second": 3.0}
    assert journal.take_facts() == {}


def test_a_stage_journals_its_successes_only(tmp_path, monkeypatch):
    from mlic.stage import Stage

    def ok(args, params) -> int:
        journal.note(items=2)
        return 0

    write_text(tmp_path / "params.yaml", "common:\n  seed: 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["stages/ok.py"])
    for name, run, code in (("ok", ok, 0), ("bad", lambda args, params: 2, 2)):
        with pytest.raises(SystemExit) as exit_:
            Stage("A stage.", ("common",), lambda ap: None, run).script(name=name, root=tmp_path)
        assert exit_.value.code == code
    runs = journal.read(tmp_path)
    assert list(runs) == ["ok"] and runs["ok"].facts == {"items": 2.0}
    assert runs["ok"].started <= runs["ok"].ended


# --------------------------------------------------------------------------- the record
def test_record_from_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    write_text(tmp_path / "params.yaml", "common:\n  seed: 1\n")
    write_text(tmp_path / "e.json", json.dumps({"test": {"macro_f1": 0.5, "n_samples": 9}}))
    write_text(tmp_path / "t.json", json.dumps({"best_epoch": 3}))
    write_text(tmp_path / "dvc.lock", "schema: '2.0'\n")
    write_manifests(tmp_path / "m", {"train": "a" * 64})
    journal.write(tmp_path, journal.StageRun("train", 100.0, 200.0, {"images_per_second": 7.0}))
    run = build_record(params_file=tmp_path / "params.yaml",
                       metrics_files=[("", tmp_path / "e.json"), ("train", tmp_path / "t.json")],
                       artifacts=[tmp_path / "dvc.lock"], manifests_dir=tmp_path / "m",
                       project_root=tmp_path, env={})
    assert run.params == {"common.seed": "1"}
    assert run.metrics == {"test/macro_f1": 0.5, "train/best_epoch": 3.0, "train/images_per_second": 7.0}
    assert run.started == 100.0 and run.stages == ("train",)
    assert {"dvc.lock.yaml", "params.yaml", "e.json", "t.json", "train.manifest.json"} == set(run.artifacts)
    assert [d.name for d in run.datasets] == ["train"]
    assert run.tags["git_commit"] == "unknown" and run.name == "repro @nogit"
    assert run.tags["mlic.changed"] == "unknown"
    # dvc.lock is logged, not fingerprinted: DVC rewrites it after `track` runs
    assert set(run.sources) == set(run.artifacts) - {"dvc.lock.yaml", "params.yaml"}   # params: by value


def test_a_run_says_what_changed_and_what_it_beats(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    write_text(tmp_path / "params.yaml", "calibrate:\n  beta: 1.0\ntracking:\n  sweep: null\n")
    _commit_all(tmp_path)
    head = git(tmp_path, "rev-parse", "HEAD")
    report = {"test_calibrated": {"macro_f1": 0.89}, "baseline": {"test_calibrated": {"macro_f1": 0.37}}}
    write_text(tmp_path / "c.json", json.dumps(report))
    as_committed = build_record(params_file=tmp_path / "params.yaml", metrics_files=[("", tmp_path / "c.json")],
                                project_root=tmp_path, env={"DVC_STAGE": "track"})
    assert as_committed.name == f"as committed @{head[:7]}" and as_committed.tags["mlic.changed"] == "nothing"
    note = as_committed.tags["mlflow.note.content"]
    assert note.startswith(f"Params as committed at {head[:7]}.")
    assert "Calibrated test macro-F1 0.890 (trivial predictor 0.370)" in note
    assert "baseline/test_calibrated/macro_f1" not in as_committed.metrics
    write_text(tmp_path / "params.yaml", "calibrate:\n  beta: 2.0\ntracking:\n  sweep: s1\n")
    exp = build_record(params_file=tmp_path / "params.yaml", project_root=tmp_path,
                       env={"DVC_EXP_NAME": "minus-pyre"}, sweep="s1")
    assert exp.name == "s1/calibrate.beta=2.0 (minus-pyre)" and exp.tags["mlic.changed"] == "calibrate.beta=2.0"
    assert exp.tags["mlflow.note.content"].startswith(f"Changed from params.yaml at {head[:7]}: calibrate.beta=2.0.")


def test_a_sweep_tags_the_run_and_prefixes_its_name(tmp_path):
    env = {"DVC_EXP_NAME": "brisk-otter", "DVC_EXP_BASELINE_REV": "f" * 40}
    run = build_record(params_file=None, project_root=tmp_path, env=env, sweep="lr-dropout")
    assert run.name == "lr-dropout/brisk-otter"
    assert run.tags["mlic.sweep"] == "lr-dropout" and run.tags["dvc_exp_name"] == "brisk-otter"
    assert run.tags["dvc_exp_baseline_rev"] == "f" * 40
    alone = build_record(params_file=None, project_root=tmp_path, env=env)
    assert alone.name == "brisk-otter" and "mlic.sweep" not in alone.tags


def test_the_same_metric_from_two_files_is_refused(tmp_path):
    write_text(tmp_path / "a.json", json.dumps({"test": {"f1": 1}}))
    write_text(tmp_path / "b.json", json.dumps({"test": {"f1": 2}}))
    with pytest.raises(ValueError, match="comes from both"):
        build_record(params_file=None, metrics_files=[("", tmp_path / "a.json"), ("", tmp_path / "b.json")],
                     project_root=tmp_path, env={})


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: metrics file not found"):
        build_record(params_file=None, metrics_files=[("", tmp_path / "nope.json")], project_root=tmp_path, env={})
