"""MLflow mirror of one pipeline run (with `serving.py`, the only code that imports mlflow).

Metrics files are the source of truth; MLflow mirrors them. The `track` stage depends on every
output of the earlier stages, so DVC re-runs it (and this logs one fresh, complete run) whenever
anything upstream changed, and skips it on a no-op `dvc repro`.

Naming conventions (one place, so the UI columns stay stable from run to run):
  params   every key of params.yaml, dotted: `train.learning_rate`, `data.classes`. Values are
           text as YAML would write them: lists/mappings as compact JSON, None as `null`,
           booleans as `true`/`false`; longer than MLflow's 6000 chars -> cut, with a marker.
  curves   each numeric column of the Keras history CSV as `epoch/<keras name>` with
           step = epoch (`epoch/loss`, `epoch/val_f1`, `epoch/learning_rate`). The `epoch/` prefix
           keeps them apart from the summary metrics and the UI groups them in one chart section.
  summary  metrics JSONs flattened with `_` between levels, plus the file's prefix if given:
           evaluate {"test": {"macro_f1": ..}} -> `test_macro_f1`; train (prefix `train`)
           {"best_epoch": 7} -> `train_best_epoch`. null/NaN/inf/text/lists are skipped (and
           counted in the log); booleans become 0/1. Step 0.
  artifacts top level (the compare view lists only those), named by file name, or by as many
           parent folders as needed to be unique: `evaluate_per_class_test.csv`.
  tags     git_commit, git_dirty (true/false/unknown), git_dirty_paths, dvc_exp_name,
           dvc_exp_baseline_rev, data_fingerprint, data_fingerprint_<split>,
           mlflow.source.name ("dvc repro" | "dvc exp run" | "python stages/track.py").
  model    the packaged pyfunc model (`serving.py`: image files in, labels + probabilities out,
           with the .keras file, thresholds and model_meta.json as artifacts) under name
           "model", registered as a new version of `tracking.registered_model` with the
           headline metrics as version tags; the `champion` alias follows `registry.py`'s rule
           and the decision is logged (`champion.json`, tags `champion.*`).

The experiment is tagged `mlflow.experimentKind = custom_model_development`, so the MLflow 3 UI
opens the classic runs table instead of asking for / showing the GenAI overview.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlic import registry, serving
from mlic.store import (  # noqa: F401 - re-exported: tracking is where users look for them
    DB_FILE,
    TrackingUnavailable,
    _one_line,
    check_store,
    default_project_root,
    redact_uri,
    resolve_tracking_uri,
    sqlite_path,
)

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mlic"
HISTORY_PREFIX = "epoch/"
MODEL_NAME = "model"
# Read by the MLflow 3 UI (server/js: `ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`); without it the
# UI infers the kind or asks, and may land on the GenAI overview/traces page.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MANIFEST_SUFFIX = ".manifest.json"
# MLflow's limits (mlflow/utils/validation.py), repeated so we cut values ourselves, visibly.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
_UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class PackageSpec:
    """What the packaged model is made of, and where it is registered."""

    keras_model: Path
    meta: Path
    thresholds: Path
    registered_model: str | None = None   # None: log the model, register nothing
    champion_metric: str = "val_macro_ap"


@dataclasses.dataclass(frozen=True)
class RunInfo:
    run_id: str
    experiment_id: str
    experiment: str
    run_name: str
    tracking_uri: str
    git_commit: str
    model_uri: str | None = None
    registered_model: str | None = None
    model_version: str | None = None
    champion: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, str]:
        """For reports/mlflow_run.json: no password from the tracking URI ends up in a file."""
        return dataclasses.asdict(self) | {"tracking_uri": redact_uri(self.tracking_uri)}


@dataclasses.dataclass(frozen=True)
class GitInfo:
    commit: str  # full sha, or "unknown" outside a git repo / without git
    dirty: str  # "true" | "false" | "unknown"
    dirty_paths: tuple[str, ...] = ()


# --------------------------------------------------------------------------- pure helpers
_BAD_NAME_CHARS = re.compile(r"[^\w.\- ]")  # MLflow allows \w . - space / (and :) in names


def clean_name(name: str) -> str:
    """A metric/param name MLflow accepts: other characters (and `/`, reserved) become `_`."""
    return _BAD_NAME_CHARS.sub("_", str(name)).strip() or "_"


def param_value(value: Any) -> str:
    """A param value as text, written the way params.yaml would show it."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE:
        marker = f"...[cut, {len(text)} chars; see params.yaml artifact]"
        text = text[: MAX_PARAM_VALUE - len(marker)] + marker
    return text


def flatten_params(raw: Mapping[str, Any]) -> dict[str, str]:
    """params.yaml -> {"section.key": "value"}; nested mappings are dotted, empty ones skipped."""
    from mlic.params import flatten

    return {clean_name(k)[:250]: param_value(v) for k, v in flatten(dict(raw)).items()}


def flatten_metrics(obj: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], list[str]]:
    """Nested metrics JSON -> ({"a_b_c": number}, [skipped names]).

    Booleans become 0/1; null, NaN, inf, text and lists are skipped.
    """
    values: dict[str, float] = {}
    skipped: list[str] = []
    for key, value in obj.items():
        name = f"{prefix}_{clean_name(key)}" if prefix else clean_name(key)
        if isinstance(value, Mapping):
            sub_values, sub_skipped = flatten_metrics(value, name)
            values.update(sub_values)
            skipped.extend(sub_skipped)
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            values[name] = float(value)
        else:
            skipped.append(name)
    return values, skipped


def read_history(path: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """History CSV -> ({"epoch/<column>": [(epoch, value), ...]}, [non-numeric columns]).

    Every numeric column but `epoch` is a curve; empty cells (NaN) are left out of their curve.
    """
    import pandas as pd

    frame = pd.read_csv(path)
    if "epoch" not in frame.columns:
        raise ValueError(f"{path}: no `epoch` column; columns are {', '.join(map(str, frame.columns))}")
    epochs = pd.to_numeric(frame["epoch"], errors="coerce")
    if epochs.isna().any() or (epochs != epochs.round()).any():
        raise ValueError(f"{path}: `epoch` must hold whole numbers in every row")
    if epochs.duplicated().any():
        log.warning("%s: repeated epoch numbers; MLflow will show several points per step", path)
    curves: dict[str, list[tuple[int, float]]] = {}
    skipped: list[str] = []
    for column in frame.columns:
        if column == "epoch":
            continue
        series = frame[column]
        if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
            skipped.append(str(column))
            continue
        points = [(int(e), float(v)) for e, v in zip(epochs, series.astype(float)) if math.isfinite(v)]
        curves[HISTORY_PREFIX + clean_name(column)] = points
    return curves, skipped


def artifact_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A unique top-level artifact name per path: the file name, or as many parent folders as
    it takes to tell clashing names apart (`reports/evaluate/x.csv` -> `evaluate_x.csv`)."""
    parts = {p: [s for s in Path(p).parts if s not in (Path(p).anchor, ".", "..")] for p in paths}
    depth = {p: 1 for p in paths}
    while True:
        names = {p: "_".join(parts[p][-depth[p]:]) for p in paths}
        counts = Counter(names.values())
        grow = [p for p in paths if counts[names[p]] > 1 and depth[p] < len(parts[p])]
        if not grow:
            break
        for p in grow:
            depth[p] += 1
    clashes = sorted(n for n, c in Counter(names.values()).items() if c > 1)
    if clashes:
        raise ValueError(f"two artifacts would share the name {clashes[0]!r}; rename one")
    return names


def read_fingerprints(manifests_dir: Path) -> dict[str, str]:
    """{split: fingerprint} from `<split>.manifest.json` files (written by preprocess)."""
    found: dict[str, str] = {}
    for path in sorted(Path(manifests_dir).glob("*" + MANIFEST_SUFFIX)):
        split = path.name[: -len(MANIFEST_SUFFIX)]
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not manifest.get("fingerprint"):
            raise ValueError(f"{path}: no `fingerprint`; re-run `dvc repro preprocess`")
        found[split] = str(manifest["fingerprint"])
    if not found:
        raise FileNotFoundError(f"{manifests_dir}: no *{MANIFEST_SUFFIX} files")
    return found


def data_fingerprint(fingerprints: Mapping[str, str]) -> str:
    """One sha256 over all splits' fingerprints, independent of listing order."""
    text = "".join(f"{split}={fp}\n" for split, fp in sorted(fingerprints.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_info(cwd: Path) -> GitInfo:
    """HEAD and whether the work tree differs from it (untracked files count); never raises.

    Under `dvc repro` the tree is usually dirty because DVC rewrites dvc.lock before `track`
    runs; `git_dirty_paths` shows which files differ.
    """
    head = _git(["rev-parse", "HEAD"], cwd)
    if head is None:
        return GitInfo(_UNKNOWN, _UNKNOWN)
    status = _git(["status", "--porcelain"], cwd)
    if status is None:
        return GitInfo(head.strip(), _UNKNOWN)
    paths = tuple(line[3:] for line in status.splitlines() if line.strip())
    return GitInfo(head.strip(), "true" if paths else "false", paths)


def run_context(env: Mapping[str, str], commit: str, now: datetime) -> tuple[str, dict[str, str]]:
    """(run name, DVC tags) for this process: the experiment name under `dvc exp run`,
    else `repro-<short sha>-<UTC time>`."""
    exp_name = env.get("DVC_EXP_NAME", "")
    tags = {"dvc_exp_name": exp_name or "workspace"}
    if env.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = env["DVC_EXP_BASELINE_REV"]
    if exp_name:
        tags["mlflow.source.name"] = "dvc exp run"
    elif env.get("DVC_STAGE"):
        tags["mlflow.source.name"] = "dvc repro"
    else:
        tags["mlflow.source.name"] = "python stages/track.py"
    stamp = now.astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")
    short = commit[:7] if commit != _UNKNOWN else "nogit"
    return exp_name or f"repro-{short}-{stamp}", tags


def ui_hint(info: RunInfo) -> str:
    """Where to look: a URL for a server, or the `mlflow ui` command for a local store."""
    route = f"#/experiments/{info.experiment_id}/runs/{info.run_id}"
    if info.tracking_uri.startswith(("http://", "https://")):
        return f"{redact_uri(info.tracking_uri).rstrip('/')}/{route}"
    return f"mlflow ui --backend-store-uri '{info.tracking_uri}'  then  http://127.0.0.1:5000/{route}"


# --------------------------------------------------------------------------- logging a run
def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None


def _require(path: Path | None, what: str) -> None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{path}: {what} not found (it was passed, so it is required)")


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point the fluent API (needed by log_model) at `uri` for the block only."""
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created as a model-training experiment if missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        db = sqlite_path(tracking_uri)
        if db is not None:
            # Beside the database rather than MLflow's default `./mlruns` of the current folder,
            # which for `dvc exp run --temp/--queue` is a temporary copy of the repo.
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
            location = (db.parent.resolve() / "mlruns" / safe).as_uri()
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:  # created meanwhile by a parallel `dvc queue` worker
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise exc
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or set tracking.experiment")
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # never override a kind someone chose
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def log_pipeline_run(
    *,
    tracking_uri: str,
    experiment: str = DEFAULT_EXPERIMENT,
    params_file: Path | None,
    history_csv: Path | None = None,
    metrics_files: Sequence[tuple[str, Path]] = (),
    artifacts: Sequence[Path] = (),
    package: PackageSpec | None = None,
    manifests_dir: Path | None = None,
    project_root: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> RunInfo:
    """Log one complete MLflow run from the pipeline's files and return where it is.

    `metrics_files` is a list of (prefix, path); prefix "" keeps the JSON's own top-level keys.
    Params file, history, metrics files and manifests are logged as artifacts too.
    Every input is read and checked before the run is created, so a missing file leaves no run;
    a failure while logging marks the run FAILED (KILLED on Ctrl-C), never FINISHED.
    """
    env = os.environ if env is None else env
    project_root = Path(project_root or Path.cwd())
    for path, what in [(params_file, "params file"), (history_csv, "history CSV"),
                       *([(package.keras_model, "model"), (package.meta, "model metadata"),
                          (package.thresholds, "thresholds")] if package else []),
                       (manifests_dir, "manifests folder"),
                       *[(p, "metrics file") for _, p in metrics_files],
                       *[(p, "artifact") for p in artifacts]]:
        _require(path, what)

    # ---- read everything first
    from mlic.params import read_params_file

    params = flatten_params(read_params_file(params_file)) if params_file else {}
    curves, skipped_columns = read_history(Path(history_csv)) if history_csv else ({}, [])
    if skipped_columns:
        log.info("history: non-numeric column(s) not logged: %s", ", ".join(skipped_columns))
    summary: dict[str, float] = {}
    source: dict[str, Path] = {}
    skipped: list[str] = []
    for prefix, path in metrics_files:
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object at the top level")
        values, missing = flatten_metrics(data, clean_name(prefix) if prefix else "")
        for name in values:
            if name in summary:
                raise ValueError(f"metric {name!r} comes from both {source[name]} and {path}")
            source[name] = Path(path)
        summary.update(values)
        skipped.extend(missing)
    if skipped:
        log.info("%d metric value(s) skipped (null/NaN/non-numeric): %s%s", len(skipped),
                 ", ".join(skipped[:10]), " ..." if len(skipped) > 10 else "")

    fingerprints = read_fingerprints(Path(manifests_dir)) if manifests_dir else {}
    files = [p for p in [params_file, history_csv, *[p for _, p in metrics_files], *artifacts] if p]
    if manifests_dir:
        files += sorted(Path(manifests_dir).glob("*" + MANIFEST_SUFFIX))
    unique: dict[Path, Path] = {}
    for p in files:
        unique.setdefault(Path(p).resolve(), Path(p))
    names = artifact_names(list(unique.values()))

    git = git_info(project_root)
    run_name, tags = run_context(env, git.commit, datetime.now(timezone.utc))
    tags |= {"git_commit": git.commit, "git_dirty": git.dirty}
    if git.dirty_paths:
        tags["git_dirty_paths"] = _one_line(" ".join(git.dirty_paths), MAX_TAG_VALUE)
    if git.commit != _UNKNOWN:
        tags["mlflow.source.git.commit"] = git.commit
    if fingerprints:
        tags["data_fingerprint"] = data_fingerprint(fingerprints)
        tags |= {f"data_fingerprint_{clean_name(s)}": fp for s, fp in fingerprints.items()}
    how = [f"`git checkout {git.commit}` then `dvc repro`"] if git.commit != _UNKNOWN else []
    if env.get("DVC_EXP_NAME"):
        how.append(f"`dvc exp apply {env['DVC_EXP_NAME']}`")
    tags["mlflow.note.content"] = (
        "Logged by the mlic `track` stage from the pipeline's files, which are the source of "
        "truth." + (f" Reproduce: {' or '.join(how)}." if how else ""))

    if package is not None and package.registered_model:
        registry.check_selection_metric(package.champion_metric)

    # ---- then log
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.tracking.context.registry import resolve_tags

    now_ms = int(time.time() * 1000)
    metrics = [Metric(k, v, now_ms, 0) for k, v in sorted(summary.items())]
    metrics += [Metric(k, v, now_ms, step) for k, points in sorted(curves.items()) for step, v in points]
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=resolve_tags(tags))
    run_id = run.info.run_id
    try:
        # start_run: log_model needs an active run. Leaving the block marks the run FINISHED,
        # or FAILED if anything inside raised.
        with _tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            client.log_batch(run_id, metrics=metrics,
                             params=[Param(k, v) for k, v in sorted(params.items())])
            with tempfile.TemporaryDirectory(prefix="mlic-artifacts-") as staging:
                for path, name in names.items():
                    if path.is_dir():
                        shutil.copytree(path, Path(staging) / name)
                    else:
                        shutil.copy2(path, Path(staging) / name)
                client.log_artifacts(run_id, staging)
            model_info = decision = None
            if package is not None:
                model_info, decision = _log_package(client, run_id, package, summary)
    except BaseException as exc:  # also covers start_run itself failing; Ctrl-C -> KILLED
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    log.info("logged %d params, %d summary metrics, %d curves, %d artifacts%s",
             len(params), len(summary), len(curves), len(names), ", packaged model" if model_info else "")
    return RunInfo(run_id, experiment_id, experiment, run_name, tracking_uri, git.commit,
                   model_uri=model_info.model_uri if model_info else None,
                   registered_model=package.registered_model if model_info and package.registered_model else None,
                   model_version=None if decision is None else decision.version,
                   champion=None if decision is None else decision.as_dict())


def _log_package(client: Any, run_id: str, package: PackageSpec,
                 summary: Mapping[str, float]) -> tuple[Any, Any]:
    """Log the packaged pyfunc model into the active run, register it, and hold the champion vote."""
    # MLflow 3 links the run's metrics, already logged, to the logged model it creates here.
    info = serving.log_packaged_model(package.keras_model, package.meta, package.thresholds, name=MODEL_NAME,
                                      registered_model_name=package.registered_model)
    if not package.registered_model:
        return info, None
    version = str(info.registered_model_version)
    # The few numbers a user decides on, as version tags: the registry's list shows them.
    headline = registry.headline(summary, package.champion_metric)
    registry.tag_version(client, package.registered_model, version, headline, {"run_id": run_id})
    decision = registry.elect_champion(client, package.registered_model, version, package.champion_metric,
                                       summary.get(package.champion_metric))
    with tempfile.TemporaryDirectory(prefix="mlic-champion-") as tmp:
        path = Path(tmp) / "champion.json"
        path.write_text(json.dumps(decision.as_dict(), indent=2) + "\n", encoding="utf-8")
        client.log_artifact(run_id, str(path))
    client.update_model_version(package.registered_model, version, description=(
        f"From run {run_id}. " + ", ".join(f"{k} {v:.4g}" for k, v in headline.items())
        + f". Champion: {'promoted' if decision.promoted else 'not promoted'} ({decision.reason})."))
    client.set_tag(run_id, "champion.promoted", str(decision.promoted).lower())
    client.set_tag(run_id, "champion.reason", _one_line(decision.reason, MAX_TAG_VALUE))
    client.set_tag(run_id, "registered_model_version", f"{package.registered_model}/{version}")
    log.info("registered %s version %s; champion: %s (%s)", package.registered_model, version,
             "promoted" if decision.promoted else f"stays version {decision.previous_champion}", decision.reason)
    return info, decision


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """`python -m mlic.tracking check`: exit 0 if the configured store is usable, else 2."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mlic.tracking", description=main.__doc__)
    ap.add_argument("command", choices=["check"])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    from mlic.stage import setup_logging
    from mlic.params import load_section

    setup_logging()

    params_uri = load_section("tracking", args.params).uri if Path(args.params).exists() else None
    uri = resolve_tracking_uri(params_uri)
    try:
        check_store(uri, args.timeout)
    except TrackingUnavailable as exc:
        log.error("%s", exc)
        return 2
    log.info("MLflow tracking store %s is usable", redact_uri(uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
