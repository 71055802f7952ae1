"""End to end: the real pipeline through real `dvc repro` / `dvc exp run` on tiny params.

The project is copied into a temporary git repo, with params shrunk (120 images of 32-48 px,
32 px inputs, 1 epoch) and the MLflow store in the temp dir. Slow (about 3-5 minutes). The
MLflow UI over the resulting store is checked in headless Chromium; its screenshots go to
reports/ui/ (CI artifacts, ignored by git).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_PIPELINE, check_complete_run, make_project, mlflow_runs, run_ok

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "reports" / "ui"

_run = run_ok


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of the project with tiny params; env with a temp MLflow store."""
    repo = tmp_path_factory.mktemp("e2e") / "project"
    return repo, make_project(repo, SMALL_PIPELINE)


def _journal(repo: Path) -> dict:
    from mlic import journal

    return journal.read(repo)


def test_repro_then_noop_then_experiments(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    _run(["dvc", "repro"], repo, env)

    # Every declared out, metric and plot exists.
    for path in ["data/sample/labels.csv", "data/splits/train.csv", "data/tfrecords/train.manifest.json",
                 "models/model.keras", "models/model_meta.json", "reports/data/summary.json",
                 "reports/train/history.csv", "reports/train/metrics.json", "reports/evaluate/metrics.json",
                 "reports/evaluate/per_class_test.csv", "reports/evaluate/predictions/test.csv",
                 "reports/calibrate/thresholds.json", "reports/calibrate/metrics.json",
                 "reports/evaluate/pr_curves.csv", "reports/calibrate/fbeta_vs_threshold.csv",
                 "reports/calibrate/reliability_test.csv", ".mlic/mlflow_run.json"]:
        assert (repo / path).is_file(), path
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    declared = [m for rev in shown.values() for m in rev["data"]]
    assert sorted(declared) == ["reports/calibrate/headline.json", "reports/evaluate/headline.json",
                                "reports/train/metrics.json"]
    ev = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert 0.0 <= ev["test"]["macro_f1"] <= 1.0 and "test" in ev["baseline"]
    # the full set is one command away
    full = json.loads(_run(["dvc", "metrics", "show", "--json", "reports/evaluate/metrics.json"], repo, env).stdout)
    assert "subset_accuracy" in json.dumps(full)
    thresholds = json.loads((repo / "reports/calibrate/thresholds.json").read_text())
    meta = json.loads((repo / "models/model_meta.json").read_text())
    assert thresholds["format"] == 2
    assert list(thresholds["thresholds"]) == list(thresholds["temperature"]) == meta["classes"]

    runs = mlflow_runs(env)
    assert len(runs) == 1
    check_complete_run(runs[0], env, repo, first_in_store=True)
    assert json.loads((repo / ".mlic/mlflow_run.json").read_text())["run_id"] == runs[0].info.run_id
    # The run spans the pipeline: it starts when the first stage started, so training is inside it.
    stages = _journal(repo)
    assert runs[0].info.start_time <= stages["train"].started * 1000 + 1
    assert runs[0].info.end_time >= stages["train"].ended * 1000
    assert runs[0].data.metrics["train/images_per_second"] > 0
    assert runs[0].data.metrics["train/cpu_seconds"] > 0          # user + sys of the train stage
    assert len(runs[0].data.tags["train.epoch_cpu_seconds"].split(",")) == runs[0].data.metrics["train/epochs_run"]
    assert runs[0].data.tags["train.progressive"] == "off"  # 32 px: half of it is under the 32 px minimum

    # A reproduction is a no-op to git: nothing tracked changes (no timing, no path, no run id).
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "baseline results"], repo, env)
    committed = (repo / "dvc.lock").read_text()
    assert str(repo) not in committed and str(repo.parent) not in _tracked_text(repo, env)
    _run(["dvc", "repro", "--force", "--single-item", "train"], repo, env)
    out = _run(["dvc", "repro"], repo, env).stdout
    assert "Stage 'evaluate' didn't change" in out, out   # a bit-identical model: nothing downstream
    assert _run(["git", "status", "--porcelain", "--untracked-files=no"], repo, env).stdout == ""
    assert json.loads(_run(["dvc", "metrics", "diff", "--json"], repo, env).stdout or "{}") == {}
    assert len(mlflow_runs(env)) == 1

    # A no-op repro runs nothing and logs nothing.
    out = _run(["dvc", "repro"], repo, env).stdout
    assert "didn't change" in out or "up to date" in out
    assert len(mlflow_runs(env)) == 1

    # Only calibrate's params change: two more runs, just as complete, and quick (no TensorFlow).
    for n, (name, beta) in enumerate([("beta2", "2.0"), ("beta05", "0.5")], start=2):
        started = time.perf_counter()
        _run(["dvc", "exp", "run", "-n", name, "-S", f"calibrate.beta={beta}"], repo, env)
        print(f"calibrate-only experiment {name}: {time.perf_counter() - started:.1f} s")
        runs = mlflow_runs(env)
        assert len(runs) == n
        check_complete_run(runs[-1], env, repo)
        assert runs[-1].data.params["calibrate.beta"] == beta
        assert runs[-1].data.tags["pipeline_stages"] == "calibrate"   # the run spans its own stages only
        # the run says what changed: its name and a tag (and the start of its description)
        assert runs[-1].info.run_name == f"calibrate.beta={beta} ({name})"
        assert runs[-1].data.tags["mlic.changed"] == f"calibrate.beta={beta}"
        assert runs[-1].data.tags["mlflow.note.content"].startswith("Changed from params.yaml at ")
        assert "train/images_per_second" not in runs[-1].data.metrics
    # The default table shows the headline; --only-changed over these experiments fits 200 columns.
    header = _run(["dvc", "exp", "show", "--no-pager", "--csv"], repo, env).stdout.splitlines()[0].split(",")
    metric_columns = header[header.index("parent") + 1:header.index("common.seed")]  # metrics come first
    assert metric_columns == ["best_epoch", "best_val_auc_pr", "epochs_run", "test.macro_ap", "test.macro_f1",
                              "val.macro_ap", "test_calibrated.hamming_loss", "test_calibrated.macro_f1",
                              "test_calibrated.subset_accuracy"], header
    narrow = _run(["dvc", "exp", "show", "--no-pager", "--only-changed"], repo, dict(env, COLUMNS="200")).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 200 and "…" not in narrow, narrow  # nothing cut

    # An experiment that re-trains: a fourth run, complete, that spans training again.
    _run(["dvc", "exp", "run", "-n", "two-epochs", "-S", "train.epochs=2", "-S", "calibrate.beta=1.0"], repo, env)
    runs = mlflow_runs(env)
    assert len(runs) == 4
    check_complete_run(runs[-1], env, repo)
    assert runs[-1].data.params["train.epochs"] == "2"
    assert runs[-1].data.tags.get("dvc_exp_name") == "two-epochs"
    assert runs[-1].data.metrics["train/epochs_run"] == 2 and "train" in runs[-1].data.tags["pipeline_stages"]
    text = json.dumps(json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout))
    assert "two-epochs" in text and "beta2" in text and "test_calibrated" in text


def _tracked_text(repo: Path, env: dict[str, str]) -> str:
    """Every small tracked text file's content, to look for machine paths."""
    files = _run(["git", "ls-files"], repo, env).stdout.split()
    texts = []
    for name in files:
        path = repo / name
        if path.is_file() and path.stat().st_size < 2_000_000:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(texts)


def test_mlflow_ui_opens_runs_and_compares_them(project: tuple[Path, dict[str, str]]) -> None:
    """The MLflow UI as a user sees it (headless Chromium): the experiment opens on its runs table,
    and comparing the two calibrate experiments (only calibrate.beta differs) shows that param and the
    metrics it moved. Screenshots: reports/ui/."""
    repo, env = project
    runs = mlflow_runs(env)
    if not {"beta2", "beta05"} <= {r.data.tags.get("dvc_exp_name") for r in runs}:
        pytest.skip("pipeline test did not run")
    import mlflow_ui

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    named = {r.data.tags["dvc_exp_name"]: r for r in runs}
    two, beta = named["beta2"], named["beta05"]
    experiment = beta.info.experiment_id
    with mlflow_ui.mlflow_server(env["MLFLOW_TRACKING_URI"], timeout=120) as url, mlflow_ui.browser() as browser:
        # The link `track` prints (and docs/experiments.md gives) opens the runs table in a fresh browser,
        # and each row says what changed: no need to open a run to tell them apart.
        with mlflow_ui.ui_page(browser, workflow=None) as page:
            names = mlflow_ui.runs_table_names(page, url, experiment)
            mlflow_ui.screenshot(page, SCREENSHOTS, "experiment-link")
            assert "calibrate.beta=2.0 (beta2)" in names and "calibrate.beta=0.5 (beta05)" in names, names
            assert any(n.startswith("as committed @") for n in names), names
            # The chart view leads with the model's own figures; the trivial predictor has no section.
            sections = mlflow_ui.chart_sections(page, url, experiment)
            mlflow_ui.screenshot(page, SCREENSHOTS, "charts")
            assert sections[0] == "epoch" and not any(s.startswith("baseline") for s in sections), sections
            assert {"test", "test_calibrated", "val"} <= set(sections), sections
        # A user who chose "Model training" once: a click on the experiment lands on the runs table.
        with mlflow_ui.ui_page(browser) as page:
            landing = mlflow_ui.open_experiment(page, url, "mlic")
            mlflow_ui.screenshot(page, SCREENSHOTS, "experiment-click")
            assert landing.tab == "runs" and landing.runs_table, landing
            assert {r.info.run_name for r in runs} <= set(landing.run_names), landing
            view = mlflow_ui.open_compare(page, url, [two.info.run_id, beta.info.run_id], [experiment])
            mlflow_ui.screenshot(page, SCREENSHOTS, "compare")
        assert view.params.get("calibrate.beta") == ("2.0", "0.5"), view.params
        changed = {name for name, values in view.metrics.items() if len(set(values)) > 1}
        assert any(name.startswith("test_calibrated/") for name in changed), view.metrics
        assert not any(name.startswith("test/") for name in changed), changed  # the model did not change


def _predict(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "mlic")
    return _run([exe, "predict", *args], repo, env)


def test_mlic_predict_agrees_with_evaluate_and_calibrate(project: tuple[Path, dict[str, str]]) -> None:
    """`mlic predict` on the raw image files = calibrate's temperature and thresholds on evaluate's
    test predictions."""
    repo, env = project
    if not (repo / "reports/calibrate/thresholds.json").exists():
        pytest.skip("pipeline test did not run")
    import pandas as pd

    from mlic.calibration import Calibration
    from mlic.metrics import predict as at_thresholds
    from mlic.predictions import read_predictions

    _predict(repo, env, "data/sample/images", "--out", "p.csv")  # default --model models
    ours = pd.read_csv(repo / "p.csv", keep_default_na=False)
    ours["filename"] = ours["filename"].str.removeprefix("data/sample/images/")
    ours = ours.set_index("filename")
    test = read_predictions(repo / "reports/evaluate/predictions/test.csv")
    cal = Calibration.from_dict(json.loads((repo / "reports/calibrate/thresholds.json").read_text()), test.classes)
    q = cal.probabilities(test.y_prob)
    expected = at_thresholds(q, cal.thresholds)
    rows = ours.loc[test.filenames]
    probs = rows[[f"prob_{c}" for c in test.classes]].to_numpy()
    np.testing.assert_allclose(probs, q, atol=1e-5)
    got = [set(x.split()) for x in rows["labels"]]
    want = [{c for c, on in zip(test.classes, row) if on} for row in expected]
    assert got == want
    assert len(ours) == len(list((repo / "data/sample/images").rglob("*.*")))  # every image predicted


def _post(url: str, body: bytes) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_served_champion_answers_like_mlic_predict(project: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """A real `mlflow models serve` of models:/mlic@champion: JPEG, PNG and grayscale in, same answer as
    `mlic predict`; garbage gets a 4xx naming the row, and the server keeps serving."""
    repo, env = project
    if not (repo / ".mlic/mlflow_run.json").exists():
        pytest.skip("pipeline test did not run")
    import base64

    from PIL import Image

    from mlic import serving

    source = sorted((repo / "data/sample/images").rglob("*.jpg"))[0]
    files = {"a.jpg": source.read_bytes()}
    im = Image.open(source).convert("RGB")
    for name, image, fmt in [("b.png", im.rotate(90, expand=True), "PNG"), ("c.png", im.convert("L"), "PNG")]:
        path = tmp_path / name
        image.save(path, format=fmt)
        files[name] = path.read_bytes()
    (tmp_path / "a.jpg").write_bytes(files["a.jpg"])
    out = tmp_path / "cli.json"
    _predict(repo, env, *(str(tmp_path / n) for n in files), "--model", "models:/mlic@champion", "--out", str(out))
    expected = json.loads(out.read_text())

    with serving.model_server("models:/mlic@champion", cwd=repo, env=env, log_path=tmp_path / "serve.log") as server:
        url, body = server.url, serving.request_body
        status, answer = _post(url + "/invocations", body([base64.b64encode(b).decode() for b in files.values()]))
        assert status == 200, answer
        rows = answer["predictions"]
        assert [r["labels"] for r in rows] == [e["labels"] for e in expected]
        for r, e in zip(rows, expected):
            for key, value in e.items():
                if key.startswith("prob_"):
                    assert abs(r[key] - value) <= 1e-6, (key, r[key], value)

        status, error = _post(url + "/invocations", body([base64.b64encode(files["a.jpg"]).decode(),
                                                          base64.b64encode(b"GIF89a nonsense").decode()]))
        assert 400 <= status < 500, (status, error)
        assert "row 1" in error["message"] and "row 0:" not in error["message"]
        status, _ = _post(url + "/invocations", b"{not json")
        assert 400 <= status < 500
        status, again = _post(url + "/invocations", body([base64.b64encode(files["c.png"]).decode()]))
        assert status == 200 and again["predictions"][0]["labels"] == expected[2]["labels"]
    assert server.process.returncode is not None  # stopped by its PID's process group


def test_saved_model_predicts_on_a_raw_image_file(project: tuple[Path, dict[str, str]]) -> None:
    repo, _ = project
    if not (repo / "models/model.keras").exists():
        pytest.skip("pipeline test did not run")
    import keras
    from PIL import Image

    import mlic.model  # noqa: F401 - registers custom objects
    from mlic.images import load_rgb, resize

    meta = json.loads((repo / "models/model_meta.json").read_text())
    model = keras.models.load_model(repo / "models/model.keras", compile=False)
    first = sorted((repo / "data/sample/images").iterdir())[0]
    assert Image.open(first).size  # a real image file from the user-format folder
    x = np.asarray(resize(load_rgb(first), meta["image_size"], "pad"), dtype=np.float32)[None]
    probs = np.asarray(model.predict(x, verbose=0))
    assert probs.shape == (1, len(meta["classes"]))
    assert np.all((probs >= 0) & (probs <= 1))


def test_unreachable_tracking_store_fails_before_training(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    bad = dict(env, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    proc = subprocess.run(
        [sys.executable, "stages/train.py", "--tfrecords", "data/tfrecords", "--model", "/tmp/never.keras",
         "--meta", "/tmp/never.json", "--summary", "/tmp/never.txt", "--history", "/tmp/never.csv",
         "--metrics", "/tmp/never-m.json"],
        cwd=repo, env=bad, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not reachable" in proc.stderr
    assert "Epoch" not in proc.stdout + proc.stderr


def test_same_params_and_data_give_the_same_metrics(project: tuple[Path, dict[str, str]]) -> None:
    """Reproducible on CPU: re-training from scratch with the same params gives the same metrics."""
    repo, env = project
    if not (repo / "models/model.keras").exists():
        pytest.skip("pipeline test did not run")
    before = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    history_before = (repo / "reports/train/history.csv").read_text()
    _run(["dvc", "repro", "--force", "--single-item", "train"], repo, env)
    _run(["dvc", "repro", "evaluate"], repo, env)
    after = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert (repo / "reports/train/history.csv").read_text() == history_before
    assert after == before
