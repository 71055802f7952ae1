"""`mlic init`: a fresh clone pointed at a user's own labels and images without editing dvc.yaml
by hand; the data checked first, nothing written while it has problems, comments kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_image_set, run_ok

from mlic import project
from mlic.errors import UserError


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A `git clone` of this repository's HEAD (with this checkout's uncommitted params/dvc.yaml
    left out: what a newcomer gets)."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    repo = tmp_path_factory.mktemp("own-data") / "mlic"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(repo / "src"), "MLFLOW_DISABLE_TELEMETRY": "true",
            "GIT_AUTHOR_NAME": "user", "GIT_COMMITTER_NAME": "user",
            "GIT_AUTHOR_EMAIL": "user@example.invalid", "GIT_COMMITTER_EMAIL": "user@example.invalid"}
    run_ok(["git", "clone", "-q", str(ROOT), str(repo)], repo.parent, env)
    return repo, env


def _init(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlic.cli", "init", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)


def test_own_data_from_a_fresh_clone_without_editing_dvc_yaml(fresh: tuple[Path, dict[str, str]]) -> None:
    repo, env = fresh
    data = make_image_set(repo / "data" / "mine", n=60, fmt="tags", seed=5)
    params_before, dvc_before = (repo / "params.yaml").read_text(), (repo / "dvc.yaml").read_text()

    # A row whose image is missing: reported with its CSV line, and nothing is written.
    (data.images_dir / data.filenames[3]).rename(repo / "data" / "aside")
    failed = _init(repo, env, "--labels", "data/mine/labels.csv", "--images", "data/mine/images")
    assert failed.returncode == 2, failed.stderr
    assert "data/mine/labels.csv:5" in failed.stderr and data.filenames[3] in failed.stderr
    assert (repo / "params.yaml").read_text() == params_before and (repo / "dvc.yaml").read_text() == dvc_before
    (repo / "data" / "aside").rename(data.images_dir / data.filenames[3])

    done = _init(repo, env, "--labels", "data/mine/labels.csv", "--images", "data/mine/images")
    assert done.returncode == 0, done.stderr
    assert "60 images, 4 classes" in done.stderr and "sample stage is removed" in done.stderr
    steps = [line.strip() for line in done.stdout.splitlines()[1:]]
    assert steps[0] == "dvc add data/mine/images data/mine/labels.csv" and steps[-1] == "dvc repro"

    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert {k: params["data"][k] for k in ("labels_csv", "images_dir", "format", "delimiter")} == {
        "labels_csv": "data/mine/labels.csv", "images_dir": "data/mine/images", "format": "tags", "delimiter": " "}
    # Only those values changed: every other line, comments included, is as it was.
    changed = [(a, b) for a, b in zip(params_before.splitlines(), (repo / "params.yaml").read_text().splitlines())
               if a != b]
    assert [b.split("#")[0].split(":")[0].strip() for _, b in changed] == ["labels_csv", "images_dir", "format"]
    assert all("#" in a and "#" in b and a.split("#", 1)[1] == b.split("#", 1)[1] for a, b in changed)
    # dvc.yaml: the sample stage's lines gone, every other line as it was.
    lines = dvc_before.splitlines()
    start, end = lines.index("  sample:"), lines.index("  split:")
    assert (repo / "dvc.yaml").read_text().splitlines() == lines[:start] + lines[end:]

    # The steps it printed, then the pipeline's first stage on the user's data.
    for step in steps[:-1]:
        run_ok(step.split(), repo, env)
    run_ok(["dvc", "repro", "split"], repo, env)
    summary = yaml.safe_load((repo / "reports" / "data" / "summary.json").read_text())
    assert summary["images"] == 60 and summary["classes"] == 4
    assert not (repo / "data" / "sample").exists()
    again = _init(repo, env, "--labels", "data/mine/labels.csv", "--images", "data/mine/images")
    assert again.returncode == 0 and "no sample stage (removed before)" in again.stderr


def test_the_format_is_told_from_the_header() -> None:
    assert project.detect_format(["filename", "tags"], "filename", "tags") == "tags"
    assert project.detect_format(["tags", "filename"], "filename", "tags") == "tags"
    assert project.detect_format(["filename", "cat", "dog"], "filename", "tags") == "onehot"
    assert project.detect_format(["filename", "tags", "extra"], "filename", "tags") == "onehot"


def test_data_outside_the_project_is_refused(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    assert project.project_path(tmp_path / "project", "data/x.csv", "--labels") == "data/x.csv"
    assert project.project_path(tmp_path / "project", tmp_path / "project" / "d" / "i", "--images") == "d/i"
    with pytest.raises(UserError, match="outside the project .* move or copy it under data/"):
        project.project_path(tmp_path / "project", tmp_path / "elsewhere.csv", "--labels")
