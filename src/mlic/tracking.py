"""The MLflow adapter: writes a `record.RunRecord` as one complete MLflow run.

What a run holds (names, which metrics, which artifacts) is `record.py`'s job; this module only
knows how MLflow stores it. It and `serving.py` are the only code that imports mlflow.

How a record maps onto MLflow:
  run       created with the start time of the pipeline's first stage that ran (the journal),
            so its Duration spans the pipeline, not just this stage; FINISHED only after
            everything is logged, FAILED otherwise, KILLED on Ctrl-C or SIGTERM. Tagged with its
            owner process (`mlic.owner.*`): a run whose owner died without a word (kill -9) is
            marked FAILED by the next `track` on the same host (`settle_abandoned_runs`).
  store     first opened under a lock beside a SQLite file (`store.first_use`): parallel first
            writers to a fresh store would race MLflow's table creation.
  params, summary metrics (step 0), curves (step = epoch), tags: as named by the record.
  artifacts top-level files (the compare view lists only those), PNG figures included.
  datasets  `log_inputs`: one dataset per split, context tag = the split, digest = the
            fingerprint's first 12 hex digits, the full one in the profile.
  state     tag `mlic.fingerprint` (`record.state_fingerprint`): `logged_run` finds the FINISHED
            run of a pipeline state, so `track` logs each state once per store.
  model     the packaged pyfunc model (`serving.py`: image files in, labels + probabilities out)
            named after the run (`model_name`); then the summary metrics, headline first (the
            compare view plots the first-logged), split ones with their dataset and all with the
            model's id; then registered as a new version of `tracking.registered_model` with the
            headline metrics as version tags; the `champion` alias follows `registry.py`'s rule
            and the decision is logged (`champion.json`, tags `champion.*`).
  experiment created with its artifact folder beside a SQLite store and tagged so the UI opens
            it on its runs table (see `ensure_experiment`).
  sweep     a run of a sweep (`tracking.sweep`) is a child of the sweep's one parent run, which
            the first run of the sweep creates (`sweep.parent_run`: race-free across workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mlic import journal, registry, serving, sweep
from mlic.atomic import require_files
from mlic.errors import InputError
from mlic.record import FINGERPRINT_TAG, MAX_TAG_VALUE, DatasetInput, RunRecord
from mlic.store import first_use, one_line, redact_uri, sqlite_path

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mlic"
# The experiment's kind as MLflow 3 records it. The 3.17 UI ignores it (measured in Chromium):
# where a click on an experiment lands is the browser's own "GenAI | Model training" switch
# (localStorage `mlflow.workflowType_v1`, default GenAI -> the traces overview), overridden by
# a `workflowType=` URL parameter. So the links mlic prints carry WORKFLOW_QUERY, which opens
# the runs table in any browser; the tag stays for MLflow versions and tools that read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
WORKFLOW_QUERY = "workflowType=machine_learning"
# A dataset's digest as the UI's Dataset column shows it: 12 hex digits tell splits and data
# versions apart at a glance (the full sha256 is in the dataset's profile and the data_fingerprint tag).
DIGEST_CHARS = 12


@dataclasses.dataclass(frozen=True)
class PackageSpec:
    """What the packaged model is made of, and where it is registered."""

    keras_model: Path
    meta: Path
    thresholds: Path
    registered_model: str | None = None   # None: log the model, register nothing
    champion_metric: str = "val/macro_ap"
    summary: Path | None = None           # train's model_summary.txt (else made by loading the model)
    max_image_pixels: int | None = None   # data.max_image_pixels: the served model refuses larger images


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
        """For the local run note: no password from the tracking URI ends up in a file."""
        return dataclasses.asdict(self) | {"tracking_uri": redact_uri(self.tracking_uri)}


def ui_routes(info: RunInfo) -> tuple[str, str]:
    """(the experiment's runs table, the run's page) as UI routes, opening in model-training mode."""
    experiment = f"#/experiments/{info.experiment_id}"
    return f"{experiment}/runs?{WORKFLOW_QUERY}", f"{experiment}/runs/{info.run_id}?{WORKFLOW_QUERY}"


def ui_hint(info: RunInfo) -> list[str]:
    """Where to look, one line each: the `mlflow ui` command for a local store, then the runs
    table's and the run's URLs (a line each, so a terminal shows them whole and clickable)."""
    table, run = ui_routes(info)
    lines = []
    if info.tracking_uri.startswith(("http://", "https://")):
        base = redact_uri(info.tracking_uri).rstrip("/")
    else:
        base = "http://127.0.0.1:5000"
        lines.append(f"  open the UI: mlflow ui --backend-store-uri '{info.tracking_uri}'")
    return lines + [f"  runs table:  {base}/{table}", f"  this run:    {base}/{run}"]


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
        raise InputError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or set tracking.experiment")
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # never override a kind someone chose
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def logged_run(tracking_uri: str, experiment: str, fingerprint: str) -> RunInfo | None:
    """The newest FINISHED run of `experiment` that mirrors the pipeline state `fingerprint`
    (tag `mlic.fingerprint`), or None if the store holds none. Runs a killed `track` left
    RUNNING are settled first (`settle_abandoned_runs`), as logging would: finding the state
    logged must not leave them behind."""
    from mlflow import MlflowClient

    with first_use(tracking_uri):
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        return None
    settle_abandoned_runs(client, found.experiment_id)
    runs = client.search_runs([found.experiment_id], filter_string=(
        f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    registered, _, version = run.data.tags.get("registered_model_version", "").rpartition("/")
    return RunInfo(run.info.run_id, found.experiment_id, experiment, run.info.run_name, tracking_uri,
                   run.data.tags.get("git_commit", "unknown"), registered_model=registered or None,
                   model_version=version or None)


# Who is writing a run, so a later `track` can tell a run abandoned by a killed process (kill -9,
# power loss: nothing could mark it) from one a parallel `dvc queue` worker is still writing.
OWNER_HOST, OWNER_PID, OWNER_STARTED = "mlic.owner.host", "mlic.owner.pid", "mlic.owner.started"


def owner_tags() -> dict[str, str]:
    """This process as a run's owner: host name, pid and the pid's start time."""
    import socket

    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()),
            OWNER_STARTED: f"{journal.process_started(os.getpid()) or 0:.2f}"}


def settle_abandoned_runs(client: Any, experiment_id: str, by: str = "track") -> list[str]:
    """Mark FAILED the RUNNING runs of this experiment whose owner process, on this host, is gone.

    Runs owned by another host, or by a live process (a parallel queue worker), are left alone:
    nothing here can tell whether they are still being written. Returns the settled run ids.
    """
    import socket

    host = socket.gethostname()
    settled = []
    for run in client.search_runs([experiment_id], filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{host}'"), max_results=1000):
        tags = run.data.tags
        try:
            pid, started = int(tags[OWNER_PID]), float(tags[OWNER_STARTED])
        except (KeyError, ValueError):
            continue
        alive = journal.process_started(pid)
        if alive is not None and abs(alive - started) < 1.0:
            continue  # its owner still runs
        client.set_tag(run.info.run_id, "mlic.settled",
                       f"left RUNNING by process {pid}, which no longer runs (killed?); marked FAILED by a later {by}")
        client.set_terminated(run.info.run_id, "FAILED")
        settled.append(run.info.run_id)
    if settled:
        log.warning("marked %d run(s) FAILED that a killed %s left RUNNING: %s", len(settled), by, ", ".join(settled))
    return settled


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a `kill`, a CI timeout, `dvc queue kill`) ends the block like Ctrl-C, so the run
    is marked KILLED instead of being left RUNNING. Main thread only (signal handlers live there)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _dataset_inputs(datasets: list[DatasetInput]) -> list[Any]:
    from mlflow.entities import Dataset, InputTag
    from mlflow.entities import DatasetInput as MlflowDatasetInput

    inputs = []
    for d in datasets:
        schema = {"mlflow_colspec": [{"name": k, "type": v} for k, v in d.columns.items()]}
        dataset = Dataset(name=d.name, digest=d.fingerprint[:DIGEST_CHARS], source_type="local",
                          source=json.dumps({"uri": d.source}), schema=json.dumps(schema),
                          profile=json.dumps(d.profile))
        inputs.append(MlflowDatasetInput(dataset, tags=[InputTag("mlflow.data.context", d.name)]))
    return inputs


def log_record(record: RunRecord, *, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT,
               package: PackageSpec | None = None, extra_artifacts: dict[str, Path] | None = None) -> RunInfo:
    """Log `record` (plus `extra_artifacts`, e.g. figures drawn for it) as one MLflow run.

    A failure while logging marks the run FAILED (KILLED on Ctrl-C), never FINISHED.
    """
    if package is not None:
        require_files([(package.keras_model, "model"), (package.meta, "model metadata"),
                       (package.thresholds, "thresholds"), (package.summary, "model summary")])
    if package is not None and package.registered_model:
        registry.check_selection_metric(package.champion_metric, record.metrics)
    artifacts = dict(record.artifacts)
    for name, path in (extra_artifacts or {}).items():
        if name in artifacts:
            raise InputError(f"two artifacts would share the name {name!r}; rename one")
        artifacts[name] = path

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.tracking.context.registry import resolve_tags

    now_ms = int(time.time() * 1000)
    digests = {d.name: d.fingerprint[:DIGEST_CHARS] for d in record.datasets}

    def metric_batch(model_id: str | None) -> list[Metric]:
        """The summary in `metric_order`, then the curves. A split's metrics carry its dataset and
        the model's id: MLflow copies metrics logged before the model without their dataset, so
        with a package they are logged after it, filling its "Datasets used"."""
        splits = {k: metric_split(k) for k in record.metrics}
        batch = [Metric(k, record.metrics[k], now_ms, 0, model_id=model_id,
                        dataset_name=splits[k] if splits[k] in digests else None,
                        dataset_digest=digests.get(splits[k])) for k in metric_order(record.metrics)]
        return batch + [Metric(k, v, now_ms, step) for k, points in sorted(record.curves.items())
                        for step, v in points]
    with first_use(tracking_uri):  # opening the client opens (or creates) the store
        client = MlflowClient(tracking_uri)
        experiment_id = ensure_experiment(client, experiment, tracking_uri)
    settle_abandoned_runs(client, experiment_id)
    started = min(int(record.started * 1000) if record.started is not None else now_ms, now_ms)
    tags = {**record.tags, **owner_tags(), RUN_COLOR_TAG: next_run_color(client, experiment_id)}
    if record.tags.get(sweep.SWEEP_TAG):
        parent = sweep.parent_run(client, experiment_id, record.tags[sweep.SWEEP_TAG], started_ms=started)
        if parent:
            tags[sweep.MLFLOW_PARENT] = parent
    run = client.create_run(experiment_id, start_time=started, run_name=record.name, tags=resolve_tags(tags))
    run_id = run.info.run_id
    try:
        # start_run: log_model needs an active run. Leaving the block marks the run FINISHED,
        # or FAILED if anything inside raised.
        with _sigterm_as_interrupt(), _tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            client.log_batch(run_id, metrics=metric_batch(None) if package is None else [],
                             params=[Param(k, v) for k, v in sorted(record.params.items())])
            if record.datasets:
                client.log_inputs(run_id, datasets=_dataset_inputs(record.datasets))
            with tempfile.TemporaryDirectory(prefix="mlic-artifacts-") as staging:
                for name, path in artifacts.items():
                    if Path(path).is_dir():
                        shutil.copytree(path, Path(staging) / name)
                    else:
                        shutil.copy2(path, Path(staging) / name)
                client.log_artifacts(run_id, staging)
            model_info = decision = None
            if package is not None:
                model_info, decision = _log_package(
                    client, run_id, package, record, lambda model_id: client.log_batch(run_id, metric_batch(model_id)))
    except BaseException as exc:  # also covers start_run itself failing; Ctrl-C or SIGTERM -> KILLED
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    log.info("logged %d params, %d summary metrics, %d curves, %d artifacts, %d datasets%s",
             len(record.params), len(record.metrics), len(record.curves), len(artifacts),
             len(record.datasets), ", packaged model" if model_info else "")
    return RunInfo(run_id, experiment_id, experiment, record.name, tracking_uri,
                   record.tags.get("git_commit", "unknown"),
                   model_uri=model_info.model_uri if model_info else None,
                   registered_model=package.registered_model if model_info and package.registered_model else None,
                   model_version=None if decision is None else decision.version,
                   champion=None if decision is None else decision.as_dict())


WHAT_THE_MODEL_DOES = ("image files in; each class's probability (temperature-scaled) and its 0/1 decision at "
                       "the thresholds calibrated on validation out.")


def registered_model_description(champion_metric: str) -> str:
    """What the registered model is, for its page in the registry (set once, never over a user's)."""
    return ("mlic's multi-label image classifier. Each version is one pipeline run's packaged model: "
            f"{WHAT_THE_MODEL_DOES} Use: `mlic predict IMAGES... --model models:/<name>@champion`, or "
            "`mlflow models serve -m models:/<name>@champion`. The `champion` alias moves to a new version only "
            f"if it beats the champion on `{champion_metric}` (validation); each version's tags hold its "
            "headline metrics.")


# The metric logged first: MLflow's compare view plots the params that differ against the first
# metric every run has, in the order they were logged (it was baseline/test/hamming_loss, the same
# for every run: a flat line). The calibrated test macro-F1 moves with the model and with calibrate.
LEAD_METRIC = "test_calibrated/macro_f1"


def metric_order(metrics: Mapping[str, float]) -> list[str]:
    """Summary metric names in the order they are logged: LEAD_METRIC first, then sorted."""
    return sorted(metrics, key=lambda k: (k != LEAD_METRIC, k))


def metric_split(name: str) -> str:
    """The split a summary metric was measured on (`test_calibrated/macro_f1` -> test), else ""."""
    head = name.split("/", 1)[0]
    return next((split for split in ("val", "test") if head == split or head.startswith(split + "_")), "")


def model_name(run_name: str) -> str:
    """The logged model's name: the run's, in the characters a model name takes (MLflow refuses
    `/ : . % " '`). Each run's model is then told apart in the experiment's Models tab (they were
    all `model`)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", run_name)[:MAX_MODEL_NAME].strip("-") or "model"


def model_description(record: RunRecord, run_id: str) -> str:
    """What the logged model is, for its page (tag mlflow.note.content)."""
    return (f"The packaged mlic model of run {record.name!r}: {WHAT_THE_MODEL_DOES} "
            + (f"{record.contrast}. " if record.contrast else "")
            + f"Use: `mlic predict IMAGES... --model runs:/{run_id}`; datasets: the splits it was scored on.")


# Run colours: MLflow picks one by hashing the run id, so consecutive runs can share it (two of
# three did). Each new run takes the next colour of a categorical palette (Tableau 10) after the
# latest run's; the UI's own colour picker writes the same tag, so a user's choice still wins.
RUN_COLOR_TAG = "mlflow.runColor"
RUN_COLORS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
              "#9c755f", "#bab0ac")
MAX_MODEL_NAME = 64


def next_run_color(client: Any, experiment_id: str) -> str:
    """The palette colour after the latest run's in this experiment (the first if none)."""
    latest = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    previous = latest[0].data.tags.get(RUN_COLOR_TAG, "") if latest else ""
    index = RUN_COLORS.index(previous) + 1 if previous in RUN_COLORS else 0
    return RUN_COLORS[index % len(RUN_COLORS)]


def _log_package(client: Any, run_id: str, package: PackageSpec, record: RunRecord,
                 log_metrics: Callable[[str], None]) -> tuple[Any, Any]:
    """Log the packaged pyfunc model into the active run, then its metrics (`log_metrics(model
    id)`), then register it and hold the champion vote. Registered last, so no other `track` (a
    parallel queue worker) can meet this version as champion before its metrics are in the run."""
    summary, run_name = record.metrics, record.name
    info = serving.log_packaged_model(package.keras_model, package.meta, package.thresholds,
                                      name=model_name(run_name), summary_path=package.summary,
                                      tags={"mlflow.note.content": model_description(record, run_id)},
                                      max_image_pixels=package.max_image_pixels)
    log_metrics(info.model_id)
    if not package.registered_model:
        return info, None
    version = serving.register_model(info.model_uri, package.registered_model)
    # The few numbers a user decides on, as version tags: the registry's list shows them.
    headline = registry.headline(summary, package.champion_metric)
    registry.tag_version(client, package.registered_model, version, headline, {"run_id": run_id})
    decision = registry.elect_champion(client, package.registered_model, version, package.champion_metric,
                                       summary.get(package.champion_metric))
    with tempfile.TemporaryDirectory(prefix="mlic-champion-") as tmp:
        path = Path(tmp) / "champion.json"
        path.write_text(json.dumps(decision.as_dict(), indent=2) + "\n", encoding="utf-8")
        client.log_artifact(run_id, str(path))
    # What the version is first (the list cuts long text), then its numbers; the run id last.
    client.update_model_version(package.registered_model, version, description=(
        (f"{run_name}: " if run_name else "") + ", ".join(f"{k} {v:.4g}" for k, v in headline.items())
        + f". Champion: {'promoted' if decision.promoted else 'not promoted'} ({decision.reason}). From run {run_id}."))
    if not client.get_registered_model(package.registered_model).description:
        client.update_registered_model(package.registered_model,
                                       description=registered_model_description(package.champion_metric))
    client.set_tag(run_id, "champion.promoted", str(decision.promoted).lower())
    client.set_tag(run_id, "champion.reason", one_line(decision.reason, MAX_TAG_VALUE))
    client.set_tag(run_id, "registered_model_version", f"{package.registered_model}/{version}")
    log.info("registered %s version %s; champion: %s (%s)", package.registered_model, version,
             "promoted" if decision.promoted else f"stays version {decision.previous_champion}", decision.reason)
    return info, decision


# --------------------------------------------------------------------------- tune
TUNE_EXPERIMENT_SUFFIX = "-tune"   # studies go to `<tracking.experiment>-tune`, beside the pipeline runs
TUNE_STUDY = "mlic.tune.study"     # the study's name: on its parent run and on every trial run
TUNE_ROLE = "mlic.tune.role"       # "study" (the parent) or "trial"
TUNE_STATE = "mlic.tune.state"     # a trial's end: complete | pruned | failed | interrupted
TUNE_TRIAL = "mlic.tune.trial"     # a trial's number in its study
PARENT_RUN = "mlflow.parentRunId"  # what makes a run nested in MLflow's UI


class StudyRuns:
    """The MLflow side of one `tune` study: a parent run for the study, a nested run per trial.

    Used as a context manager around the study. The parent is the study's: a resumed study (same
    name) reopens its parent unless a live process is writing it, so all of a study's trials sit
    under one run. Trial runs carry the trial's values as params, per-epoch curves (`epoch/<key>`,
    step = epoch, the objective among them as `epoch/val_macro_ap`), the objective `val/macro_ap`
    and their end as tag `mlic.tune.state`; complete and pruned trials end FINISHED, failed ones
    FAILED, interrupted ones KILLED. The parent holds the study's definition as params, the best
    value (`best/val/macro_ap`) and trial counts as metrics, the best values as `best.<param>`
    tags (they may change as a study goes on; params cannot), trials.csv and best_params.yaml; it is
    FINISHED only once all is logged (`finish`), KILLED on Ctrl-C or SIGTERM, FAILED on an error.
    Runs are owned like track's (`owner_tags`): ones a killed process left RUNNING are settled
    FAILED when the next study opens (`settle_abandoned_runs`), a trial's tagged interrupted.
    """

    def __init__(self, tracking_uri: str, experiment: str, study: str, definition: Mapping[str, Any],
                 searched: list[str]):
        self.tracking_uri, self.study, self.searched = tracking_uri, study, searched
        self.experiment = experiment + TUNE_EXPERIMENT_SUFFIX
        self.definition = definition
        self.client: Any = None
        self.experiment_id = self.parent_id = ""
        self._open: dict[str, int] = {}   # trial runs not ended yet -> their trial number

    def __enter__(self) -> StudyRuns:
        from mlflow import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        with first_use(self.tracking_uri):
            self.client = MlflowClient(self.tracking_uri)
            self.experiment_id = ensure_experiment(self.client, self.experiment, self.tracking_uri)
        for run_id in settle_abandoned_runs(self.client, self.experiment_id, by="tune"):
            if self.client.get_run(run_id).data.tags.get(TUNE_ROLE) == "trial":  # its trial is run again
                self.client.set_tag(run_id, TUNE_STATE, "interrupted")
        reopened = self._reopen()
        if reopened:
            self.parent_id = reopened
            log.info("MLflow: continuing run %s of study %s", reopened, self.study)
        else:
            tags = resolve_tags({TUNE_STUDY: self.study, TUNE_ROLE: "study", **owner_tags()})
            self.parent_id = self.client.create_run(self.experiment_id, run_name=self.study, tags=tags).info.run_id
            from mlic.params import flatten
            from mlic.record import param_value

            self._batch(self.parent_id, params={k: param_value(v) for k, v in flatten(dict(self.definition)).items()})
        self._sigterm = _sigterm_as_interrupt()  # SIGTERM ends the study like Ctrl-C: runs KILLED
        self._sigterm.__enter__()
        return self

    def _reopen(self) -> str | None:
        """The study's latest parent run, set RUNNING again, unless a live process holds it."""
        found = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`{TUNE_STUDY}` = '{self.study}' and tags.`{TUNE_ROLE}` = 'study'"),
            order_by=["attributes.start_time DESC"], max_results=1)
        if not found or found[0].info.status == "RUNNING":  # RUNNING after settling: its owner lives
            return None
        run_id = found[0].info.run_id
        self.client.update_run(run_id, status="RUNNING")
        for key, value in owner_tags().items():
            self.client.set_tag(run_id, key, value)
        if "mlic.settled" in found[0].data.tags:
            self.client.delete_tag(run_id, "mlic.settled")
        return run_id

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc is not None:
                status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
                for run_id in sorted(self._open):
                    with contextlib.suppress(Exception):
                        self.client.set_terminated(run_id, status)
                with contextlib.suppress(Exception):
                    self.client.set_terminated(self.parent_id, status)
        finally:
            self._sigterm.__exit__(kind, exc, tb)

    def _batch(self, run_id: str, metrics: Mapping[str, float] | None = None, params: Mapping[str, str] | None = None,
               step: int = 0) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                              params=[Param(k, v) for k, v in (params or {}).items()])

    def start_trial(self, number: int, values: Mapping[str, Any]) -> str:
        from mlic.record import param_value

        tags = {PARENT_RUN: self.parent_id, TUNE_STUDY: self.study, TUNE_ROLE: "trial", TUNE_TRIAL: str(number),
                **owner_tags()}
        run_id = self.client.create_run(self.experiment_id, run_name=f"{self.study}-trial-{number:03d}",
                                        tags=tags).info.run_id
        self._open[run_id] = number
        self._batch(run_id, params={k: param_value(v) for k, v in values.items()})
        return run_id

    def log_epoch(self, run_id: str, epoch: int, logs: Mapping[str, float]) -> None:
        self._batch(run_id, metrics={f"epoch/{k}": v for k, v in logs.items() if isinstance(v, (int, float))},
                    step=epoch)

    def end_trial(self, run_id: str, state: str, value: float | None, note: str = "") -> None:
        self.client.set_tag(run_id, TUNE_STATE, state)
        if note:
            self.client.set_tag(run_id, "mlic.tune.note", one_line(note, MAX_TAG_VALUE))
        if value is not None:
            self._batch(run_id, metrics={"val/macro_ap": value})
            # the objective by trial number: the parent's chart of the search
            self._batch(self.parent_id, metrics={"trial/val/macro_ap": value}, step=self._open[run_id])
        status = {"failed": "FAILED", "interrupted": "KILLED"}.get(state, "FINISHED")
        self.client.set_terminated(run_id, status)
        self._open.pop(run_id, None)

    def finish(self, result: Any, artifacts: Mapping[str, Path]) -> None:
        """Log the study's outcome on the parent and mark it FINISHED (`result`: tune.StudyResult)."""
        counts = result.counts()
        metrics = {f"trials/{state}": n for state, n in counts.items()}
        if result.best is not None:
            metrics["best/val/macro_ap"] = result.best.value
            metrics["best/trial"] = result.best.number
            for key, value in result.best.values.items():
                self.client.set_tag(self.parent_id, f"best.{key}", str(value))
        self._batch(self.parent_id, metrics=metrics, step=len(result.rows))
        with tempfile.TemporaryDirectory(prefix="mlic-tune-") as staging:
            for name, path in artifacts.items():
                shutil.copy2(path, Path(staging) / name)
            self.client.log_artifacts(self.parent_id, staging)
        self.client.set_terminated(self.parent_id, "FINISHED")
        info = RunInfo(self.parent_id, self.experiment_id, self.experiment, self.study, self.tracking_uri, "")
        log.info("MLflow: study run %s with %d nested trial runs\n%s", self.parent_id, len(result.rows),
                 "\n".join(ui_hint(info)))
