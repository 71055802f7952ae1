"""Tests for mlic.losses: the four losses against their formulas, serialisation, the factory and
the per-epoch Keras metrics. Tiny arrays and models (32 px, weights=None), CPU only."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import typing

import keras
import numpy as np
import pytest
from sklearn.metrics import f1_score

from mlic import losses
from mlic import model as mm
from mlic.params import Train

SIZE = 32
N_CLASSES = 3


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def labels(n: int, k: int = N_CLASSES, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, k)) < 0.4).astype("float32")


# --------------------------------------------------------------------------- weighted BCE
def test_unweighted_loss_equals_keras_binary_crossentropy():
    rng = np.random.default_rng(0)
    y_true = labels(16, 5)
    y_pred = rng.random((16, 5)).astype("float32")
    y_pred[0, :2] = [0.0, 1.0]  # exact 0/1 must stay finite (clipping)
    ours = float(losses.make_loss("bce")(y_true, y_pred))
    keras_bce = float(keras.losses.BinaryCrossentropy()(y_true, y_pred))
    assert np.isfinite(ours)
    assert ours == pytest.approx(keras_bce, rel=1e-6)


def test_unweighted_loss_equals_keras_bce_inside_a_model():
    # In a model Keras recovers the logits behind the sigmoid; the custom loss must too.
    x, y = images(16), labels(16)
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8)
    model.compile(loss=losses.make_loss("bce"))
    ours = model.evaluate(x, y, batch_size=16, verbose=0)
    model.compile(loss=keras.losses.BinaryCrossentropy())
    assert ours == pytest.approx(model.evaluate(x, y, batch_size=16, verbose=0), rel=1e-6)


def test_weighted_loss_matches_the_formula():
    y_true = np.array([[1, 0, 1], [0, 1, 0]], dtype="float32")
    y_pred = np.array([[0.9, 0.2, 0.3], [0.4, 0.6, 0.1]], dtype="float32")
    w = np.array([2.0, 1.0, 5.0], dtype="float32")
    per_class = -(w * y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred))
    expected = per_class.mean(axis=1).mean()
    assert float(losses.make_loss("weighted_bce", pos_weight=w)(y_true, y_pred)) == pytest.approx(expected, rel=1e-5)


def test_weighted_loss_serialises():
    loss = losses.make_loss("weighted_bce", pos_weight=np.array([1.5, 3.0]))
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, losses.WeightedBinaryCrossentropy)
    assert clone.get_config() == loss.get_config()


@pytest.mark.parametrize(
    "prevalence, expected",
    [
        ([0.5, 0.1, 0.25], [1.0, 9.0, 3.0]),
        ([0.01, 0.0], [10.0, 10.0]),  # rare or absent classes are capped
        ([0.9, 1.0], [1 / 9, 0.1]),  # common classes are down-weighted, floor 1/max_weight
    ],
)
def test_positive_weights(prevalence, expected):
    weights = losses.positive_weights(np.array(prevalence), max_weight=10.0)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


@pytest.mark.parametrize("prevalence", [[-0.1], [1.5], [[0.5]], [np.nan]])
def test_positive_weights_rejects_non_fractions(prevalence):
    with pytest.raises(ValueError):
        losses.positive_weights(np.array(prevalence))


# --------------------------------------------------------------------------- metrics
def test_metrics_give_binary_accuracy_and_macro_f1():
    y_true = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype="float32")
    y_pred = np.array(
        [[0.9, 0.2, 0.4], [0.6, 0.7, 0.8], [0.3, 0.55, 0.1], [0.1, 0.45, 0.95]], dtype="float32"
    )
    metrics = {m.name: m for m in losses.make_metrics(3)}
    assert list(metrics) == ["binary_accuracy", "auc_pr", "f1"]
    for metric in metrics.values():
        metric.update_state(y_true, y_pred)

    hard = (y_pred >= 0.5).astype("float32")
    assert float(metrics["binary_accuracy"].result()) == pytest.approx((hard == y_true).mean())
    assert float(metrics["binary_accuracy"].result()) == pytest.approx(9 / 12)
    expected_f1 = f1_score(y_true, hard, average="macro")
    assert float(metrics["f1"].result()) == pytest.approx(expected_f1, abs=1e-6)
    assert 0.0 <= float(metrics["auc_pr"].result()) <= 1.0


# --------------------------------------------------------------------------- asymmetric loss
def asl_reference(y, p, gamma_neg=4.0, gamma_pos=0.0, margin=0.05, eps=1e-7):
    """Ridnik et al. 2021, eq. (4)-(5), transcribed in NumPy, loop-free but term by term.

    L+ = (1 - p)^g+ log(p);  L- = p_m^g- log(1 - p_m),  p_m = max(p - m, 0)  (the "clip");
    loss = -y L+ - (1 - y) L-, averaged over labels then images. p is first clipped to
    [eps, 1 - eps] like Keras's BCE (and the authors' clamp(min=eps)).
    """
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(y, dtype=np.float64)
    p_m = np.maximum(p - margin, 0.0)
    l_pos = (1 - p) ** gamma_pos * np.log(p)
    l_neg = p_m ** gamma_neg * np.log(1 - p_m)
    return float(np.mean(-(y * l_pos + (1 - y) * l_neg)))


ASL_CASES = [
    pytest.param(dict(), id="paper-defaults"),
    pytest.param(dict(gamma_neg=2.0, gamma_pos=1.0, margin=0.2), id="both-focused-wide-margin"),
    pytest.param(dict(gamma_neg=0.0, gamma_pos=0.0, margin=0.0), id="plain-bce"),
]


@pytest.mark.parametrize("kwargs", ASL_CASES)
def test_asl_matches_the_papers_formula(kwargs):
    rng = np.random.default_rng(1)
    y = labels(32, 6, seed=2)
    p = rng.random((32, 6)).astype("float32")
    p[0, :4] = [0.0, 1.0, 0.03, 0.049]  # exact 0/1 stay finite; negatives below the margin count 0
    ours = float(losses.AsymmetricLoss(**kwargs)(y, p))
    assert np.isfinite(ours)
    assert ours == pytest.approx(asl_reference(y, p, **kwargs), rel=1e-5)


def test_asl_with_no_focusing_and_no_margin_is_bce():
    y, p = labels(16, 5), np.random.default_rng(3).uniform(0.01, 0.99, (16, 5)).astype("float32")
    asl = float(losses.AsymmetricLoss(0.0, 0.0, 0.0)(y, p))
    assert asl == pytest.approx(float(keras.losses.BinaryCrossentropy()(y, p)), rel=1e-5)


def test_asl_ignores_negatives_below_the_margin_and_spares_easy_negatives():
    loss = losses.AsymmetricLoss(gamma_neg=4.0, gamma_pos=0.0, margin=0.05)
    y = np.zeros((1, 3), "float32")
    assert float(loss(y, np.array([[0.01, 0.04, 0.05]], "float32"))) == 0.0
    bce = keras.losses.BinaryCrossentropy()
    easy = np.array([[0.2, 0.2, 0.2]], "float32")
    assert float(loss(y, easy)) < 0.01 * float(bce(y, easy))
    # a positive is plain -log p when gamma_pos = 0
    assert float(loss(np.ones((1, 1), "float32"), np.array([[0.3]], "float32"))) == pytest.approx(-np.log(0.3), rel=1e-5)


def test_asl_gradient_pushes_positives_up_and_hard_negatives_down():
    import tensorflow as tf

    y = tf.constant([[1.0, 0.0, 0.0]])
    p = tf.Variable([[0.4, 0.6, 0.02]])
    with tf.GradientTape() as tape:
        value = losses.AsymmetricLoss()(y, p)
    grad = tape.gradient(value, p).numpy()[0]
    assert grad[0] < 0 < grad[1]  # raise the positive, lower the hard negative
    assert grad[2] == 0.0  # below the margin: no signal at all


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma_neg=-1.0), "gamma"), (dict(margin=1.0), "margin"), (dict(margin=-0.1), "margin"),
])
def test_asl_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.AsymmetricLoss(**kwargs)


def test_asl_serialises():
    loss = losses.AsymmetricLoss(3.0, 1.0, 0.1)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, losses.AsymmetricLoss)
    assert clone.get_config() == loss.get_config()
    assert (clone.gamma_neg, clone.gamma_pos, clone.margin) == (3.0, 1.0, 0.1)


# --------------------------------------------------------------------------- save and load, every loss
LOADER = textwrap.dedent(
    """
    import sys

    import keras
    import numpy as np

    import mlic.losses  # registers mlic's losses, as the project's own code does
    from mlic.model import load_model

    path, x = sys.argv[1], np.load(sys.argv[2])
    compiled = keras.models.load_model(path)  # with its loss: no custom_objects needed
    print("LOSS", type(compiled.loss).__name__, compiled.loss.get_config()["name"])
    plain = load_model(path)  # what evaluate and the packaged model do
    np.testing.assert_allclose(plain.predict(x, verbose=0), compiled.predict(x, verbose=0))
    np.save(sys.argv[3], plain.predict(x, verbose=0))
    """
)


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_a_model_trained_with_each_loss_saves_and_loads_in_a_fresh_process(tmp_path, kind):
    x, y = images(32), labels(32)
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8)
    pos_weight = np.array([1.0, 2.0, 3.0]) if kind == "weighted_bce" else None
    loss = losses.make_loss(kind, pos_weight=pos_weight)
    model.compile(optimizer="adam", loss=loss, metrics=losses.make_metrics(N_CLASSES))
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.models.load_model(path)  # in this process: the loss comes back as configured
    assert type(loaded.loss) is type(loss)
    assert loaded.loss.get_config() == loss.get_config()

    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([sys.executable, "-c", LOADER, str(path), str(tmp_path / "x.npy"),
                             str(tmp_path / "p.npy")], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"LOSS {type(loss).__name__}" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- factory
def test_focal_is_keras_binary_focal_crossentropy_with_the_params():
    loss = losses.make_loss("focal", focal_gamma=3.0, focal_alpha=0.4, focal_class_balancing=True)
    assert isinstance(loss, keras.losses.BinaryFocalCrossentropy)
    assert (loss.gamma, loss.alpha, loss.apply_class_balancing) == (3.0, 0.4, True)
    y, p = labels(8), np.random.default_rng(0).uniform(0.01, 0.99, (8, 3)).astype("float32")
    # Lin et al.: -alpha_t (1 - p_t)^gamma log p_t, averaged over labels and images
    p_t = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, 0.4, 0.6)
    expected = np.mean(-alpha_t * (1 - p_t) ** 3.0 * np.log(p_t))
    assert float(loss(y, p)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind, cls", [
    ("bce", losses.WeightedBinaryCrossentropy), ("focal", keras.losses.BinaryFocalCrossentropy),
    ("asl", losses.AsymmetricLoss),
])
def test_make_loss_builds_each_kind(kind, cls):
    assert type(losses.make_loss(kind)) is cls


def test_make_loss_rejects_unknown_kinds_and_misplaced_weights():
    with pytest.raises(ValueError, match="unknown loss"):
        losses.make_loss("hinge")
    with pytest.raises(ValueError, match="needs pos_weight"):
        losses.make_loss("weighted_bce")
    with pytest.raises(ValueError, match="weighted_bce only"):
        losses.make_loss("asl", pos_weight=np.ones(3))


def test_loss_from_params_reads_the_train_section():
    prevalence = np.array([0.5, 0.1, 0.01])
    weighted = losses.loss_from_params(Train(loss="weighted_bce", max_pos_weight=5.0), prevalence)
    assert weighted.pos_weight == pytest.approx([1.0, 5.0, 5.0])
    asl = losses.loss_from_params(Train(loss="asl", asl_gamma_neg=2.0, asl_gamma_pos=1.0, asl_margin=0.1), prevalence)
    assert (asl.gamma_neg, asl.gamma_pos, asl.margin) == (2.0, 1.0, 0.1)
    focal = losses.loss_from_params(Train(loss="focal", focal_gamma=1.5), prevalence)
    assert focal.gamma == 1.5
    assert losses.loss_from_params(Train(loss="bce"), prevalence).pos_weight is None


def test_the_loss_choices_of_params_are_exactly_the_built_ones():
    assert set(typing.get_args(typing.get_type_hints(Train)["loss"])) == set(losses.LOSSES)
