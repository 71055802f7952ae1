"""Probabilities you can trust: temperature scaling, how calibrated scores are, and the file that ships both.

Temperature scaling (Guo et al., ICML 2017), per sigmoid output: q = sigmoid(logit(p) / T).
T > 1 softens over-confident scores towards 0.5, T < 1 sharpens them; the order of the scores
within a class is unchanged, so AP and ROC-AUC are too. Rules (decided once, here):
- The model's output p is clipped to [EPS, 1 - EPS] (EPS = 1e-7) before the logit: the saved
  probabilities are rounded to 6 decimals, so exact 0 and 1 occur and have no finite logit.
- T is fitted on validation by minimising the mean binary cross-entropy of q, as a bounded
  scalar minimisation over log T in [log 0.05, log 20] (the BCE is convex in 1/T: one
  minimum). `global`: one T for every (image, class) pair; `per_class`: one T per class, except
  that a class with fewer than `min_support` validation positives (or no negative) gets the
  global T: a handful of positives fits a temperature as poorly as a threshold.
- Scaled probabilities are rounded to 6 decimals again (`predictions.round_probabilities`):
  calibrate, `mlic predict`, the packaged model and the server all threshold the same numbers.

How calibrated (reported on test, before and after scaling), over all n x k (image, class) pairs:
- `brier`: mean of (q - y)^2.
- `ece`: expected calibration error with 15 equal-width bins on [0, 1]; a pair with score q is
  in bin min(floor(15 q), 14) (the last bin includes 1). ECE = sum over non-empty bins of
  (pairs in bin / all pairs) * |mean y in bin - mean q in bin|.
`reliability_table` is the same binning as a table (the reliability diagram).

`Calibration` is calibrate's product, thresholds.json: per class a threshold on the scaled
probability, its temperature and the rule that set the threshold. Format 2:
  {"format": 2, "thresholds": {class: t}, "temperature": {class: T}, "rule": {class: name}, ...}
Format 1, the plain {class: threshold} mapping of earlier runs, still reads (temperature 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mlic import thresholds as thr
from mlic.predictions import round_probabilities
from mlic.thresholds import thresholds_from_dict, thresholds_to_dict

EPS = 1e-7
T_BOUNDS = (0.05, 20.0)
ECE_BINS = 15
FORMAT = 2
TEMPERATURE_MODES = ("none", "global", "per_class")


# --------------------------------------------------------------------------- temperature
def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a negative number only: no overflow warning for large |z|
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def scale(p: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """sigmoid(logit(p) / T), T a scalar or one per column; not rounded."""
    t = np.asarray(temperature, dtype=np.float64)
    return _sigmoid(logit(p) / t)


def apply(p: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """The probabilities users see: scaled, then rounded as evaluate rounds. T == 1 changes nothing."""
    t = np.asarray(temperature, dtype=np.float64)
    if np.all(t == 1.0):
        return round_probabilities(p)
    return round_probabilities(scale(p, t))


def bce(y: np.ndarray, z: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of sigmoid(z / T) against 0/1 labels y (log-sum-exp form)."""
    x = np.asarray(z, dtype=np.float64) / temperature
    # -[y log s(x) + (1-y) log(1-s(x))] = softplus(x) - y x
    return float(np.mean(np.logaddexp(0.0, x) - np.asarray(y, dtype=np.float64) * x))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """The T in T_BOUNDS minimising the mean BCE of sigmoid(logit(p) / T) over all given pairs."""
    from scipy.optimize import minimize_scalar  # scikit-learn's dependency; only calibrate fits

    y = np.asarray(y, dtype=np.float64).ravel()
    z = logit(p).ravel()
    if y.size == 0 or y.min() == y.max() or not np.any(z):
        return 1.0  # one label value only (or no signal): the data cannot pin a temperature
    lo, hi = (math.log(b) for b in T_BOUNDS)
    res = minimize_scalar(lambda s: bce(y, z, math.exp(s)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-7})
    return float(math.exp(res.x))


def fit_temperatures(y_true: np.ndarray, y_prob: np.ndarray, mode: str = "per_class",
                     min_support: int = 1) -> np.ndarray:
    """(k,) temperatures: all 1 (`none`), one shared (`global`) or one per class (`per_class`,
    the shared one for a class with fewer than `min_support` positives or no negative)."""
    if mode not in TEMPERATURE_MODES:
        raise ValueError(f"temperature mode must be one of {TEMPERATURE_MODES}, got {mode!r}")
    y_true = np.asarray(y_true)
    k = y_true.shape[1]
    if mode == "none":
        return np.ones(k)
    shared = fit_temperature(y_true, y_prob)
    if mode == "global":
        return np.full(k, shared)
    pos = y_true.sum(axis=0)
    neg = y_true.shape[0] - pos
    return np.array([fit_temperature(y_true[:, j], y_prob[:, j]) if pos[j] >= max(min_support, 1) and neg[j] > 0
                     else shared for j in range(k)])


# --------------------------------------------------------------------------- how calibrated
def _bins(q: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum(np.floor(q * bins).astype(np.int64), bins - 1)


def brier(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean squared error over all (image, class) pairs."""
    y, q = np.asarray(y_true, dtype=np.float64), np.asarray(y_prob, dtype=np.float64)
    return float(np.mean((q - y) ** 2))


def ece(y_true: np.ndarray, y_prob: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over all pairs, `bins` equal-width bins (module docstring)."""
    table = reliability_table(y_true, y_prob, bins)
    n = table["count"].sum()
    return float((table["count"] / n * (table["frequency"] - table["confidence"]).abs()).sum())


def reliability_table(y_true: np.ndarray, y_prob: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """One row per non-empty bin: bin, lower, upper, confidence (mean score), frequency (share of
    positives), count. What the reliability diagram draws and what `ece` sums."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    q = np.asarray(y_prob, dtype=np.float64).ravel()
    b = _bins(q, bins)
    count = np.bincount(b, minlength=bins)
    conf = np.bincount(b, weights=q, minlength=bins)
    freq = np.bincount(b, weights=y, minlength=bins)
    keep = count > 0
    idx = np.arange(bins)[keep]
    return pd.DataFrame({"bin": idx, "lower": idx / bins, "upper": (idx + 1) / bins,
                         "confidence": conf[keep] / count[keep], "frequency": freq[keep] / count[keep],
                         "count": count[keep]})


def probability_report(y_true: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """ECE and Brier score of the same labels before and after scaling."""
    return {"ece_before": ece(y_true, before), "ece_after": ece(y_true, after),
            "brier_before": brier(y_true, before), "brier_after": brier(y_true, after)}


def reliability_long(y_true: np.ndarray, before: np.ndarray, after: np.ndarray,
                     bins: int = ECE_BINS) -> pd.DataFrame:
    """Both reliability tables, stacked, with a `probabilities` column: `before` | `after`."""
    frames = [reliability_table(y_true, p, bins).assign(probabilities=name)
              for name, p in (("before", before), ("after", after))]
    out = pd.concat(frames, ignore_index=True)
    return out[["probabilities", *[c for c in out.columns if c != "probabilities"]]]


# --------------------------------------------------------------------------- thresholds.json
@dataclasses.dataclass(frozen=True)
class Calibration:
    """What turns the model's output into labels: p -> apply(p, temperature) >= thresholds."""

    classes: list[str]
    thresholds: np.ndarray          # (k,) on the scaled probabilities
    temperature: np.ndarray         # (k,) 1 = unscaled
    rules: list[str] | None = None  # per class, which rule set its threshold (format 2 only)
    strategy: str | None = None

    def __post_init__(self) -> None:
        k = len(self.classes)
        for name in ("thresholds", "temperature"):
            value = np.broadcast_to(np.asarray(getattr(self, name), dtype=np.float64), (k,)).copy()
            object.__setattr__(self, name, value)
        if not (np.isfinite(self.temperature).all() and (self.temperature > 0).all()):
            raise ValueError(f"temperatures must be finite and > 0; got {self.temperature.tolist()}")

    def probabilities(self, y_prob: np.ndarray) -> np.ndarray:
        return apply(y_prob, self.temperature)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "rule_of_use": "a class is predicted when sigmoid(logit(p) / temperature) >= threshold, "
                           "p the model's output rounded to 6 decimals, the result rounded again",
            "thresholds": thresholds_to_dict(self.classes, self.thresholds),
            "temperature": {c: float(t) for c, t in zip(self.classes, self.temperature)},
        }
        if self.strategy is not None:
            out["strategy"] = self.strategy
        if self.rules is not None:
            out["rule"] = dict(zip(self.classes, self.rules))
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], classes: Sequence[str]) -> "Calibration":
        """Format 2, or format 1 ({class: threshold}, no temperature). Raises ValueError."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        if not is_format2(raw):
            return cls(list(classes), thresholds_from_dict(raw, classes), np.ones(len(classes)))
        if raw["format"] != FORMAT:
            raise ValueError(f"thresholds file format {raw['format']!r} is not known to this mlic "
                             f"(it reads {FORMAT} and the plain class -> threshold mapping)")
        temps = raw.get("temperature") or {}
        missing = [c for c in classes if c not in temps]
        if missing or not isinstance(temps, Mapping):
            raise ValueError(f"temperature missing for {missing}")
        rules = raw.get("rule")
        return cls(list(classes), thresholds_from_dict(raw["thresholds"], classes),
                   np.array([temps[c] for c in classes], dtype=np.float64),
                   [str(rules[c]) for c in classes] if isinstance(rules, Mapping) else None,
                   raw.get("strategy"))


def fit(classes: Sequence[str], y_true: np.ndarray, y_prob: np.ndarray, *, temperature: str = "per_class",
        strategy: str = "fbeta", beta: float = 1.0, precision_target: float = 0.8, min_support: int = 5,
        default: float = 0.5) -> Calibration:
    """Fit on validation: the temperature first, then the thresholds on the scaled probabilities
    (what the packaged model applies), by `strategy` with the min-support fallback."""
    temps = fit_temperatures(y_true, y_prob, temperature, min_support)
    found = thr.fit(y_true, apply(y_prob, temps), strategy, beta=beta, precision_target=precision_target,
                    min_support=min_support, default=default)
    return Calibration(list(classes), found.thresholds, temps, found.rules, strategy)


def is_format2(raw: Mapping[str, Any]) -> bool:
    return "format" in raw and isinstance(raw.get("thresholds"), Mapping)


def threshold_mapping(raw: Mapping[str, Any]) -> dict[str, float]:
    """{class: threshold} from either format, unchecked (for figures)."""
    return dict(raw["thresholds"]) if is_format2(raw) else dict(raw)
