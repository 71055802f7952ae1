"""The training procedure: one or two phases of `model.fit` with the callbacks users expect.

Phase 1 trains the head (and a from-scratch backbone entirely); with a pretrained backbone
phase 1 freezes it and phase 2 unfreezes its top layers at a lower learning rate. One best
checkpoint spans both phases, judged on the monitored validation metric. Given a `Resume`, the
state is saved after every epoch and a killed run continues where it stopped (`resume.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from mlic import dataset, losses, model as mlic_model
from mlic.metrics import greater_is_better
from mlic.params import ParamsError, Train
from mlic.resume import Resume, State, assign

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


def optimizer_for(cfg: Train, lr: float | keras.optimizers.schedules.LearningRateSchedule,
                  phase: str = "full") -> keras.optimizers.Optimizer:
    """Adam, or with `train.weight_decay` > 0 AdamW (Loshchilov & Hutter 2019): decoupled weight
    decay, each step shrinking every trainable variable by lr x weight_decay of itself. Behind
    BatchNorm a convolution's scale does not change its output, so the decay keeps its weights
    small and its effective learning rate up: from scratch it learnt far faster here
    (docs/choosing.md). Not in phase 2 ("finetune"): a pretrained backbone's BatchNorm is frozen
    there, so the decay would pull the pretrained weights towards zero and change the function."""
    if cfg.weight_decay > 0 and phase != "finetune":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(lr)


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
    jit_compile: bool = False       # XLA as it really ran (Keras may refuse a request), last phase
    # this process's CPU seconds (all threads) at the end of each epoch it ran: the cost axis of
    # bench/quality.py's time-to-quality plot (not in the history, which must reproduce bit for bit)
    epoch_cpu_seconds: list[float] = dataclasses.field(default_factory=list)
    progressive: str = "off"        # progressive resizing as it ran: "<side> px x <epochs> epochs" or "off"


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss: keras.losses.Loss, n_classes: int,
             jit: bool) -> None:
    model.compile(optimizer=optimizer, loss=loss, metrics=losses.make_metrics(n_classes), jit_compile=jit)


PROGRESSIVE = "progressive"  # the history's phase name of progressive resizing's small-image epochs


def progressive_plan(cfg: Train, image_size: int) -> tuple[int, int] | None:
    """(small side in px, epochs at that side) of progressive resizing, or None when it does not
    apply: off, a keras.applications backbone (its input is fixed here, and pretrained, phase 1
    trains only its head: like `train.width`, the param is for from-scratch backbones), a side
    under the backbone's minimum, or no epoch to spare (phase 1's last epoch always runs at full
    size). Says why in the log."""
    if cfg.progressive_scale <= 0:
        return None
    spec = mlic_model.BACKBONES[cfg.backbone]
    side = math.floor(image_size * cfg.progressive_scale + 0.5)  # halves up, unlike round()
    epochs = min(math.floor(cfg.epochs * cfg.progressive_fraction + 0.5), cfg.epochs - 1)
    if not spec.from_scratch:
        why = f"{cfg.backbone} is a keras.applications backbone (from-scratch backbones only)"
    elif not spec.min_size <= side < image_size:
        why = f"{side} px is not between {cfg.backbone}'s minimum {spec.min_size} px and the image size"
    elif epochs < 1:
        why = (f"progressive_fraction {cfg.progressive_fraction} of {cfg.epochs} epochs is no small epoch "
               "before the last, full-size one")
    else:
        return side, epochs
    log.info("progressive resizing off: %s; every epoch at %d px", why, image_size)
    return None


class EpochRecorder(keras.callbacks.Callback):
    """Last in the callback list: records each epoch's history row and, with `resume`, saves the
    state the rest of the run depends on (after ModelCheckpoint and EarlyStopping have acted)."""

    def __init__(self, phase: str, rows: list[dict[str, Any]], stopped: list[str], checkpoint: Path,
                 best: keras.callbacks.ModelCheckpoint, early: keras.callbacks.EarlyStopping | None,
                 resume: Resume | None, early_state: dict[str, Any] | None = None,
                 cpu: list[float] | None = None, saved: keras.Model | None = None):
        super().__init__()
        self.phase, self.rows, self.stopped, self.checkpoint = phase, rows, stopped, checkpoint
        self.best, self.early, self.resume, self.early_state = best, early, resume, early_state
        self.cpu = cpu if cpu is not None else []
        self.saved = saved  # the model whose variables a resume state holds (default: the one fitting)

    def on_train_begin(self, logs: dict | None = None) -> None:
        # EarlyStopping resets its counters when a fit starts; a resumed phase puts them back.
        if self.early is not None and self.early_state is not None:
            for name, value in self.early_state.items():
                setattr(self.early, name, value)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # Plain floats, so a row saved for resuming and read back is the very same row.
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}, "phase": self.phase})
        self.cpu.append(time.process_time())
        if self.model.stop_training:
            self.stopped.append(self.phase)
        if self.resume is not None:
            early = None if self.early is None else {
                name: _plain(getattr(self.early, name)) for name in ("wait", "best", "best_epoch")}
            self.resume.save(self.saved or self.model, optimizer=self.model.optimizer, epochs_done=len(self.rows),
                             phase=self.phase, rows=self.rows,
                             stopped=self.stopped, best=_plain(self.best.best), early_stopping=early,
                             checkpoint=self.checkpoint)


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, (float, np.floating)) else value


def fit(model: keras.Model, train_epochs: Callable[..., Any], val_ds: Any, *, cfg: Train, n_classes: int,
        n_train: int, checkpoint: Path, loss: keras.losses.Loss | None = None, jit_compile: bool = False,
        pretrained: bool = False, resume: Resume | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
    """Train `model`; the best epoch's model is saved at `checkpoint` (a `.keras` path).

    `train_epochs(epochs=range(a, b))` gives the training batches of epochs a..b-1, one epoch after
    another, each epoch's order fixed by its number (`dataset.make_dataset(epochs=...)`); for
    progressive resizing it is also called with `resize_to=<side>` (make_dataset's).
    `pretrained`: freeze the backbone for phase 1, then run `cfg.finetune_epochs` with the top
    `cfg.finetune_layers` unfrozen at `cfg.finetune_learning_rate`. With `cfg.progressive_scale`
    (progressive resizing; `model` from `model.from_params`), the first `cfg.progressive_fraction`
    of phase 1's epochs train and validate on images downscaled by that scale, through a view
    of `model` sharing its layers, with the one optimizer and learning-rate schedule of the whole
    phase; the best checkpoint and early stopping look at full-size epochs only. `loss`: None is plain BCE;
    the stage passes `losses.loss_from_params(cfg, prevalence)`.
    `resume`: save the state after every epoch there, and first continue from a saved state.
    `callbacks`: more epoch callbacks (tune's pruning one), run after checkpointing and early
    stopping and before the history row is recorded, so a value they add to the logs is in it.
    """
    # Check the monitor now, not after a whole phase of training: the names Keras will log.
    logged = ["loss", *(m.name for m in losses.make_metrics(n_classes))]
    known = sorted(logged + [f"val_{name}" for name in logged])
    if cfg.monitor not in known:
        raise ParamsError(f"train.monitor {cfg.monitor!r} is not a logged metric; "
                         f"choose one of {', '.join(known)}")
    loss = loss if loss is not None else losses.make_loss("bce")
    steps = max(1, math.ceil(n_train / cfg.batch_size))
    mode = monitor_mode(cfg.monitor)
    best = keras.callbacks.ModelCheckpoint(str(checkpoint), monitor=cfg.monitor, mode=mode,
                                           save_best_only=True, verbose=0)
    plan = progressive_plan(cfg, int(model.input_shape[1]))
    small = plan[0] if plan else None
    phases = [("head" if pretrained else "full", cfg.epochs, cfg.learning_rate)]
    if plan:  # one phase in two parts: a small-image start, then full size
        phases = [(PROGRESSIVE, plan[1], cfg.learning_rate), ("full", cfg.epochs - plan[1], cfg.learning_rate)]
        shared = optimizer_for(cfg, learning_rate(cfg.lr_schedule, cfg.learning_rate, cfg.epochs * steps))
        # Built on the full model's variables, so its slots keep one order whichever model fits
        # first (a resume state stores them in that order).
        shared.build(model.trainable_variables)
    if pretrained and cfg.finetune_epochs > 0:
        phases.append(("finetune", cfg.finetune_epochs, cfg.finetune_learning_rate))

    state = resume.load() if resume is not None else None
    rows: list[dict[str, Any]] = []
    stopped: list[str] = []
    cpu: list[float] = []
    if state is not None:  # model variables, best checkpoint; the optimizer comes with its phase
        try:
            restore_model(model, state, best, checkpoint)
        except ValueError as exc:
            log.warning("%s in %s; training from the start", exc, resume.folder)
            state = None
    if state is not None:
        rows, stopped = list(state.rows), list(state.stopped)
        log.info("resuming from epoch %d (%d epochs done) from %s", state.epochs_done + 1, state.epochs_done,
                 resume.folder)

    epoch0, start = 0, time.perf_counter()
    for phase, epochs, lr0 in phases:
        done = sum(row["phase"] == phase for row in rows)
        if phase == "head":
            mlic_model.freeze_backbone(model)
        elif phase == "finetune":
            if done == 0 and checkpoint.is_file():
                # From the best phase-1 epoch, not the last: fine-tuning an overfit head wastes phase 2.
                model.load_weights(str(checkpoint))
                log.info("phase 2 starts from the best phase-1 weights (%s)", checkpoint.name)
            n = mlic_model.unfreeze_top(model, cfg.finetune_layers)
            log.info("phase 2: %d backbone layers trainable (BatchNorm frozen)", n)
        net = mlic_model.resized_view(model, small) if phase == PROGRESSIVE else model
        optimizer = shared if small else optimizer_for(cfg, learning_rate(cfg.lr_schedule, lr0, epochs * steps), phase)
        _compile(net, optimizer, loss, n_classes, jit_compile)
        xla = bool(net.jit_compile)  # Keras turns a requested XLA off for op determinism or a non-XLA layer
        if jit_compile and not xla:
            log.warning("jit_compile was requested but Keras compiled phase %s without XLA: op determinism "
                        "is on (set train.deterministic_ops: auto or false for XLA), or a layer has no "
                        "XLA kernel", phase)
        early_state = None
        if state is not None and state.phase == phase:  # the phase the run was killed in
            # Into the optimizer the fitting model holds: under mixed precision compile wraps ours
            # in a LossScaleOptimizer, whose variables (its loss scale's, then ours) were saved.
            held = net.optimizer
            if not held.built:
                held.build(model.trainable_variables)
            assign(held.variables, state.optimizer_variables, "optimizer variables")
            early_state = state.early_stopping
        early = None
        if cfg.early_stopping_patience > 0:
            early = keras.callbacks.EarlyStopping(monitor=cfg.monitor, mode=mode,
                                                  patience=cfg.early_stopping_patience)
        if done < epochs and phase not in stopped:
            recorder = EpochRecorder(phase, rows, stopped, checkpoint, best,
                                     None if phase == PROGRESSIVE else early, resume, early_state, cpu, saved=model)
            todo = range(epoch0 + done, epoch0 + epochs)
            if phase == PROGRESSIVE:
                # Small-image scores are not comparable with full-size ones: no checkpoint, no
                # early stopping, no extra callbacks (tune's pruning scores the full model).
                train_ds, val = train_epochs(epochs=todo, resize_to=small), dataset.downscaled(val_ds, small)
                phase_callbacks = [LearningRateLogger(), recorder]
            else:
                train_ds, val = train_epochs(epochs=todo), val_ds
                phase_callbacks = [LearningRateLogger(), best, *([early] if early else []), *callbacks, recorder]
            log.info("phase %s: %d epochs at learning rate %g (%s)%s, XLA %s", phase, epochs, lr0, cfg.lr_schedule,
                     f" on {small} px images" if phase == PROGRESSIVE else "", "on" if xla else "off")
            net.fit(train_ds, steps_per_epoch=steps, validation_data=val, epochs=epoch0 + epochs,
                    initial_epoch=epoch0 + done, callbacks=phase_callbacks, verbose=2,
                    shuffle=False)  # tf.data shuffles, seeded by epoch
        epoch0 += sum(row["phase"] == phase for row in rows)  # early stopping may have cut it short
    seconds = time.perf_counter() - start  # of this process: a resumed run times its own epochs
    ran = len(rows) - (state.epochs_done if state is not None else 0)

    history = pd.DataFrame(rows)
    if cfg.monitor not in history:
        raise ParamsError(f"train.monitor {cfg.monitor!r} is not a logged metric; "
                         f"choose one of {', '.join(sorted(history.columns))}")
    # The best epoch is a full-size one: the checkpoint saved only those.
    values = history[cfg.monitor].where(history["phase"] != PROGRESSIVE).to_numpy()
    idx = int(np.nanargmin(values) if mode == "min" else np.nanargmax(values))
    return TrainResult(history=history, best_epoch=int(history["epoch"][idx]), best_value=float(values[idx]),
                       seconds=seconds, images_seen=n_train * ran, jit_compile=xla, epoch_cpu_seconds=cpu,
                       progressive=f"{plan[0]} px x {plan[1]} epochs" if plan else "off")


def restore_model(model: keras.Model, state: State, best: keras.callbacks.ModelCheckpoint, checkpoint: Path) -> None:
    """Put a saved state back: every model variable, the best checkpoint file and its value."""
    assign(model.variables, state.model_variables, "model variables")
    best.best = state.best
    if state.best_file is not None:
        shutil.copyfile(state.best_file, checkpoint)
