"""One `tune` trial: train with the trial's `train` params through `train`'s own code, reporting
the validation mAP after every epoch.

The trial is wired as `stages/train.py` wires a training (`dataset.make_dataset` with the same
augmentation, shuffle and repeat-factor sampling, `model.build_model`, `losses.loss_from_params`,
`training.fit` with its checkpoint, early stopping and schedule), with two differences: no resume
state (a killed trial is run again) and one more epoch callback, `ValidationAP`. Each trial starts
from a cleared Keras session and `common.seed`, so the same params on the same shards give the
same trial (on CPU with `deterministic_ops`, as `train`).
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mlic import augment, dataset, devices as mlic_devices, losses, metrics, model as mlic_model, predictions, training
from mlic.errors import InputError
from mlic.params import Train
from mlic.tfrecords import Manifest
from mlic.tune import OBJECTIVE, Report, TrialOutcome

log = logging.getLogger(__name__)


class ValidationAP(keras.callbacks.Callback):
    """After each epoch: the validation mAP of the model as it stands, scored as evaluate scores a
    model (probabilities rounded by `predictions.round_probabilities`, `metrics.compute_metrics`),
    put into the epoch's logs as `val_macro_ap`, then `report(epoch, logs)`; a True answer (prune)
    stops training after this epoch. Outputs that are not finite (a diverged loss) stop it too.

    `val_ds` is the validation dataset `training.fit` gets (unshuffled batches of images, labels):
    built once, iterated each epoch. `flip`: score the mean of each image and its mirror image, as
    the saved model does with `train.tta_flip` (`model.with_flip_tta`), so trials rank what
    evaluate will score."""

    def __init__(self, val_ds: Any, report: Report, flip: bool = False):
        super().__init__()
        self.val_ds, self.report, self.flip = val_ds, report, flip
        self.y_true: np.ndarray | None = None
        self.pruned = self.diverged = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        probs, labels = [], []
        for images, y in self.val_ds:
            out = self.model(images, training=False)
            if self.flip:
                out = (out + self.model(keras.ops.flip(images, axis=2), training=False)) / 2
            probs.append(np.asarray(out, dtype=np.float64))
            labels.append(np.asarray(y))
        if self.y_true is None:
            self.y_true = np.concatenate(labels).astype(np.int64)
        y_prob = np.concatenate(probs)
        if not np.isfinite(y_prob).all():
            self.diverged, self.model.stop_training = True, True
            logs[OBJECTIVE] = math.nan
        else:
            y_prob = predictions.round_probabilities(y_prob)
            logs[OBJECTIVE] = float(metrics.compute_metrics(self.y_true, y_prob)["macro_ap"])
        if self.report(epoch, {k: float(v) for k, v in logs.items()}) and not self.diverged:
            self.pruned, self.model.stop_training = True, True
            log.info("trial pruned after epoch %d (%s %.4f below the median of earlier trials)",
                     epoch + 1, OBJECTIVE, logs[OBJECTIVE])


class Trainer:
    """Trains trials on one set of shards (their manifests read once)."""

    def __init__(self, tfrecords: str | Path, seed: int):
        self.train_m, self.val_m = Manifest.read(tfrecords, "train"), Manifest.read(tfrecords, "val")
        if (self.val_m.classes, self.val_m.image_size, self.val_m.resize_mode) != (
                self.train_m.classes, self.train_m.image_size, self.train_m.resize_mode):
            raise InputError("train and val shards disagree on classes, image size or resize mode; "
                             "re-run `dvc repro preprocess`")
        self.seed = seed

    def __call__(self, cfg: Train, report: Report) -> TrialOutcome:
        # A fresh session per trial: memory of the last trial freed, layer names restarting. It
        # also resets the dtype policy, so the devices are configured after it, every trial.
        keras.backend.clear_session()
        mlic_devices.set_seed(self.seed)
        devices = mlic_devices.configure_devices(cfg.mixed_precision, cfg.jit_compile, cfg.deterministic_ops,
                                                       cfg.intra_op_threads)
        train_m, val_m, n_classes = self.train_m, self.val_m, len(self.train_m.classes)
        aug = augment.Augmentation.from_params(cfg)
        train_epochs = functools.partial(dataset.make_dataset, train_m, cfg.batch_size, shuffle=True, augment=aug,
                                         seed=self.seed, shuffle_buffer=cfg.shuffle_buffer,
                                         repeat_threshold=cfg.repeat_threshold)
        val_ds = dataset.make_dataset(val_m, cfg.batch_size)
        scorer = ValidationAP(val_ds, report, flip=mlic_model.flips_at_test_time(cfg))
        with devices.strategy.scope(), tempfile.TemporaryDirectory(prefix="mlic-trial-") as tmp:
            model = mlic_model.from_params(cfg, n_classes, train_m.image_size, self.seed)
            loss = losses.loss_from_params(cfg, train_m.prevalence)
            result = training.fit(model, train_epochs, val_ds, cfg=cfg, n_classes=n_classes, n_train=train_m.count,
                                  checkpoint=Path(tmp) / "best.keras", loss=loss, jit_compile=devices.jit_compile,
                                  pretrained=cfg.weights is not None, callbacks=[scorer])
        history = result.history
        epochs = len(history)
        if scorer.diverged:
            return TrialOutcome(None, epochs, failure=f"diverged: non-finite outputs after epoch {epochs}")
        if scorer.pruned:
            return TrialOutcome(None, epochs, pruned=True)
        kept = history.index[history["epoch"] == result.best_epoch][0]
        value = float(history.loc[kept, OBJECTIVE])
        return TrialOutcome(value, epochs, best_epoch=int(result.best_epoch))

