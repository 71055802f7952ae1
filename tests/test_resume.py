"""A training stopped after any epoch and started again ends as if it had never stopped.

`training.fit` is run three ways on tiny TFRecords (24 train / 8 val records at 32 px): through,
stopped by an exception raised after epoch k (the in-process stand-in for a kill), and resumed
from the state that left in the resume folder. The history, the best epoch and value and the
best checkpoint's weights must be those of the run that went through. Augmentation, dropout,
the cosine schedule and early stopping are on, so their restored state is checked too.

These runs do not switch op determinism on (it is process-wide and irreversible, and would leak
into the rest of the session): on CPU this tiny model repeats itself bit for bit anyway. The
kill -9 test in test_stages_model.py runs `train` as a process with `deterministic_ops: true`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import mlic.model  # noqa: F401 - registers the custom objects load_model needs
from mlic.augment import Augmentation
from mlic import dataset, devices, resume, tfrecords, training
from mlic import model as mm
from mlic.params import Train

SIZE, BATCH, SEED = 32, 8, 5
SPLITS = {"train": range(0, 24), "val": range(24, 32)}  # as conftest's tiny_tfrecords writes them


class Killed(Exception):
    """Raised by the test after an epoch's state is saved, as a kill would strike."""


@pytest.fixture(scope="module")
def tfr(tiny_tfrecords) -> tuple[Path, int]:
    """Tiny train/val TFRecords at 32 px (conftest's `tiny_tfrecords`): (folder, number of classes)."""
    return tiny_tfrecords(SIZE)


def config(**overrides) -> Train:
    """Small, with every source of state on: augmentation, dropout, cosine decay, early stopping."""
    small = dict(batch_size=BATCH, epochs=4, early_stopping_patience=3, shuffle_buffer=64, learning_rate=0.01)
    return dataclasses.replace(Train(), **{**small, **overrides})


def build(cfg: Train, k: int, size: int = SIZE) -> keras.Model:
    devices.set_seed(SEED)
    return mm.from_params(dataclasses.replace(cfg, width=8), k, size, SEED)


def run(tfr, cfg: Train, checkpoint: Path, saved: resume.Resume | None, kill_after: int | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None, pretrained: bool = False) -> tuple[keras.Model, training.TrainResult]:
    """fit() on a freshly built model; with `kill_after`, raise Killed once that epoch (0-based) is saved."""
    folder, k = tfr
    model = build(cfg, k, tfrecords.Manifest.read(folder, "train").image_size)
    train_epochs = functools.partial(dataset.make_dataset, tfrecords.Manifest.read(folder, "train"), cfg.batch_size,
                                     shuffle=True, seed=SEED, shuffle_buffer=cfg.shuffle_buffer,
                                     augment=Augmentation(cfg.augment_flip, cfg.augment_rotation, cfg.augment_zoom,
                                                          cfg.augment_contrast))
    val_ds = dataset.make_dataset(tfrecords.Manifest.read(folder, "val"), cfg.batch_size)
    if kill_after is not None:
        record = training.EpochRecorder.on_epoch_end

        def record_then_die(self, epoch, logs=None):
            record(self, epoch, logs)
            if epoch == kill_after:
                raise Killed(f"after epoch {epoch}")

        monkeypatch.setattr(training.EpochRecorder, "on_epoch_end", record_then_die)
    try:
        result = training.fit(model, train_epochs, val_ds, cfg=cfg, n_classes=k, n_train=len(SPLITS["train"]),
                              checkpoint=checkpoint, pretrained=pretrained, resume=saved)
    finally:
        if kill_after is not None:
            monkeypatch.undo()
    return model, result


def weights_of(path: Path) -> list[np.ndarray]:
    return keras.models.load_model(path, compile=False).get_weights()


def assert_same_training(got: training.TrainResult, want: training.TrainResult, got_ckpt: Path, want_ckpt: Path):
    pd.testing.assert_frame_equal(got.history, want.history, check_exact=True)
    assert (got.best_epoch, got.best_value) == (want.best_epoch, want.best_value)
    for a, b in zip(weights_of(got_ckpt), weights_of(want_ckpt), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def through(tfr, tmp_path_factory) -> tuple[training.TrainResult, Path]:
    """The reference: 4 epochs of simple_cnn in one go, saving resume states as it goes."""
    folder = tmp_path_factory.mktemp("through")
    ckpt = folder / "best.keras"
    _, result = run(tfr, config(), ckpt, resume.Resume(folder / "state"))
    return result, ckpt


def test_a_run_that_goes_through_repeats_itself(tfr, through, tmp_path: Path) -> None:
    # Without this, the equality below could not tell resuming from plain nondeterminism.
    want, want_ckpt = through
    _, got = run(tfr, config(), tmp_path / "best.keras", None)
    assert_same_training(got, want, tmp_path / "best.keras", want_ckpt)
    assert len(want.history) == 4 and want.history["val_auc_pr"].nunique() > 1


@pytest.mark.parametrize("kill_after", [0, 2])
def test_a_killed_fit_resumes_at_the_next_epoch_and_ends_the_same(
        tfr, through, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, kill_after: int) -> None:
    want, want_ckpt = through
    saved = resume.Resume(tmp_path / "resume" / "key")
    with pytest.raises(Killed):
        run(tfr, config(), tmp_path / "killed.keras", saved, kill_after, monkeypatch)
    assert [p.name for p in saved.folder.iterdir()] == [f"epoch-{kill_after + 1:04d}"]

    ckpt = tmp_path / "best.keras"  # a new temp checkpoint, as a new train process would have
    with caplog.at_level(logging.INFO, logger="mlic.training"):
        _, got = run(tfr, config(), ckpt, resume.Resume(saved.folder))
    assert f"resuming from epoch {kill_after + 2} ({kill_after + 1} epochs done)" in caplog.text
    assert_same_training(got, want, ckpt, want_ckpt)
    assert got.images_seen == len(SPLITS["train"]) * (4 - kill_after - 1)  # this process's epochs only


def test_a_state_saved_after_the_last_epoch_trains_no_more(tfr, through, tmp_path: Path, monkeypatch, caplog) -> None:
    want, want_ckpt = through
    saved = resume.Resume(tmp_path / "key")
    with pytest.raises(Killed):
        run(tfr, config(), tmp_path / "killed.keras", saved, kill_after=3, monkeypatch=monkeypatch)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again after the last epoch")

    monkeypatch.setattr(keras.Model, "fit", no_training)
    _, got = run(tfr, config(), tmp_path / "best.keras", resume.Resume(saved.folder))
    assert_same_training(got, want, tmp_path / "best.keras", want_ckpt)


def test_early_stopping_counters_survive_a_resume(tfr, tmp_path: Path, monkeypatch) -> None:
    # Learning rate 0: only BatchNorm statistics move, and the metric soon stops improving.
    cfg = config(epochs=8, learning_rate=0.0, lr_schedule="constant", early_stopping_patience=2)
    _, want = run(tfr, cfg, tmp_path / "through.keras", None)
    stop = len(want.history) - 1
    assert stop < cfg.epochs - 1 and want.best_epoch == stop - 2  # stopped by patience 2
    # Killed one epoch before the stop (EarlyStopping's wait is 1): a resumed run that forgot the
    # wait would train two more epochs instead of one.
    saved = resume.Resume(tmp_path / "key")
    with pytest.raises(Killed):
        run(tfr, cfg, tmp_path / "killed.keras", saved, kill_after=stop - 1, monkeypatch=monkeypatch)
    _, got = run(tfr, cfg, tmp_path / "best.keras", resume.Resume(saved.folder))
    pd.testing.assert_frame_equal(got.history, want.history, check_exact=True)


@pytest.fixture(scope="module")
def two_phase(tfr, tmp_path_factory) -> tuple[Train, keras.Model, training.TrainResult, Path]:
    """Fine-tuning in one go: 1 head epoch, then 2 with the top 5 backbone layers open. The
    simple_cnn plays the pretrained backbone (fit's two phases only need a layer named
    "backbone"): a MobileNetV2 would test the same steps at three times the cost."""
    folder = tmp_path_factory.mktemp("two_phase")
    cfg = config(epochs=1, finetune_epochs=2, finetune_layers=5, finetune_learning_rate=0.001)
    model, result = run(tfr, cfg, folder / "through.keras", None, pretrained=True)
    assert result.history["phase"].tolist() == ["head", "finetune", "finetune"]
    return cfg, model, result, folder / "through.keras"


@pytest.mark.parametrize("kill_after", [0, 1], ids=["end-of-phase-1", "inside-phase-2"])
def test_two_phase_fine_tuning_resumes_in_the_right_phase(tfr, two_phase, tmp_path: Path, monkeypatch, caplog,
                                                          kill_after: int) -> None:
    cfg, model_a, want, want_ckpt = two_phase
    saved = resume.Resume(tmp_path / "key")
    with pytest.raises(Killed):
        run(tfr, cfg, tmp_path / "killed.keras", saved, kill_after, monkeypatch, pretrained=True)
    with caplog.at_level(logging.INFO, logger="mlic.training"):
        model_b, got = run(tfr, cfg, tmp_path / "best.keras", resume.Resume(saved.folder), pretrained=True)
    assert f"resuming from epoch {kill_after + 2} ({kill_after + 1} epochs done)" in caplog.text
    assert "phase 2: 4 backbone layers trainable" in caplog.text  # the top was opened again
    assert_same_training(got, want, tmp_path / "best.keras", want_ckpt)
    # The same layers open, and the same optimizer state (its step count too) at the end.
    def flags(m: keras.Model) -> list[bool]:
        return [x.trainable for x in m.layers + m.get_layer(mm.BACKBONE_NAME).layers]

    assert flags(model_b) == flags(model_a) and any(flags(model_a)) and not all(flags(model_a))
    assert int(model_b.optimizer.iterations) == int(model_a.optimizer.iterations) == 2 * 3
    for a, b in zip(model_b.optimizer.variables, model_a.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def progressive(tiny_tfrecords, tmp_path_factory) -> tuple[tuple[Path, int], Train, keras.Model, training.TrainResult, Path]:
    """Progressive resizing in one go on 64 px shards: 2 epochs at 32 px, then 2 at 64."""
    folder = tmp_path_factory.mktemp("progressive")
    tfr64 = tiny_tfrecords(64)
    cfg = config(progressive_scale=0.5, progressive_fraction=0.5)
    model, result = run(tfr64, cfg, folder / "through.keras", None)
    assert result.history["phase"].tolist() == ["progressive"] * 2 + ["full"] * 2
    return tfr64, cfg, model, result, folder / "through.keras"


@pytest.mark.parametrize("kill_after", [0, 1, 2], ids=["inside-small", "at-the-size-change", "inside-full"])
def test_progressive_resizing_resumes_on_either_side_of_the_size_change(progressive, tmp_path: Path, monkeypatch,
                                                                        kill_after: int) -> None:
    tfr64, cfg, model_a, want, want_ckpt = progressive
    saved = resume.Resume(tmp_path / "key")
    with pytest.raises(Killed):
        run(tfr64, cfg, tmp_path / "killed.keras", saved, kill_after, monkeypatch)
    model_b, got = run(tfr64, cfg, tmp_path / "best.keras", resume.Resume(saved.folder))
    assert_same_training(got, want, tmp_path / "best.keras", want_ckpt)
    # The one optimizer of both sizes, its step count and moments, came back whole.
    assert int(model_b.optimizer.iterations) == int(model_a.optimizer.iterations) == 4 * 3
    for a, b in zip(model_b.optimizer.variables, model_a.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_key_changes_with_params_seed_data_and_code_but_not_with_the_resume_switch(monkeypatch) -> None:
    base = dataclasses.asdict(Train())
    data = {"train": "aaa", "val": "bbb"}
    key = resume.resume_key(base, 1, data)
    assert key == resume.resume_key({**base, "resume": False}, 1, data)
    assert key != resume.resume_key({**base, "epochs": 41}, 1, data)
    assert key != resume.resume_key(base, 2, data)
    assert key != resume.resume_key(base, 1, {**data, "val": "ccc"})
    monkeypatch.setattr(resume, "code_fingerprint", lambda: "edited")
    assert key != resume.resume_key(base, 1, data)


def test_a_state_that_does_not_fit_the_model_starts_over_with_a_warning(
        tfr, tmp_path: Path, monkeypatch, caplog) -> None:
    # Another architecture under the same key (say, a width changed in code between the kill and
    # the re-run): nothing is assigned, the run starts at epoch 1.
    saved = resume.Resume(tmp_path / "key")
    cfg = config(epochs=1)
    folder, k = tfr
    small = mm.build_model("simple_cnn", k, SIZE, seed=SEED, width=4)
    small.compile(optimizer="adam", loss="binary_crossentropy")
    saved.save(small, epochs_done=1, phase="full", rows=[], stopped=[], best=None, early_stopping=None,
               checkpoint=tmp_path / "none.keras")
    with caplog.at_level(logging.INFO):
        _, result = run(tfr, cfg, tmp_path / "best.keras", resume.Resume(saved.folder))
    assert "do not match this model" in caplog.text and "training from the start" in caplog.text
    assert "resuming" not in caplog.text
    assert result.history["epoch"].tolist() == [0]


def test_an_unreadable_state_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    broken = tmp_path / "key" / "epoch-0002"
    broken.mkdir(parents=True)
    (broken / resume.STATE_FILE).write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert resume.Resume(tmp_path / "key").load() is None
    assert "training from the start" in caplog.text


def test_clear_removes_this_state_and_stale_ones(tmp_path: Path) -> None:
    root = tmp_path / ".mlic" / "train-resume"
    (root / "ours" / "epoch-0001").mkdir(parents=True)
    (root / "stale" / "epoch-0007").mkdir(parents=True)
    resume.Resume(root / "ours").clear()
    assert not root.exists() and (tmp_path / ".mlic").is_dir()


@pytest.fixture
def mixed_policy():
    """mixed_float16 for one test (compile wraps the optimizer in a LossScaleOptimizer), then float32."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("progressive", [False, True], ids=["one-size", "progressive"])
def test_mixed_precision_resumes_with_its_loss_scale(tiny_tfrecords, mixed_policy, tmp_path: Path, monkeypatch,
                                                     progressive: bool) -> None:
    # The saved optimizer state is the wrapper's (loss scale, then Adam's slots): it must go back
    # into the wrapper the resumed model compiles, whichever model (the view or the full one) holds it.
    tfr64 = tiny_tfrecords(64)
    cfg = config(epochs=3, **({"progressive_scale": 0.5, "progressive_fraction": 0.5} if progressive else {}))
    _, want = run(tfr64, cfg, tmp_path / "through.keras", None)
    saved = resume.Resume(tmp_path / "key")
    with pytest.raises(Killed):
        run(tfr64, cfg, tmp_path / "killed.keras", saved, 0, monkeypatch)
    model_b, got = run(tfr64, cfg, tmp_path / "best.keras", resume.Resume(saved.folder))
    assert isinstance(model_b.optimizer, keras.optimizers.LossScaleOptimizer)
    assert_same_training(got, want, tmp_path / "best.keras", tmp_path / "through.keras")
