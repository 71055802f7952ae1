"""Per-class F-beta threshold fitting, checked against a brute-force sklearn oracle."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, fbeta_score

from mlic import thresholds
from mlic.thresholds import (RULE_DEFAULT, RULE_FEW_POSITIVES, RULE_UNREACHABLE, STRATEGIES, fit, fit_global,
                             fit_thresholds, thresholds_from_dict, thresholds_to_dict)

# Hand-built class: sorted scores with labels 1 1 0 1 0 0.
KNOWN_Y = np.array([1, 1, 0, 1, 0, 0])
KNOWN_P = np.array([0.95, 0.8, 0.7, 0.6, 0.3, 0.1])


def column(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return y.reshape(-1, 1), p.reshape(-1, 1)


@pytest.mark.parametrize(
    "beta, expected",
    [
        (1.0, 0.45),  # best set {.95,.8,.7,.6}: F1 6/7; midpoint of (0.3, 0.6]
        (2.0, 0.45),  # recall-heavy F2 picks the same set: 15/16
        (0.5, 0.75),  # precision-heavy F0.5 stops at 0.8 (2.5/2.75); midpoint of (0.7, 0.8]
    ],
)
def test_known_optimum(beta: float, expected: float) -> None:
    assert fit_thresholds(*column(KNOWN_Y, KNOWN_P), beta=beta)[0] == pytest.approx(expected)


def make_case(seed: int, n: int, k: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rng.uniform(0.05, 0.6, size=k)).astype(np.int64)
    p = np.clip(0.3 * y + 0.7 * rng.random((n, k)), 0.0, 1.0)
    if decimals is not None:
        p = np.round(p, decimals)  # coarse scores: many equal probabilities and F-beta ties
    return y, p


def brute_force_best(y: np.ndarray, p: np.ndarray, beta: float) -> float:
    """Max F-beta over every candidate threshold, all scored by sklearn in one multilabel call."""
    candidates = np.unique(p)
    preds = (p[:, None] >= candidates[None, :]).astype(int)  # one column per candidate
    truth = np.repeat(y[:, None], candidates.size, axis=1)
    return float(fbeta_score(truth, preds, beta=beta, average=None, zero_division=0).max())


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(
    "seed, n, k, decimals",
    [(0, 50, 5, None), (1, 200, 12, None), (2, 7, 3, None), (3, 120, 6, 1), (4, 80, 4, 2)],
)
def test_fitted_threshold_achieves_brute_force_max(
    beta: float, seed: int, n: int, k: int, decimals: int | None
) -> None:
    y, p = make_case(seed, n, k, decimals)
    t = fit_thresholds(y, p, beta=beta)
    for j in range(k):
        if not y[:, j].any():
            assert t[j] == 0.5
            continue
        best = brute_force_best(y[:, j], p[:, j], beta)
        ours = fbeta_score(y[:, j], p[:, j] >= t[j], beta=beta, zero_division=0)
        assert ours == pytest.approx(best, abs=1e-9)
        assert 0.0 <= t[j] <= 1.0
        # The midpoint rule: the threshold never sits on a validation score unless forced to.
        assert not np.isin(t[j], p[:, j]) or np.nextafter(t[j], 0) in p[:, j]


def test_tie_goes_to_the_highest_candidate() -> None:
    # Labels 1 0 0 1: predicting only the top score and predicting all four both give F1 2/3.
    y, p = column(np.array([1, 0, 0, 1]), np.array([0.9, 0.6, 0.5, 0.2]))
    assert fit_thresholds(y, p)[0] == pytest.approx(0.75)


def test_lowest_candidate_uses_midpoint_to_zero() -> None:
    y, p = column(np.array([1, 1, 1]), np.array([0.4, 0.2, 0.9]))
    assert fit_thresholds(y, p)[0] == pytest.approx(0.1)


def test_adjacent_floats_keep_the_candidate_itself() -> None:
    below = np.nextafter(0.5, 0.0)
    y, p = column(np.array([1, 0]), np.array([0.5, below]))
    t = fit_thresholds(y, p)[0]
    assert t == 0.5 and below < t


@pytest.mark.parametrize("default", [0.5, 0.3])
def test_class_without_positives_gets_default(default: float) -> None:
    y, p = make_case(5, 40, 3, None)
    y[:, 1] = 0
    t = fit_thresholds(y, p, default=default)
    assert t[1] == default
    assert t[0] != default


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fitted_f1_never_below_f1_at_half(seed: int) -> None:
    y, p = make_case(seed, 150, 8, None)
    y[:, 3] = 0
    t = fit_thresholds(y, p)
    fitted = f1_score(y, p >= t, average=None, zero_division=0)
    at_half = f1_score(y, p >= 0.5, average=None, zero_division=0)
    assert (fitted >= at_half - 1e-12).all()
    assert fitted.mean() >= at_half.mean() - 1e-12


def test_float32_scores_are_handled() -> None:
    y, p = make_case(6, 100, 4, None)
    p32 = p.astype(np.float32)
    t = fit_thresholds(y, p32)
    for j in range(4):
        best = brute_force_best(y[:, j], p32[:, j], 1.0)
        assert f1_score(y[:, j], p32[:, j] >= t[j]) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"default": 1.5}, "default"),
    ],
)
def test_fit_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    y, p = make_case(0, 10, 2, None)
    with pytest.raises(ValueError, match=match):
        fit_thresholds(y, p, **kwargs)


def test_fit_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_thresholds(np.zeros((3, 2)), np.full((3, 2), 2.0))


def test_dict_round_trip_is_keyed_by_name() -> None:
    names = ["cat", "dog", "car"]
    t = np.array([0.25, 0.5, 0.875])
    d = thresholds_to_dict(names, t)
    assert d == {"cat": 0.25, "dog": 0.5, "car": 0.875}
    assert all(type(v) is float for v in d.values())
    np.testing.assert_array_equal(thresholds_from_dict(d, names), t)
    # Order comes from class_names, not from the mapping.
    reordered = thresholds_from_dict(d, ["car", "cat", "dog"])
    np.testing.assert_array_equal(reordered, [0.875, 0.25, 0.5])


def test_from_dict_names_missing_and_extra_classes() -> None:
    with pytest.raises(ValueError, match=r"missing \['dog'\], extra \['bird'\]"):
        thresholds_from_dict({"cat": 0.5, "bird": 0.5}, ["cat", "dog"])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: thresholds_to_dict(["a", "b"], [0.5]), "2 class names"),
        (lambda: thresholds_to_dict(["a", "a"], [0.5, 0.5]), "not unique"),
        (lambda: thresholds_from_dict({"a": 1.5}, ["a"]), r"\[0, 1\]"),
        (lambda: thresholds_from_dict({"a": None}, ["a"]), "finite"),
    ],
    ids=["length", "duplicates", "out_of_range", "none"],
)
def test_dict_helpers_reject_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_fbeta_curve_table_matches_sklearn_at_every_threshold(beta: float) -> None:
    from sklearn.metrics import fbeta_score

    rng = np.random.default_rng(int(beta * 10))
    y = (rng.random((50, 3)) < 0.3).astype(int)
    y[:, 2] = 0                                    # no positive: F-beta 0 everywhere
    p = rng.random((50, 3))
    table = thresholds.fbeta_curve_table(y, p, ["a", "b", "c"], beta=beta, points=9)
    assert len(table) == 27
    for row in table.itertuples():
        j = "abc".index(row[1])
        pred = (p[:, j] >= row.threshold).astype(int)
        assert row.f_beta == pytest.approx(fbeta_score(y[:, j], pred, beta=beta, zero_division=0), abs=1e-12)


# --- strategies (thresholds.fit) -----------------------------------------------------------------

@pytest.mark.parametrize(
    "target, expected",
    [
        (0.75, 0.55),   # precision 3/4 at 0.6: the lowest threshold reaching the target (most recall)
        (0.8, 0.75),    # 2/2 at 0.8; 0.6 gives 3/4 < 0.8
        (1.0, 0.75),    # 0.9 and 0.8 both give precision 1: the one with more recall (0.8)
        (0.5, 0.55),    # 0.5 and 0.4 reach it too, but add no recall: the highest with all 3 found
    ],
)
def test_precision_strategy_takes_the_most_recall_reaching_the_target(target: float, expected: float) -> None:
    y = np.array([[1], [1], [0], [1], [0], [0]])
    p = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
    got = fit(y, p, "precision", precision_target=target, min_support=1)
    assert got.rules == ["precision"]
    assert got.thresholds[0] == pytest.approx(expected)


def test_an_unreachable_precision_target_falls_back_to_the_global_threshold() -> None:
    y = np.array([[0, 1], [1, 1], [0, 0], [1, 0]])
    p = np.array([[0.9, 0.8], [0.8, 0.7], [0.7, 0.2], [0.6, 0.1]])
    got = fit(y, p, "precision", precision_target=0.9, min_support=1)
    assert got.rules == [RULE_UNREACHABLE, "precision"]
    assert got.thresholds[0] == got.global_threshold == fit_global(y, p)


def test_global_strategy_is_one_threshold_maximising_macro_f1() -> None:
    y = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    p = np.array([[0.9, 0.6], [0.8, 0.4], [0.3, 0.35], [0.2, 0.1]])
    # at 0.4 both classes are perfect (macro F1 1); the midpoint to the next lower score, 0.35
    got = fit(y, p, "global")
    np.testing.assert_allclose(got.thresholds, [0.375, 0.375])
    assert got.rules == ["global", "global"]
    # brute force over a fine grid agrees: nothing beats macro F1 1 and 0.375 reaches it
    from sklearn.metrics import f1_score
    assert f1_score(y, (p >= 0.375).astype(int), average="macro") == 1.0


def test_global_threshold_matches_a_brute_force_search() -> None:
    from sklearn.metrics import fbeta_score

    rng = np.random.default_rng(4)
    y = (rng.random((60, 4)) < [0.5, 0.3, 0.2, 0.1]).astype(int)
    y[0] = 1
    p = np.round(np.clip(0.35 * y + 0.65 * rng.random((60, 4)), 0, 1), 3)
    t = fit_global(y, p, beta=2.0)
    score = lambda th: fbeta_score(y, (p >= th).astype(int), beta=2.0, average="macro", zero_division=0)  # noqa: E731
    best = max(score(c) for c in np.unique(p))
    assert score(t) == pytest.approx(best, abs=1e-12)


def test_fbeta_strategy_with_enough_support_is_the_per_class_fit() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((80, 3)) < [0.5, 0.4, 0.3]).astype(int)
    p = np.clip(0.3 * y + 0.7 * rng.random((80, 3)), 0, 1)
    got = fit(y, p, "fbeta", beta=2.0, min_support=5)
    np.testing.assert_array_equal(got.thresholds, fit_thresholds(y, p, beta=2.0))
    assert got.rules == ["fbeta"] * 3


def test_a_class_with_one_positive_gets_the_global_threshold_not_an_overfit_one() -> None:
    """The issue's case: one validation positive scored 0.027, below most negatives."""
    rng = np.random.default_rng(1)
    n = 200
    y = (rng.random((n, 3)) < [0.5, 0.3, 0.0]).astype(int)
    p = np.clip(0.45 * y + 0.55 * rng.random((n, 3)), 0, 1)
    p[:, 2] = 0.03 + 0.4 * rng.random(n)
    y[0, 2], p[0, 2] = 1, 0.027
    own = fit(y, p, "fbeta", min_support=1)
    assert own.thresholds[2] < 0.03 and own.rules[2] == "fbeta"   # what the old rule did: fires on every image
    robust = fit(y, p, "fbeta", min_support=5)
    assert robust.rules == ["fbeta", "fbeta", RULE_FEW_POSITIVES]
    assert robust.thresholds[2] == robust.global_threshold == fit_global(y, p) > 0.2
    np.testing.assert_array_equal(robust.thresholds[:2], own.thresholds[:2])


def test_no_positive_anywhere_gives_the_default() -> None:
    y = np.zeros((5, 2), int)
    p = np.random.default_rng(0).random((5, 2))
    for strategy in STRATEGIES:
        got = fit(y, p, strategy, default=0.4)
        np.testing.assert_array_equal(got.thresholds, [0.4, 0.4])
        assert got.rules == [RULE_DEFAULT] * 2
    assert fit_global(y, p) is None


@pytest.mark.parametrize("kwargs, words", [({"strategy": "median"}, "strategy"), ({"beta": 0.0}, "beta"),
                                           ({"precision_target": 0.0}, "precision_target")])
def test_fit_refuses_bad_settings(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        fit(np.array([[1], [0]]), np.array([[0.6], [0.2]]), **kwargs)
