"""Per-class decision thresholds fitted on validation predictions, keyed by class name.

Rules of `fit_thresholds` (prediction rule: prob >= t):
- Candidates are the distinct validation probabilities of the class; each candidate defines
  one prediction set, and the one with the highest F-beta wins.
- Ties in F-beta (within 1e-12 relative, to absorb float rounding of equal fractions) go to
  the highest candidate: the same score with fewer positive predictions.
- The returned threshold is the midpoint between the winning candidate and the next lower
  distinct probability (0 below the lowest). Every threshold in that gap gives the same
  validation predictions, so the midpoint scores the same, but it does not sit exactly on a
  validation score, where a float rounding difference in a re-run would flip that image.
- A class with no validation positive has F-beta 0 at every threshold: the data say nothing
  about it, so it gets `default` (0.5). "Just above the largest probability" was rejected:
  for a rare class that maximum can be tiny (say 0.02), and the threshold would then fire
  freely on test images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mlic.metrics import check_arrays

# Relative tolerance for F-beta ties: equal fractions like 2/3 and 4/6 can differ in the last bit.
_TIE_RTOL = 1e-12


def _fit_one(y: np.ndarray, p: np.ndarray, beta2: float, default: float) -> float:
    """Best F-beta threshold for one class (see module docstring); O(n log n)."""
    n_pos = int(y.sum())
    if n_pos == 0:
        return default
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(1 - y_sorted)
    # The last index of each run of equal probabilities: thresholding at that value predicts
    # everything up to and including it.
    last = np.flatnonzero(np.r_[p_sorted[1:] != p_sorted[:-1], True])
    tp, fp, cand = tp[last], fp[last], p_sorted[last]
    # F-beta = (1+b2) TP / ((1+b2) TP + b2 FN + FP) = (1+b2) TP / (b2 P + TP + FP); the
    # denominator is > 0 because P > 0.
    fbeta = (1 + beta2) * tp / (beta2 * n_pos + tp + fp)
    best = int(np.flatnonzero(fbeta >= fbeta.max() * (1 - _TIE_RTOL))[0])  # candidates descend
    upper = float(cand[best])
    lower = float(cand[best + 1]) if best + 1 < cand.size else 0.0
    mid = lower + (upper - lower) / 2
    # Adjacent floats have no value strictly between them; keep the candidate itself then.
    return mid if lower < mid <= upper else upper


def fit_thresholds(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    beta: float = 1.0,
    default: float = 0.5,
) -> np.ndarray:
    """Return (k,) per-class thresholds maximising F-beta on these (validation) arrays.

    `beta` > 1 favours recall, < 1 precision. `default` is used for classes with no positive.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, min_classes=1)
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if not 0 <= default <= 1:
        raise ValueError(f"default must be in [0, 1], got {default}")
    beta2 = float(beta) ** 2
    k = y_true.shape[1]
    return np.array([_fit_one(y_true[:, j], y_prob[:, j], beta2, float(default)) for j in range(k)])


def thresholds_to_dict(
    class_names: Sequence[str], thresholds: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Return {class name: threshold} in column order, ready for thresholds.json."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (len(class_names),):
        raise ValueError(f"{len(class_names)} class names but thresholds of shape {t.shape}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names are not unique: {list(class_names)}")
    return {str(name): float(value) for name, value in zip(class_names, t)}


def thresholds_from_dict(mapping: Mapping[str, float], class_names: Sequence[str]) -> np.ndarray:
    """Return a (k,) array in `class_names` order; the keys must be exactly those classes."""
    missing = [c for c in class_names if c not in mapping]
    extra = sorted(set(mapping) - set(class_names))
    if missing or extra:
        raise ValueError(
            f"thresholds do not match the model's classes: missing {missing}, extra {extra}"
        )
    t = np.array([mapping[c] for c in class_names], dtype=np.float64)
    if not np.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        got = dict(zip(class_names, t.tolist()))
        raise ValueError(f"thresholds must be finite and in [0, 1]; got {got}")
    return t


def fbeta_curve_table(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    class_names: Sequence[str],
    beta: float = 1.0,
    points: int = 99,
) -> pd.DataFrame:
    """F-beta of each class at evenly spaced thresholds (long format: class, threshold, f_beta).

    What `fit_thresholds` maximises, drawn: a flat top means the fitted threshold is robust, a
    narrow spike that it is fitted to a handful of validation images. The grid is
    1/(points+1) .. points/(points+1), so 0.5 is on it for the default 99 points.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, min_classes=1)
    if len(class_names) != y_true.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {y_true.shape[1]} columns")
    beta2 = float(beta) ** 2
    grid = np.arange(1, points + 1) / (points + 1)
    frames = []
    for j, name in enumerate(class_names):
        y, p = y_true[:, j], y_prob[:, j]
        pred = p[None, :] >= grid[:, None]                     # (points, n)
        tp = (pred & (y[None, :] == 1)).sum(axis=1)
        fp = pred.sum(axis=1) - tp
        denom = beta2 * y.sum() + tp + fp
        f = np.where(denom > 0, (1 + beta2) * tp / np.maximum(denom, 1), 0.0)
        frames.append(pd.DataFrame({"class": name, "threshold": grid, "f_beta": f}))
    return pd.concat(frames, ignore_index=True)
