"""Tests for mlic.model: tiny images (32 px), weights=None, CPU only."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score

from mlic import model as mm

SIZE = 32
N_CLASSES = 3
ALL_BACKBONES = sorted(mm.BACKBONES)


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Raw RGB images, float32 in 0..255, as the tf.data reader yields them."""
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def labels(n: int, k: int = N_CLASSES, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, k)) < 0.4).astype("float32")


def compiled_cnn(pos_weight=None, augmentation=None, seed: int = 0) -> keras.Model:
    model = mm.build_model(
        "simple_cnn", N_CLASSES, SIZE, augmentation=augmentation, seed=seed, width=8
    )
    model.compile(optimizer="adam", loss=mm.make_loss(pos_weight), metrics=mm.make_metrics(N_CLASSES))
    return model


@pytest.fixture
def float32_policy():
    """Restore the global dtype policy whatever a test sets."""
    yield
    keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------- building
@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_every_backbone_builds_and_outputs_probabilities(name):
    model = mm.build_model(name, N_CLASSES, SIZE)
    assert model.output.shape == (None, N_CLASSES)
    assert model.get_layer(mm.BACKBONE_NAME).name == "backbone"
    probs = model.predict(images(2), verbose=0)
    assert probs.shape == (2, N_CLASSES) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "nope"}, "unknown backbone"),
        ({"weights": "imagenet"}, "trained from scratch"),
        ({"n_classes": 0}, "n_classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"backbone": "vgg16", "image_size": 16}, "at least 32 px"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs, message):
    args = {"backbone": "simple_cnn", "n_classes": N_CLASSES, "image_size": SIZE, **kwargs}
    with pytest.raises(ValueError, match=message):
        mm.build_model(args.pop("backbone"), args.pop("n_classes"), args.pop("image_size"), **args)


def test_head_stays_float32_under_mixed_precision(float32_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, augmentation=mm.Augmentation(), width=8)
    assert model.get_layer("backbone").layers[1].compute_dtype == "float16"
    assert model.get_layer("preprocess").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    assert model.predict(images(2), verbose=0).dtype == np.float32


# --------------------------------------------------------------------------- preprocessing
KERAS_PREPROCESS = {
    "simple_cnn": lambda x: x / 255.0,
    "mobilenet_v2": keras.applications.mobilenet_v2.preprocess_input,
    "efficientnet_b0": keras.applications.efficientnet.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "resnet50_v2": keras.applications.resnet_v2.preprocess_input,
    "vgg16": keras.applications.vgg16.preprocess_input,
    "vgg19": keras.applications.vgg19.preprocess_input,
}


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_in_model_preprocessing_matches_keras_applications(name):
    x = images(2)
    layer = mm.build_preprocessing(name)
    ours = x if layer is None else keras.ops.convert_to_numpy(layer(x))
    # preprocess_input edits float numpy arrays in place: give it a copy.
    expected = KERAS_PREPROCESS[name](x.copy())
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch"])
def test_preprocessing_layer_matches_imagenet_utils_and_round_trips(mode):
    x = images(2)
    layer = mm.ImagenetPreprocessing(mode)
    expected = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode=mode)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-4)
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, mm.ImagenetPreprocessing) and clone.mode == mode


def test_preprocessing_layer_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        mm.ImagenetPreprocessing("bgr")


# --------------------------------------------------------------------------- train, save, load
def test_fit_save_load_gives_identical_predictions(tmp_path):
    x, y = images(64), labels(64)
    model = compiled_cnn(pos_weight=np.array([1.0, 2.0, 3.0]), augmentation=mm.Augmentation())
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for key in ("loss", "binary_accuracy", "auc_pr", "f1"):
        assert np.all(np.isfinite(history.history[key])), key

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: importing mlic.model registers them

    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert isinstance(loaded.loss, mm.WeightedBinaryCrossentropy)
    assert loaded.loss.pos_weight == [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- augmentation
def test_augmentation_is_first_and_identity_at_inference():
    x = images(4)
    augmented = mm.build_model("simple_cnn", N_CLASSES, SIZE, augmentation=mm.Augmentation(), width=8)
    plain = mm.build_model("simple_cnn", N_CLASSES, SIZE, augmentation=None, width=8)
    assert augmented.layers[1].name == mm.AUGMENTATION_NAME
    assert mm.AUGMENTATION_NAME not in [layer.name for layer in plain.layers]
    plain.set_weights(augmented.get_weights())  # seed state is not a weight: the lists line up

    first = augmented.predict(x, verbose=0)
    np.testing.assert_array_equal(first, augmented.predict(x, verbose=0))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(augmented(x, training=False)),
        keras.ops.convert_to_numpy(plain(x, training=False)),
        rtol=1e-6,
    )


def test_augmentation_changes_images_in_training():
    x = images(4)
    aug = mm.build_augmentation(mm.Augmentation(), seed=0)
    out = keras.ops.convert_to_numpy(aug(x, training=True))
    assert out.shape == x.shape
    assert not np.allclose(out, x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(aug(x, training=False)), x)


@pytest.mark.parametrize(
    "setting, layer_class",
    [
        (mm.Augmentation(flip=True, rotation=0, zoom=0, contrast=0), keras.layers.RandomFlip),
        (mm.Augmentation(flip=False, rotation=0.1, zoom=0, contrast=0), keras.layers.RandomRotation),
        (mm.Augmentation(flip=False, rotation=0, zoom=0.1, contrast=0), keras.layers.RandomZoom),
        (mm.Augmentation(flip=False, rotation=0, zoom=0, contrast=0.2), keras.layers.RandomContrast),
    ],
)
def test_each_augmentation_switches_on_alone(setting, layer_class):
    aug = mm.build_augmentation(setting, seed=0)
    assert [type(layer) for layer in aug.layers] == [layer_class]


def test_all_augmentation_off_gives_no_block():
    assert mm.build_augmentation(mm.Augmentation(False, 0, 0, 0), seed=0) is None


def test_augmentation_is_reproducible_from_one_seed():
    x = images(4)

    def run(seed):
        return keras.ops.convert_to_numpy(mm.build_augmentation(mm.Augmentation(), seed)(x, training=True))

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    seeds = [layer.seed for layer in mm.build_augmentation(mm.Augmentation(), 1).layers]
    assert len(set(seeds)) == len(seeds) and 1 not in seeds


# --------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def mobilenet():
    return mm.build_model("mobilenet_v2", N_CLASSES, SIZE)


def _bn_layers(backbone):
    return [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_freeze_backbone_leaves_only_the_head_trainable(mobilenet):
    mm.freeze_backbone(mobilenet)
    head = mobilenet.get_layer("probabilities")
    assert [id(w) for w in mobilenet.trainable_weights] == [id(w) for w in head.trainable_weights]


@pytest.mark.parametrize("n_layers", [0, 20, 10_000])
def test_unfreeze_top_opens_top_layers_but_never_batchnorm(mobilenet, n_layers):
    mm.freeze_backbone(mobilenet)
    n_trainable = mm.unfreeze_top(mobilenet, n_layers)
    backbone = mobilenet.get_layer("backbone")
    top = backbone.layers[max(len(backbone.layers) - n_layers, 0):]
    expected = [layer for layer in top if not isinstance(layer, keras.layers.BatchNormalization)]
    assert n_trainable == len(expected)
    assert [layer for layer in backbone.layers if layer.trainable] == expected
    assert not any(layer.trainable for layer in _bn_layers(backbone))
    if n_layers == 10_000:
        # Every conv layer is in play; only BN gamma/beta stay frozen.
        n_bn_params = sum(len(layer.trainable_variables) for layer in _bn_layers(backbone))
        assert n_bn_params == 0 and len(backbone.trainable_weights) > 0


def test_frozen_batchnorm_keeps_its_statistics_while_fine_tuning():
    # simple_cnn: a randomly initialised MobileNetV2 with inference-mode BN outputs ~1e-12
    # features, so its gradients (and Adam steps) are too small to see.
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8)
    mm.unfreeze_top(model, 10_000)
    model.compile(optimizer="adam", loss=mm.make_loss())
    backbone = model.get_layer("backbone")
    bns = _bn_layers(backbone)
    before = [keras.ops.convert_to_numpy(bn.moving_mean).copy() for bn in bns]
    conv = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D))
    conv_before = keras.ops.convert_to_numpy(conv.kernel).copy()
    model.fit(images(8), labels(8), batch_size=8, epochs=1, verbose=0)
    for bn, mean in zip(bns, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), mean)
    # ...while the convolutions did learn.
    assert not np.allclose(keras.ops.convert_to_numpy(conv.kernel), conv_before)


def test_unfreeze_top_rejects_negative_count(mobilenet):
    with pytest.raises(ValueError):
        mm.unfreeze_top(mobilenet, -1)


# --------------------------------------------------------------------------- weights
def test_missing_weights_file_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        mm.build_model("mobilenet_v2", N_CLASSES, SIZE, weights=tmp_path / "nope.weights.h5")


@pytest.mark.parametrize("filename", ["mobilenet.weights.h5", "mobilenet_notop.h5"])
def test_local_weights_file_is_loaded_into_the_backbone(tmp_path, filename):
    source = mm.build_backbone("mobilenet_v2", (SIZE, SIZE, 3))
    path = tmp_path / filename
    _save_weights(source, path)
    model = mm.build_model("mobilenet_v2", N_CLASSES, SIZE, weights=path)
    for ours, theirs in zip(model.get_layer("backbone").get_weights(), source.get_weights()):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_file_of_another_architecture_gives_a_clear_error(tmp_path):
    path = tmp_path / "vgg.weights.h5"
    mm.build_backbone("vgg16", (SIZE, SIZE, 3)).save_weights(path)
    with pytest.raises(ValueError, match="could not load weights"):
        mm.build_model("mobilenet_v2", N_CLASSES, SIZE, weights=path)


def _save_weights(model: keras.Model, path) -> None:
    """Keras 3 `.weights.h5`, or the legacy `.h5` layout of keras.applications' *_notop.h5 files."""
    if str(path).endswith(".weights.h5"):
        model.save_weights(path)
        return
    h5py = pytest.importorskip("h5py")
    try:
        from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group
    except ImportError:  # private API: skip rather than fail when Keras moves it
        pytest.skip("keras legacy h5 writer not available")
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)


@pytest.mark.parametrize("filename", ["efficientnet.weights.h5", "efficientnet_notop.h5"])
def test_efficientnet_weights_file_gets_the_imagenet_std_folded_in(tmp_path, filename):
    # The official file stores the ImageNet std as the Normalization variance (tensorflow#49930).
    source = mm.build_backbone("efficientnet_b0", (SIZE, SIZE, 3))
    norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_mean.assign(np.array([0.485, 0.456, 0.406]))
    norm.adapt_variance.assign(np.array([0.229, 0.224, 0.225]))
    path = tmp_path / filename
    _save_weights(source, path)

    backbone = mm.build_backbone("efficientnet_b0", (SIZE, SIZE, 3), weights=path)
    norm = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization))
    pixel = np.full((1, 1, 1, 3), 0.5, dtype="float32")  # after the backbone's own Rescaling(1/255)
    expected = (0.5 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm(pixel)).ravel(), expected, rtol=1e-4)


def test_imagenet_download_failure_is_wrapped_with_advice(monkeypatch):
    # Offline, keras raises a plain Exception("URL fetch failure ...") within a second; fake it
    # so the test never touches the network (and cannot hang or download on a connected machine).
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid: None -- no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(RuntimeError, match=r"~/.keras/models.*local file path") as info:
        mm.build_model("mobilenet_v2", N_CLASSES, 96, weights="imagenet")
    assert "URL fetch failure" in str(info.value)


# --------------------------------------------------------------------------- loss
def test_unweighted_loss_equals_keras_binary_crossentropy():
    rng = np.random.default_rng(0)
    y_true = labels(16, 5)
    y_pred = rng.random((16, 5)).astype("float32")
    y_pred[0, :2] = [0.0, 1.0]  # exact 0/1 must stay finite (clipping)
    ours = float(mm.make_loss(None)(y_true, y_pred))
    keras_bce = float(keras.losses.BinaryCrossentropy()(y_true, y_pred))
    assert np.isfinite(ours)
    assert ours == pytest.approx(keras_bce, rel=1e-6)


def test_unweighted_loss_equals_keras_bce_inside_a_model():
    # In a model Keras recovers the logits behind the sigmoid; the custom loss must too.
    x, y = images(16), labels(16)
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8)
    model.compile(loss=mm.make_loss(None))
    ours = model.evaluate(x, y, batch_size=16, verbose=0)
    model.compile(loss=keras.losses.BinaryCrossentropy())
    assert ours == pytest.approx(model.evaluate(x, y, batch_size=16, verbose=0), rel=1e-6)


def test_weighted_loss_matches_the_formula():
    y_true = np.array([[1, 0, 1], [0, 1, 0]], dtype="float32")
    y_pred = np.array([[0.9, 0.2, 0.3], [0.4, 0.6, 0.1]], dtype="float32")
    w = np.array([2.0, 1.0, 5.0], dtype="float32")
    per_class = -(w * y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred))
    expected = per_class.mean(axis=1).mean()
    assert float(mm.make_loss(w)(y_true, y_pred)) == pytest.approx(expected, rel=1e-5)


def test_weighted_loss_serialises():
    loss = mm.make_loss(np.array([1.5, 3.0]))
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, mm.WeightedBinaryCrossentropy)
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
    weights = mm.positive_weights(np.array(prevalence), max_weight=10.0)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


@pytest.mark.parametrize("prevalence", [[-0.1], [1.5], [[0.5]], [np.nan]])
def test_positive_weights_rejects_non_fractions(prevalence):
    with pytest.raises(ValueError):
        mm.positive_weights(np.array(prevalence))


# --------------------------------------------------------------------------- metrics
def test_metrics_give_binary_accuracy_and_macro_f1():
    y_true = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype="float32")
    y_pred = np.array(
        [[0.9, 0.2, 0.4], [0.6, 0.7, 0.8], [0.3, 0.55, 0.1], [0.1, 0.45, 0.95]], dtype="float32"
    )
    metrics = {m.name: m for m in mm.make_metrics(3)}
    assert list(metrics) == ["binary_accuracy", "auc_pr", "f1"]
    for metric in metrics.values():
        metric.update_state(y_true, y_pred)

    hard = (y_pred >= 0.5).astype("float32")
    assert float(metrics["binary_accuracy"].result()) == pytest.approx((hard == y_true).mean())
    assert float(metrics["binary_accuracy"].result()) == pytest.approx(9 / 12)
    expected_f1 = f1_score(y_true, hard, average="macro")
    assert float(metrics["f1"].result()) == pytest.approx(expected_f1, abs=1e-6)
    assert 0.0 <= float(metrics["auc_pr"].result()) <= 1.0


# --------------------------------------------------------------------------- devices, seeds
def test_configure_devices_auto_on_cpu(float32_policy):
    config = mm.configure_devices()
    assert config.gpus == len(tf.config.list_physical_devices("GPU"))
    if config.gpus == 0:
        assert not config.mixed_precision and not config.jit_compile
        assert not isinstance(config.strategy, tf.distribute.MirroredStrategy)
    assert keras.mixed_precision.global_policy().name == (
        "mixed_float16" if config.mixed_precision else "float32"
    )


def test_configure_devices_forced_switches(float32_policy):
    config = mm.configure_devices(mixed_precision="on", jit_compile="off")
    assert config.mixed_precision and not config.jit_compile
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    mm.configure_devices(mixed_precision="off")
    assert keras.mixed_precision.global_policy().name == "float32"
    # Unquoted on/off in YAML arrive as booleans.
    assert mm.configure_devices(mixed_precision=False, jit_compile=True).jit_compile is True
    with pytest.raises(ValueError, match="auto"):
        mm.configure_devices(mixed_precision="yes")


def test_make_strategy_is_default_for_one_device():
    assert mm.make_strategy(0) is tf.distribute.get_strategy()
    assert mm.make_strategy(1) is tf.distribute.get_strategy()


def test_set_seed_reproduces_initial_weights(monkeypatch):
    calls = []
    # Op determinism is process-wide and irreversible: record the call instead of making it.
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: calls.append(1))
    mm.set_seed(7, deterministic_ops=True)
    first = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8).get_weights()
    mm.set_seed(7)
    second = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8).get_weights()
    assert calls == [1]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf

    # Must run before TF initialises its devices, hence a fresh process.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    from mlic import model as mm

    mm.set_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    per_replica = 4
    global_batch = per_replica * strategy.num_replicas_in_sync
    x = np.random.default_rng(0).uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    y = (np.random.default_rng(1).random((32, 3)) < 0.4).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
    with strategy.scope():
        model = mm.build_model("simple_cnn", 3, 32, augmentation=mm.Augmentation(), width=8)
        model.compile(optimizer="adam", loss=mm.make_loss(np.ones(3)), metrics=mm.make_metrics(3))
    history = model.fit(ds, epochs=1, verbose=0)
    loss = history.history["loss"][-1]
    assert np.isfinite(loss), loss
    print("LOSS", loss)
    """
)


def test_mirrored_strategy_trains_on_two_logical_cpus():
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOSS" in result.stdout


def test_summary_text_does_not_depend_on_the_terminal(monkeypatch) -> None:
    """train writes it as a DVC output: a terminal and CI must write the same bytes."""
    model = mm.build_model("simple_cnn", 3, 32, augmentation=None, seed=0)
    texts = set()
    for columns in ("60", "300"):
        monkeypatch.setenv("COLUMNS", columns)
        texts.add(mm.summary_text(model))
        assert __import__("os").environ["COLUMNS"] == columns   # restored
    assert len(texts) == 1 and "Total params" in texts.pop()


def test_the_backbone_choices_of_params_are_exactly_the_built_ones() -> None:
    import typing

    from mlic.params import Train

    assert set(typing.get_args(typing.get_type_hints(Train)["backbone"])) == set(mm.BACKBONES)
