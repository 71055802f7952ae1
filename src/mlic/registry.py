"""The Model Registry side of a pipeline run: headline metrics on the version, and the champion rule.

Each pipeline run registers one version of the packaged model under `tracking.registered_model`.
The alias `champion` moves to the new version only when it is strictly better than the current
champion on `tracking.champion_metric`, a *validation* metric: choosing a model on test would
make the test figures an optimistic, leaked estimate. Ties keep the current champion, so a
bit-identical retrain never moves the alias. The decision, with both values, is returned for
the run to log (`champion.json`, `champion.*` tags) and written on the version's tags.

An election reads the champion, compares, then moves the alias: two runs finishing together
(sweep workers) could both read the old champion and the worse one set the alias last. So each
election holds a lock for that model (`champion_lock`), taken the way `sweep.py` takes its
one-shot lock: by creating the MLflow experiment that bears the lock's name, which any store keeps
unique. Unlike the sweep's, this lock is taken again and again, so releasing renames the
experiment (which frees the name) and then deletes it, out of the UI's lists (`mlflow gc` removes
such deleted experiments for good). A lock older than `STALE_S` is taken to be a killed holder's
and broken.

Functions take an `MlflowClient`; this module never imports mlflow itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from mlic.metrics import greater_is_better, headline_names
from mlic.params import ParamsError
from mlic.sweep import ALREADY_EXISTS

log = logging.getLogger(__name__)

ALIAS = "champion"
LOCK_PREFIX = "mlic-champion-lock"
# An election holds the lock for a few store calls (well under a second, seconds on a busy
# server): a lock this old was left by a holder that was killed.
STALE_S = 120.0
# The numbers a user decides on (metrics.HEADLINE), shown on every registered version.
HEADLINE = tuple(headline_names())


def check_selection_metric(name: str, logged: Collection[str] | None = None) -> None:
    """A champion is chosen on a logged validation metric (`val/...`); anything else is refused with why."""
    if not name.startswith("val/"):
        hint = f"val/{name[4:]}" if name.startswith("val_") else "val/macro_ap"
        raise ParamsError(
            f"tracking.champion_metric {name!r}: choose a validation metric (val/...), e.g. {hint}; "
            "selecting a model on test leaks the test set into the choice")
    if logged is not None and name not in logged:
        choices = ", ".join(sorted(n for n in logged if n.startswith("val/")))
        raise ParamsError(f"tracking.champion_metric {name!r} is not among the run's metrics; "
                         f"choose one of: {choices or '(none: is evaluate in the pipeline?)'}")


def headline(summary: Mapping[str, float], selection_metric: str) -> dict[str, float]:
    """The headline metrics present in `summary`, plus the selection metric."""
    names = list(dict.fromkeys([*HEADLINE, selection_metric]))
    return {n: float(summary[n]) for n in names if n in summary and math.isfinite(float(summary[n]))}


@dataclasses.dataclass(frozen=True)
class Decision:
    """Whether the new version became champion, and the comparison behind it."""

    model: str
    metric: str
    greater_is_better: bool
    version: str
    value: float | None
    previous_champion: str | None
    previous_value: float | None
    promoted: bool
    reason: str
    rule: str = ("the alias moves when the new version is strictly better than the current champion on "
                 "the validation metric; ties keep the champion; test metrics are never used")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decide(metric: str, value: float | None, champion_value: float | None, *,
           has_champion: bool) -> tuple[bool, str]:
    """(promote?, why) for a new version scoring `value` against the champion's `champion_value`."""
    up = greater_is_better(metric)
    if value is None or not math.isfinite(value):
        return False, f"the new version has no finite {metric}"
    if not has_champion:
        return True, "no champion yet"
    if champion_value is None or not math.isfinite(champion_value):
        return True, f"the champion has no finite {metric}"
    better = value > champion_value if up else value < champion_value
    op = (">" if up else "<") if better else ("<=" if up else ">=")
    verdict = "better" if better else "not better"
    return better, f"{metric} {value:.6g} {op} {champion_value:.6g} ({verdict}; {'higher' if up else 'lower'} is better)"


def _run_metric(client: Any, run_id: str | None, metric: str) -> float | None:
    if not run_id:
        return None
    found = client.get_run(run_id).data.metrics
    # runs logged before metric names were hierarchical call `val/macro_ap` `val_macro_ap`
    value = found.get(metric, found.get(metric.replace("/", "_")))
    return None if value is None else float(value)


def lock_name(model: str) -> str:
    """The experiment name whose creation entitles one election at a time for `model`."""
    return f"{LOCK_PREFIX}/{model}"


def _release(client: Any, experiment_id: str, name: str) -> None:
    # Renamed first: a deleted experiment keeps its name taken, a renamed one gives it back.
    client.rename_experiment(experiment_id, f"{name}/released/{uuid.uuid4().hex}")
    client.delete_experiment(experiment_id)


@contextlib.contextmanager
def champion_lock(client: Any, model: str, *, wait_s: float = 2 * STALE_S, poll_s: float = 0.1,
                  stale_s: float = STALE_S) -> Iterator[None]:
    """Hold `model`'s election lock for the `with` block; wait for another holder to let go."""
    name = lock_name(model)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock_id = client.create_experiment(name)
            break
        except Exception as exc:
            if getattr(exc, "error_code", None) != ALREADY_EXISTS:
                raise
        held = client.get_experiment_by_name(name)
        if held is not None and time.time() * 1000 - (held.creation_time or 0) > stale_s * 1000:
            log.warning("breaking the champion lock %r (experiment %s): held for over %.0f s, its holder "
                        "was killed", name, held.experiment_id, stale_s)
            with contextlib.suppress(Exception):  # another waiter broke it first
                _release(client, held.experiment_id, name)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"the champion of {model!r} is being elected by another run for over {wait_s:.0f} s "
                               f"(MLflow experiment {name!r}); a lock left by a killed run is broken after "
                               f"{stale_s:.0f} s: run `dvc repro track` again")
        time.sleep(poll_s)
    try:
        yield
    finally:
        try:
            _release(client, lock_id, name)
        except Exception as exc:  # noqa: BLE001 - broken as stale meanwhile: nothing left to release
            log.warning("could not release the champion lock %r: %s", name, exc)


def elect_champion(client: Any, model: str, version: str, metric: str, value: float | None) -> Decision:
    """Compare the new `version` with the current champion and move the alias if it wins, holding
    `champion_lock` from reading the champion to moving the alias."""
    check_selection_metric(metric)
    with champion_lock(client, model):
        return _elect(client, model, version, metric, value)


def _elect(client: Any, model: str, version: str, metric: str, value: float | None) -> Decision:
    try:
        current = client.get_model_version_by_alias(model, ALIAS)
    except Exception:  # noqa: BLE001 - MLflow raises RESOURCE_DOES_NOT_EXIST for "no such alias"
        current = None
    if current is not None and str(current.version) == str(version):
        current = None  # already champion (a re-run of the election): compare with nobody
    champion_value = _run_metric(client, current.run_id, metric) if current is not None else None
    promoted, reason = decide(metric, value, champion_value, has_champion=current is not None)
    if promoted:
        client.set_registered_model_alias(model, ALIAS, str(version))
    decision = Decision(model=model, metric=metric, greater_is_better=greater_is_better(metric),
                        version=str(version), value=value,
                        previous_champion=None if current is None else str(current.version),
                        previous_value=champion_value, promoted=promoted, reason=reason)
    client.set_model_version_tag(model, str(version), "champion_decision",
                                 ("promoted: " if promoted else "not promoted: ") + reason)
    return decision


def tag_version(client: Any, model: str, version: str, metrics: Mapping[str, float],
                tags: Mapping[str, str]) -> None:
    """Headline metrics and provenance tags on a registered version (shown in the registry UI)."""
    for name, value in metrics.items():
        client.set_model_version_tag(model, str(version), name, f"{value:.6g}")
    for name, value in tags.items():
        client.set_model_version_tag(model, str(version), name, value)
