"""Multi-label stratified train/val/test split by iterative stratification.

Iterative stratification (Sechidis, Tsoumakas & Vlahavas, 2011) places the examples of the
rarest remaining label first, each into the split that still wants most of that label, so
every class keeps about its overall prevalence in every split — rare classes included, where
a random split easily leaves a class out of val or test. We use the implementation in the
`iterative-stratification` package and call it once with three fractions, rather than
splitting twice, so val and test are stratified against each other too.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlic.errors import InputError
from mlic.params import ParamsError

if TYPE_CHECKING:  # pandas is imported where used: preprocess and its workers import this module
    import pandas as pd

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
    import pandas as pd

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


def read_split_csv(path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """A split CSV written by the split stage: (filenames, 0/1 matrix, class columns).

    With the csv module, not pandas: preprocess reads three small files, and importing pandas
    would be most of its start-up. Filenames stay text ("007" is not 7, "NA" not missing).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise InputError(f"{path}: no split CSV; run `dvc repro split` first") from None
    if not rows or len(rows[0]) < 2 or rows[0][0] != "filename":
        raise InputError(f"{path}: not a split CSV (header `filename,<class>,...` expected); run `dvc repro split`")
    classes = rows[0][1:]
    y = np.zeros((len(rows) - 1, len(classes)), dtype=np.uint8)
    for r, row in enumerate(rows[1:]):
        if len(row) != len(classes) + 1 or any(v not in ("0", "1") for v in row[1:]):
            raise InputError(f"{path}: row {r + 2} is not a filename and {len(classes)} 0/1 values; "
                             "run `dvc repro split` to rewrite it")
        y[r] = [v == "1" for v in row[1:]]
    return [row[0] for row in rows[1:]], y, classes
