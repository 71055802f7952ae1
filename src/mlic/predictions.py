"""Model predictions for a split, and their CSV form (filename, true_<class>, prob_<class>).

evaluate predicts once and saves these; calibrate and any later analysis read the CSV
instead of running the model again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mlic.atomic import write_csv

if TYPE_CHECKING:  # calibrate reads predictions without the TFRecord side
    from mlic.tfrecords import Manifest

# Probabilities are kept to 6 decimals, in the CSV *and* in what evaluate scores, so metrics
# recomputed from the CSV (calibrate's, any later analysis) equal evaluate's.
DECIMALS = 6


@dataclasses.dataclass(frozen=True)
class Predictions:
    filenames: list[str]
    classes: list[str]
    y_true: np.ndarray   # (n, k) 0/1
    y_prob: np.ndarray   # (n, k) sigmoid probabilities


def round_probabilities(y_prob: np.ndarray) -> np.ndarray:
    """Model outputs as every consumer sees them: clipped to [0, 1], rounded to `DECIMALS`.

    evaluate, calibrate, `mlic predict` and the packaged model all threshold these rounded
    values, so a probability within rounding of a threshold gets the same label everywhere.
    """
    return np.round(np.clip(np.asarray(y_prob, dtype=np.float64), 0.0, 1.0), DECIMALS)


def predict_split(model, manifest: Manifest, batch_size: int) -> Predictions:
    """Run `model` over one split in manifest order (unshuffled), keeping filenames aligned.

    Probabilities are rounded to `DECIMALS`, as `write_predictions` writes them.
    """
    from mlic import dataset  # TensorFlow only where a model runs

    classes = manifest.classes
    names, ys, ps = [], [], []
    for images, labels, filenames in dataset.make_dataset(manifest, batch_size, with_filenames=True):
        ps.append(np.asarray(model(images, training=False), dtype=np.float64))
        ys.append(labels.numpy().astype(np.int64))
        names.extend(f.decode("utf-8") for f in filenames.numpy())
    k = len(classes)
    return Predictions(names, list(classes),
                       np.concatenate(ys) if ys else np.zeros((0, k), np.int64),
                       round_probabilities(np.concatenate(ps)) if ps else np.zeros((0, k)))


def write_predictions(path: str | Path, pred: Predictions) -> None:
    """One row per image: filename, true_<class>..., prob_<class>... (probabilities to 6 d.p.)."""
    frame = pd.DataFrame({"filename": pred.filenames})
    true = pd.DataFrame(pred.y_true, columns=[f"true_{c}" for c in pred.classes])
    prob = pd.DataFrame(np.round(pred.y_prob, DECIMALS), columns=[f"prob_{c}" for c in pred.classes])
    write_csv(path, pd.concat([frame, true, prob], axis=1))


def read_predictions(path: str | Path) -> Predictions:
    """Inverse of `write_predictions`."""
    # Filenames stay text: pandas would read `007` as 7 and `NA` as missing.
    frame = pd.read_csv(path, dtype={"filename": str}, keep_default_na=False)
    classes = [c[len("true_"):] for c in frame.columns if c.startswith("true_")]
    return Predictions(frame["filename"].tolist(), classes,
                       frame[[f"true_{c}" for c in classes]].to_numpy(np.int64),
                       frame[[f"prob_{c}" for c in classes]].to_numpy(np.float64))
