"""Multi-label metrics over arrays: the flat metric set, a per-class table, a baseline.

Inputs: `y_true` (n, k) of 0/1, `y_prob` (n, k) of probabilities in [0, 1], and
`thresholds`, a float or one float per class; a label is predicted when prob >= threshold.
Every metric that scikit-learn has is computed by scikit-learn, so our numbers match the
reference implementation by construction rather than by re-derivation.

Edge-case rules (decided once, here):
- `zero_division=0` everywhere. An image with no true and no predicted labels therefore
  scores 0 in samples precision/recall/F1/Jaccard, although `subset_accuracy` and
  `hamming_loss` count it as correct; `n_samples_without_labels` says how many such images
  exist. Likewise a class with no positives and no predictions has macro F1 0.
- Average precision is undefined for a class with no positive in `y_true`; ROC-AUC also for
  a class with no negative. Such classes are left out of `macro_ap` / `macro_roc_auc` (mean
  over the defined classes, NaN if none) and counted in `n_classes_undefined_ap` /
  `n_classes_undefined_roc_auc`. `micro_ap` is NaN when `y_true` has no positive at all.
- Ranking metrics keep scikit-learn's conventions: an image with no true label adds 0 to
  `coverage_error` and `ranking_loss`, and 1 to `lrap`.
- The figures multi-label papers report (Chen et al., ML-GCN, CVPR 2019, and those after it):
  CP/CR are the per-class precision/recall averaged (= macro_precision/recall), CF1 their
  harmonic mean (not macro_f1, the mean of per-class F1s); OP/OR/OF1 count over all labels
  (= micro). The `_top3` variants predict at most the 3 highest-scoring labels per image, each
  only if it also clears its threshold (ties broken by column order).
- At least 2 classes: with one class the problem is binary and scikit-learn rejects the
  samples averages and ranking metrics.
NaN is the only non-finite value returned; `nan_to_none` makes a dict strict-JSON safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

# A single threshold for every class, or one per class in column order.
Thresholds = float | Sequence[float] | np.ndarray


# Metrics where lower is better; every other metric of `compute_metrics` is higher-is-better.
LOWER_IS_BETTER = ("hamming_loss", "coverage_error", "ranking_loss", "loss")

# Keys of `compute_metrics` that describe the data, not the model: the same for every model
# scored on the same split, so they are reported with the data, never compared as metrics.
DATA_FACTS = ("n_samples", "n_classes", "n_classes_undefined_ap", "n_classes_undefined_roc_auc",
              "n_samples_without_labels", "mean_labels_true")
# Paper names of `compute_metrics` that equal another key (kept in the reports under the name
# papers use; a run's summary holds the value once, under the key on the right).
ALIASES = {"cp": "macro_precision", "cr": "macro_recall", "op": "micro_precision",
           "or": "micro_recall", "of1": "micro_f1"}
# Keys of `compute_metrics` that rank probabilities and ignore the thresholds: equal at any
# threshold, so a calibrated report repeats them unchanged.
THRESHOLD_FREE = ("macro_ap", "micro_ap", "macro_roc_auc", "coverage_error", "ranking_loss", "lrap")

# The numbers a user decides on, by report section: what `dvc exp show` shows (each stage writes
# its part as a small DVC metrics file) and what a registered model version is tagged with.
# `test_calibrated` is what the shipped model does; `test` at the default threshold and
# `val/macro_ap` (the selection metric) give the contrast. Kept short so `dvc exp show
# --only-changed` over calibrate experiments fits 200 columns; the full sets stay in the stages'
# metrics.json files (micro-F1 among them).
HEADLINE: dict[str, tuple[str, ...]] = {
    "test_calibrated": ("macro_f1", "subset_accuracy", "hamming_loss"),
    "test": ("macro_ap", "macro_f1"),
    "val": ("macro_ap",),
}


def headline(report: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """The `HEADLINE` part of a stage's report ({section: {metric: value}}), in HEADLINE order."""
    return {section: {name: report[section][name] for name in names if name in report[section]}
            for section, names in HEADLINE.items() if section in report}


def headline_names(sep: str = "/") -> list[str]:
    """HEADLINE as flat names: `test_calibrated/macro_f1`, ..."""
    return [f"{section}{sep}{name}" for section, names in HEADLINE.items() for name in names]


def greater_is_better(name: str) -> bool:
    """Direction of a metric by its (possibly prefixed) name: `val/hamming_loss` -> False."""
    return not name.endswith(LOWER_IS_BETTER)


def check_arrays(
    y_true: np.ndarray, y_prob: np.ndarray, min_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (`y_true` as int64, `y_prob` as float64); raise ValueError if bad."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    if y_true.ndim != 2 or y_prob.ndim != 2:
        raise ValueError(
            "y_true and y_prob must be 2-D (n_samples, n_classes); "
            f"got shapes {y_true.shape} and {y_prob.shape}"
        )
    if y_true.shape != y_prob.shape:
        raise ValueError(f"shape mismatch: y_true {y_true.shape} vs y_prob {y_prob.shape}")
    n, k = y_true.shape
    if n < 1:
        raise ValueError("need at least one sample")
    if k < min_classes:
        raise ValueError(f"need at least {min_classes} classes, got {k}")
    if not (np.issubdtype(y_true.dtype, np.number) or y_true.dtype == bool):
        raise ValueError(f"y_true must be numeric 0/1, got dtype {y_true.dtype}")
    if not np.isin(y_true, (0, 1)).all():
        bad = np.unique(y_true[~np.isin(y_true, (0, 1))])[:5]
        raise ValueError(f"y_true must contain only 0 and 1; found {bad.tolist()}")
    if not (np.issubdtype(y_prob.dtype, np.number) or y_prob.dtype == bool):
        raise ValueError(f"y_prob must be numeric, got dtype {y_prob.dtype}")
    y_prob = y_prob.astype(np.float64)
    if np.isnan(y_prob).any():
        raise ValueError(f"y_prob contains {int(np.isnan(y_prob).sum())} NaN value(s)")
    if (y_prob < 0).any() or (y_prob > 1).any():
        raise ValueError(
            f"y_prob must lie in [0, 1]; found range [{y_prob.min()}, {y_prob.max()}] "
            "(logits instead of sigmoid outputs?)"
        )
    return y_true.astype(np.int64), y_prob


def check_thresholds(thresholds: Thresholds, n_classes: int) -> np.ndarray:
    """Return thresholds as a float64 (k,) array; a scalar is broadcast to every class."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(n_classes, float(t))
    if t.shape != (n_classes,):
        raise ValueError(
            f"thresholds must be a float or {n_classes} floats (one per class); got shape {t.shape}"
        )
    # Outside [0, 1] is almost always a bug (logit-scale thresholds), so it is refused.
    if not np.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        raise ValueError(f"thresholds must be finite and in [0, 1]; got {t.tolist()}")
    return t


def predict(y_prob: np.ndarray, thresholds: Thresholds = 0.5) -> np.ndarray:
    """Return the 0/1 (n, k) prediction `y_prob >= thresholds`, a per-class array by column."""
    y_prob = np.asarray(y_prob, dtype=np.float64)
    return (y_prob >= check_thresholds(thresholds, y_prob.shape[1])).astype(np.int64)


def _defined_classes(y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return boolean masks (AP defined, ROC-AUC defined) per class."""
    pos = y_true.sum(axis=0)
    has_pos = pos > 0
    return has_pos, has_pos & (pos < y_true.shape[0])


def _per_class_ap_auc(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP and ROC-AUC from scikit-learn, NaN where undefined (never passed to sklearn)."""
    from sklearn import metrics as skm  # not at import: `track` and `mlic predict` use the names only

    ap_ok, auc_ok = _defined_classes(y_true)
    k = y_true.shape[1]
    ap = np.full(k, np.nan)
    auc = np.full(k, np.nan)
    for j in range(k):
        # Column by column as 1-D binary problems: sklearn would warn (AP) or raise (AUC)
        # on an undefined column, and the definedness rule is ours, not sklearn's.
        if ap_ok[j]:
            ap[j] = skm.average_precision_score(y_true[:, j], y_prob[:, j])
        if auc_ok[j]:
            auc[j] = skm.roc_auc_score(y_true[:, j], y_prob[:, j])
    return ap, auc


def top_k(y_prob: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """`y_pred` keeping, per image, only labels among its `k` highest scores (stable on ties)."""
    order = np.argsort(-np.asarray(y_prob, dtype=np.float64), axis=1, kind="stable")
    keep = np.zeros_like(y_pred)
    np.put_along_axis(keep, order[:, :k], 1, axis=1)
    return y_pred * keep


def paper_metrics(y_true: np.ndarray, y_pred: np.ndarray, suffix: str = "") -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 (see the module docstring) of a 0/1 prediction."""
    from sklearn import metrics as skm  # not at import: `track` and `mlic predict` use the names only

    out = {}
    for prefix, average in (("c", "macro"), ("o", "micro")):
        p, r, _, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        out.update({f"{prefix}p{suffix}": float(p), f"{prefix}r{suffix}": float(r),
                    f"{prefix}f1{suffix}": float(2 * p * r / (p + r)) if p + r > 0 else 0.0})
    return out


def _mean_or_nan(values: np.ndarray) -> float:
    """Mean of the non-NaN values, NaN (without a warning) if there are none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


def compute_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: Thresholds = 0.5
) -> dict[str, float]:
    """Return the flat multi-label metric dict (see the module docstring for edge cases)."""
    from sklearn import metrics as skm  # not at import: `track` and `mlic predict` use the names only

    y_true, y_prob = check_arrays(y_true, y_prob)
    y_pred = predict(y_prob, thresholds)
    n, k = y_true.shape

    out: dict[str, float] = {
        "subset_accuracy": skm.accuracy_score(y_true, y_pred),
        "hamming_loss": skm.hamming_loss(y_true, y_pred),
    }
    for average in ("samples", "micro", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, average=average, zero_division=0
        )
        out[f"{average}_precision"] = p
        out[f"{average}_recall"] = r
        out[f"{average}_f1"] = f
    out["samples_jaccard"] = skm.jaccard_score(y_true, y_pred, average="samples", zero_division=0)
    out.update(paper_metrics(y_true, y_pred))
    out.update(paper_metrics(y_true, top_k(y_prob, y_pred, 3), "_top3"))

    ap, auc = _per_class_ap_auc(y_true, y_prob)
    out["macro_ap"] = _mean_or_nan(ap)
    out["micro_ap"] = (
        skm.average_precision_score(y_true, y_prob, average="micro") if y_true.any() else math.nan
    )
    out["macro_roc_auc"] = _mean_or_nan(auc)
    out["coverage_error"] = skm.coverage_error(y_true, y_prob)
    out["ranking_loss"] = skm.label_ranking_loss(y_true, y_prob)
    out["lrap"] = skm.label_ranking_average_precision_score(y_true, y_prob)

    out = {key: float(value) for key, value in out.items()}
    out.update(
        n_samples=n,
        n_classes=k,
        n_classes_undefined_ap=int(np.isnan(ap).sum()),
        n_classes_undefined_roc_auc=int(np.isnan(auc).sum()),
        n_samples_without_labels=int((y_true.sum(axis=1) == 0).sum()),
        mean_labels_true=float(y_true.sum(axis=1).mean()),
        mean_labels_pred=float(y_pred.sum(axis=1).mean()),
    )
    return out


def per_class_table(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    class_names: Sequence[str],
    thresholds: Thresholds = 0.5,
) -> pd.DataFrame:
    """One row per class: support, prevalence, threshold, P/R/F1, AP, ROC-AUC, predicted positives."""
    from sklearn import metrics as skm  # not at import: `track` and `mlic predict` use the names only

    y_true, y_prob = check_arrays(y_true, y_prob)
    k = y_true.shape[1]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} columns")
    t = check_thresholds(thresholds, k)
    y_pred = predict(y_prob, t)
    p, r, f, support = skm.precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0
    )
    ap, auc = _per_class_ap_auc(y_true, y_prob)
    return pd.DataFrame(
        {
            "class": list(class_names),
            "support": support.astype(np.int64),
            "prevalence": y_true.mean(axis=0),
            "threshold": t,
            "precision": p,
            "recall": r,
            "f1": f,
            "ap": ap,
            "roc_auc": auc,
            "predicted_positive": y_pred.sum(axis=0).astype(np.int64),
        }
    )


def prevalence_baseline(train_prevalence: np.ndarray, n: int) -> np.ndarray:
    """Return (n, k) scores where every image gets each class's training prevalence.

    The trivial, input-blind predictor: its metrics say what a model's numbers are worth.
    """
    prev = np.asarray(train_prevalence, dtype=np.float64)
    if prev.ndim != 1 or prev.size == 0:
        raise ValueError(f"train_prevalence must be a non-empty 1-D array, got shape {prev.shape}")
    if not np.isfinite(prev).all() or (prev < 0).any() or (prev > 1).any():
        raise ValueError(f"train_prevalence must be finite and in [0, 1]; got {prev.tolist()}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return np.tile(prev, (n, 1))


def nan_to_none(values: Mapping[str, float]) -> dict[str, float | None]:
    """Replace NaN by None so `json.dump` writes `null` (strict JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def pr_curve_table(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str], points: int = 101
) -> pd.DataFrame:
    """Per-class precision-recall curves, long format (class, recall, precision), for plots.

    Precision is interpolated the usual way, as the best precision at any recall >= r, on a
    fixed recall grid of `points` values from 0 to 1: the table stays small for any number of
    images, and curves of different runs share their x values. Classes without a positive
    (no curve exists) are left out. The raw curve comes from scikit-learn.
    """
    from sklearn import metrics as skm  # not at import: `track` and `mlic predict` use the names only

    y_true, y_prob = check_arrays(y_true, y_prob, min_classes=1)
    if len(class_names) != y_true.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {y_true.shape[1]} columns")
    grid = np.linspace(0.0, 1.0, points)
    frames = []
    for j, name in enumerate(class_names):
        if not y_true[:, j].any():
            continue
        precision, recall, _ = skm.precision_recall_curve(y_true[:, j], y_prob[:, j])
        # recall descends along sklearn's arrays; the running max from the high-recall end
        # is the best precision at recall >= r.
        order = np.argsort(recall, kind="stable")
        r, p = recall[order], precision[order]
        best = np.maximum.accumulate(p[::-1])[::-1]
        # a recall of 6/20 must count as reaching the grid's 0.30000000000000004
        idx = np.searchsorted(r, grid - 1e-9, side="left")
        interp = np.where(idx < r.size, best[np.minimum(idx, r.size - 1)], 0.0)
        frames.append(pd.DataFrame({"class": name, "recall": grid, "precision": interp}))
    if not frames:
        return pd.DataFrame({"class": pd.Series(dtype=str), "recall": pd.Series(dtype=float),
                             "precision": pd.Series(dtype=float)})
    return pd.concat(frames, ignore_index=True)
