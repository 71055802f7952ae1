"""Predict labels for image files: the one prediction path behind `mlic predict` and the MLflow model.

A `Predictor` is a trained Keras model plus its `ModelMeta` and calibrate's product
(`calibration.Calibration`: per class a temperature and a threshold). Images
(paths or file bytes) go through `images.prepare`, the function preprocess used, and
`tfrecords.decode_pixels`, the TFRecord reader's decoder, inside a tf.data pipeline that works in
parallel threads and feeds the model whole batches. Probabilities
are rounded as evaluate rounds them (`predictions.round_probabilities`), scaled by the class's
temperature and rounded again (`calibration.apply`, as calibrate scaled evaluate's predictions),
and a class is predicted when that probability is >= its threshold (`metrics.predict`), so
probabilities and labels here equal calibrate's on evaluate's predictions. An image that cannot be read is reported with its reason;
the others are still predicted. An image whose header claims more pixels than `max_pixels`
(`data.max_image_pixels`, what `split` refuses) is one of those, refused before it is decoded.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from mlic import images
from mlic import calibration
from mlic.atomic import read_json
from mlic.errors import InputError
from mlic.metrics import predict as apply_thresholds
from mlic.model_meta import ModelMeta
from mlic.params import Data
from mlic.predictions import round_probabilities
from mlic.tfrecords import decode_pixels

log = logging.getLogger(__name__)

KERAS_FILE = "model.keras"
META_FILE = "model_meta.json"
# The answer's columns, for `mlic predict` and the packaged model alike.
LABELS_COLUMN = "labels"
PROB_PREFIX = "prob_"
# data.max_image_pixels's default: the limit of a model packaged before it travelled with the model.
DEFAULT_MAX_PIXELS = Data.max_image_pixels


def check_pixels(source: images.ImageSource, limit: int) -> None:
    """Raise `images.TooManyPixels` when the image's header claims more than `limit` pixels.

    Reads the header only. Unlike `images.load_rgb(max_pixels=)` it leaves PIL's module-wide
    limit alone: prediction decodes images on several threads at once.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
        if im.width * im.height > limit:
            raise images.TooManyPixels(im.width, im.height, limit)


@dataclasses.dataclass(frozen=True)
class Result:
    """Predictions for the readable images, in input order, and the reasons the others failed."""

    index: list[int]              # positions in the input of the rows below
    probabilities: np.ndarray     # (len(index), k), rounded like evaluate's CSV
    labels: list[list[str]]       # class names at the thresholds, in class order
    errors: dict[int, str]        # input position -> why that image could not be read


def read_calibration(path: str | Path, classes: Sequence[str]) -> calibration.Calibration:
    """Calibrate's `thresholds.json` (either format) for the model's `classes`."""
    raw = read_json(path, "thresholds", "run `dvc repro calibrate`")
    try:
        return calibration.Calibration.from_dict(raw, classes)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: {exc}; re-run `dvc repro calibrate`") from None


def read_thresholds(path: str | Path, classes: Sequence[str]) -> np.ndarray:
    """The thresholds of `thresholds.json` as an array in `classes` order."""
    return read_calibration(path, classes).thresholds


def output_frame(classes: Sequence[str], labels: list[list[str]], probabilities: np.ndarray) -> pd.DataFrame:
    """`labels` (list of class names) then `prob_<class>` per class, one row per image."""
    frame = pd.DataFrame({LABELS_COLUMN: pd.Series(labels, dtype=object)})
    probs = pd.DataFrame(np.asarray(probabilities, dtype=np.float64).reshape(len(labels), len(classes)),
                         columns=[f"{PROB_PREFIX}{c}" for c in classes])
    return pd.concat([frame, probs], axis=1)


class Predictor:
    """A trained model with its input contract and decision thresholds."""

    def __init__(self, model: Any, meta: ModelMeta, thresholds: np.ndarray | float,
                 temperature: np.ndarray | float = 1.0, max_pixels: int = DEFAULT_MAX_PIXELS):
        n_out = int(model.output_shape[-1])
        if n_out != len(meta.classes):
            raise InputError(f"the model has {n_out} outputs but its metadata lists {len(meta.classes)} "
                             "classes; model and model_meta.json come from different runs")
        self.model = model
        self.meta = meta
        self.max_pixels = int(max_pixels)
        self.thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n_out,)).copy()
        self.temperature = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (n_out,)).copy()
        if not (np.isfinite(self.temperature).all() and (self.temperature > 0).all()):
            raise InputError(f"temperatures must be finite and > 0; got {self.temperature.tolist()}")

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @classmethod
    def from_files(cls, keras_path: str | Path, meta_path: str | Path, thresholds_path: str | Path,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> "Predictor":
        from mlic.model import load_model  # TensorFlow only once a model is loaded

        meta = ModelMeta.read(meta_path)
        cal = read_calibration(thresholds_path, meta.classes)
        return cls(load_model(keras_path), meta, cal.thresholds, cal.temperature, max_pixels)

    def labels(self, probabilities: np.ndarray) -> list[list[str]]:
        """Class names whose (rounded) probability is >= their threshold, per row."""
        if len(probabilities) == 0:
            return []
        on = apply_thresholds(probabilities, self.thresholds).astype(bool)
        return [[c for c, keep in zip(self.meta.classes, row) if keep] for row in on]

    def predict_arrays(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated, rounded probabilities for a batch of model inputs, uint8 or float (n, s, s, 3)
        RGB 0..255: the model's output rounded as evaluate saved it, then temperature-scaled."""
        out = self.model(np.asarray(pixels, dtype=np.float32), training=False)
        return calibration.apply(round_probabilities(np.asarray(out)), self.temperature)

    def predict(self, sources: Sequence[images.ImageSource], batch_size: int = 64,
                on_batch: Callable[[int], None] | None = None) -> Result:
        """Predict every image in `sources` (paths or file bytes) in batches through tf.data.

        `on_batch(n)` is called after each batch with how many images it held (progress bars).
        """
        import tensorflow as tf

        meta = self.meta
        size, n = meta.image_size, len(sources)
        quality = meta.jpeg_quality or 92
        errors: dict[int, str] = {}
        # A placeholder for unreadable inputs, so a batch keeps its shape; their rows are dropped.
        blank = images.encode(Image.new("RGB", (size, size)), meta.encoding, quality)

        def prepare(i: np.int64) -> tuple[bytes, np.bool_]:
            i = int(i)
            try:
                check_pixels(sources[i], self.max_pixels)
                return images.prepare(sources[i], size, meta.resize_mode, meta.encoding, quality), np.True_
            except images.TooManyPixels as exc:
                errors[i] = (f"{images.describe_failure(exc)}; shrink it, or raise data.max_image_pixels "
                             "(for a packaged model: in the run that packages it)")
                return blank, np.False_
            except Exception as exc:  # noqa: BLE001 - any unreadable input is reported, not fatal
                errors[i] = images.describe_failure(exc)
                return blank, np.False_

        def load(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            encoded, ok = tf.numpy_function(prepare, [i], (tf.string, tf.bool), stateful=False)
            pixels = tf.ensure_shape(decode_pixels(encoded), (size, size, 3))
            return pixels, tf.ensure_shape(ok, ()), i

        # Each image becomes exactly what preprocess stored (`images.prepare`: decode, orient, RGB,
        # resize, encode as the shards were encoded) and is decoded as the TFRecord reader decodes
        # it (`tfrecords.decode_pixels`), so the model sees the pixels it was trained and evaluated
        # on, JPEG round trip included. Threads run in parallel (PIL releases the GIL); order is
        # kept (deterministic=True); batch before prefetch keeps whole batches ready.
        ds = (tf.data.Dataset.range(n)
              .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .batch(batch_size)
              .prefetch(tf.data.AUTOTUNE))
        index, probs = [], []
        for pixels, ok, idx in ds:
            ok = ok.numpy()
            if ok.any():
                batch = self.predict_arrays(tf.cast(pixels, tf.float32).numpy())
                probs.append(batch[ok])
                index.extend(int(i) for i in idx.numpy()[ok])
            if on_batch is not None:
                on_batch(int(len(ok)))
        k = len(self.meta.classes)
        probabilities = np.concatenate(probs) if probs else np.zeros((0, k))
        return Result(index, probabilities, self.labels(probabilities), dict(sorted(errors.items())))
