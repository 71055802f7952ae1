"""What training optimises and watches: the multi-label losses, their class weighting, and the
Keras metrics logged every epoch.

`train.loss` picks one (`make_loss`); each takes sigmoid *probabilities* (the model's output) and
averages over classes, then over the batch, so their scales are comparable with plain BCE:

- `bce`: binary cross-entropy, every label counts the same.
- `weighted_bce`: BCE with the positives of class k weighted by (1 - p_k) / p_k from training
  prevalence, capped (`positive_weights`): rare classes get their positives heard.
- `focal`: Keras's own `BinaryFocalCrossentropy` (Lin et al. 2017): (1 - p_t)^gamma down-weights
  the easy examples, which on multi-label data are mostly the many easy negatives.
- `asl`: asymmetric loss (Ridnik et al., ICCV 2021): focusing on negatives only (gamma- > gamma+)
  and a probability margin that ignores negatives already below it, so the many easy negatives of
  rare classes stop drowning the few positives, and mislabeled negatives hurt less.

Every loss here is a registered Keras object (package "mlic"), so a `.keras` file compiled with
one loads with `keras.models.load_model` once this module is imported. `mlic.model.load_model`
loads for inference (`compile=False`) and never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import keras
import numpy as np

if TYPE_CHECKING:
    from mlic.params import Train

LOSSES = ("bce", "weighted_bce", "focal", "asl")  # params' train.loss Literal equals this (a test keeps it)


@keras.saving.register_keras_serializable(package="mlic")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Mean over classes of -(w_k y log p + (1 - y) log(1 - p)), p a sigmoid probability.

    pos_weight None means w_k = 1, i.e. `keras.losses.BinaryCrossentropy()`. Each log term is
    computed by `keras.ops.binary_crossentropy`, which clips p to [eps, 1 - eps] and, inside a
    model, recovers the logits behind a sigmoid output for exact log-probabilities.
    """

    def __init__(
        self,
        pos_weight: np.ndarray | list[float] | None = None,
        name: str = "weighted_binary_crossentropy",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.pos_weight = None if pos_weight is None else [float(v) for v in np.ravel(pos_weight)]

    def call(self, y_true, y_pred):
        y_pred = keras.ops.convert_to_tensor(y_pred)
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        if self.pos_weight is None:
            return keras.ops.mean(keras.ops.binary_crossentropy(y_true, y_pred), axis=-1)
        w = keras.ops.convert_to_tensor(self.pos_weight, dtype=y_pred.dtype)
        neg_log_p = keras.ops.binary_crossentropy(keras.ops.ones_like(y_pred), y_pred)
        neg_log_1mp = keras.ops.binary_crossentropy(keras.ops.zeros_like(y_pred), y_pred)
        per_class = w * y_true * neg_log_p + (1.0 - y_true) * neg_log_1mp
        return keras.ops.mean(per_class, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "pos_weight": self.pos_weight}


@keras.saving.register_keras_serializable(package="mlic")
class AsymmetricLoss(keras.losses.Loss):
    """Asymmetric loss (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021).

    Per label, with p the sigmoid probability and p_m = max(p - margin, 0) the shifted
    probability of a negative (eq. 4-5 of the paper):

        L+ = -(1 - p)^gamma_pos * log(p)              (y = 1)
        L- = -p_m^gamma_neg * log(1 - p_m)            (y = 0)

    averaged over classes, then over the batch. gamma_neg > gamma_pos focuses on the positives:
    easy negatives (small p) are down-weighted by p^gamma_neg, and a negative with p <= margin
    contributes nothing at all ("hard thresholding" of very easy negatives; it also rejects some
    mislabeled negatives, whose p is high). The paper's defaults are gamma_neg 4, gamma_pos 0,
    margin 0.05; gamma_pos = gamma_neg = margin = 0 is plain BCE.

    p is clipped to [eps, 1 - eps] before the logs (eps = `keras.config.epsilon()`, as Keras's
    BCE does) so an exact 0 or 1 stays finite, like the `clamp(min=eps)` of the authors' code.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        margin: float = 0.05,
        name: str = "asymmetric_loss",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"gamma_neg and gamma_pos must be >= 0, got {gamma_neg}, {gamma_pos}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self.gamma_neg, self.gamma_pos, self.margin = float(gamma_neg), float(gamma_pos), float(margin)

    def call(self, y_true, y_pred):
        y_pred = keras.ops.convert_to_tensor(y_pred)
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        eps = keras.config.epsilon()
        p = keras.ops.clip(y_pred, eps, 1.0 - eps)
        p_m = keras.ops.maximum(p - self.margin, 0.0)
        loss_pos = keras.ops.power(1.0 - p, self.gamma_pos) * keras.ops.log(p)
        # 1 - p_m >= 1 - (1 - eps - margin) > eps, so this log never sees 0.
        loss_neg = keras.ops.power(p_m, self.gamma_neg) * keras.ops.log(1.0 - p_m)
        per_label = -(y_true * loss_pos + (1.0 - y_true) * loss_neg)
        return keras.ops.mean(per_label, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma_neg": self.gamma_neg, "gamma_pos": self.gamma_pos,
                "margin": self.margin}


def positive_weights(train_prevalence: np.ndarray, max_weight: float = 10.0) -> np.ndarray:
    """w_k = (1 - p_k) / p_k, clipped to [1/max_weight, max_weight].

    Balances each class's positives against its negatives; the clip keeps a class with a
    handful of positives (or none) from dominating the loss.
    """
    p = np.asarray(train_prevalence, dtype=np.float64)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise ValueError("train_prevalence must be a 1-D array of fractions in [0, 1]")
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
    with np.errstate(divide="ignore"):
        w = (1.0 - p) / p  # p = 0 gives inf, clipped below
    return np.clip(w, 1.0 / max_weight, max_weight).astype(np.float32)


def make_loss(
    kind: str = "bce",
    *,
    pos_weight: np.ndarray | None = None,
    focal_gamma: float = 2.0,
    focal_alpha: float = 0.25,
    focal_class_balancing: bool = False,
    asl_gamma_neg: float = 4.0,
    asl_gamma_pos: float = 0.0,
    asl_margin: float = 0.05,
) -> keras.losses.Loss:
    """The loss named `kind` (one of LOSSES). pos_weight: weighted_bce only, one weight per class."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if kind == "weighted_bce":
        if pos_weight is None:
            raise ValueError("weighted_bce needs pos_weight (see positive_weights)")
        return WeightedBinaryCrossentropy(pos_weight)
    if pos_weight is not None:
        raise ValueError(f"pos_weight is for weighted_bce only, not {kind}")
    if kind == "focal":
        return keras.losses.BinaryFocalCrossentropy(
            apply_class_balancing=focal_class_balancing, alpha=focal_alpha, gamma=focal_gamma)
    if kind == "asl":
        return AsymmetricLoss(asl_gamma_neg, asl_gamma_pos, asl_margin)
    return WeightedBinaryCrossentropy(None)


def loss_from_params(cfg: Train, train_prevalence: np.ndarray) -> keras.losses.Loss:
    """`make_loss` as `params.yaml: train` asks for it; prevalence feeds weighted_bce's weights."""
    pos_weight = positive_weights(train_prevalence, cfg.max_pos_weight) if cfg.loss == "weighted_bce" else None
    return make_loss(cfg.loss, pos_weight=pos_weight, focal_gamma=cfg.focal_gamma, focal_alpha=cfg.focal_alpha,
                     focal_class_balancing=cfg.focal_class_balancing, asl_gamma_neg=cfg.asl_gamma_neg,
                     asl_gamma_pos=cfg.asl_gamma_pos, asl_margin=cfg.asl_margin)


def make_metrics(n_classes: int) -> list[keras.metrics.Metric]:
    """Per-epoch metrics for a multi-label sigmoid head (fresh objects on every call).

    Not the string "accuracy": Keras 3 maps it to CategoricalAccuracy on this head.
    F1Score needs an explicit threshold, else it takes the argmax (single-label).
    """
    return [
        keras.metrics.BinaryAccuracy(name="binary_accuracy", threshold=0.5),
        keras.metrics.AUC(curve="PR", multi_label=True, num_labels=n_classes, name="auc_pr"),
        keras.metrics.F1Score(average="macro", threshold=0.5, name="f1"),
    ]
