"""The stage skeleton: params loaded whole and validated once, a user error is one line and exit 2,
a bug keeps its traceback, a full disk is the machine's fault in one line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, write_params, write_text
from mlic.errors import UserError
from mlic.stage import EXIT_USER_ERROR, Stage


def _stage(run, sections=("common",), checks=()) -> Stage:
    return Stage("A test stage.\n\nMore.", sections, lambda ap: ap.add_argument("--out"), run, checks)


def test_the_declared_sections_are_passed_with_defaults(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", common={"seed": 11})
    seen = {}

    def run(args, p) -> int:
        seen.update(seed=p.common.seed, epochs=p.train.epochs, out=args.out, path=p.path)
        return 0

    assert _stage(run, ("common", "train"))(["--params", str(params), "--out", "o"]) == 0
    # `train` is absent from the file: its defaults, the one place they live.
    assert seen == {"seed": 11, "epochs": seen["epochs"], "out": "o", "path": params} and seen["epochs"] > 0


@pytest.mark.parametrize("text, words", [
    ("trian:\n  epochs: 2\n", ["trian", "did you mean", "train"]),
    ("preprocess:\n  shard_size: 0\n", ["preprocess", "shard_size", "0"]),   # not this stage's section
    ("train:\n  dropout: 1.0\n", ["train", "dropout", "1.0"]),
    ("common:\n  seed: [1]\n", ["common", "seed"]),
])
def test_a_bad_params_file_is_one_line_before_any_work(tmp_path: Path, caplog, text: str, words: list[str]) -> None:
    params = write_text(tmp_path / "params.yaml", text)
    ran = []
    assert _stage(lambda a, p: ran.append(1) or 0)(["--params", str(params)]) == EXIT_USER_ERROR
    assert not ran
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    message = record.getMessage()
    assert "\n" not in message and all(w in message for w in words), message


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path: Path, caplog) -> None:
    params = write_params(tmp_path / "params.yaml")

    def user(args, p) -> int:
        raise UserError("labels.csv, line 3, column `cat`: `2` is not 0 or 1; fix the cell")

    assert _stage(user)(["--params", str(params)]) == EXIT_USER_ERROR
    assert caplog.records[-1].getMessage().startswith("labels.csv, line 3")

    def bug(args, p) -> int:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        _stage(bug)(["--params", str(params)])


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_a_full_or_unwritable_disk_is_one_line_naming_the_file(tmp_path: Path, caplog, code: int, words: str) -> None:
    params = write_params(tmp_path / "params.yaml")

    def write(args, p) -> int:
        raise OSError(code, os.strerror(code), str(tmp_path / "data" / "shard-00001.tfrecord"))

    assert _stage(write)(["--params", str(params)]) == EXIT_USER_ERROR
    message = caplog.records[-1].getMessage()
    assert "shard-00001.tfrecord" in message and words in message and "re-run" in message


def test_other_os_errors_are_bugs(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml")

    def broken(args, p) -> int:
        raise OSError(errno.EIO, "input/output error")

    with pytest.raises(OSError):
        _stage(broken)(["--params", str(params)])


@pytest.mark.parametrize("stage, text", [
    ("split", "split:\n  val_fraction: 0.6\n  test_fraction: 0.6\n"),
    ("train", "trian:\n  epochs: 1\n"),
    ("preprocess", "preprocess:\n  shard_size: 0\n"),
])
def test_the_real_stages_end_in_one_line_on_stderr(tmp_path: Path, stage: str, text: str) -> None:
    """As DVC runs them: a subprocess; stderr holds exactly one line, no traceback."""
    write_text(tmp_path / "params.yaml", text)
    cmd = [sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--params", str(tmp_path / "params.yaml")]
    cmd += {"split": ["--splits-dir", "s", "--reports-dir", "r"],
            "preprocess": ["--splits-dir", "s", "--out", "o", "--metrics", "m.json"],
            "train": ["--tfrecords", "t", "--model", "m", "--meta", "x", "--summary", "y", "--history", "h",
                      "--metrics", "z"]}[stage]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    assert len(lines) == 1 and lines[0].startswith("ERROR") and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / ".mlic").exists()  # a failure is not journalled


def test_sigterm_unwinds_like_ctrl_c_leaving_no_temp_output(tmp_path: Path) -> None:
    """`dvc queue kill` sends SIGTERM: the half-written output is removed, one line, exit 130."""
    import signal

    write_params(tmp_path / "params.yaml")
    script = write_text(tmp_path / "slow.py", (
        "import time\n"
        "from mlic.atomic import atomic_dir\n"
        "from mlic.stage import Stage\n"
        "def run(args, params):\n"
        "    with atomic_dir('out') as out:\n"
        "        (out / 'part').write_text('half')\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(60)\n"
        "    return 0\n"
        "main = Stage('Slow.', ('common',), lambda ap: None, run)\n"
        "if __name__ == '__main__':\n"
        "    main.script()\n"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # the temp folder exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "slow.py"]
