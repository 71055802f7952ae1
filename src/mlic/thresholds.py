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
  about it, so `fit_thresholds` gives it `default` (0.5) and `fit` the fallback below. "Just
  above the largest probability" was rejected: for a rare class that maximum can be tiny
  (say 0.02), and the threshold would then fire freely on test images.

Strategies of `fit` (calibrate.strategy), each fitted on validation:
- `fbeta`: each class its own best-F-beta threshold, by the rules above.
- `precision`: each class the lowest threshold whose validation precision is >= the target,
  i.e. the most recall the precision constraint allows; among thresholds with that same
  recall, the highest (fewer positive predictions, as for F-beta ties). Midpoint as above.
- `global`: one threshold for every class, the one maximising the macro F-beta (mean over
  the classes with a validation positive) among all distinct validation probabilities; ties
  to the highest, midpoint to the next lower distinct probability.
Fallback (per-class strategies): a class with fewer than `min_support` validation positives
gets the `global` threshold instead of its own, and so does a class whose precision target
is unreachable. Why: with 1-4 positives the per-class optimum is set by those few images (one
positive scored 0.027 gives a threshold of about 0.027 that fires on nearly every image),
whereas the global threshold is fitted on every validation label and is never that extreme.
Only if validation holds no positive at all is there no global threshold: `default` then.
`Fit.rules` names, per class, the rule that set its threshold (`RULES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mlic.metrics import check_arrays

# Relative tolerance for F-beta ties: equal fractions like 2/3 and 4/6 can differ in the last bit.
_TIE_RTOL = 1e-12

STRATEGIES = ("fbeta", "precision", "global")
# What set a class's threshold: the strategy's own rule, or a fallback (module docstring).
RULE_FEW_POSITIVES = "global:few_positives"
RULE_UNREACHABLE = "global:precision_unreachable"
RULE_DEFAULT = "default:no_positives"
RULES = (*STRATEGIES, RULE_FEW_POSITIVES, RULE_UNREACHABLE, RULE_DEFAULT)


def _candidates(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct probabilities, descending, with TP and FP when thresholding at each."""
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(1 - y_sorted)
    # The last index of each run of equal probabilities: thresholding at that value predicts
    # everything up to and including it.
    last = np.flatnonzero(np.r_[p_sorted[1:] != p_sorted[:-1], True])
    return p_sorted[last], tp[last], fp[last]


def _midpoint(cand: np.ndarray, best: int) -> float:
    """Halfway between candidate `best` and the next lower distinct one (0 below the lowest)."""
    upper = float(cand[best])
    lower = float(cand[best + 1]) if best + 1 < cand.size else 0.0
    mid = lower + (upper - lower) / 2
    # Adjacent floats have no value strictly between them; keep the candidate itself then.
    return mid if lower < mid <= upper else upper


def _fit_one(y: np.ndarray, p: np.ndarray, beta2: float, default: float) -> float:
    """Best F-beta threshold for one class (see module docstring); O(n log n)."""
    n_pos = int(y.sum())
    if n_pos == 0:
        return default
    cand, tp, fp = _candidates(y, p)
    # F-beta = (1+b2) TP / ((1+b2) TP + b2 FN + FP) = (1+b2) TP / (b2 P + TP + FP); the
    # denominator is > 0 because P > 0.
    fbeta = (1 + beta2) * tp / (beta2 * n_pos + tp + fp)
    best = int(np.flatnonzero(fbeta >= fbeta.max() * (1 - _TIE_RTOL))[0])  # candidates descend
    return _midpoint(cand, best)


def _fit_precision(y: np.ndarray, p: np.ndarray, target: float) -> float | None:
    """Lowest threshold with precision >= target (most recall); None if no threshold reaches it."""
    if int(y.sum()) == 0:
        return None
    cand, tp, fp = _candidates(y, p)
    ok = np.flatnonzero(tp >= target * (tp + fp) * (1 - _TIE_RTOL))
    ok = ok[tp[ok] > 0]  # predicting only negatives has no precision to speak of
    if ok.size == 0:
        return None
    best = int(ok[tp[ok] == tp[ok].max()][0])  # the most TP; of those, the highest threshold
    return _midpoint(cand, best)


def fit_global(y_true: np.ndarray, y_prob: np.ndarray, beta: float = 1.0) -> float | None:
    """One threshold for all classes maximising macro F-beta (module docstring); None when no
    class has a positive. O(k C log n) for C distinct probabilities."""
    y_true, y_prob = check_arrays(y_true, y_prob, min_classes=1)
    beta2 = float(beta) ** 2
    cols = [j for j in range(y_true.shape[1]) if y_true[:, j].any()]
    if not cols:
        return None
    cand = np.unique(y_prob)[::-1]                                   # descending
    total = np.zeros(cand.size)
    for j in cols:
        y, p = y_true[:, j], y_prob[:, j]
        pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
        tp = pos.size - np.searchsorted(pos, cand, side="left")      # positives with p >= t
        fp = neg.size - np.searchsorted(neg, cand, side="left")
        total += (1 + beta2) * tp / (beta2 * pos.size + tp + fp)
    best = int(np.flatnonzero(total >= total.max() * (1 - _TIE_RTOL))[0])
    return _midpoint(cand, best)


@dataclasses.dataclass(frozen=True)
class Fit:
    thresholds: np.ndarray      # (k,)
    rules: list[str]            # per class, one of RULES
    global_threshold: float | None


def fit(y_true: np.ndarray, y_prob: np.ndarray, strategy: str = "fbeta", *, beta: float = 1.0,
        precision_target: float = 0.8, min_support: int = 5, default: float = 0.5) -> Fit:
    """Thresholds by `strategy` with the min-support fallback (module docstring)."""
    y_true, y_prob = check_arrays(y_true, y_prob, min_classes=1)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if not 0 < precision_target <= 1:
        raise ValueError(f"precision_target must be in (0, 1], got {precision_target}")
    g = fit_global(y_true, y_prob, beta)
    fallback, fallback_rule = (g, RULE_FEW_POSITIVES) if g is not None else (float(default), RULE_DEFAULT)
    t, rules = [], []
    for j in range(y_true.shape[1]):
        y, p = y_true[:, j], y_prob[:, j]
        if strategy == "global" and g is not None:
            value, rule = g, "global"
        elif int(y.sum()) < max(min_support, 1) or g is None:
            value, rule = fallback, fallback_rule
        elif strategy == "fbeta":
            value, rule = _fit_one(y, p, float(beta) ** 2, float(default)), "fbeta"
        else:
            found = _fit_precision(y, p, float(precision_target))
            value, rule = (found, "precision") if found is not None else (g, RULE_UNREACHABLE)
        t.append(value)
        rules.append(rule)
    return Fit(np.array(t, dtype=np.float64), rules, g)


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
