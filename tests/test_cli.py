"""`mlic predict`: files, folders and globs in; CSV or JSON out; failures reported, exit code honest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlic import cli
from mlic.inference import Predictor


@pytest.fixture()
def folder(predict_images, tmp_path: Path) -> Path:
    """A copy of the prediction images (with a sub-folder, a hidden folder and a non-image file)."""
    dst = tmp_path / "imgs"
    shutil.copytree(predict_images.images_dir, dst)
    (dst / "readme.txt").write_text("not an image")
    (dst / ".cache").mkdir()
    shutil.copy(next(dst.glob("*.png")), dst / ".cache" / "thumb.png")
    return dst


def test_expand_inputs_walks_folders_and_globs_and_reports_misses(folder: Path, predict_images) -> None:
    files, problems = cli.expand_inputs([str(folder), str(folder / "sub" / "*.png"), str(folder / "nope.jpg"),
                                         str(folder / "*.gif")])
    expected = sorted(str(folder / f) for f in predict_images.filenames)
    assert files == expected  # recursive, sorted, each once, hidden and non-image files left out
    assert [p[0] for p in problems] == [str(folder / "nope.jpg"), str(folder / "*.gif")]
    assert problems[0][1] == "no such file or folder" and "no image file matches" in problems[1][1]
    recursive, _ = cli.expand_inputs([str(folder / "**" / "*.jpg")])
    assert recursive == sorted(f for f in expected if f.endswith(".jpg"))


def _predict(model_dir, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.chdir(model_dir.root)  # model_meta.json names the thresholds relative to the project root
    return cli.main(["predict", *argv])


def test_predict_folder_to_csv_matches_the_predictor(model_dir, folder: Path, predict_images, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "p.csv"
    assert _predict(model_dir, [str(folder), "--out", str(out), "--batch-size", "5"], monkeypatch) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["filename", "labels", *(f"prob_{c}" for c in model_dir.classes)]
    files = sorted(str(folder / f) for f in predict_images.filenames)
    assert frame["filename"].tolist() == files
    direct = Predictor.from_files(model_dir.models / "model.keras", model_dir.models / "model_meta.json",
                                  model_dir.thresholds).predict(files)
    np.testing.assert_allclose(frame.iloc[:, 2:].to_numpy(), direct.probabilities, atol=1e-6)
    assert frame["labels"].tolist() == [" ".join(x) for x in direct.labels]
    assert not out.with_name("p.errors.csv").exists()


def test_predict_json_keeps_labels_as_lists(model_dir, folder: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "p.json"
    assert _predict(model_dir, [str(folder / "sub"), "--out", str(out)], monkeypatch) == 0
    rows = json.loads(out.read_text())
    assert rows and set(rows[0]) == {"filename", "labels", *(f"prob_{c}" for c in model_dir.classes)}
    assert all(isinstance(r["labels"], list) for r in rows)


def test_unreadable_and_missing_inputs_are_reported_and_the_rest_predicted(
        model_dir, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    bad = folder / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "p.csv"
    code = _predict(model_dir, [str(folder), str(tmp_path / "missing.png"), "--out", str(out)], monkeypatch)
    assert code == cli.EXIT_SOME_FAILED
    frame = pd.read_csv(out)
    assert str(bad) not in frame["filename"].tolist() and len(frame) == 12
    errors = pd.read_csv(out.with_name("p.errors.csv"))
    assert errors["path"].tolist() == [str(bad), str(tmp_path / "missing.png")]
    assert "cannot be read" in caplog.text and str(bad) in caplog.text


def test_images_over_the_params_max_image_pixels_are_refused(model_dir, folder: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    big = folder / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  max_image_pixels: 59999\n")
    out = tmp_path / "p.csv"
    code = _predict(model_dir, [str(folder), "--out", str(out), "--params", str(params)], monkeypatch)
    assert code == cli.EXIT_SOME_FAILED
    assert str(big) not in pd.read_csv(out)["filename"].tolist()
    errors = pd.read_csv(out.with_name("p.errors.csv"))
    assert errors["path"].tolist() == [str(big)]
    assert "more than the limit of 59,999" in errors.iloc[0, 1] and "data.max_image_pixels" in errors.iloc[0, 1]


@pytest.mark.parametrize("argv, words", [
    (["nothing-here", "--out", "p.csv"], "nothing to predict"),
    (["{images}", "--out", "p.txt"], "use a .csv or .json"),
    (["{images}", "--model", "/no/such/models", "--out", "p.csv"], "not a models folder"),
    (["{images}", "--thresholds", "/no/t.json", "--out", "p.csv"], "/no/t.json"),
])
def test_usage_errors_exit_2_with_one_line(model_dir, folder: Path, argv: list[str], words: str,
                                           monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    argv = [a.replace("{images}", str(folder)) for a in argv]
    assert _predict(model_dir, argv, monkeypatch) == cli.EXIT_USAGE
    assert words in caplog.text


def test_missing_thresholds_say_to_run_calibrate(model_dir, folder: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "project"
    shutil.copytree(model_dir.models, copy / "models")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", str(folder), "--model", str(copy / "models"), "--out", "p.csv"]) == cli.EXIT_USAGE
    assert "dvc repro calibrate" in caplog.text


def test_packaged_model_folder_predicts_the_same(model_dir, folder: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mlic import serving

    package = serving.save_packaged_model(tmp_path / "pkg", model_dir.models / "model.keras",
                                          model_dir.models / "model_meta.json", model_dir.thresholds)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert _predict(model_dir, [str(folder), "--out", str(a)], monkeypatch) == 0
    assert _predict(model_dir, [str(folder), "--model", str(package), "--out", str(b)], monkeypatch) == 0
    assert a.read_text() == b.read_text()


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "mlic"
    proc = subprocess.run([str(exe), "predict", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--model" in proc.stdout and "runs:/" in proc.stdout


def test_progress_bar_only_on_a_terminal(model_dir, folder: Path, tmp_path: Path) -> None:
    """On a terminal (a pty here) stderr shows a progress bar; piped, it stays clean for logs."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    exe = str(Path(sys.executable).parent / "mlic")
    argv = [exe, "predict", str(folder), "--out", str(tmp_path / "p.csv"), "--batch-size", "4"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    try:
        proc = subprocess.run(argv, cwd=model_dir.root, env=env, stdout=subprocess.DEVNULL, stderr=follower,
                              timeout=120)
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the pty is drained and closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
    on_tty = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "predict: 100%" in on_tty and "12/12" in on_tty
    piped = subprocess.run(argv, cwd=model_dir.root, env=env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "100%" not in piped.stderr and "predicted 12 image(s)" in piped.stderr
