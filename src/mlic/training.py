"""The training procedure: one or two phases of `model.fit` with the callbacks users expect.

Phase 1 trains the head (and a from-scratch backbone entirely); with a pretrained backbone
phase 1 freezes it and phase 2 unfreezes its top layers at a lower learning rate. One best
checkpoint spans both phases, judged on the monitored validation metric.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from mlic import losses, model as mlic_model
from mlic.metrics import greater_is_better
from mlic.params import Train

log = logging.getLogger(__name__)


def monitor_mode(monitor: str) -> str:
    """'min' for losses, 'max' for scores (AUC, F1, accuracy)."""
    return "max" if greater_is_better(monitor) else "min"


def learning_rate(kind: str, initial: float, total_steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """A constant rate, or cosine decay to zero over `total_steps` (smoother late epochs)."""
    if kind == "constant":
        return initial
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(initial, decay_steps=max(total_steps, 1))
    raise ValueError(f"unknown lr_schedule {kind!r}; use constant or cosine")


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the learning rate in effect at the end of each epoch to the logs (and the history)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:  # the property evaluates a schedule at the current step
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


@dataclasses.dataclass
class TrainResult:
    history: pd.DataFrame           # one row per epoch over both phases
    best_epoch: int
    best_value: float
    seconds: float
    images_seen: int


def _compile(model: keras.Model, lr: Any, loss: keras.losses.Loss, n_classes: int, jit: bool) -> None:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss=loss,
                  metrics=losses.make_metrics(n_classes), jit_compile=jit)


def fit(model: keras.Model, train_ds: Any, val_ds: Any, *, cfg: Train, n_classes: int, n_train: int,
        checkpoint: Path, loss: keras.losses.Loss | None = None, jit_compile: bool = False,
        pretrained: bool = False) -> TrainResult:
    """Train `model`; the best epoch's model is saved at `checkpoint` (a `.keras` path).

    `pretrained`: freeze the backbone for phase 1, then run `cfg.finetune_epochs` with the top
    `cfg.finetune_layers` unfrozen at `cfg.finetune_learning_rate`. `loss`: None is plain BCE;
    the stage passes `losses.loss_from_params(cfg, prevalence)`.
    """
    # Check the monitor now, not after a whole phase of training: the names Keras will log.
    logged = ["loss", *(m.name for m in losses.make_metrics(n_classes))]
    known = sorted(logged + [f"val_{name}" for name in logged])
    if cfg.monitor not in known:
        raise ValueError(f"train.monitor {cfg.monitor!r} is not a logged metric; "
                         f"choose one of {', '.join(known)}")
    loss = loss if loss is not None else losses.make_loss("bce")
    steps = max(1, math.ceil(n_train / cfg.batch_size))
    mode = monitor_mode(cfg.monitor)
    best = keras.callbacks.ModelCheckpoint(str(checkpoint), monitor=cfg.monitor, mode=mode,
                                           save_best_only=True, verbose=0)
    phases = [("head" if pretrained else "full", cfg.epochs, cfg.learning_rate)]
    if pretrained and cfg.finetune_epochs > 0:
        phases.append(("finetune", cfg.finetune_epochs, cfg.finetune_learning_rate))

    frames, epoch0, start = [], 0, time.perf_counter()
    for phase, epochs, lr0 in phases:
        if phase == "head":
            mlic_model.freeze_backbone(model)
        elif phase == "finetune":
            n = mlic_model.unfreeze_top(model, cfg.finetune_layers)
            log.info("phase 2: %d backbone layers trainable (BatchNorm frozen)", n)
        _compile(model, learning_rate(cfg.lr_schedule, lr0, epochs * steps), loss, n_classes, jit_compile)
        callbacks = [LearningRateLogger(), best]
        if cfg.early_stopping_patience > 0:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor=cfg.monitor, mode=mode, patience=cfg.early_stopping_patience))
        log.info("phase %s: %d epochs at learning rate %g (%s)", phase, epochs, lr0, cfg.lr_schedule)
        hist = model.fit(train_ds, validation_data=val_ds, epochs=epoch0 + epochs, initial_epoch=epoch0,
                         callbacks=callbacks, verbose=2, shuffle=False)  # tf.data shuffles, seeded
        frame = pd.DataFrame(hist.history)
        if cfg.monitor not in frame:
            raise ValueError(f"train.monitor {cfg.monitor!r} is not a logged metric; "
                             f"choose one of {', '.join(sorted(frame.columns))}")
        frame.insert(0, "epoch", np.arange(epoch0, epoch0 + len(frame)))
        frame["phase"] = phase
        frames.append(frame)
        epoch0 += len(frame)
    seconds = time.perf_counter() - start

    history = pd.concat(frames, ignore_index=True)
    values = history[cfg.monitor].to_numpy()
    idx = int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))
    return TrainResult(history=history, best_epoch=int(history["epoch"][idx]), best_value=float(values[idx]),
                       seconds=seconds, images_seen=n_train * len(history))
