"""Temperature scaling, ECE/Brier and the thresholds.json formats (mlic.calibration)."""

from __future__ import annotations

import json
import typing

import numpy as np
import pandas as pd
import pytest

from mlic import calibration, params, thresholds
from mlic.calibration import Calibration


def synthetic_with_temperature(t: float, n: int = 4000, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z) and the scores a model with temperature 1/t would output:
    sigmoid(z * t). Scaling those by T = t recovers the true probabilities."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 2.0, (n, k))
    y = (rng.random((n, k)) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return y, 1 / (1 + np.exp(-z * t))


# --- temperature ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.5, 1.0, 1.7, 3.0])
def test_fit_temperature_recovers_the_temperature_the_data_were_made_with(t: float) -> None:
    y, p = synthetic_with_temperature(t)
    assert calibration.fit_temperature(y, p) == pytest.approx(t, rel=0.08)


def test_per_class_temperatures_recover_one_per_class_and_rare_classes_get_the_global_one() -> None:
    ys, ps = zip(*(synthetic_with_temperature(t, k=1, seed=i) for i, t in enumerate((0.6, 2.0))))
    y, p = np.hstack(ys), np.hstack(ps)
    got = calibration.fit_temperatures(y, p, "per_class")
    np.testing.assert_allclose(got, [0.6, 2.0], rtol=0.1)
    shared = calibration.fit_temperature(y, p)
    np.testing.assert_allclose(calibration.fit_temperatures(y, p, "global"), [shared, shared])
    np.testing.assert_array_equal(calibration.fit_temperatures(y, p, "none"), [1.0, 1.0])
    rare = y.copy()
    rare[:, 1] = 0
    rare[:3, 1] = 1  # 3 positives < min_support 5: the shared temperature, not its own
    temps = calibration.fit_temperatures(rare, p, "per_class", min_support=5)
    assert temps[1] == pytest.approx(calibration.fit_temperature(rare, p))


def test_the_fitted_temperature_minimises_the_validation_bce() -> None:
    y, p = synthetic_with_temperature(1.7, n=500)
    t = calibration.fit_temperature(y, p)
    z = calibration.logit(p)
    best = calibration.bce(y, z, t)
    for other in (t * 0.97, t * 1.03):
        assert calibration.bce(y, z, other) > best


def test_one_label_value_pins_no_temperature() -> None:
    p = np.random.default_rng(0).random((20, 2))
    assert calibration.fit_temperature(np.zeros((20, 2)), p) == 1.0


def test_apply_is_sigmoid_of_logit_over_t_rounded_and_clips_0_and_1() -> None:
    p = np.array([[0.0, 0.2, 0.5], [0.9, 1.0, 0.999]])
    t = np.array([2.0, 0.5, 1.5])
    logit = np.log(np.clip(p, 1e-7, 1 - 1e-7) / (1 - np.clip(p, 1e-7, 1 - 1e-7)))
    np.testing.assert_allclose(calibration.apply(p, t), np.round(1 / (1 + np.exp(-logit / t)), 6), atol=1e-12)
    assert np.isfinite(calibration.apply(p, t)).all()
    np.testing.assert_array_equal(calibration.apply(p, 1.0), p)  # T = 1 changes nothing


# --- how calibrated ------------------------------------------------------------------------------

def ece_loop(y: np.ndarray, q: np.ndarray, bins: int = 15) -> float:
    """The ECE definition, transcribed literally: pairs into equal-width bins, weighted gap."""
    pairs = list(zip(np.ravel(y).tolist(), np.ravel(q).tolist()))
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(yy, qq) for yy, qq in pairs if lo <= qq < hi or (b == bins - 1 and qq == 1.0)]
        if inside:
            acc = sum(yy for yy, _ in inside) / len(inside)
            conf = sum(qq for _, qq in inside) / len(inside)
            total += len(inside) / len(pairs) * abs(acc - conf)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_and_brier_match_their_definitions_and_sklearn(seed: int) -> None:
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(seed)
    q = rng.random((50, 4)) ** 2
    q[0, 0], q[1, 1], q[2, 2] = 0.0, 1.0, 14 / 15  # the edges: bin 0, the closed last bin, a bin edge
    y = (rng.random((50, 4)) < q).astype(np.int64)
    assert calibration.ece(y, q) == pytest.approx(ece_loop(y, q), abs=1e-12)
    assert calibration.brier(y, q) == pytest.approx(brier_score_loss(y.ravel(), q.ravel()), abs=1e-6)
    assert calibration.brier(y, q) == pytest.approx(np.mean([(a - b) ** 2 for a, b in zip(y.ravel(), q.ravel())]))


def test_perfectly_calibrated_bins_have_zero_ece() -> None:
    q = np.repeat([0.1, 0.5, 0.9], 10)[:, None]
    y = np.concatenate([[1] + [0] * 9, [1] * 5 + [0] * 5, [1] * 9 + [0]])[:, None]
    assert calibration.ece(y, q) == pytest.approx(0.0, abs=1e-12)


def test_reliability_table_shape_and_counts() -> None:
    rng = np.random.default_rng(0)
    q = rng.random((40, 3))
    y = (rng.random((40, 3)) < q).astype(int)
    table = calibration.reliability_table(y, q)
    assert list(table.columns) == ["bin", "lower", "upper", "confidence", "frequency", "count"]
    assert table["count"].sum() == q.size and (table["count"] > 0).all()
    assert table["bin"].is_monotonic_increasing and table["bin"].between(0, 14).all()
    assert ((table["confidence"] >= table["lower"]) & (table["confidence"] <= table["upper"])).all()
    both = calibration.reliability_long(y, q, calibration.apply(q, 2.0))
    assert list(both.columns) == ["probabilities", *table.columns]
    assert both["probabilities"].unique().tolist() == ["before", "after"]
    pd.testing.assert_frame_equal(both[both["probabilities"] == "before"].drop(columns="probabilities"), table)


# --- thresholds.json -----------------------------------------------------------------------------

CLASSES = ["cat", "dog", "wäter"]


def test_format_2_round_trips_through_json() -> None:
    cal = Calibration(CLASSES, np.array([0.3, 0.5, 0.12]), np.array([1.2, 0.9, 1.0]),
                      ["fbeta", "fbeta", thresholds.RULE_FEW_POSITIVES], "fbeta")
    raw = json.loads(json.dumps(cal.to_dict()))
    assert raw["format"] == 2 and list(raw["thresholds"]) == CLASSES
    back = Calibration.from_dict(raw, ["wäter", "cat", "dog"])  # read in the model's order
    np.testing.assert_array_equal(back.thresholds, [0.12, 0.3, 0.5])
    np.testing.assert_array_equal(back.temperature, [1.0, 1.2, 0.9])
    assert back.rules == [thresholds.RULE_FEW_POSITIVES, "fbeta", "fbeta"] and back.strategy == "fbeta"


def test_format_1_a_plain_mapping_still_reads_with_temperature_1() -> None:
    old = {"cat": 0.3, "dog": 0.5, "wäter": 0.12}
    cal = Calibration.from_dict(old, CLASSES)
    np.testing.assert_array_equal(cal.thresholds, [0.3, 0.5, 0.12])
    np.testing.assert_array_equal(cal.temperature, [1.0, 1.0, 1.0])
    assert calibration.threshold_mapping(old) == old
    p = np.array([[0.25, 0.5, 0.3]])
    np.testing.assert_array_equal(cal.probabilities(p), p)


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"format": 3, "thresholds": {c: 0.5 for c in CLASSES}}, "format 3"),
        ({"format": 2, "thresholds": {c: 0.5 for c in CLASSES}, "temperature": {"cat": 1.0}}, "temperature missing"),
        ({"format": 2, "thresholds": {c: 0.5 for c in CLASSES}, "temperature": dict.fromkeys(CLASSES, 0.0)}, "> 0"),
        ({"format": 2, "thresholds": {"cat": 0.5}, "temperature": dict.fromkeys(CLASSES, 1.0)}, "missing"),
    ],
    ids=["unknown-format", "temperature-missing", "temperature-zero", "threshold-missing"],
)
def test_bad_files_are_refused_naming_the_problem(raw: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Calibration.from_dict(raw, CLASSES)


def test_fit_scales_then_fits_thresholds_on_the_scaled_probabilities() -> None:
    y, p = synthetic_with_temperature(2.0, n=600)
    cal = calibration.fit(["a", "b", "c"], y, p, temperature="global", strategy="global", min_support=5)
    t = calibration.fit_temperature(y, p)
    np.testing.assert_allclose(cal.temperature, t)
    assert cal.thresholds[0] == thresholds.fit_global(y, calibration.apply(p, t))


def test_params_choices_are_the_codes() -> None:
    hints = typing.get_type_hints(params.Calibrate)
    assert typing.get_args(hints["strategy"]) == thresholds.STRATEGIES
    assert typing.get_args(hints["temperature"]) == calibration.TEMPERATURE_MODES
