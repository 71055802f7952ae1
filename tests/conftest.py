"""Shared fixtures: a tiny synthetic image set with a labels CSV, a tiny params.yaml, stage loaders.

Everything is built in `tmp_path`, small enough (tens of images, 24-64 px) that the data-side
suite runs in about a minute on two cores. TensorFlow is imported lazily by the tests that need
it, so it is imported once per session.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import re
import shlex
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFilter

from mlic.params import Data

ROOT = Path(__file__).resolve().parents[1]

# CI must not go green on a test that did not run: with MLIC_REQUIRE_ALL=1 (.ci/run sets it) a
# skipped test fails, whatever skipped it (a missing package, browser, database, account or an
# earlier test). xfail stays allowed: it is declared, with its reason, and still reported.
REQUIRE_ALL = "MLIC_REQUIRE_ALL"


def required(name: str) -> bool:
    """Whether the switch `name` (MLIC_REQUIRE_*) is on: set to anything but "" or "0", or
    MLIC_REQUIRE_ALL is. Every switch is read this one way."""
    import os

    return any(os.environ.get(n, "") not in ("", "0") for n in (name, REQUIRE_ALL))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and required(REQUIRE_ALL):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but {REQUIRE_ALL} is set (CI runs every test): {reason}"

CLASSES = ("cloud", "road", "water", "field")
# (mode to save in, file extension) cycled over the images, so every test set mixes formats.
IMAGE_KINDS = (
    ("RGB", "jpg"),
    ("L", "png"),
    ("RGBA", "png"),
    ("P", "png"),
    ("CMYK", "jpg"),
    ("LA", "png"),
    ("RGB", "png"),
)
COLOURS = {"cloud": (230, 230, 230), "road": (90, 90, 90), "water": (30, 80, 200), "field": (60, 170, 40)}


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """A labels CSV plus the images it names, and the labels we meant to write."""

    root: Path
    images_dir: Path
    labels_csv: Path
    format: str
    delimiter: str
    filenames: list[str]
    classes: list[str]
    y: np.ndarray  # (n, k) uint8, columns in `classes` order

    def spec(self, **overrides: Any) -> Data:
        """The `data` params section pointing at this set."""
        values = dict(labels_csv=str(self.labels_csv), images_dir=str(self.images_dir),
                      format=self.format, delimiter=self.delimiter)
        values.update(overrides)
        return Data(**values)

    def data_section(self, **overrides: Any) -> dict[str, Any]:
        """The same, as a params.yaml mapping."""
        return dataclasses.asdict(self.spec(**overrides))


def render(labels: np.ndarray, classes: list[str], width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A smooth RGB picture: a gradient background and one shape per positive class.

    Smooth content keeps the JPEG round-trip error small, as on real photos.
    """
    gx = np.linspace(0, 1, width)[None, :, None]
    gy = np.linspace(0, 1, height)[:, None, None]
    base = rng.integers(40, 200, size=3)
    arr = np.clip(base + 50 * gx - 30 * gy, 0, 255).astype(np.uint8)
    im = Image.fromarray(np.broadcast_to(arr, (height, width, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(im)
    for c, on in zip(classes, labels):
        if on:
            x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            draw.ellipse((x0, y0, x0 + width // 2, y0 + height // 2), fill=COLOURS.get(c, (200, 50, 50)))
    return im.filter(ImageFilter.GaussianBlur(2))


def save_as(im: Image.Image, path: Path, mode: str) -> None:
    """Save an RGB picture in `mode` (the modes users' folders actually contain)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = im.quantize(colors=32)
    elif mode in ("RGBA", "LA"):
        im = im.convert(mode)
        alpha = Image.new("L", im.size, 255)
        ImageDraw.Draw(alpha).rectangle((0, 0, 3, 3), fill=0)  # a transparent corner
        im.putalpha(alpha)
    else:
        im = im.convert(mode)
    if path.suffix == ".jpg":
        im.save(path, quality=95)
    else:
        im.save(path)


def draw_label_matrix(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-hot labels with falling prevalence, every class present, and some rows with no label."""
    rates = np.linspace(0.6, 0.2, k)
    y = (rng.random((n, k)) < rates).astype(np.uint8)
    y[:k] = np.eye(k, dtype=np.uint8)  # every class has a positive
    y[k] = 0                          # and at least one row has none
    return y


def write_labels_csv(path: Path, filenames: list[str], y: np.ndarray, classes: list[str],
                     fmt: str = "onehot", delimiter: str = " ") -> None:
    """Write the CSV in format `onehot` (filename + 0/1 columns) or `tags` (filename + tags)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        if fmt == "onehot":
            w.writerow(["filename", *classes])
            for name, row in zip(filenames, y):
                w.writerow([name, *(int(v) for v in row)])
        else:
            w.writerow(["filename", "tags"])
            for name, row in zip(filenames, y):
                w.writerow([name, delimiter.join(c for c, v in zip(classes, row) if v)])


def make_image_set(root: Path, n: int = 30, *, fmt: str = "onehot", delimiter: str = " ", seed: int = 0,
                   classes: tuple[str, ...] = CLASSES, min_size: int = 24, max_size: int = 64) -> ImageSet:
    """`n` small images of mixed modes, formats and sizes (some in a subfolder) and their labels CSV."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    y = draw_label_matrix(n, len(classes), rng)
    filenames = []
    for i in range(n):
        mode, ext = IMAGE_KINDS[i % len(IMAGE_KINDS)]
        name = f"img_{i:03d}.{ext}" if i % 5 else f"sub/img_{i:03d}.{ext}"
        width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        save_as(render(y[i], list(classes), width, height, rng), images_dir / name, mode)
        filenames.append(name)
    labels_csv = root / "labels.csv"
    write_labels_csv(labels_csv, filenames, y, list(classes), fmt, delimiter)
    return ImageSet(root, images_dir, labels_csv, fmt, delimiter, filenames, list(classes), y)


@pytest.fixture(scope="session")
def make_set():
    """`make_image_set`, for tests and fixtures that build their own set (any scope)."""
    return make_image_set


def write_shards(image_set: ImageSet, out: Path, splits: dict[str, Any], *, size: int = 32, shard_size: int = 8,
                 seed: int = 5, y: np.ndarray | None = None, encoding: str = "jpeg", pool: Any = None) -> dict:
    """TFRecord shards and manifests of `image_set` into `out`, as preprocess writes them (pad resize,
    JPEG quality 90): per split the rows `splits[split]` (labels `y`, default the set's). Returns
    {split: Manifest}. The one shard-writing helper of the suite."""
    from mlic.tfrecords import EncodeSettings, write_split  # TensorFlow only for the tests using it

    y = image_set.y if y is None else y
    settings = EncodeSettings(image_size=size, resize_mode="pad", encoding=encoding, jpeg_quality=90)
    out.mkdir(parents=True, exist_ok=True)
    return {split: write_split(split, [image_set.filenames[i] for i in rows], y[list(rows)], image_set.classes,
                               image_set.images_dir, out, settings, shard_size, seed, pool=pool)
            for split, rows in splits.items()}


@pytest.fixture(scope="session")
def tiny_tfrecords(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_tfrecords(size)`: train (24) and val (8) records of a 32-image set at `size` px in
    shards of 8, written once per size per session; returns (folder, number of classes)."""
    made: dict[int, tuple[Path, int]] = {}

    def get(size: int) -> tuple[Path, int]:
        if size not in made:
            image_set = make_image_set(tmp_path_factory.mktemp(f"tiny_set_{size}"), n=32, seed=7)
            out = tmp_path_factory.mktemp(f"tiny_tfr_{size}")
            write_shards(image_set, out, {"train": range(0, 24), "val": range(24, 32)}, size=size)
            made[size] = (out, len(image_set.classes))
        return made[size]

    return get


TINY_PARAMS: dict[str, dict[str, Any]] = {
    "common": {"seed": 3},
    "data": {},
    "split": {"val_fraction": 0.2, "test_fraction": 0.2},
    "preprocess": {"image_size": 32, "resize_mode": "pad", "encoding": "jpeg", "jpeg_quality": 90,
                   "shard_size": 8, "workers": 1},
}


def write_params(path: Path, **sections: dict[str, Any]) -> Path:
    """A tiny params.yaml: TINY_PARAMS with each given section's keys overridden."""
    params = {name: dict(values) for name, values in TINY_PARAMS.items()}
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def params_yaml():
    """`write_params`: `params_yaml(path, data={...})` writes a tiny params.yaml."""
    return write_params


def dvc_stage(name: str) -> tuple[list[str], list[str]]:
    """The argv that dvc.yaml's `cmd` passes to stages/<name>.py, and every output path it declares
    (outs, metrics, plots), with `${...}` vars substituted: the contract the stage tests check."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    variables: dict[str, Any] = {}
    for entry in doc.get("vars", []):
        if isinstance(entry, dict):
            variables.update(entry)

    def lookup(match: re.Match) -> str:
        value: Any = variables
        for part in match.group(1).split("."):
            value = value[part]
        return str(value)

    def substitute(text: str) -> str:
        return re.sub(r"\$\{([^}]+)\}", lookup, text)

    stage = doc["stages"][name]
    argv = shlex.split(substitute(stage["cmd"]))
    assert argv[:2] == ["python", f"stages/{name}.py"], argv
    outputs = [substitute(next(iter(e)) if isinstance(e, dict) else e)
               for key in ("outs", "metrics", "plots") for e in stage.get(key, [])]
    return argv[2:], outputs


@pytest.fixture(scope="session")
def dvc_stages():
    """`dvc_stage`: `argv, outputs = dvc_stages("split")`."""
    return dvc_stage


def _load_stage(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def split_stage() -> types.ModuleType:
    """stages/split.py as a module (its `main(argv)` is what DVC runs)."""
    return _load_stage("split")


@pytest.fixture(scope="session")
def preprocess_stage() -> types.ModuleType:
    """stages/preprocess.py as a module."""
    return _load_stage("preprocess")


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A pipeline-shaped models folder: model.keras, model_meta.json, and the thresholds it names."""

    root: Path          # the "project root" the thresholds path is relative to
    models: Path        # root / "models"
    thresholds: Path
    classes: list[str]
    image_size: int


def make_model_dir(root: Path, backbone: str = "simple_cnn", image_size: int = 32,
                   classes: tuple[str, ...] = CLASSES, thresholds: tuple[float, ...] | None = None,
                   any_size: bool = False) -> ModelDir:
    """An untrained (seeded) model saved as `train` saves it, with metadata and thresholds
    (`any_size`: built as progressive resizing builds it)."""
    import json

    import keras

    from mlic import model as mlic_model
    from mlic.model_meta import ModelMeta

    keras.utils.set_random_seed(0)
    model = mlic_model.build_model(backbone, len(classes), image_size, seed=0, any_size=any_size)
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    model.save(models / "model.keras")
    rel = "reports/calibrate/thresholds.json"
    ModelMeta(classes=list(classes), image_size=image_size, resize_mode="pad", encoding="png", jpeg_quality=None,
              thresholds=rel, backbone=backbone, seed=0, train={"backbone": backbone},
              data_fingerprints={}, parameters=int(model.count_params())).write(models / "model_meta.json")
    values = thresholds or tuple(0.3 + 0.1 * i for i in range(len(classes)))
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(zip(classes, values))), encoding="utf-8")
    return ModelDir(root, models, path, list(classes), image_size)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    """A tiny simple_cnn models folder (32 px, 4 classes), built once per session."""
    return make_model_dir(tmp_path_factory.mktemp("model_dir"))


@pytest.fixture(scope="session")
def predict_images(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    """A dozen images of mixed modes, formats and sizes to predict on."""
    return make_image_set(tmp_path_factory.mktemp("predict_images"), n=12, seed=11, min_size=20, max_size=90)


def write_manifests(folder: Path, fingerprints: dict[str, str], classes: tuple[str, ...] = ("cat", "dog", "bird"),
                    count: int = 10) -> list:
    """Manifests as preprocess writes them (no shards behind them): one per split, given fingerprints."""
    from mlic.tfrecords import SCHEMA_VERSION, Manifest, Shard

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split, fp in fingerprints.items():
        manifest = Manifest(schema_version=SCHEMA_VERSION, split=split, count=count,
                            classes=list(classes), image_size=32, channels=3, resize_mode="pad",
                            encoding="png", jpeg_quality=None,
                            positives={c: i + 1 for i, c in enumerate(classes)},
                            shards=[Shard(f"{split}-00000-of-00001.tfrecord", count, "0" * 64)],
                            fingerprint=fp, directory=folder)
        manifest.write()
        written.append(manifest)
    return written


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` as a throwaway identity; its stdout, stripped."""
    import subprocess

    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path`, creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# What a copy of the project needs to run the pipeline (make_project).
PROJECT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "stages", "src")


def run_ok(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900):
    """Run `cmd`; its CompletedProcess, or an AssertionError with the tail of its output."""
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def make_project(repo: Path, params: dict[str, dict[str, Any]], who: str = "e2e") -> dict[str, str]:
    """A git + DVC copy of this project in `repo` (a new folder), each params section updated from
    `params`, committed. Returns the environment to run `dvc` there: this venv first on PATH, an
    MLflow store beside the repo (`../mlflow.db`), telemetry off, a throwaway git identity."""
    import os
    import shutil
    import sys

    repo.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, repo / name)
    values = yaml.safe_load((repo / "params.yaml").read_text())
    for section, overrides in params.items():
        values[section].update(overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo.parent / 'mlflow.db'}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = who
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = f"{who}@example.invalid"
    env.pop("DVC_EXP_NAME", None)
    run_ok(["git", "init", "-q", "-b", "main"], repo, env)
    run_ok(["dvc", "init", "-q"], repo, env)
    run_ok(["dvc", "config", "core.analytics", "false"], repo, env)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the plot templates dvc.yaml names
    with open(repo / ".gitignore", "a", encoding="utf-8") as fh:
        fh.write("mlflow.db\n")
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-q", "-m", "init"], repo, env)
    return env


# The small project of the end-to-end tests: 120 images of 32-48 px, 32 px inputs, 1 epoch.
SMALL_PIPELINE: dict[str, dict[str, Any]] = {
    "sample": {"n_images": 120, "min_size": 32, "max_size": 48},
    # png: lossless shards, so `mlic predict` on the image files sees the very pixels evaluate saw.
    "preprocess": {"image_size": 32, "shard_size": 40, "encoding": "png"},
    "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": 0},
    "evaluate": {"batch_size": 32},
    # 120 images leave every class under the default min_support of 10 validation positives, so every class
    # would take the one global threshold; per-class thresholds keep the beta experiments meaningful.
    "calibrate": {"min_support": 1},
}


def mlflow_runs(env: dict[str, str]) -> list:
    """Every run in the store at env's MLFLOW_TRACKING_URI, oldest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time ASC"])


def check_complete_run(run, env: dict[str, str], repo: Path, *, workspace: bool = True,
                       first_in_store: bool = False) -> None:
    """Assert that `run` (in the store at env's MLFLOW_TRACKING_URI) is what `track` logs for the
    pipeline in `repo`: params, summary metrics (each equal to the stage's metrics file the run
    logged, and with `workspace` that file is `repo`'s own reports/*.json), curves, artifacts,
    datasets, the packaged model, its registry version (with `first_in_store`: the champion), git
    provenance, FINISHED."""
    import json
    import subprocess
    import tempfile

    from mlic.record import flatten_metrics

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    params = run.data.params
    assert params["train.epochs"] == str(yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"])
    for key in ("common.seed", "split.val_fraction", "preprocess.image_size", "train.backbone", "calibrate.beta"):
        assert key in params, key
    metrics = run.data.metrics
    summary = [k for k in metrics if not k.startswith("epoch/")]
    assert 20 <= len(summary) <= 60, sorted(summary)                # a summary a person can scan
    assert all("/" in k for k in metrics), sorted(metrics)          # hierarchical: the UI groups them
    for key in ("test/macro_f1", "test_calibrated/macro_f1", "val/macro_ap", "test/hamming_loss",
                "test/subset_accuracy"):
        assert key in metrics, (key, sorted(metrics))
    # the trivial predictor is the description's contrast, not metrics that lead every MLflow list
    assert not any(k.startswith("baseline/") for k in metrics), sorted(metrics)
    assert "trivial predictor" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["mlic.changed"] and len(run.data.tags["mlic.fingerprint"]) == 64
    assert not any(k.endswith(("/n_samples", "/n_classes")) for k in metrics)  # constants are not metrics
    steps = client.get_metric_history(run.info.run_id, "epoch/val_loss")
    assert sorted(m.step for m in steps) == list(range(len(steps))) and steps
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"thresholds.json", "dvc.lock.yaml", "history.csv"} <= artifacts, artifacts
    assert len({a for a in artifacts if a.endswith(".png")}) >= 4, artifacts
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["test", "train", "val"]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1, models
    # The served model refuses images over the run's data.max_image_pixels: the limit travels in it.
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{models[0].artifact_location}/MLmodel",
                                                      dst_path=tmp, tracking_uri=env["MLFLOW_TRACKING_URI"])
        flavor = yaml.safe_load(Path(mlmodel).read_text())["flavors"]["python_function"]
    assert flavor["config"]["data.max_image_pixels"] == int(run.data.params["data.max_image_pixels"]), flavor
    assert "champion.json" in artifacts
    assert run.data.tags["champion.promoted"] in ("true", "false")
    name, version = run.data.tags["registered_model_version"].split("/")
    mv = client.get_model_version(name, version)
    assert mv.run_id == run.info.run_id
    if first_in_store:  # nobody to beat: the first version is champion
        assert run.data.tags["champion.promoted"] == "true"
        assert str(client.get_model_version_by_alias(name, "champion").version) == str(version)
    # The numbers are the pipeline's: each logged summary metric equals its stage's metrics file.
    sweep_prefix = f"{run.data.tags['mlic.sweep']}/" if "mlic.sweep" in run.data.tags else ""
    compared = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("evaluate", "calibrate"):
            logged = json.loads(Path(client.download_artifacts(run.info.run_id, f"{stage}_metrics.json", tmp))
                                .read_text())
            if workspace:
                assert logged == json.loads((repo / "reports" / stage / "metrics.json").read_text()), stage
            for key, value in flatten_metrics(logged)[0].items():
                got = metrics.get(key, metrics.get(sweep_prefix + key))
                if got is not None:
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (key, got, value)
                    compared.append(key)
    assert {"test/macro_f1", "test_calibrated/macro_f1", "val/macro_ap"} <= set(compared), compared
    assert "val/macro_ap" in mv.tags and "test_calibrated/macro_f1" in mv.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == head
    assert run.data.tags["git_dirty"] in ("true", "false")
    assert len(run.data.tags["data_fingerprint"]) == 64
    assert run.info.status == "FINISHED"


@dataclasses.dataclass(frozen=True)
class Project:
    """A git + DVC copy of the project (make_project): its folder and the environment to run dvc in."""

    repo: Path
    env: dict[str, str]

    def run(self, *cmd: str, **env: str):
        """`run_ok(cmd)` in the project, with `env` on top of the project's environment."""
        return run_ok(list(cmd), self.repo, {**self.env, **env})


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The small project (SMALL_PIPELINE) after one `dvc repro`, its results committed (dvc.lock in
    git, cached outputs in the DVC cache), MLflow store beside it. Shared by the team-setup tests
    (tracking server, DVC remote): each leaves the pipeline's outputs as they were."""
    repo = tmp_path_factory.mktemp("pipeline") / "project"
    project = Project(repo, make_project(repo, SMALL_PIPELINE, who="team"))
    project.run("dvc", "repro")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "pipeline results")
    return project
