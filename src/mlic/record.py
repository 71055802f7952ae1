"""What one pipeline run's record holds, read from the pipeline's files; no tracking backend here.

`build_record` reads every file the `track` stage is given and returns a `RunRecord`: the run's
name and tags, its params, summary metrics, per-epoch curves, artifacts (figures included),
dataset inputs and start time. `tracking.py` writes such a record to MLflow; another backend
would write the same record. The files are the source of truth; the record mirrors them.

Naming conventions (one place, so the UI columns stay stable from run to run):
  params    every key of params.yaml, dotted: `train.learning_rate`, `data.classes`. Values are
            text as YAML would write them: lists/mappings as compact JSON, None as `null`,
            booleans as `true`/`false`; longer than MLflow's 6000 chars -> cut, with a marker.
  curves    each numeric column of the Keras history CSV as `epoch/<keras name>`, step = epoch.
  metrics   hierarchical, levels joined by `/` so the MLflow UI groups them: a metrics JSON
            {"test": {"macro_f1": ..}} -> `test/macro_f1`; a file given a prefix (train) ->
            `train/best_epoch`. Facts a
            stage noted in the journal -> `<stage>/<fact>` (`train/images_per_second`), for the
            stages that ran since the previous `track`. `SUMMARY_RULES` keeps the run to the
            numbers worth comparing (see `keep_summary_metric`); every value stays in the JSON
            files, which are logged as artifacts.
  artifacts top level (the compare view lists only those), named by file name, or by as many
            parent folders as needed to be unique: `evaluate_per_class_test.csv`. A file type
            the UI cannot preview gets a suffix it can (`dvc.lock` -> `dvc.lock.yaml`).
  datasets  one input per split manifest: name = split, digest = its fingerprint, with the
            record count, classes and prevalence as the profile.
  tags      git_commit (and mlflow.source.git.commit), git_dirty (true/false/unknown),
            git_dirty_paths, dvc_exp_name, dvc_exp_baseline_rev, data_fingerprint,
            model_parameters, pipeline_stages (the stages this run spans), mlflow.source.name ("dvc repro" | "dvc exp run" |
            "python stages/track.py"), mlic.sweep (the sweep's name, `tracking.sweep`, when set).
            mlic.changed (the params that differ from params.yaml at HEAD, `key=value, ...`, or
            `nothing`), mlic.fingerprint (the pipeline state, `state_fingerprint`; set by `track`).
  run name  what changed first (`change_label`), then the DVC experiment's name under `dvc exp
            run`, else the short commit: `calibrate.beta=2.0 (beta2)`, `as committed @abcdef1`;
            prefixed `<sweep>/` in a sweep, so charts and the compare view say which sweep.
  description (mlflow.note.content) what changed, the model against the trivial predictor,
            how to reproduce.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlic import journal
from mlic.atomic import read_json, require_files
from mlic.errors import InputError, MissingInput
from mlic.metrics import ALIASES, DATA_FACTS, THRESHOLD_FREE
from mlic.model_meta import ModelMeta
from mlic.params import flatten, load_yaml, read_params_file
from mlic.split import SPLITS
from mlic.store import one_line
from mlic.sweep import SWEEP_TAG

log = logging.getLogger(__name__)

HISTORY_PREFIX = "epoch/"
MANIFEST_SUFFIX = ".manifest.json"
# MLflow's limits (mlflow/utils/validation.py), repeated so we cut values ourselves, visibly.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
UNKNOWN = "unknown"
# Artifact suffixes the MLflow UI shows as text (server/js FileUtils); others get one appended.
PREVIEW_SUFFIX = {".lock": ".yaml"}

# Which summary metrics a run holds (see keep_summary_metric). Validation is for choosing a
# model, so it keeps what ranks models independently of any threshold, plus F1 at the default.
VAL_KEPT = (*THRESHOLD_FREE, "macro_f1", "micro_f1")
# The papers' top-3 figures a run keeps (on test/): the two F1s; their P/R parts stay in the JSON.
TOP3_KEPT = ("cf1_top3", "of1_top3")
# The trivial predictor is a contrast, not a candidate: its numbers are not run metrics (they sorted
# first in every MLflow list and chart, identical for every run); the run's description states the
# contrast (`contrast_sentence`) and the metrics JSON artifacts hold all of them.
CONTRAST = (("test_calibrated/macro_f1", "calibrated test macro-F1"), ("test/macro_ap", "test mAP"))
# A calibrated report repeats the ranking metrics unchanged; validation at its own fitted
# thresholds is in-sample.
SUMMARY_RULES = """\
- facts about the data (n_samples, n_classes, ...) are not metrics of a model: dropped;
- the papers' names for a value kept under another name (cp = macro_precision, ...): dropped;
  of their top-3 figures, CF1 and OF1 are kept, on `test/` at the default threshold only;
- `test/` keeps every metric; `val/` the threshold-free ones plus macro/micro F1;
- `test_calibrated/` only the threshold-dependent ones (the rest equal `test/`);
  `val_calibrated/` none (in-sample: the thresholds were fitted on it);
- `baseline/` (the trivial predictor) none: the description states the contrast (`CONTRAST`),
  the metrics JSON artifacts hold every value;
- `test_probability/` (ECE and Brier score before and after temperature scaling) all four."""


@dataclasses.dataclass(frozen=True)
class GitInfo:
    commit: str  # full sha, or "unknown" outside a git repo / without git
    dirty: str  # "true" | "false" | "unknown"
    dirty_paths: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DatasetInput:
    """One split the run used, as the tracking backend's dataset input."""

    name: str                 # the split: train | val | test
    fingerprint: str          # content hash of the split's shards (sha256 hex)
    source: str               # the manifest's path, relative to the project
    records: int
    columns: dict[str, str]   # what a record holds: name -> MLflow column type
    profile: dict[str, Any]   # records, classes, prevalence, shards, image size


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """Everything one pipeline run logs, backend-neutral."""

    name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]]
    artifacts: dict[str, Path]      # top-level artifact name -> local file or folder
    datasets: list[DatasetInput]
    started: float | None = None    # Unix seconds: the first stage of this pipeline run
    stages: tuple[str, ...] = ()    # the stages that ran since the previous `track`
    contrast: str = ""              # the model against the trivial predictor, in words (`contrast_sentence`)
    # the pipeline files it was read from, by artifact name: what `state_fingerprint` hashes
    sources: dict[str, Path] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- names and values
_BAD_NAME_CHARS = re.compile(r"[^\w.\- ]")  # MLflow allows \w . - space / (and :) in names


def clean_name(name: str) -> str:
    """One level of a metric/param name MLflow accepts: other characters (and `/`) become `_`."""
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
    return {clean_name(k)[:250]: param_value(v) for k, v in flatten(dict(raw)).items()}


def flatten_metrics(obj: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], list[str]]:
    """Nested metrics JSON -> ({"a/b/c": number}, [skipped names]).

    Booleans become 0/1; null, NaN, inf, text and lists are skipped.
    """
    values: dict[str, float] = {}
    skipped: list[str] = []
    for key, value in obj.items():
        name = f"{prefix}/{clean_name(key)}" if prefix else clean_name(key)
        if isinstance(value, Mapping):
            sub_values, sub_skipped = flatten_metrics(value, name)
            values.update(sub_values)
            skipped.extend(sub_skipped)
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            values[name] = float(value)
        else:
            skipped.append(name)
    return values, skipped


def keep_summary_metric(name: str) -> bool:
    """Whether a flattened metric belongs in the run's summary (`SUMMARY_RULES`)."""
    section, _, key = name.rpartition("/")
    if key in DATA_FACTS or key in ALIASES or (key.endswith("_top3") and (section != "test" or key not in TOP3_KEPT)):
        return False
    if section.split("/")[0] == "baseline":
        return False
    if section.endswith("_calibrated"):
        return section == "test_calibrated" and key not in THRESHOLD_FREE
    if section == "val":
        return key in VAL_KEPT
    return True


def read_history(path: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """History CSV -> ({"epoch/<column>": [(epoch, value), ...]}, [non-numeric columns]).

    Every numeric column but `epoch` is a curve; empty cells (NaN) are left out of their curve.
    """
    import pandas as pd

    frame = pd.read_csv(path)
    if "epoch" not in frame.columns:
        raise InputError(f"{path}: no `epoch` column; columns are {', '.join(map(str, frame.columns))}")
    epochs = pd.to_numeric(frame["epoch"], errors="coerce")
    if epochs.isna().any() or (epochs != epochs.round()).any():
        raise InputError(f"{path}: `epoch` must hold whole numbers in every row")
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
        raise InputError(f"two artifacts would share the name {clashes[0]!r}; rename one")
    return {p: name + PREVIEW_SUFFIX.get(Path(name).suffix, "") for p, name in names.items()}


# --------------------------------------------------------------------------- data
def read_datasets(manifests_dir: Path, project_root: Path) -> list[DatasetInput]:
    """One `DatasetInput` per `<split>.manifest.json` (written by preprocess), in split order."""
    from mlic.tfrecords import Manifest

    paths = list(Path(manifests_dir).glob("*" + MANIFEST_SUFFIX))
    if not paths:
        raise MissingInput(f"{manifests_dir}: no *{MANIFEST_SUFFIX} files; run `dvc repro preprocess`")
    order = {split: i for i, split in enumerate(SPLITS)}
    found = []
    for path in sorted(paths, key=lambda p: (order.get(p.name[: -len(MANIFEST_SUFFIX)], len(order)), p.name)):
        m = Manifest.read(manifests_dir, path.name[: -len(MANIFEST_SUFFIX)])
        columns = {"image": "binary", "filename": "string", "labels": "long"}
        profile = {"records": m.count, "shards": len(m.shards),
                   "image": f"{m.encoding} {m.image_size}x{m.image_size} ({m.resize_mode})",
                   "labels": f"multi-hot, {len(m.classes)} classes in this order", "classes": m.classes,
                   "prevalence": {c: round(float(p), 6) for c, p in zip(m.classes, m.prevalence)},
                   "fingerprint": m.fingerprint}
        found.append(DatasetInput(m.split, m.fingerprint, _relative(path, project_root), m.count,
                                  columns, profile))
    return found


def data_fingerprint(fingerprints: Mapping[str, str]) -> str:
    """One sha256 over all splits' fingerprints, independent of listing order."""
    text = "".join(f"{split}={fp}\n" for split, fp in sorted(fingerprints.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _relative(path: Path, root: Path) -> str:
    """`path` relative to the project when inside it (no machine's absolute path in a record)."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).name


# --------------------------------------------------------------------------- provenance
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
        return GitInfo(UNKNOWN, UNKNOWN)
    status = _git(["status", "--porcelain"], cwd)
    if status is None:
        return GitInfo(head.strip(), UNKNOWN)
    paths = tuple(line[3:] for line in status.splitlines() if line.strip())
    return GitInfo(head.strip(), "true" if paths else "false", paths)


def committed_params(params_file: Path, root: Path) -> dict[str, str] | None:
    """`params_file` as committed at HEAD, flattened like `flatten_params`; None when git, the
    commit or the file is missing (then nothing can be said about what changed)."""
    try:
        rel = Path(params_file).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None
    text = _git(["show", f"HEAD:./{rel}"], root)
    if text is None:
        return None
    import yaml

    try:
        raw = load_yaml(text)
    except yaml.YAMLError:
        return None
    return flatten_params(raw) if isinstance(raw, dict) else None


# Params that say where a run is filed, not what it is: left out of "what changed".
NOT_A_CHANGE = ("tracking.sweep",)
CHANGED_TAG = "mlic.changed"
NAME_CHANGES = 2   # changes spelled out in a run's name; the rest counted (all of them: the tag)


def changed_params(params: Mapping[str, str], committed: Mapping[str, str]) -> list[str]:
    """`key=value` for each param that differs from the committed params.yaml, in file order
    (a key removed from the file: `key=(removed)`)."""
    changes = [f"{k}={v}" for k, v in params.items() if committed.get(k) != v and k not in NOT_A_CHANGE]
    return changes + [f"{k}=(removed)" for k in committed if k not in params and k not in NOT_A_CHANGE]


def change_label(changes: Sequence[str] | None) -> str:
    """A few words for a run's name: the first changes, `+N more`; `as committed` if none; empty
    when there was nothing to compare with (no git, no committed params.yaml)."""
    if changes is None:
        return ""
    if not changes:
        return "as committed"
    label = ", ".join(changes[:NAME_CHANGES])
    return label + (f" +{len(changes) - NAME_CHANGES} more" if len(changes) > NAME_CHANGES else "")


def contrast_sentence(metrics: Mapping[str, float]) -> str:
    """The model against the trivial predictor (each class at its training prevalence), from the
    flattened metrics files, as a sentence: `Calibrated test macro-F1 0.890 (trivial predictor 0.373)`."""
    parts = [f"{label} {metrics[name]:.3f} (trivial predictor {metrics['baseline/' + name]:.3f})"
             for name, label in CONTRAST if name in metrics and "baseline/" + name in metrics]
    text = "; ".join(parts)
    return text[:1].upper() + text[1:]


def run_context(env: Mapping[str, str], commit: str, label: str = "") -> tuple[str, dict[str, str]]:
    """(run name, DVC tags) for this process. The name leads with `label` (what changed, see
    `change_label`), then the DVC experiment's name under `dvc exp run`, else the short commit:
    `calibrate.beta=2.0 (beta2)`, `as committed @abcdef1`."""
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
    short = commit[:7] if commit != UNKNOWN else "nogit"
    if exp_name:
        return (f"{label} ({exp_name})" if label else exp_name), tags
    return (f"{label} @{short}" if label else f"repro @{short}"), tags


# --------------------------------------------------------------------------- the record
def build_record(
    *,
    params_file: Path | None,
    history_csv: Path | None = None,
    metrics_files: Sequence[tuple[str, Path]] = (),
    artifacts: Sequence[Path] = (),
    manifests_dir: Path | None = None,
    model_meta: Path | None = None,
    project_root: Path | None = None,
    env: Mapping[str, str] | None = None,
    session: str | None = None,
    keep: Sequence[str] = (),
    sweep: str | None = None,
) -> RunRecord:
    """Read every input and return the run's record; any missing or broken file raises first.

    `metrics_files` is a list of (prefix, path); prefix "" keeps the JSON's own top-level keys.
    The params file, history, metrics files and manifests are artifacts too. The journal under
    `project_root` gives the start time and the noted facts of the stages of this pipeline
    invocation (`session`, default: this process's; see journal.py). Metrics named in `keep`
    are kept in the summary whatever the rules say (the champion's selection metric). `sweep`
    (`tracking.sweep`) tags the run and prefixes its name.
    """
    env = os.environ if env is None else env
    project_root = Path(project_root or Path.cwd())
    require_files([(params_file, "params file"), (history_csv, "history CSV"),
                   (manifests_dir, "manifests folder"), (model_meta, "model metadata"),
                   *[(p, "metrics file") for _, p in metrics_files],
                   *[(p, "artifact") for p in artifacts]])

    params = flatten_params(read_params_file(params_file)) if params_file else {}
    curves, skipped_columns = read_history(Path(history_csv)) if history_csv else ({}, [])
    if skipped_columns:
        log.info("history: non-numeric column(s) not logged: %s", ", ".join(skipped_columns))

    flat: dict[str, float] = {}
    source: dict[str, Path] = {}
    skipped: list[str] = []
    for prefix, path in metrics_files:
        data = read_json(path, "metrics file", "re-run the stage that writes it")
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object at the top level")
        values, missing = flatten_metrics(data, clean_name(prefix) if prefix else "")
        for name in values:
            if name in flat:
                raise InputError(f"metric {name!r} comes from both {source[name]} and {path}")
            source[name] = Path(path)
        flat.update(values)
        skipped.extend(missing)
    if skipped:
        log.info("%d metric value(s) not numbers, not logged: %s%s", len(skipped),
                 ", ".join(skipped[:10]), " ..." if len(skipped) > 10 else "")

    ran = journal.since(journal.read(project_root), current=journal.session() if session is None else session)
    settings: dict[str, str] = {}  # text facts: what a stage resolved at run time (effective XLA ...)
    for run in ran:
        for fact, value in run.facts.items():
            if isinstance(value, str):
                settings[f"{clean_name(run.stage)}.{clean_name(fact)}"] = one_line(value, MAX_TAG_VALUE)
            else:
                flat.setdefault(f"{clean_name(run.stage)}/{clean_name(fact)}", value)
    metrics = {k: v for k, v in flat.items() if keep_summary_metric(k) or k in keep}

    datasets = read_datasets(Path(manifests_dir), project_root) if manifests_dir else []
    files = [p for p in [params_file, history_csv, *[p for _, p in metrics_files], *artifacts] if p]
    if manifests_dir:
        files += sorted(Path(manifests_dir).glob("*" + MANIFEST_SUFFIX))
    unique: dict[Path, Path] = {}
    for p in files:
        unique.setdefault(Path(p).resolve(), Path(p))
    names = artifact_names(list(unique.values()))

    git = git_info(project_root)
    committed = committed_params(Path(params_file), project_root) if params_file else None
    changes = changed_params(params, committed) if committed is not None else None
    run_name, tags = run_context(env, git.commit, change_label(changes))
    tags[CHANGED_TAG] = one_line(", ".join(changes), MAX_TAG_VALUE) if changes else (
        "nothing" if changes is not None else UNKNOWN)
    tags |= {"git_commit": git.commit, "git_dirty": git.dirty, **settings}
    if git.dirty_paths:
        tags["git_dirty_paths"] = one_line(" ".join(git.dirty_paths), MAX_TAG_VALUE)
    if git.commit != UNKNOWN:
        tags["mlflow.source.git.commit"] = git.commit
    if datasets:
        tags["data_fingerprint"] = data_fingerprint({d.name: d.fingerprint for d in datasets})
    if model_meta is not None:
        parameters = ModelMeta.read(model_meta).parameters
        if parameters is not None:
            tags["model_parameters"] = str(parameters)
    if ran:
        tags["pipeline_stages"] = " ".join(r.stage for r in ran)
    if sweep:
        tags[SWEEP_TAG] = sweep
        run_name = f"{sweep}/{run_name}"
    how = [f"`git checkout {git.commit}` then `dvc repro`"] if git.commit != UNKNOWN else []
    if env.get("DVC_EXP_NAME"):
        how.append(f"`dvc exp apply {env['DVC_EXP_NAME']}`")
    short = git.commit[:7] if git.commit != UNKNOWN else ""
    if changes:
        what = f"Changed from params.yaml at {short}: {', '.join(changes)}."
    elif changes is not None:
        what = f"Params as committed at {short}."
    else:
        what = "Params: no committed params.yaml to compare with."
    contrast = contrast_sentence(flat)
    tags["mlflow.note.content"] = one_line(
        what + (f" {contrast}." if contrast else "")
        + " Logged by the mlic `track` stage from the pipeline's files, which are the source of truth."
        + (f" Reproduce: {' or '.join(how)}." if how else ""), MAX_TAG_VALUE)
    return RunRecord(name=run_name, tags=tags, params=params, metrics=metrics, curves=curves,
                     artifacts={name: path for path, name in names.items()}, datasets=datasets,
                     started=min((r.started for r in ran), default=None),
                     stages=tuple(r.stage for r in ran), contrast=contrast,
                     sources={name: path for path, name in names.items()
                              if path.name not in NOT_FINGERPRINTED and path != params_file})


# --------------------------------------------------------------------------- the state it mirrors
FINGERPRINT_TAG = "mlic.fingerprint"
# Logged, not fingerprinted: DVC rewrites dvc.lock after `track` runs, so while `track` runs the file
# still holds `track`'s previous entry; every other entry's content is fingerprinted through the files.
# (The params file is fingerprinted by its values: `state_fingerprint`.)
NOT_FINGERPRINTED = frozenset({"dvc.lock"})


def _hash_path(digest: Any, path: Path) -> None:
    """Feed a file's bytes, or a folder's files (sorted, with their relative names), to `digest`."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        digest.update(hashlib.sha256(f.read_bytes()).digest())


def state_fingerprint(params: Mapping[str, str], files: Mapping[str, Path]) -> str:
    """sha256 of the pipeline state a run mirrors: the params' values (as `flatten_params` gives
    them: DVC tracks values, so a comment or DVC's own rewrite of params.yaml is no new state) and
    the content of each named file or folder (the outputs a run is read from, the model, the code
    that packages it).

    Names, not paths, go in, so the same state in another clone or folder has the same fingerprint;
    nothing a run notes about its process (timing, run id, git commit, host) does. Equal
    fingerprints mean equal params, metrics, curves, artifacts, datasets and model.
    """
    digest = hashlib.sha256()
    for key, value in sorted(params.items()):
        digest.update(f"param {key}={value}\n".encode())
    for name, path in sorted(files.items()):
        digest.update(f"file {name}\n".encode())
        _hash_path(digest, path)
    return digest.hexdigest()


def state_files(record: RunRecord, inputs: Sequence[Path | None], code: Path, root: Path) -> dict[str, Path]:
    """Everything a run is made of, by a name that is the same in every clone: the files the record
    was read from, further `inputs` (figure tables, the model's files) by their path under `root`,
    and the `*.py` files of `code` (the package the model ships)."""
    files = dict(record.sources)
    for path in inputs:
        if path is not None:
            files[f"input/{_relative(Path(path), root)}"] = Path(path)
    for path in sorted(Path(code).glob("*.py")):
        files[f"code/{path.name}"] = path
    return files
