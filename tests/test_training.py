"""Tests for the training procedure (`mlic.training.fit`) on tiny TFRecords.

Everything is small: 40 images written as 32 px JPEG records (24 train, 8 val), batches of 8,
1-4 epochs, simple_cnn of width 8, or a MobileNetV2 built with weights=None whose weights are
saved to a local file and loaded back to play the pretrained backbone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import keras
import numpy as np
import pytest

import mlic.model  # noqa: F401 - registers the custom objects load_model needs
from mlic import dataset, devices, tfrecords, training
from mlic import model as mm
from mlic.params import Train

SIZE, BATCH, SEED = 32, 8, 5
SPLITS = {"train": range(0, 24), "val": range(24, 32)}  # as conftest's tiny_tfrecords writes them
# Every transform off: these tests are about the training loop, not augmentation.
NO_AUG = dict(augment_flip=False, augment_rotation=0.0, augment_zoom=0.0, augment_contrast=0.0)


@pytest.fixture(scope="module")
def tfr(tiny_tfrecords) -> tuple[Path, int]:
    """Tiny train/val TFRecords at 32 px (conftest's `tiny_tfrecords`): (folder, number of classes)."""
    return tiny_tfrecords(SIZE)


def config(**overrides) -> Train:
    """The default `train` section shrunk for tests, with `overrides` on top."""
    small = dict(batch_size=BATCH, epochs=2, early_stopping_patience=0, shuffle_buffer=64, **NO_AUG)
    return dataclasses.replace(Train(), **{**small, **overrides})


def run_fit(tfr, cfg: Train, checkpoint: Path, model: keras.Model | None = None, pretrained: bool = False):
    folder, k = tfr
    devices.set_seed(SEED)
    if model is None:
        model = mm.build_model("simple_cnn", k, SIZE, dropout=cfg.dropout, seed=SEED, width=8)
    train_epochs = functools.partial(dataset.make_dataset, tfrecords.Manifest.read(folder, "train"), cfg.batch_size,
                                     shuffle=True, seed=SEED, shuffle_buffer=cfg.shuffle_buffer)
    val_ds = dataset.make_dataset(tfrecords.Manifest.read(folder, "val"), cfg.batch_size)
    result = training.fit(model, train_epochs, val_ds, cfg=cfg, n_classes=k, n_train=len(SPLITS["train"]),
                          checkpoint=checkpoint, pretrained=pretrained)
    return model, result, val_ds


@pytest.mark.parametrize("monitor, mode", [("val_auc_pr", "max"), ("val_loss", "min"), ("loss", "min"),
                                           ("val_f1", "max")])
def test_monitor_mode_is_min_only_for_losses(monitor: str, mode: str) -> None:
    assert training.monitor_mode(monitor) == mode


def test_unknown_lr_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="constant or cosine"):
        training.learning_rate("linear", 0.1, 10)


@pytest.mark.parametrize(
    "schedule, monitor",
    [("cosine", "val_auc_pr"), ("constant", "val_loss")],
    ids=["cosine-max-auc", "constant-min-loss"],
)
def test_history_best_epoch_and_checkpoint(tfr, tmp_path: Path, schedule: str, monitor: str) -> None:
    epochs, lr0 = 3, 0.01
    cfg = config(epochs=epochs, lr_schedule=schedule, learning_rate=lr0, monitor=monitor)
    _, result, val_ds = run_fit(tfr, cfg, tmp_path / "best.keras")
    h = result.history

    # One row per epoch, numbered from 0, with the phase, learning rate and monitored metric.
    assert len(h) == epochs
    assert h["epoch"].tolist() == list(range(epochs))
    assert h["phase"].tolist() == ["full"] * epochs
    for column in ("loss", "val_loss", "auc_pr", "val_auc_pr", "f1", "val_f1", "learning_rate", monitor):
        assert column in h.columns, column
    assert np.isfinite(h[monitor]).all()

    lr = h["learning_rate"].to_numpy()
    if schedule == "constant":
        np.testing.assert_allclose(lr, lr0, rtol=1e-6)
    else:  # cosine to 0 over the phase, read at the end of each epoch: lr0 * (1 + cos(pi * (e+1)/E)) / 2
        expected = [lr0 * 0.5 * (1 + math.cos(math.pi * (e + 1) / epochs)) for e in range(epochs)]
        np.testing.assert_allclose(lr, expected, rtol=1e-5, atol=1e-9)
        assert (np.diff(lr) < 0).all()

    # Best epoch/value agree with the history, in the direction monitor_mode says (first if tied).
    values = h[monitor].to_numpy()
    best = int(np.argmax(values) if training.monitor_mode(monitor) == "max" else np.argmin(values))
    assert result.best_epoch == best
    assert result.best_value == pytest.approx(values[best], abs=0)
    assert result.images_seen == len(SPLITS["train"]) * epochs and result.seconds > 0
    # the CPU clock at each epoch's end (bench/quality.py's cost axis): one per epoch, never falling
    assert len(result.epoch_cpu_seconds) == epochs and np.all(np.diff(result.epoch_cpu_seconds) >= 0)
    assert "cpu" not in " ".join(h.columns)                 # the history stays reproducible

    # The checkpoint is a loadable .keras model holding the best epoch's weights.
    path = tmp_path / "best.keras"
    assert path.is_file()
    loaded = keras.models.load_model(path)
    scores = loaded.evaluate(val_ds, return_dict=True, verbose=0)
    assert scores[monitor.removeprefix("val_")] == pytest.approx(result.best_value, rel=1e-4, abs=1e-6)


def test_unknown_monitor_names_the_logged_metrics_before_training(tfr, tmp_path: Path, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking train.monitor")

    monkeypatch.setattr(keras.Model, "fit", no_training)
    cfg = config(epochs=1, monitor="val_acuracy")
    with pytest.raises(ValueError) as err:
        run_fit(tfr, cfg, tmp_path / "best.keras")
    message = str(err.value)
    assert "'val_acuracy'" in message
    for name in ("val_auc_pr", "val_loss", "val_f1", "auc_pr", "loss"):
        assert name in message, message


def test_early_stopping_stops_when_the_metric_cannot_improve(tfr, tmp_path: Path) -> None:
    # Learning rate 0 with the backbone frozen (BatchNorm in inference mode): the weights never
    # change, so the validation metric is the same every epoch and never improves after epoch 0.
    cfg = config(epochs=5, learning_rate=0.0, lr_schedule="constant", early_stopping_patience=1)
    _, result, _ = run_fit(tfr, cfg, tmp_path / "best.keras", pretrained=True)
    h = result.history
    assert len(h) == 2 < cfg.epochs  # epoch 0 sets the best, epoch 1 exhausts a patience of 1
    assert h["val_auc_pr"].nunique() == 1
    assert result.best_epoch == 0


def test_two_phase_fine_tuning_of_a_pretrained_backbone(tfr, tmp_path: Path, monkeypatch) -> None:
    _, k = tfr
    weights = tmp_path / "backbone.weights.h5"
    source = mm.build_backbone("mobilenet_v2", (SIZE, SIZE, 3))
    source.save_weights(weights)
    model = mm.build_model("mobilenet_v2", k, SIZE, weights=weights, seed=SEED)
    head = model.get_layer("probabilities")
    head_before = [w.copy() for w in head.get_weights()]

    # Snapshot the model at the start of phase 2, i.e. as phase 1 left it.
    after_phase1: dict[str, list[np.ndarray]] = {}
    unfreeze = mm.unfreeze_top

    def spy(m: keras.Model, n_layers: int) -> int:
        after_phase1["backbone"] = [w.copy() for w in m.get_layer(mm.BACKBONE_NAME).get_weights()]
        after_phase1["head"] = [w.copy() for w in m.get_layer("probabilities").get_weights()]
        return unfreeze(m, n_layers)

    monkeypatch.setattr(mm, "unfreeze_top", spy)
    cfg = config(backbone="mobilenet_v2", weights=str(weights), lr_schedule="constant",
                 epochs=1, learning_rate=0.01,
                 finetune_epochs=1, finetune_layers=5, finetune_learning_rate=0.001)
    _, result, _ = run_fit(tfr, cfg, tmp_path / "best.keras", model=model, pretrained=True)

    h = result.history
    assert h["phase"].tolist() == ["head", "finetune"]
    assert h["epoch"].tolist() == [0, 1]
    np.testing.assert_allclose(h["learning_rate"], [0.01, 0.001], rtol=1e-6)
    assert result.best_epoch in (0, 1) and (tmp_path / "best.keras").is_file()

    # Phase 1: the backbone (weights and BatchNorm statistics) is exactly the loaded file; the head learnt.
    assert after_phase1, "phase 2 never started"
    for ours, theirs in zip(after_phase1["backbone"], source.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert any(not np.array_equal(a, b) for a, b in zip(after_phase1["head"], head_before))

    # Phase 2: the top 5 layers are open except BatchNorm, which stays frozen everywhere.
    backbone = model.get_layer(mm.BACKBONE_NAME)
    top = backbone.layers[-5:]
    bns = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and not any(layer.trainable for layer in bns)
    assert [layer for layer in backbone.layers if layer.trainable] == [
        layer for layer in top if not isinstance(layer, keras.layers.BatchNormalization)]


def test_phase_2_starts_from_the_best_phase_1_weights(tfr, tmp_path: Path, monkeypatch) -> None:
    """The monitor's direction is reversed (the highest training loss is 'best') so the best
    phase-1 epoch is the first, not the last: phase 2 must start from that epoch's weights."""
    _, k = tfr
    weights = tmp_path / "backbone.weights.h5"
    mm.build_backbone("mobilenet_v2", (SIZE, SIZE, 3)).save_weights(weights)
    model = mm.build_model("mobilenet_v2", k, SIZE, weights=weights, seed=SEED)
    checkpoint = tmp_path / "best.keras"
    at_phase2: dict[str, bool] = {}
    unfreeze = mm.unfreeze_top

    def spy(m: keras.Model, n_layers: int) -> int:
        best = keras.models.load_model(checkpoint, compile=False)
        at_phase2["equal"] = all(np.array_equal(a, b) for a, b in zip(m.get_weights(), best.get_weights(), strict=True))
        return unfreeze(m, n_layers)

    monkeypatch.setattr(mm, "unfreeze_top", spy)
    monkeypatch.setattr(training, "monitor_mode", lambda monitor: "max")
    cfg = config(backbone="mobilenet_v2", weights=str(weights), lr_schedule="constant", monitor="loss",
                 epochs=3, learning_rate=0.01, finetune_epochs=1, finetune_layers=5, finetune_learning_rate=0.001)
    _, result, _ = run_fit(tfr, cfg, checkpoint, model=model, pretrained=True)
    phase1 = result.history[result.history["phase"] == "head"]
    assert int(phase1["loss"].to_numpy().argmax()) == 0  # the 'best' phase-1 epoch is not the last
    assert at_phase2 == {"equal": True}


# --------------------------------------------------------------------------- progressive resizing
BIG, SMALL = 64, 32  # shards' side and the progressive epochs' side (from-scratch minimum 32)


def fit_progressive(tiny_tfrecords, checkpoint: Path, monkeypatch: pytest.MonkeyPatch | None = None, **overrides):
    """fit() on 64 px shards, recording each `Model.fit` call: (input side, first epoch, end epoch,
    its callbacks' class names, whether it changed the model's trainable weights)."""
    folder, k = tiny_tfrecords(BIG)
    cfg = config(**{"epochs": 3, "learning_rate": 0.01, **overrides})
    devices.set_seed(SEED)
    model = mm.from_params(dataclasses.replace(cfg, width=8), k, BIG, SEED)
    calls: list[tuple[int, int, int]] = []
    if monkeypatch is not None:
        real_fit = keras.Model.fit

        def recording_fit(self, *args, **kwargs):
            before = [np.array(w) for w in model.trainable_weights]
            history = real_fit(self, *args, **kwargs)
            changed = any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.trainable_weights))
            calls.append((self.input_shape[1], kwargs["initial_epoch"], kwargs["epochs"],
                          sorted(type(c).__name__ for c in kwargs["callbacks"]), changed))
            return history

        monkeypatch.setattr(keras.Model, "fit", recording_fit)
    train_epochs = functools.partial(dataset.make_dataset, tfrecords.Manifest.read(folder, "train"), cfg.batch_size,
                                     shuffle=True, seed=SEED, shuffle_buffer=cfg.shuffle_buffer)
    val_ds = dataset.make_dataset(tfrecords.Manifest.read(folder, "val"), cfg.batch_size)
    result = training.fit(model, train_epochs, val_ds, cfg=cfg, n_classes=k, n_train=24, checkpoint=checkpoint)
    return model, result, calls


def test_progressive_resizing_trains_small_images_first_then_full_size(tiny_tfrecords, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model, result, calls = fit_progressive(tiny_tfrecords, tmp_path / "best.keras", monkeypatch,
                                           progressive_scale=0.5, progressive_fraction=0.5, epochs=4)
    h = result.history
    # Epochs 0-1 on 32 px images through the view, 2-3 on the 64 px model itself; the view's
    # updates land in the model's weights, and only full-size epochs checkpoint.
    assert [c[:3] for c in calls] == [(SMALL, 0, 2), (BIG, 2, 4)]
    assert [c[4] for c in calls] == [True, True]
    assert "ModelCheckpoint" not in calls[0][3] and "ModelCheckpoint" in calls[1][3]
    assert h["phase"].tolist() == ["progressive", "progressive", "full", "full"]
    assert np.isfinite(h["val_auc_pr"]).all()  # the small epochs are validated too (on small images)
    # One optimizer and one cosine schedule over all 4 epochs: no restart at the size change.
    lr0, steps = 0.01, math.ceil(24 / BATCH)
    expected = [lr0 * 0.5 * (1 + math.cos(math.pi * (e + 1) / 4)) for e in range(4)]
    np.testing.assert_allclose(h["learning_rate"], expected, rtol=1e-5, atol=1e-9)
    assert int(model.optimizer.iterations) == 4 * steps
    # The best epoch is a full-size one, and the checkpoint is the full-size model.
    assert result.best_epoch in (2, 3)
    assert result.best_value == h.loc[h["phase"] == "full", "val_auc_pr"].max()
    assert result.progressive == "32 px x 2 epochs"
    loaded = keras.models.load_model(tmp_path / "best.keras")
    assert loaded.input_shape == (None, BIG, BIG, 3)


def test_weight_decay_is_adamw_through_both_sizes_and_shrinks_the_weights(tiny_tfrecords, tmp_path: Path) -> None:
    # The attention head and AdamW together, as the defaults train: one AdamW across the size
    # change; with a huge decay and no learning signal left to fight it, the weights shrink.
    kw = dict(progressive_scale=0.5, progressive_fraction=0.5, epochs=2, pool="attention", attention_lambda=1.0)
    plain, _, _ = fit_progressive(tiny_tfrecords, tmp_path / "a.keras", **kw)
    decayed, result, _ = fit_progressive(tiny_tfrecords, tmp_path / "b.keras", weight_decay=5.0, **kw)
    assert isinstance(decayed.optimizer, keras.optimizers.AdamW) and decayed.optimizer.weight_decay == 5.0
    assert type(plain.optimizer) is keras.optimizers.Adam
    assert result.progressive == "32 px x 1 epochs"

    def norm(m: keras.Model) -> float:
        return float(np.sqrt(sum(np.sum(np.square(np.asarray(w))) for w in m.get_layer("backbone").trainable_weights)))

    assert norm(decayed) < 0.9 * norm(plain)


@pytest.mark.parametrize("overrides, size, plan, why", [
    (dict(progressive_scale=0.5, progressive_fraction=0.5), 160, (80, 40), None),
    (dict(progressive_scale=0.5, progressive_fraction=0.5, epochs=5), 64, (32, 3), None),  # halves round up
    (dict(progressive_scale=0.5, progressive_fraction=0.5, epochs=5), 65, (33, 3), None),
    (dict(progressive_scale=0.5, progressive_fraction=0.9, epochs=4), 64, (32, 3), None),  # the last at full size
    (dict(progressive_scale=0.0), 160, None, None),
    (dict(progressive_scale=0.5, epochs=1), 160, None, "progressive_fraction 0.5 of 1 epochs is no small epoch"),
    (dict(progressive_scale=0.5, progressive_fraction=0.0), 160, None, "progressive_fraction 0.0 of 80 epochs"),
    (dict(progressive_scale=0.5), 48, None, "24 px is not between strided_cnn's minimum 32 px"),
    (dict(progressive_scale=0.5, backbone="mobilenet_v2"), 224, None, "mobilenet_v2 is a keras.applications"),
])
def test_progressive_plan_says_when_it_does_not_apply(overrides, size, plan, why, caplog) -> None:
    cfg = dataclasses.replace(Train(), **{"backbone": "strided_cnn", "epochs": 80, **overrides})
    with caplog.at_level(logging.INFO, logger="mlic.training"):
        assert training.progressive_plan(cfg, size) == plan
    if why:
        assert f"progressive resizing off: {why}" in caplog.text
    else:
        assert "progressive resizing off" not in caplog.text


def test_any_size_is_for_from_scratch_backbones() -> None:
    with pytest.raises(ValueError, match="any_size takes a from-scratch backbone"):
        mm.build_model("mobilenet_v2", 3, 64, any_size=True)
    # from_params asks for it only where it applies: a pretrained family builds as before
    cfg = dataclasses.replace(Train(), backbone="mobilenet_v2", progressive_scale=0.5)
    assert mm.from_params(cfg, 3, 64, 0).get_layer(mm.BACKBONE_NAME).input_shape == (None, 64, 64, 3)


def test_small_epochs_downscale_before_augmenting(tiny_tfrecords) -> None:
    import tensorflow as tf

    from mlic.augment import Augmentation

    folder, _ = tiny_tfrecords(BIG)
    train = tfrecords.Manifest.read(folder, "train")
    plain = next(iter(dataset.make_dataset(train, BATCH)))[0]
    small = next(iter(dataset.make_dataset(train, BATCH, resize_to=SMALL)))[0]
    np.testing.assert_allclose(small, tf.image.resize(plain, (SMALL, SMALL), antialias=True), atol=1e-4)
    # augmented at the small side: the warps and colour changes run on 32 px images
    aug = Augmentation(flip=True, rotation=0.05, zoom=0.1, contrast=0.1, colour=True)
    augmented = next(iter(dataset.make_dataset(train, BATCH, shuffle=True, augment=aug, resize_to=SMALL)))[0]
    assert augmented.shape == (BATCH, SMALL, SMALL, 3)
    # the validation batches of small epochs: the same downscaling, applied to a finished dataset
    val_small = next(iter(dataset.downscaled(dataset.make_dataset(train, BATCH), SMALL)))[0]
    np.testing.assert_allclose(val_small, small, atol=1e-4)
