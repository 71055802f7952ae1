"""Tests for mlic.model: tiny images (32 px), weights=None, CPU only."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from mlic import losses
from mlic import model as mm

SIZE = 32
N_CLASSES = 3
ALL_BACKBONES = sorted(mm.BACKBONES)


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Raw RGB images, float32 in 0..255, as the tf.data reader yields them."""
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def labels(n: int, k: int = N_CLASSES, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, k)) < 0.4).astype("float32")


def compiled_cnn(pos_weight=None, seed: int = 0) -> keras.Model:
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, seed=seed, width=8)
    model.compile(optimizer="adam", loss=losses.make_loss("bce" if pos_weight is None else "weighted_bce", pos_weight=pos_weight),
                  metrics=losses.make_metrics(N_CLASSES))
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
        ({"backbone": "resnet_small", "weights": "imagenet"}, "trained from scratch"),
        ({"pool": "mean"}, "unknown pool"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs, message):
    args = {"backbone": "simple_cnn", "n_classes": N_CLASSES, "image_size": SIZE, **kwargs}
    with pytest.raises(ValueError, match=message):
        mm.build_model(args.pop("backbone"), args.pop("n_classes"), args.pop("image_size"), **args)


@pytest.mark.parametrize("pool", ["avg", "attention"])
def test_head_stays_float32_under_mixed_precision(float32_policy, pool):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8, pool=pool)
    assert model.get_layer("backbone").layers[1].compute_dtype == "float16"
    if pool == "attention":  # a softmax over a score map in float16 would saturate
        assert model.get_layer("class_maps").compute_dtype == model.get_layer("pool").compute_dtype == "float32"
    assert model.get_layer("preprocess").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    assert model.predict(images(2), verbose=0).dtype == np.float32


# The keras.applications backbones that normalise inside themselves: the model adds no layer and
# the backbone's own first layers do what keras' preprocess_input would (identity here) expect.
SELF_NORMALISING = ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnetv2_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", SELF_NORMALISING)
def test_self_normalising_backbones_take_raw_pixels(name):
    assert mm.build_preprocessing(name) is None
    backbone = mm.build_backbone(name, (SIZE, SIZE, 3))
    first = [type(layer).__name__ for layer in backbone.layers[1:3]]
    assert "Rescaling" in first or "Normalization" in first, first


@pytest.mark.parametrize("pool, width", [("avg", 64), ("max", 64), ("avgmax", 128)])
def test_pool_head(pool, width):
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8, pool=pool)
    assert model.get_layer("pool").output.shape == (None, width)  # simple_cnn width 8 ends with 64 channels
    feature_map = model.get_layer("backbone").predict(images(2) / 255.0, verbose=0)  # simple_cnn: x/255 first
    pooled = keras.Model(model.input, model.get_layer("pool").output).predict(images(2), verbose=0)
    expected = {"avg": [feature_map.mean((1, 2))], "max": [feature_map.max((1, 2))],
                "avgmax": [feature_map.mean((1, 2)), feature_map.max((1, 2))]}[pool]
    np.testing.assert_allclose(pooled, np.concatenate(expected, axis=-1), rtol=1e-5, atol=1e-6)


def test_resnet_small_keeps_full_resolution_in_the_stem_and_downsamples_by_its_strides():
    backbone = mm.build_backbone("resnet_small", (64, 64, 3), width=8)
    assert backbone.get_layer("stem_conv").output.shape == (None, 64, 64, 8)
    side = 64 // int(np.prod(mm.RESNET_SMALL_STRIDES))
    assert backbone.output.shape == (None, side, side, 64)
    adds = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == sum(mm.RESNET_SMALL_BLOCKS)
    # each block starts as the identity on its residual branch (zero-initialised last BN gamma)
    for add in adds:
        bn = backbone.get_layer(add.name.replace("_add", "_bn2"))
        assert not np.any(keras.ops.convert_to_numpy(bn.gamma))


def test_strided_cnn_halves_the_side_in_its_stem_and_ends_at_a_32nd():
    backbone = mm.build_backbone("strided_cnn", (128, 128, 3), width=8)
    assert backbone.get_layer("stem_conv").output.shape == (None, 64, 64, 16)
    assert backbone.output.shape == (None, 4, 4, 64)
    # its blocks are simple_cnn's, so at twice the side it has simple_cnn's feature map
    assert mm.build_backbone("simple_cnn", (64, 64, 3), width=8).output.shape == (None, 4, 4, 64)


@pytest.mark.parametrize("name", ["resnet_small", "strided_cnn", "mobilenet_v3_small", "efficientnetv2_b0"])
def test_new_backbones_train_save_and_load(tmp_path, name):
    x, y = images(16), labels(16)
    model = mm.build_model(name, N_CLASSES, SIZE, width=8, pool="avgmax")
    model.compile(optimizer="adam", loss=losses.make_loss("asl"), metrics=losses.make_metrics(N_CLASSES))
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = mm.load_model(path)
    assert loaded.get_layer(mm.BACKBONE_NAME).name == "backbone"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_fine_tuning_finds_the_backbone_of_a_renamed_application():
    # EfficientNetV2 is built under its own name (its block layout is looked up by it) and renamed.
    model = mm.build_model("efficientnetv2_b0", N_CLASSES, SIZE)
    mm.freeze_backbone(model)
    assert not model.get_layer("backbone").trainable
    assert mm.unfreeze_top(model, 5) > 0


# --------------------------------------------------------------------------- preprocessing
KERAS_PREPROCESS = {
    "simple_cnn": lambda x: x / 255.0,
    "resnet_small": lambda x: x / 255.0,
    "strided_cnn": lambda x: x / 255.0,
    "mobilenet_v2": keras.applications.mobilenet_v2.preprocess_input,
    # these four normalise inside the backbone: their preprocess_input is the identity
    "mobilenet_v3_small": keras.applications.mobilenet_v3.preprocess_input,
    "mobilenet_v3_large": keras.applications.mobilenet_v3.preprocess_input,
    "efficientnet_b0": keras.applications.efficientnet.preprocess_input,
    "efficientnetv2_b0": keras.applications.efficientnet_v2.preprocess_input,
    "convnext_tiny": keras.applications.convnext.preprocess_input,
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


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_attention_head_is_the_mean_plus_lambda_times_the_attention_of_each_class_map(tmp_path, lam):
    # CSRA (Zhu & Wu 2021) written out in numpy: per class, mean of the score map + lam * the
    # softmax(map)-weighted sum of the map; lam 0 is global average pooling then the classifier.
    model = mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8, pool="attention", attention_lambda=lam, dropout=0.5)
    x = images(4)
    maps = keras.Model(model.input, model.get_layer("class_maps").output).predict(x, verbose=0)
    assert maps.shape == (4, 2, 2, N_CLASSES)  # simple_cnn: a 16th of 32 px
    s = maps.reshape(4, -1, N_CLASSES)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    logits = s.mean(axis=1) + lam * (w * s).sum(axis=1)
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    if lam == 0:  # = avg pooling + Dense: the 1x1 conv's kernel is the Dense kernel
        features = model.get_layer("backbone").predict(x / 255.0, verbose=0).mean((1, 2))
        kernel, bias = model.get_layer("class_maps").get_weights()
        np.testing.assert_allclose(logits, features @ kernel[0, 0] + bias, rtol=1e-4, atol=1e-5)
    model.save(tmp_path / "m.keras")
    loaded = mm.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), probs)
    assert loaded.get_layer("pool").lam == lam
    with pytest.raises(ValueError, match="lam must be >= 0"):
        mm.ClassAttentionPool(-1.0)


@pytest.mark.parametrize("tta_flip, augment_flip, flips", [(True, True, True), (True, False, False),
                                                          (False, True, False)])
def test_the_saved_model_flips_only_when_asked_and_trained_on_flips(tta_flip, augment_flip, flips):
    from mlic.params import Train

    assert mm.flips_at_test_time(Train(tta_flip=tta_flip, augment_flip=augment_flip)) is flips


def test_flip_tta_keeps_float32_pixels_under_mixed_precision(float32_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    tta = mm.with_flip_tta(mm.build_model("simple_cnn", N_CLASSES, SIZE, width=8))
    assert tta.get_layer("flip").compute_dtype == "float32" and tta.output.dtype == "float32"
    x = images(2) + 0.3  # not integers: float16 would round them
    symmetric = (x + x[:, :, ::-1]) / 2  # its own mirror image: both branches must see the same pixels
    out = tta.predict(symmetric, verbose=0)
    np.testing.assert_array_equal(out, tta.predict(symmetric[:, :, ::-1], verbose=0))


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror_with_the_same_weights(tmp_path):
    model = mm.build_model("strided_cnn", N_CLASSES, SIZE, width=4, pool="attention", seed=3)
    tta = mm.with_flip_tta(model)
    x = images(3)
    want = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(tta.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)
    assert {id(v) for v in tta.weights} == {id(v) for v in model.weights}
    assert tta.count_params() == model.count_params()
    tta.save(tmp_path / "m.keras")
    loaded = mm.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), tta.predict(x, verbose=0))
    assert loaded.output.dtype == "float32"


# --------------------------------------------------------------------------- train, save, load
def test_fit_save_load_gives_identical_predictions(tmp_path):
    x, y = images(64), labels(64)
    model = compiled_cnn(pos_weight=np.array([1.0, 2.0, 3.0]))
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for key in ("loss", "binary_accuracy", "auc_pr", "f1"):
        assert np.all(np.isfinite(history.history[key])), key

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: importing mlic.losses/model registers them

    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert isinstance(loaded.loss, losses.WeightedBinaryCrossentropy)
    assert loaded.loss.pos_weight == [1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- XLA
@pytest.mark.parametrize("name", ["simple_cnn", "resnet_small", "mobilenet_v3_small"])
def test_model_holds_no_random_layer_and_supports_xla(name):
    """Augmentation lives in tf.data (augment.py): a random layer in the model would make Keras
    drop a requested jit_compile (RandomRotation/RandomZoom have no XLA kernel)."""
    from keras.src.trainers.trainer import model_supports_jit

    model = mm.build_model(name, N_CLASSES, SIZE, width=8)
    layers = list(model._flatten_layers())
    assert not any(type(layer).__name__.startswith("Random") for layer in layers)
    assert all(layer.supports_jit for layer in layers)
    assert model_supports_jit(model) or tf_op_determinism()


def tf_op_determinism() -> bool:
    from tensorflow.python.framework.config import is_op_determinism_enabled

    return is_op_determinism_enabled()


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
    model.compile(optimizer="adam", loss=losses.make_loss())
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


def test_summary_text_does_not_depend_on_the_terminal(monkeypatch) -> None:
    """train writes it as a DVC output: a terminal and CI must write the same bytes."""
    model = mm.build_model("simple_cnn", 3, 32, seed=0)
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


def test_the_pool_choices_of_params_are_exactly_the_built_ones() -> None:
    import typing

    from mlic.params import Train

    assert set(typing.get_args(typing.get_type_hints(Train)["pool"])) == set(mm.POOLS)


@pytest.mark.parametrize("pool", ["avgmax", "attention"])
def test_an_any_size_model_is_the_same_function_and_its_view_shares_every_weight(tmp_path, pool) -> None:
    # Progressive resizing builds the backbone for any side: the model must stay what it was (the
    # same function at its own size, saved and loaded like any model), and the view must train it.
    fixed = mm.build_model("strided_cnn", 3, 64, width=4, seed=1, pool=pool)
    free = mm.build_model("strided_cnn", 3, 64, width=4, seed=1, pool=pool, any_size=True)
    free.set_weights(fixed.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    want = fixed.predict(x, verbose=0)
    np.testing.assert_allclose(free.predict(x, verbose=0), want, atol=1e-6)
    free.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.input_shape == (None, 64, 64, 3)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-6)

    # built for any side, it still refuses what a fixed-size build refuses
    with pytest.raises(ValueError, match="weights must be None"):
        mm.build_model("strided_cnn", 3, 64, weights="backbone.weights.h5", any_size=True)
    with pytest.raises(ValueError, match="needs images of at least 32 px"):
        mm.build_model("strided_cnn", 3, 16, any_size=True)

    view = mm.resized_view(free, 32)
    assert view.input_shape == (None, 32, 32, 3) and view.output_shape == (None, 3)
    assert {id(v) for v in view.weights} == {id(v) for v in free.weights}
