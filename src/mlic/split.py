"""Multi-label stratified train/val/test split by iterative stratification.

Iterative stratification (Sechidis, Tsoumakas & Vlahavas, 2011) places the examples of the
rarest remaining label first, each into the split that still wants most of that label, so
every class keeps about its overall prevalence in every split — rare classes included, where
a random split easily leaves a class out of val or test. We use the implementation in the
`iterative-stratification` package and call it once with three fractions, rather than
splitting twice, so val and test are stratified against each other too.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlic.params import ParamsError

SPLITS = ("train", "val", "test")


def split_fractions(val_fraction: float, test_fraction: float) -> np.ndarray:
    """(train, val, test) fractions, checked to be sensible."""
    for name, f in (("split.val_fraction", val_fraction), ("split.test_fraction", test_fraction)):
        if not 0.0 < f < 1.0:
            raise ParamsError(f"{name} must be between 0 and 1 (exclusive), got {f}")
    train = 1.0 - val_fraction - test_fraction
    if train <= 0.0:
        raise ParamsError(
            f"split.val_fraction + split.test_fraction = {val_fraction + test_fraction} leaves no training data; "
            "keep their sum below 1"
        )
    return np.array([train, val_fraction, test_fraction])


def stratified_split(y: np.ndarray, fractions: np.ndarray, seed: int) -> np.ndarray:
    """Assign each row of the multi-hot matrix `y` to a split; returns split ids (0 train, 1 val, 2 test).

    Deterministic for a given `y`, `fractions` and `seed`. Rows are shuffled first (seeded) so
    that ties are broken at random rather than by file order.
    """
    # Imported here: it pulls in scikit-learn, and preprocess's spawned workers re-import the
    # stage module (which needs only SPLITS from this one) — about 1 s of CPU each.
    from iterstrat.ml_stratifiers import IterativeStratification

    y = np.asarray(y, dtype=bool)
    n = y.shape[0]
    if n < len(fractions):
        raise ValueError(f"{n} images cannot fill {len(fractions)} splits")
    rng = np.random.RandomState(seed)  # the library draws ties from a RandomState
    order = rng.permutation(n)
    folds = IterativeStratification(labels=y[order], r=np.asarray(fractions, dtype=float), random_state=rng)
    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = folds
    return assignment


def random_split(n: int, fractions: np.ndarray, seed: int) -> np.ndarray:
    """A plain random split with the same sizes: the baseline stratification is compared to."""
    rng = np.random.default_rng(seed)
    sizes = np.floor(np.asarray(fractions) * n).astype(int)
    sizes[0] = n - sizes[1:].sum()
    assignment = np.repeat(np.arange(len(fractions)), sizes)
    rng.shuffle(assignment)
    return assignment


def split_counts(y: np.ndarray, assignment: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Long table of per-split, per-class positive counts and prevalence (a DVC bar plot)."""
    rows = []
    for s, name in enumerate(SPLITS):
        mask = assignment == s
        n = int(mask.sum())
        counts = y[mask].sum(axis=0)
        for c, cnt in zip(classes, counts):
            rows.append({"split": name, "class": c, "images": n, "count": int(cnt),
                         "prevalence": round(float(cnt) / n, 6) if n else 0.0})
    return pd.DataFrame(rows, columns=["split", "class", "images", "count", "prevalence"])


def max_prevalence_gap(y: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Per class, the largest |prevalence in a split - overall prevalence| over the splits."""
    y = np.asarray(y, dtype=float)
    overall = y.mean(axis=0)
    gaps = [np.abs(y[assignment == s].mean(axis=0) - overall) for s in np.unique(assignment)]
    return np.max(gaps, axis=0)
