"""The champion rule, on a real MLflow registry (a SQLite store in tmp_path)."""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import pytest

from mlic import registry


@pytest.mark.parametrize("metric, value, champion, has, promoted, words", [
    ("val/macro_ap", 0.8, 0.7, True, True, "0.8 > 0.7"),
    ("val/macro_ap", 0.7, 0.7, True, False, "0.7 <= 0.7"),        # a tie keeps the champion
    ("val/macro_ap", 0.6, 0.7, True, False, "not better"),
    ("val/hamming_loss", 0.05, 0.07, True, True, "lower is better"),
    ("val/hamming_loss", 0.08, 0.07, True, False, "0.08 >= 0.07"),
    ("val/macro_ap", 0.1, None, False, True, "no champion yet"),
    ("val/macro_ap", 0.1, None, True, True, "champion has no finite"),
    ("val/macro_ap", None, 0.5, True, False, "new version has no finite"),
    ("val/macro_ap", math.nan, 0.5, True, False, "new version has no finite"),
])
def test_decide(metric, value, champion, has, promoted, words) -> None:
    got, reason = registry.decide(metric, value, champion, has_champion=has)
    assert got is promoted
    assert words in reason


@pytest.mark.parametrize("name", ["test/macro_ap", "test_calibrated/macro_f1", "macro_ap", "train/best_epoch"])
def test_selection_on_anything_but_validation_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="leaks the test set"):
        registry.check_selection_metric(name)


def test_headline_keeps_the_known_finite_metrics_and_the_selection_metric() -> None:
    summary = {"test/macro_ap": 0.5, "val/macro_ap": 0.6, "val/macro_f1": 0.4, "test_calibrated/macro_f1": math.nan,
               "other": 1.0}
    assert registry.headline(summary, "val/macro_f1") == {"test/macro_ap": 0.5, "val/macro_ap": 0.6,
                                                          "val/macro_f1": 0.4}


@pytest.fixture()
def client(tmp_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path.as_posix()}/mlflow.db")


def _version(client, tmp_path: Path, name: str, value: float | None,
             metric: str = "val/macro_ap") -> str:
    """A run with `metric` = value, and a registered version of an (empty) model from it."""
    experiment = client.get_experiment_by_name("e") or client.get_experiment(client.create_experiment("e"))
    run = client.create_run(experiment.experiment_id)
    if value is not None:
        client.log_metric(run.info.run_id, metric, value)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = tmp_path / f"model-{run.info.run_id}"
    source.mkdir()
    return str(client.create_model_version(name, str(source), run_id=run.info.run_id).version)


def test_champion_moves_only_to_a_strictly_better_version(client, tmp_path: Path) -> None:
    history = []
    for value in (0.5, 0.4, 0.7, 0.7, None, 0.9):
        version = _version(client, tmp_path, "m", value)
        decision = registry.elect_champion(client, "m", version, "val/macro_ap", value)
        champion = client.get_model_version_by_alias("m", registry.ALIAS).version
        history.append((version, decision.promoted, str(champion)))
        tag = client.get_model_version("m", version).tags["champion_decision"]
        assert tag.startswith("promoted" if decision.promoted else "not promoted")
    assert history == [("1", True, "1"), ("2", False, "1"), ("3", True, "3"), ("4", False, "3"),
                       ("5", False, "3"), ("6", True, "6")]


def test_decision_records_both_sides(client, tmp_path: Path) -> None:
    first = _version(client, tmp_path, "m2", 0.5)
    registry.elect_champion(client, "m2", first, "val/macro_ap", 0.5)
    second = _version(client, tmp_path, "m2", 0.6)
    d = registry.elect_champion(client, "m2", second, "val/macro_ap", 0.6).as_dict()
    assert d["previous_champion"] == first and d["previous_value"] == pytest.approx(0.5)
    assert d["version"] == second and d["value"] == 0.6 and d["promoted"] is True
    assert d["greater_is_better"] is True and "test metrics are never used" in d["rule"]


def test_a_champion_logged_under_the_old_flat_name_is_still_compared(client, tmp_path: Path) -> None:
    old = _version(client, tmp_path, "m3", 0.8, metric="val_macro_ap")
    client.set_registered_model_alias("m3", registry.ALIAS, old)
    new = _version(client, tmp_path, "m3", 0.7)
    d = registry.elect_champion(client, "m3", new, "val/macro_ap", 0.7)
    assert d.previous_value == pytest.approx(0.8) and d.promoted is False


class _PausingClient:
    """An MlflowClient that pauses after reading the champion, `pause` seconds: every racer reads
    the champion before any of them moves the alias, and the worst moves it last."""

    def __init__(self, client, pause: float) -> None:
        self._client, self._pause = client, pause

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def get_model_version_by_alias(self, *args, **kwargs):
        try:
            return self._client.get_model_version_by_alias(*args, **kwargs)
        finally:
            time.sleep(self._pause)


def test_racing_elections_leave_the_best_version_champion(client, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    values = [0.9, 0.8, 0.7, 0.6]    # the best would set the alias first, the worst last
    versions = [_version(client, tmp_path, "race", v) for v in values]
    start = threading.Barrier(len(values))
    got: list = [None] * len(values)

    def elect(i: int) -> None:
        racer = _PausingClient(MlflowClient(uri), pause=0.2 * (i + 1))
        start.wait()
        try:
            got[i] = registry.elect_champion(racer, "race", versions[i], "val/macro_ap", values[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            got[i] = exc

    threads = [threading.Thread(target=elect, args=(i,)) for i in range(len(values))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(isinstance(g, BaseException) for g in got), got
    # Without the lock all four read "no champion", all promote, and 0.6 (set last) stays champion.
    assert client.get_model_version_by_alias("race", registry.ALIAS).version == int(versions[0])
    assert sum(d.promoted for d in got) >= 1 and [d.previous_champion for d in got].count(None) == 1
    from mlflow.entities import ViewType

    active = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    assert not [e.name for e in active if e.name.startswith(registry.LOCK_PREFIX)]
    assert client.get_experiment_by_name(registry.lock_name("race")) is None   # free for the next election


def test_a_killed_holders_lock_is_broken_and_a_live_one_waited_for(client, caplog) -> None:
    name = registry.lock_name("m4")
    client.create_experiment(name)   # a holder that never lets go
    with pytest.raises(TimeoutError, match=name):
        with registry.champion_lock(client, "m4", wait_s=0.3, poll_s=0.05):
            pass
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="mlic.registry"):
        with registry.champion_lock(client, "m4", stale_s=0.2):
            assert client.get_experiment_by_name(name).lifecycle_stage == "active"   # ours now
    assert "breaking the champion lock" in caplog.text
    assert client.get_experiment_by_name(name) is None
