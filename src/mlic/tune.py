"""Hyperparameter search inside one experiment: an Optuna study over `tune.space`.

Each trial trains with the trial's values in place of those `train` params, for `tune.epochs`
epochs, through `train`'s own code (`trial.py`), and is scored by the **validation mAP** (macro
average precision, `metrics.compute_metrics` as evaluate computes it) of the epoch `train` would
keep (the best by `train.monitor`); that is the metric the champion is chosen on (`val/macro_ap`).
After each epoch the trial reports its validation mAP; the median pruner stops a trial whose value
is below the median of earlier trials at the same epoch.

Sampler: TPE, seeded by `common.seed` and the trial's number, so a study resumed after a kill
draws what it would have drawn had it run through (given the same finished trials).

The study is an Optuna RDB study in `<project>/.mlic/tune/optuna.db` (the project is DVC_ROOT when
DVC runs the stage, so `dvc exp run --temp/--queue` resume too; outside git and DVC). Its name is
a hash of everything that decides its trials (`study_definition`): a changed definition starts a
new study, the same one is loaded and continued. Finished trials (complete, pruned, failed) count
toward `tune.n_trials` and are never re-run. A trial a killed process left RUNNING (its owner
process is gone) is marked FAIL and "interrupted", does not count, and its MLflow run is settled.

MLflow (`tracking.StudyRuns`, imported only when tuning runs): one parent run per study, one nested
run per trial. The outputs (`Outputs`) are the DVC side; MLflow mirrors them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shlex
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from mlic import journal
from mlic.atomic import atomic_open, write_json
from mlic.errors import UserError
from mlic.params import SearchSpec, Train, Tune
from mlic.sources import source_fingerprint
from mlic.store import default_project_root, first_use
from mlic.tfrecords import Manifest

log = logging.getLogger(__name__)

OBJECTIVE = "val_macro_ap"          # the key a trial adds to each epoch's logs (and to history)
OBJECTIVE_NAME = "val/macro_ap"     # the same as a run metric: evaluate's and the champion's name
STORAGE = Path(".mlic") / "tune" / "optuna.db"
# Modules whose code decides a trial's result or the trials drawn: a study run by other code is
# not continued (DVC re-runs tune when they change, as their files are the stage's deps).
CODE = ("augment", "dataset", "devices", "losses", "metrics", "model", "predictions", "tfrecords", "training",
        "trial", "tune")
# A trial's end as the outputs and MLflow name it. "interrupted": its process was killed (or
# stopped by Ctrl-C/SIGTERM) mid-trial; it does not count toward n_trials.
COMPLETE, PRUNED, FAILED, INTERRUPTED = "complete", "pruned", "failed", "interrupted"
STATES = (COMPLETE, PRUNED, FAILED, INTERRUPTED)
# Optuna user attributes of a trial
_OWNER, _RUN_ID, _INTERRUPTED, _FAILURE, _EPOCHS, _BEST_EPOCH = (
    "mlic_owner", "mlflow_run_id", "mlic_interrupted", "mlic_failure", "mlic_epochs", "mlic_best_epoch")
# A RUNNING trial with no owner yet is one a worker has just asked for: left alone this long.
_OWNERLESS_GRACE_S = 120


# --------------------------------------------------------------------------- the study's identity
def code_fingerprint() -> str:
    return source_fingerprint(CODE)


def data_fingerprints(tfrecords: str | Path) -> dict[str, str]:
    """The train and val shards' fingerprints (from preprocess's manifests)."""
    return {split: Manifest.read(tfrecords, split).fingerprint for split in ("train", "val")}


def study_definition(cfg: Tune, train: Train, seed: int, fingerprints: Mapping[str, str]) -> dict[str, Any]:
    """Everything that decides which trials a study draws and what they score.

    Left out: `enabled`, `n_trials` and `timeout_s` (the budget: raising n_trials continues the
    study), the searched train params (the trials set them), `train.epochs` (a trial trains
    `tune.epochs`) and `train.resume` (bookkeeping).
    """
    searched = set(cfg.space.get("train", {}))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("enabled", "n_trials", "timeout_s")}
    fixed = {k: v for k, v in dataclasses.asdict(train).items() if k not in searched | {"epochs", "resume"}}
    return {"tune": settings, "train": fixed, "seed": seed, "data": dict(sorted(fingerprints.items())),
            "code": code_fingerprint()}


def study_name(definition: Mapping[str, Any]) -> str:
    text = json.dumps(definition, sort_keys=True, default=str)
    return "mlic-tune-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def storage_path(root: Path | None = None) -> Path:
    """`<project>/.mlic/tune/optuna.db`; the project is DVC_ROOT under DVC (`store.default_project_root`)."""
    return (root or default_project_root()) / STORAGE


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number`: a pure function of (seed, number)."""
    return int(hashlib.sha256(f"tune:{seed}:{number}".encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------- values and -S
def suggest(trial: Any, space: Mapping[str, Mapping[str, SearchSpec]]) -> dict[str, Any]:
    """The trial's values, `{"train.learning_rate": 0.003, ...}`, in the order of the space."""
    values = {}
    for section, specs in space.items():
        for key, spec in specs.items():
            name = f"{section}.{key}"
            if spec.type == "float":
                values[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
            elif spec.type == "int":
                values[name] = trial.suggest_int(name, spec.low, spec.high, log=spec.log)
            else:
                values[name] = trial.suggest_categorical(name, spec.choices)
    return values


def nested(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"train.dropout": 0.2}` -> `{"train": {"dropout": 0.2}}`, as params.yaml nests them."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section, key = name.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


def trial_train(train: Train, cfg: Tune, values: Mapping[str, Any]) -> Train:
    """`train` with the trial's values and the trial budget: what the trial trains with."""
    return dataclasses.replace(train, **nested(values).get("train", {}), epochs=cfg.epochs, resume=False)


_HYDRA_WORDS = {"true", "false", "null", "none", "nan", "inf", "-inf", "+inf"}


def override_value(value: Any) -> str:
    """`value` as a `dvc exp run -S key=<value>` override (Hydra's grammar) gives it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{value!r} cannot be applied with `dvc exp run -S` (not a finite number)")
        return repr(value)
    text = str(value)
    plain = text and text.lower() not in _HYDRA_WORDS and all(c.isalnum() or c in "_-./" for c in text) \
        and not text[0].isdigit() and text[0] not in "-."
    return text if plain else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def apply_command(values: Mapping[str, Any]) -> str:
    """The shell command that applies `values`: `dvc exp run -S train.x=... -S ...`."""
    return " ".join(["dvc exp run", *(f"-S {shlex.quote(f'{name}={override_value(v)}')}" for name, v in values.items())])


# --------------------------------------------------------------------------- outputs
@dataclasses.dataclass(frozen=True)
class Outputs:
    best_params: Path   # YAML: the best trial nested like params.yaml, and the command applying it
    trials: Path        # CSV: one row per trial
    metrics: Path       # JSON (DVC metrics): best value, trials per state


@dataclasses.dataclass(frozen=True)
class TrialRow:
    number: int
    state: str                      # one of STATES
    value: float | None             # the objective (pruned: its last reported value)
    epochs: int | None              # epochs trained
    best_epoch: int | None          # the epoch train would keep (complete trials)
    values: dict[str, Any]          # the trial's values, dotted keys
    note: str = ""                  # why it failed or was interrupted


@dataclasses.dataclass(frozen=True)
class StudyResult:
    study: str
    rows: list[TrialRow]
    best: TrialRow | None
    ran: int                        # trials this process ran
    searched: list[str]

    def counts(self) -> dict[str, int]:
        return {state: sum(r.state == state for r in self.rows) for state in STATES}


def best_params_doc(result: StudyResult, cfg: Tune) -> tuple[str, dict[str, Any]]:
    """(a comment header, the mapping) of best_params.yaml."""
    counts = result.counts()
    if result.best is None:
        raise UserError(f"tune: no trial of study {result.study} completed ({counts[PRUNED]} pruned, "
                        f"{counts[FAILED]} failed, {counts[INTERRUPTED]} interrupted): nothing to recommend; "
                        "narrow tune.space (a learning rate that diverges?) or raise tune.epochs")
    best = result.best
    # tune.enabled=false too: DVC keeps an experiment's params in the workspace, and a training
    # experiment left with tuning on would start a whole new search whenever the shards change.
    command = apply_command({**best.values, "tune.enabled": False})
    doc = {
        "enabled": True,
        "study": result.study,
        "objective": f"{OBJECTIVE_NAME}: validation mAP at train.monitor's best epoch of a {cfg.epochs}-epoch trial",
        "best_value": best.value,
        "best_trial": best.number,
        "best_epoch": best.best_epoch,
        "trials": counts,
        **nested(best.values),
        "apply": command,
    }
    header = (f"# tune: the best of {len(result.rows)} trials of study {result.study}: {OBJECTIVE_NAME} "
              f"{best.value:.4f} (trial {best.number}).\n# Apply it (train then trains train.epochs, "
              f"not the {cfg.epochs}-epoch trial budget; tuning goes off again):\n#   {command}\n")
    return header, doc


def write_outputs(outputs: Outputs, result: StudyResult, cfg: Tune) -> None:
    header, doc = best_params_doc(result, cfg)
    with atomic_open(outputs.best_params) as fh:
        fh.write(header + yaml.safe_dump(doc, sort_keys=False, width=1000))
    _write_trials(outputs.trials, result.rows, result.searched)
    write_json(outputs.metrics, {f"best_{OBJECTIVE}": result.best.value if result.best else None,
                                 **{f"trials_{state}": n for state, n in result.counts().items()}})


def write_disabled(outputs: Outputs, searched: Sequence[str]) -> None:
    """What the stage writes when tuning is off: that it is off, an empty table, no best value."""
    with atomic_open(outputs.best_params) as fh:
        fh.write("# tune is off (tune.enabled: false): nothing was searched. Run a search in one experiment:\n"
                 "#   dvc exp run tune -S tune.enabled=true\n" + yaml.safe_dump({"enabled": False}))
    _write_trials(outputs.trials, [], searched)
    write_json(outputs.metrics, {f"best_{OBJECTIVE}": None, **{f"trials_{state}": 0 for state in STATES}})


def _write_trials(path: Path, rows: Sequence[TrialRow], searched: Sequence[str]) -> None:
    with atomic_open(path, newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["number", "state", "value", "epochs", "best_epoch", *searched, "note"])
        for r in rows:
            out.writerow([r.number, r.state, _cell(r.value), _cell(r.epochs), _cell(r.best_epoch),
                          *(_cell(r.values.get(k)) for k in searched), r.note])


def _cell(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- the study
@dataclasses.dataclass
class TrialOutcome:
    """What training one trial gave: its objective (None unless it ran to its end), whether the
    pruner stopped it, or why it failed (a diverged loss)."""

    value: float | None
    epochs: int
    best_epoch: int | None = None
    pruned: bool = False
    failure: str | None = None


# report(epoch, logs) -> True when the trial should stop (pruned). logs hold OBJECTIVE.
Report = Callable[[int, Mapping[str, float]], bool]
TrainTrial = Callable[[Train, Report], TrialOutcome]


class StudyLog(Protocol):
    """The MLflow side (`tracking.StudyRuns`): a parent run per study, a nested run per trial."""

    def start_trial(self, number: int, values: Mapping[str, Any]) -> str: ...
    def log_epoch(self, run_id: str, epoch: int, logs: Mapping[str, float]) -> None: ...
    def end_trial(self, run_id: str, state: str, value: float | None, note: str = "") -> None: ...


def _optuna() -> Any:
    import optuna

    # Optuna's own console handler would print beside ours: its records go through our logging.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    return optuna


def open_study(cfg: Tune, name: str, seed: int, path: Path) -> tuple[Any, Any]:
    """Create or load study `name` in the SQLite file `path`: (the study, its storage)."""
    optuna = _optuna()
    path.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{path.as_posix()}"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                          n_warmup_steps=cfg.pruner_warmup_epochs)
              if cfg.pruner == "median" else optuna.pruners.NopPruner())
    # Serialized like MLflow's first use: two queue workers creating the tables at once race.
    # The timeout lets parallel workers wait for SQLite's write lock instead of failing.
    with first_use(url):
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner,
                                    sampler=optuna.samplers.TPESampler(seed=trial_seed(seed, 0)),
                                    load_if_exists=True)
    return study, storage


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": journal.process_started(os.getpid()) or 0.0}


def _owner_alive(owner: Mapping[str, Any]) -> bool | None:
    """True/False for an owner on this host; None for one on another host (cannot tell)."""
    if owner.get("host") != socket.gethostname():
        return None
    started = journal.process_started(int(owner.get("pid", -1)))
    return started is not None and abs(started - float(owner.get("started", 0.0))) < 1.0


def settle_abandoned(study: Any, storage: Any) -> list[Any]:
    """Mark FAIL ("interrupted") the RUNNING trials whose owner process on this host is gone; the
    trials of live processes (a parallel queue worker on the same study) are left alone."""
    optuna = _optuna()
    settled = []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get(_OWNER)
        if owner is None:
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            if now - started < _OWNERLESS_GRACE_S:
                continue
        elif _owner_alive(owner) is not False:
            continue
        # Through the storage: this trial's Trial object died with its process.
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), t.number)
        storage.set_trial_user_attr(trial_id, _INTERRUPTED,
                                    f"left RUNNING by process {owner and owner.get('pid')}, which is gone")
        storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
        settled.append(t)
    if settled:
        log.warning("marked %d trial(s) a killed tune left RUNNING as interrupted: %s; they are run again",
                    len(settled), ", ".join(str(t.number) for t in settled))
    return settled


def rows_of(study: Any) -> list[TrialRow]:
    """Every trial of the study as a table row, by number."""
    optuna = _optuna()
    state_of = {optuna.trial.TrialState.COMPLETE: COMPLETE, optuna.trial.TrialState.PRUNED: PRUNED}
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.FAIL:
            state = INTERRUPTED if _INTERRUPTED in t.user_attrs else FAILED
        elif t.state in state_of:
            state = state_of[t.state]
        else:
            continue  # RUNNING in another live process, or WAITING
        note = t.user_attrs.get(_INTERRUPTED) or t.user_attrs.get(_FAILURE) or ""
        rows.append(TrialRow(t.number, state, t.value, t.user_attrs.get(_EPOCHS), t.user_attrs.get(_BEST_EPOCH),
                             dict(t.params), note))
    return rows


def _best(rows: Sequence[TrialRow]) -> TrialRow | None:
    complete = [r for r in rows if r.state == COMPLETE and r.value is not None and math.isfinite(r.value)]
    # The highest value; a tie goes to the earliest trial (max keeps the first).
    return max(complete, key=lambda r: r.value) if complete else None


def _finished(rows: Sequence[TrialRow]) -> int:
    return sum(r.state in (COMPLETE, PRUNED, FAILED) for r in rows)


def optimize(study: Any, cfg: Tune, train: Train, seed: int, make_trainer: Callable[[], TrainTrial],
             runs: StudyLog) -> int:
    """Run trials until `cfg.n_trials` have finished (counting earlier runs') or `cfg.timeout_s`
    has passed (no trial starts after it). Returns the number of trials run here.

    Ctrl-C/SIGTERM during a trial: the trial is marked interrupted (it does not count; the next
    run repeats it), its run KILLED, and the KeyboardInterrupt goes on. A trial that raises is
    marked failed and the exception goes on (a bug or a bad space, not something to try again).
    """
    optuna = _optuna()
    trainer: TrainTrial | None = None
    started, ran = time.monotonic(), 0
    while True:
        finished = _finished(rows_of(study))
        if finished >= cfg.n_trials:
            break
        if cfg.timeout_s is not None and time.monotonic() - started >= cfg.timeout_s:
            log.info("tune.timeout_s (%g s) reached after %d trial(s) here; %d of %d finished: the next run "
                     "continues the study", cfg.timeout_s, ran, finished, cfg.n_trials)
            break
        number = len(study.get_trials(deepcopy=False))
        study.sampler = optuna.samplers.TPESampler(seed=trial_seed(seed, number))
        trial = study.ask()
        run_id = None
        try:
            trial.set_user_attr(_OWNER, _owner())
            values = suggest(trial, cfg.space)
            run_id = runs.start_trial(trial.number, values)
            trial.set_user_attr(_RUN_ID, run_id)
            log.info("trial %d (%d of %d): %s", trial.number, finished + 1, cfg.n_trials,
                     ", ".join(f"{k}={v!r}" for k, v in values.items()))
            if trainer is None:
                trainer = make_trainer()
            trial_cfg = trial_train(train, cfg, values)
            last = trial_cfg.epochs + (trial_cfg.finetune_epochs if trial_cfg.weights is not None else 0) - 1
            scored: list[int] = []

            def report(epoch: int, logs: Mapping[str, float]) -> bool:
                runs.log_epoch(run_id, epoch, logs)
                value = logs.get(OBJECTIVE)
                if value is None or not math.isfinite(value):
                    return False
                trial.report(float(value), epoch)
                scored.append(epoch)
                # Never after the last epoch: stopping then saves nothing, and the trial is complete.
                # The warm-up counts scored epochs: progressive resizing's small epochs are not
                # scored, and the first full-size ones must not be judged at once.
                return epoch < last and len(scored) > cfg.pruner_warmup_epochs and trial.should_prune()

            outcome = trainer(trial_cfg, report)
        except KeyboardInterrupt:
            trial.set_user_attr(_INTERRUPTED, "stopped by Ctrl-C or SIGTERM")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if run_id is not None:
                runs.end_trial(run_id, INTERRUPTED, None, "stopped by Ctrl-C or SIGTERM")
            raise
        except BaseException as exc:
            note = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            trial.set_user_attr(_FAILURE, note)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if run_id is not None:
                runs.end_trial(run_id, FAILED, None, note)
            raise
        ran += 1
        trial.set_user_attr(_EPOCHS, outcome.epochs)
        if outcome.best_epoch is not None:
            trial.set_user_attr(_BEST_EPOCH, outcome.best_epoch)
        if outcome.pruned:
            frozen = study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            runs.end_trial(run_id, PRUNED, frozen.value)
        elif outcome.failure is not None or outcome.value is None or not math.isfinite(outcome.value):
            note = outcome.failure or "no objective value"
            trial.set_user_attr(_FAILURE, note)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            runs.end_trial(run_id, FAILED, None, note)
        else:
            study.tell(trial, outcome.value)
            runs.end_trial(run_id, COMPLETE, outcome.value)
    return ran


def run(cfg: Tune, train: Train, seed: int, tfrecords: Path, outputs: Outputs,
        make_trainer: Callable[[], TrainTrial], tracking_uri: str, experiment: str,
        root: Path | None = None) -> StudyResult:
    """The whole stage with tuning on: open (or resume) the study, run what is left of its budget,
    write the outputs, and mirror it all in MLflow (the parent run FINISHED only at the end)."""
    from mlic import tracking  # MLflow, only when tuning runs

    definition = study_definition(cfg, train, seed, data_fingerprints(tfrecords))
    name = study_name(definition)
    path = storage_path(root)
    study, storage = open_study(cfg, name, seed, path)
    settle_abandoned(study, storage)
    done = _finished(rows_of(study))
    log.info("study %s in %s: %d of %d trials finished%s", name, path, done, cfg.n_trials,
             "; continuing it" if done else "")
    started = time.monotonic()
    with tracking.StudyRuns(tracking_uri, experiment, name, definition, cfg.searched()) as runs:
        ran = optimize(study, cfg, train, seed, make_trainer, runs)
        rows = rows_of(study)
        result = StudyResult(name, rows, _best(rows), ran, cfg.searched())
        write_outputs(outputs, result, cfg)
        runs.finish(result, {"best_params.yaml": outputs.best_params, "trials.csv": outputs.trials})
    seconds = time.monotonic() - started
    journal.note(trials_run=ran, tune_seconds=round(seconds, 1))
    counts = result.counts()
    log.info("study %s: %d trial(s) run here in %.0f s; %s; best %s %.4f (trial %d)", name, ran, seconds,
             ", ".join(f"{n} {s}" for s, n in counts.items()), OBJECTIVE_NAME, result.best.value, result.best.number)
    return result
