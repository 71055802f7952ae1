"""Metric set, per-class table and prevalence baseline, checked against scikit-learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mlic import metrics
from mlic.metrics import compute_metrics, nan_to_none, per_class_table, prevalence_baseline

TOL = 1e-6


def make_case(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Random labels with per-class prevalence in [0.1, 0.6] and scores correlated with them."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rng.uniform(0.1, 0.6, size=k)).astype(np.int64)
    p = np.clip(0.35 * y + rng.random((n, k)) * 0.65, 0.0, 1.0)
    return y, p


def sklearn_macro(score, y: np.ndarray, p: np.ndarray) -> float:
    """sklearn's macro average over the given columns; one column is a 1-D binary problem."""
    if y.shape[1] == 0:
        return math.nan
    if y.shape[1] == 1:
        return score(y[:, 0], p[:, 0])
    return score(y, p, average="macro")


def sklearn_oracle(y: np.ndarray, p: np.ndarray, t: float | np.ndarray) -> dict[str, float]:
    """The expected metrics, computed with scikit-learn directly (other call paths than ours)."""
    pred = (p >= t).astype(np.int64)
    kw = {"zero_division": 0}
    pos = y.sum(axis=0)
    ap_cols = np.flatnonzero(pos > 0)
    auc_cols = np.flatnonzero((pos > 0) & (pos < len(y)))
    out = {
        "subset_accuracy": skm.accuracy_score(y, pred),
        "hamming_loss": skm.hamming_loss(y, pred),
        "samples_jaccard": skm.jaccard_score(y, pred, average="samples", **kw),
        "coverage_error": skm.coverage_error(y, p),
        "ranking_loss": skm.label_ranking_loss(y, p),
        "lrap": skm.label_ranking_average_precision_score(y, p),
        "n_samples": len(y),
        "n_classes": y.shape[1],
        "n_classes_undefined_ap": y.shape[1] - len(ap_cols),
        "n_classes_undefined_roc_auc": y.shape[1] - len(auc_cols),
        "mean_labels_true": y.sum(axis=1).mean(),
        "mean_labels_pred": pred.sum(axis=1).mean(),
    }
    for avg in ("samples", "micro", "macro"):
        out[f"{avg}_precision"] = skm.precision_score(y, pred, average=avg, **kw)
        out[f"{avg}_recall"] = skm.recall_score(y, pred, average=avg, **kw)
        out[f"{avg}_f1"] = skm.f1_score(y, pred, average=avg, **kw)
    # sklearn's own macro over the defined columns (our code goes column by column).
    out["macro_ap"] = sklearn_macro(skm.average_precision_score, y[:, ap_cols], p[:, ap_cols])
    out["macro_roc_auc"] = sklearn_macro(skm.roc_auc_score, y[:, auc_cols], p[:, auc_cols])
    out["micro_ap"] = skm.average_precision_score(y, p, average="micro") if y.any() else math.nan
    return out


def assert_matches(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=TOL), key


def edge_no_positive_class() -> tuple[np.ndarray, np.ndarray]:
    y, p = make_case(7, 40, 4)
    y[:, 2] = 0
    return y, p


def edge_empty_rows() -> tuple[np.ndarray, np.ndarray]:
    y, p = make_case(8, 30, 5)
    y[:6] = 0
    p[:3] = 0.0  # three empty rows predicted empty, three predicted something
    return y, p


def edge_all_zero_predictions() -> tuple[np.ndarray, np.ndarray]:
    y, p = make_case(9, 25, 3)
    return y, p * 0.4  # every score < 0.5


def edge_all_positive_class() -> tuple[np.ndarray, np.ndarray]:
    y, p = make_case(10, 40, 4)
    y[:, 0] = 1
    return y, p


def thresholds_for(kind: str, k: int) -> float | np.ndarray:
    if kind == "per_class":
        return np.linspace(0.2, 0.8, k)
    return float(kind)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(50, 5), (200, 12), (7, 3)])
@pytest.mark.parametrize("thr", ["0.5", "0.3", "per_class"])
def test_every_metric_equals_sklearn_on_random_cases(
    seed: int, shape: tuple[int, int], thr: str
) -> None:
    y, p = make_case(seed, *shape)
    t = thresholds_for(thr, shape[1])
    assert_matches(compute_metrics(y, p, t), sklearn_oracle(y, p, t))


EDGE_CASES = {
    "no_positive_class": edge_no_positive_class,
    "empty_rows": edge_empty_rows,
    "all_zero_predictions": edge_all_zero_predictions,
    "all_positive_class": edge_all_positive_class,
}


@pytest.mark.filterwarnings("error")  # the edge cases must not trip sklearn's warnings either
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
@pytest.mark.parametrize("thr", ["0.5", "per_class"])
def test_every_metric_equals_sklearn_on_edge_cases(name: str, thr: str) -> None:
    y, p = EDGE_CASES[name]()
    t = thresholds_for(thr, y.shape[1])
    got = compute_metrics(y, p, t)
    assert_matches(got, sklearn_oracle(y, p, t))
    json.dumps(nan_to_none(got), allow_nan=False)


@pytest.mark.parametrize(
    "name, undefined_ap, undefined_auc",
    [("no_positive_class", 1, 1), ("all_positive_class", 0, 1), ("empty_rows", 0, 0)],
)
def test_undefined_classes_are_counted_and_excluded(
    name: str, undefined_ap: int, undefined_auc: int
) -> None:
    y, p = EDGE_CASES[name]()
    m = compute_metrics(y, p)
    assert m["n_classes_undefined_ap"] == undefined_ap
    assert m["n_classes_undefined_roc_auc"] == undefined_auc
    assert math.isfinite(m["macro_ap"]) and math.isfinite(m["macro_roc_auc"])


def test_all_negative_labels_give_nan_ap_and_json_null() -> None:
    y = np.zeros((5, 3), dtype=np.int64)
    p = np.random.default_rng(0).random((5, 3))
    m = compute_metrics(y, p)
    assert all(math.isnan(m[key]) for key in ("macro_ap", "micro_ap", "macro_roc_auc"))
    assert m["n_classes_undefined_ap"] == 3
    assert m["n_samples_without_labels"] == 5
    assert json.loads(json.dumps(nan_to_none(m), allow_nan=False))["macro_ap"] is None


def test_empty_row_correctly_left_empty_scores_zero_in_samples_f1() -> None:
    # The documented zero_division=0 rule: exact match, but 0 in the samples averages.
    y = np.array([[1, 0], [0, 0]])
    p = np.array([[0.9, 0.1], [0.1, 0.1]])
    m = compute_metrics(y, p)
    assert m["subset_accuracy"] == 1.0 and m["hamming_loss"] == 0.0
    assert m["samples_f1"] == 0.5 and m["samples_jaccard"] == 0.5
    assert m["n_samples_without_labels"] == 1


def test_metrics_are_plain_finite_json_numbers() -> None:
    y, p = make_case(3, 60, 6)
    m = compute_metrics(y, p.astype(np.float32), 0.5)
    assert all(type(v) in (int, float) and math.isfinite(v) for v in m.values())
    json.dumps(m, allow_nan=False)


def test_bool_and_float_labels_are_accepted() -> None:
    y, p = make_case(4, 30, 4)
    want = compute_metrics(y, p)
    assert compute_metrics(y.astype(bool), p) == want
    assert compute_metrics(y.astype(np.float32), p) == want


BAD_INPUTS = [
    ("shape mismatch", np.zeros((4, 3)), np.zeros((4, 2)), 0.5),
    ("2-D", np.zeros(4), np.zeros(4), 0.5),
    ("only 0 and 1", np.full((4, 3), 2), np.zeros((4, 3)), 0.5),
    ("NaN", np.zeros((4, 3)), np.full((4, 3), np.nan), 0.5),
    (r"\[0, 1\]", np.zeros((4, 3)), np.full((4, 3), 1.5), 0.5),
    (r"\[0, 1\]", np.zeros((4, 3)), np.full((4, 3), -0.1), 0.5),
    ("one per class", np.zeros((4, 3)), np.zeros((4, 3)), [0.5, 0.5]),
    ("thresholds must be finite", np.zeros((4, 3)), np.zeros((4, 3)), 1.5),
    ("thresholds must be finite", np.zeros((4, 3)), np.zeros((4, 3)), [0.5, np.nan, 0.5]),
    ("at least 2 classes", np.zeros((4, 1)), np.zeros((4, 1)), 0.5),
    ("at least one sample", np.zeros((0, 3)), np.zeros((0, 3)), 0.5),
]


@pytest.mark.parametrize("match, y, p, t", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_invalid_inputs_raise_clear_value_errors(
    match: str, y: np.ndarray, p: np.ndarray, t: object
) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, p, t)


@pytest.mark.parametrize("name", ["random", *sorted(EDGE_CASES)])
def test_per_class_table_matches_sklearn_per_class(name: str) -> None:
    y, p = make_case(5, 60, 4) if name == "random" else EDGE_CASES[name]()
    k = y.shape[1]
    t = np.linspace(0.3, 0.7, k)
    names = [f"c{j}" for j in range(k)]
    table = per_class_table(y, p, names, t)
    assert list(table.columns) == [
        "class", "support", "prevalence", "threshold", "precision", "recall", "f1", "ap", "roc_auc",
        "predicted_positive",
    ]
    assert table["class"].tolist() == names
    for j, row in table.iterrows():
        yj, pj = y[:, j], p[:, j]
        pred = (pj >= t[j]).astype(int)
        assert row["support"] == yj.sum() and row["prevalence"] == pytest.approx(yj.mean())
        assert row["threshold"] == t[j] and row["predicted_positive"] == pred.sum()
        for col, score in [("precision", skm.precision_score), ("recall", skm.recall_score),
                           ("f1", skm.f1_score)]:
            assert row[col] == pytest.approx(score(yj, pred, zero_division=0), abs=TOL), col
        if yj.any():
            assert row["ap"] == pytest.approx(skm.average_precision_score(yj, pj), abs=TOL)
        else:
            assert math.isnan(row["ap"])
        if 0 < yj.sum() < len(yj):
            assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(yj, pj), abs=TOL)
        else:
            assert math.isnan(row["roc_auc"])


def test_per_class_table_rejects_wrong_number_of_names() -> None:
    y, p = make_case(0, 10, 3)
    with pytest.raises(ValueError, match="2 class names for 3 columns"):
        per_class_table(y, p, ["a", "b"])


def test_prevalence_baseline_repeats_train_prevalence() -> None:
    prev = np.array([0.7, 0.2, 0.05])
    scores = prevalence_baseline(prev, 4)
    assert scores.shape == (4, 3)
    np.testing.assert_array_equal(scores, np.tile(prev, (4, 1)))


def test_prevalence_baseline_f1_on_imbalanced_labels() -> None:
    # 20 images: class a in 14, b in 4, c in 1. At 0.5 the baseline predicts `a` for everyone.
    y = np.zeros((20, 3), dtype=np.int64)
    y[:14, 0] = 1
    y[14:18, 1] = 1
    y[18, 2] = 1
    m = compute_metrics(y, prevalence_baseline(np.array([0.7, 0.2, 0.05]), 20), 0.5)
    # micro: TP 14, FP 6, FN 5.  macro: a has F1 28/34, b and c have 0.
    assert m["micro_f1"] == pytest.approx(28 / 39)
    assert m["macro_f1"] == pytest.approx(28 / 34 / 3)
    assert m["subset_accuracy"] == pytest.approx(14 / 20)  # looks decent, means nothing
    assert m["hamming_loss"] == pytest.approx(11 / 60)
    assert m["macro_roc_auc"] == pytest.approx(0.5)  # constant scores rank nothing


@pytest.mark.parametrize(
    "prev, n, match",
    [
        ([0.5, 1.2], 3, r"\[0, 1\]"),
        ([[0.5]], 3, "1-D"),
        ([], 3, "1-D"),
        ([0.5, np.nan], 3, "finite"),
        ([0.5], 0, "n must"),
    ],
)
def test_prevalence_baseline_rejects_bad_inputs(prev: list, n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prevalence_baseline(np.array(prev), n)


@pytest.mark.parametrize("seed", range(5))
def test_pr_curve_table_is_the_interpolated_sklearn_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 60, 3
    y = (rng.random((n, k)) < 0.3).astype(int)
    y[0] = 1
    y[:, 2] = 0 if seed == 0 else y[:, 2]          # seed 0: a class without positives has no curve
    p = np.round(rng.random((n, k)), 2)            # ties, as real rounded scores have
    table = metrics.pr_curve_table(y, p, ["a", "b", "c"], points=21)
    kept = ["a", "b"] if seed == 0 else ["a", "b", "c"]
    assert table["class"].unique().tolist() == kept
    for j, name in enumerate(kept):
        precision, recall, _ = skm.precision_recall_curve(y[:, j], p[:, j])
        part = table[table["class"] == name]
        for r, got in zip(part["recall"], part["precision"]):
            expected = precision[recall >= r - 1e-12].max()
            assert got == pytest.approx(expected, abs=1e-9)


def paper_oracle(y: np.ndarray, p: np.ndarray, t: np.ndarray, k: int | None) -> dict[str, float]:
    """CP/CR/CF1/OP/OR/OF1 transcribed from their definition (ML-GCN, CVPR 2019, sec. 4.2):
    per class N_c (correct), N_p (predicted), N_g (ground truth); top-k keeps the k best scores
    of each image that clear the threshold. Plain loops, no scikit-learn."""
    n, c = y.shape
    pred = np.zeros_like(y)
    for i in range(n):
        ranked = sorted(range(c), key=lambda j: (-p[i, j], j))
        for j in ranked[:k] if k else ranked:
            pred[i, j] = int(p[i, j] >= t[j])
    nc = [(pred[:, j] * y[:, j]).sum() for j in range(c)]
    np_ = [pred[:, j].sum() for j in range(c)]
    ng = [y[:, j].sum() for j in range(c)]
    cp = sum(a / b if b else 0.0 for a, b in zip(nc, np_)) / c
    cr = sum(a / b if b else 0.0 for a, b in zip(nc, ng)) / c
    op = sum(nc) / sum(np_) if sum(np_) else 0.0
    or_ = sum(nc) / sum(ng) if sum(ng) else 0.0
    suffix = f"_top{k}" if k else ""
    f1 = lambda a, b: 2 * a * b / (a + b) if a + b else 0.0  # noqa: E731
    return {f"cp{suffix}": cp, f"cr{suffix}": cr, f"cf1{suffix}": f1(cp, cr),
            f"op{suffix}": op, f"or{suffix}": or_, f"of1{suffix}": f1(op, or_)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thr", ["0.5", "0.2", "per_class"])
def test_paper_metrics_follow_their_definitions(seed: int, thr: str) -> None:
    y, p = make_case(seed, 60, 7)
    p[:5, :] = 0.9  # ties: every score equal on a few images (top-3 takes the first columns)
    t = np.broadcast_to(np.asarray(thresholds_for(thr, 7), dtype=float), (7,))
    got = compute_metrics(y, p, t)
    assert_matches(got, paper_oracle(y, p, t, None))
    assert_matches(got, paper_oracle(y, p, t, 3))
    # the identities the docstring states
    assert got["cp"] == pytest.approx(got["macro_precision"]) and got["of1"] == pytest.approx(got["micro_f1"])
    assert got["op_top3"] >= 0 and (metrics.top_k(p, metrics.predict(p, t), 3).sum(axis=1) <= 3).all()


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_paper_metrics_on_edge_cases(name: str) -> None:
    y, p = EDGE_CASES[name]()
    t = np.full(y.shape[1], 0.5)
    got = compute_metrics(y, p, t)
    assert_matches(got, paper_oracle(y, p, t, None))
    assert_matches(got, paper_oracle(y, p, t, 3))
