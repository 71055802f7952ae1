"""The model for the `train` stage: augmentation + preprocessing + backbone + sigmoid head.

The saved `.keras` model takes raw RGB images, float32 in 0..255, shape (H, W, 3), and returns
one sigmoid probability per class. Each backbone's own `preprocess_input` convention lives
inside the model as a registered layer, so callers can never preprocess twice.

Layer layout (names are used by `freeze_backbone` / `unfreeze_top` and by tests):
    image -> augmentation (training only) -> preprocess -> backbone -> pool -> dropout -> probabilities

Importing this module registers every custom object (package "mlic"), so
`keras.models.load_model(path)` needs no `custom_objects`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

BACKBONE_NAME = "backbone"
# simple_cnn filters in its first block (then x2 per block). 16 learnt the built-in sample as
# well as 24 or 32 (val AUC-PR ~0.40 after 12 epochs on 1,500 images at 96 px for all three)
# while training 2-4x faster on 2 CPU cores: cost grows with width squared.
SIMPLE_CNN_WIDTH = 16
AUGMENTATION_NAME = "augmentation"

# ImageNet statistics used by keras.applications.imagenet_utils (RGB order, 0..1 scale for torch).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- preprocessing
@keras.saving.register_keras_serializable(package="mlic")
class ImagenetPreprocessing(keras.layers.Layer):
    """`keras.applications.imagenet_utils.preprocess_input` as a serialisable layer.

    mode: "tf" (x/127.5 - 1), "caffe" (RGB->BGR, minus the ImageNet BGR mean) or
    "torch" (x/255, minus mean, over std). Input is RGB in 0..255, channels last.
    A registered layer rather than a Lambda because Lambda layers do not round-trip safely
    through `.keras` files (their code is not stored, and loading is unsafe by default).
    """

    MODES = ("tf", "caffe", "torch")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            x = keras.ops.flip(x, axis=-1)  # RGB -> BGR
            return x - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
        mean = keras.ops.convert_to_tensor(_TORCH_MEAN_RGB, dtype=x.dtype)
        std = keras.ops.convert_to_tensor(_TORCH_STD_RGB, dtype=x.dtype)
        return (x / 255.0 - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


# --------------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: its keras.applications constructor and input convention."""

    factory: Callable[..., keras.Model] | None  # None: simple_cnn, built here
    # An ImagenetPreprocessing mode, "unit" (Rescaling 1/255) or None (the backbone normalises itself).
    preprocess: str | None
    min_size: int = 32


BACKBONES: dict[str, BackboneSpec] = {
    "simple_cnn": BackboneSpec(None, "unit"),
    "mobilenet_v2": BackboneSpec(keras.applications.MobileNetV2, "tf"),
    # EfficientNet has Rescaling + Normalization as its first layers; its preprocess_input is a no-op.
    "efficientnet_b0": BackboneSpec(keras.applications.EfficientNetB0, None),
    "resnet50": BackboneSpec(keras.applications.ResNet50, "caffe"),
    "resnet50_v2": BackboneSpec(keras.applications.ResNet50V2, "tf"),
    "vgg16": BackboneSpec(keras.applications.VGG16, "caffe"),
    "vgg19": BackboneSpec(keras.applications.VGG19, "caffe"),
}


def _simple_cnn(input_shape: tuple[int, int, int], width: int) -> keras.Model:
    """Four VGG-style blocks of two Conv-BN-ReLU and a MaxPool (width, 2w, 4w, 8w filters).

    Two convolutions per block, at 64 px, learn the sample's shapes far faster than one per block
    at 96 px for the same CPU time (val AUC-PR 0.76 vs 0.52 after 40 epochs, 250 s vs 410 s).
    """
    inputs = keras.Input(shape=input_shape, name="backbone_input")
    x = inputs
    for i, filters in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
        for j in (1, 2):
            # No conv bias: the following BatchNorm's beta does the same job.
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv{j}")(x)
            x = keras.layers.BatchNormalization(name=f"block{i}_bn{j}")(x)
            x = keras.layers.ReLU(name=f"block{i}_relu{j}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return keras.Model(inputs, x, name=BACKBONE_NAME)


def _fold_efficientnet_imagenet_std(backbone: keras.Model) -> None:
    """Fix EfficientNet ImageNet weights loaded from a file into a weights=None build.

    Keras stores the ImageNet *std* as the Normalization layer's variance and, only when built
    with weights="imagenet", adds a Rescaling(1/sqrt(std)) after it (tensorflow#49930). A
    weights=None build lacks that layer, so loading the official file from a path would
    normalise by sqrt(std) instead of std. Folding it in as variance = std**2 gives the same
    result. A file saved from a model we already fixed has variance std**2, so this is a no-op.
    """
    norm = next(
        (layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization)), None
    )
    if norm is None:
        return
    variance = np.asarray(keras.ops.convert_to_numpy(norm.adapt_variance)).reshape(-1)
    if np.allclose(variance, _TORCH_STD_RGB, atol=1e-4):
        norm.adapt_variance.assign(np.square(variance).reshape(norm.adapt_variance.shape))
        # Normalization caches mean/variance as tensors at finalize time; refresh them.
        norm.finalize_state()
        log.info("efficientnet: folded the ImageNet std rescaling into the Normalization layer")


def load_backbone_weights(
    backbone: keras.Model, path: str | Path, skip_mismatch: bool = False
) -> None:
    """Load a local `.weights.h5` (Keras 3) or legacy `.h5` file into `backbone`.

    Both formats are matched by layer order/type, not by the auto-generated layer names
    (which get suffixes like `_1` when several models are built in one process).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file not found: {path}. Give the path of a local .h5 / "
            ".weights.h5 file, 'imagenet' to download, or null for random initialisation."
        )
    try:
        backbone.load_weights(str(path), skip_mismatch=skip_mismatch)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(
            f"could not load weights from {path} into backbone {backbone.name!r}: {err}. "
            "The file must be saved from the same architecture without its top "
            "(include_top=False), e.g. keras.applications' *_notop.h5 files."
        ) from err


def build_backbone(
    name: str,
    input_shape: tuple[int, int, int],
    weights: str | Path | None = None,
    width: int = SIMPLE_CNN_WIDTH,
) -> keras.Model:
    """Build the feature extractor named `name` (no top, no pooling), named "backbone".

    weights: None (random init) | "imagenet" (download into ~/.keras/models) | a local file path.
    width: simple_cnn only, filters of its first block.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    if min(input_shape[:2]) < spec.min_size:
        raise ValueError(f"{name} needs images of at least {spec.min_size} px, got {input_shape}")
    if spec.factory is None:
        if weights is not None:
            raise ValueError(f"{name} is trained from scratch: weights must be None, got {weights!r}")
        return _simple_cnn(input_shape, width)

    if weights == "imagenet":
        try:
            return spec.factory(
                include_top=False, weights="imagenet", input_shape=input_shape, name=BACKBONE_NAME
            )
        except Exception as err:  # keras raises a plain Exception ("URL fetch failure") offline
            raise RuntimeError(
                f"could not get ImageNet weights for {name}: {err}. Offline? Put the file from "
                "the URL above into ~/.keras/models (or $KERAS_HOME/models; building this model "
                "once on a connected machine does it), or set weights to a local file path."
            ) from err

    backbone = spec.factory(include_top=False, weights=None, input_shape=input_shape, name=BACKBONE_NAME)
    if weights is not None:
        load_backbone_weights(backbone, weights)
        if name.startswith("efficientnet"):
            _fold_efficientnet_imagenet_std(backbone)
        log.info("loaded %s weights from %s", name, weights)
    return backbone


# --------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augmentation:
    """In-graph augmentation, active only in training. 0 / False switches a transform off.

    rotation: fraction of a full turn (0.05 = up to +-18 degrees); zoom: fraction in and out;
    contrast: contrast factor range 1 +- contrast.
    """

    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    contrast: float = 0.1

    @property
    def enabled(self) -> bool:
        return bool(self.flip or self.rotation or self.zoom or self.contrast)


def _derive_seed(seed: int, index: int) -> int:
    # Distinct, reproducible per-layer seeds that do not collide with `seed` itself (which also
    # drives split and shuffling): equal seeds in two layers would correlate their transforms.
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] % (2**31 - 1))


def build_augmentation(aug: Augmentation, seed: int) -> keras.Sequential | None:
    """A Sequential of the enabled random layers, or None when all are off."""
    layers: list[keras.layers.Layer] = []
    # float32 compute so mixed precision starts at the backbone, not at the 0..255 pixels.
    common = {"dtype": "float32"}
    if aug.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=_derive_seed(seed, 1), **common))
    if aug.rotation:
        layers.append(keras.layers.RandomRotation(aug.rotation, seed=_derive_seed(seed, 2), **common))
    if aug.zoom:
        layers.append(keras.layers.RandomZoom(aug.zoom, seed=_derive_seed(seed, 3), **common))
    if aug.contrast:
        # value_range matches our raw 0..255 input; the layer clips to it.
        layers.append(
            keras.layers.RandomContrast(
                aug.contrast, value_range=(0, 255), seed=_derive_seed(seed, 4), **common
            )
        )
    if not layers:
        return None
    return keras.Sequential(layers, name=AUGMENTATION_NAME)


# --------------------------------------------------------------------------- full model
def build_preprocessing(backbone: str) -> keras.layers.Layer | None:
    """The layer mapping raw 0..255 RGB to what `backbone` expects, or None (EfficientNet).

    Computes in float32 even under mixed precision: caffe mean subtraction on 0..255 values
    would lose ~0.1 per pixel in float16; the backbone casts afterwards.
    """
    mode = BACKBONES[backbone].preprocess
    if mode is None:
        return None
    if mode == "unit":
        return keras.layers.Rescaling(1.0 / 255.0, dtype="float32", name="preprocess")
    return ImagenetPreprocessing(mode, dtype="float32", name="preprocess")


def build_model(
    backbone: str,
    n_classes: int,
    image_size: int | tuple[int, int],
    *,
    weights: str | Path | None = None,
    dropout: float = 0.2,
    augmentation: Augmentation | None = None,
    seed: int = 0,
    width: int = SIMPLE_CNN_WIDTH,
) -> keras.Model:
    """Build the full model: raw 0..255 RGB in, `n_classes` sigmoid probabilities out.

    augmentation: None or an all-off Augmentation means no augmentation block.
    width: simple_cnn only. The head is GAP -> Dropout -> Dense(sigmoid) in float32 so the
    output stays float32 under a mixed_float16 policy.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    input_shape = (h, w, 3)

    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = inputs
    aug = build_augmentation(augmentation, seed) if augmentation is not None else None
    if aug is not None:
        x = aug(x)
    preprocess = build_preprocessing(backbone)
    if preprocess is not None:
        x = preprocess(x)
    x = build_backbone(backbone, input_shape, weights=weights, width=width)(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, seed=_derive_seed(seed, 5), name="dropout")(x)
    outputs = keras.layers.Dense(
        n_classes, activation="sigmoid", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name=f"mlic_{backbone}")


SUMMARY_WIDTH = 100  # characters per line of `summary_text`


def summary_text(model: keras.Model) -> str:
    """Keras's layer-by-layer summary of `model` (nested models expanded), as text.

    The same model gives the same text anywhere: Keras and rich size the table to the terminal
    (`COLUMNS`, else its width, else 80), which would make `train`'s summary file, a DVC output,
    differ between a terminal and CI. Both read COLUMNS, so it is pinned for the call.
    """
    lines: list[str] = []
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(SUMMARY_WIDTH)
    try:
        model.summary(print_fn=lambda line, **_: lines.append(line), expand_nested=True,
                      line_length=SUMMARY_WIDTH)
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before
    return "\n".join(lines) + "\n"


def load_model(path: str | Path) -> keras.Model:
    """Load a `.keras` model built here, for inference (compile=False: no loss or optimizer).

    Importing this module registered the custom layers, so no `custom_objects` are needed.
    """
    return keras.models.load_model(path, compile=False)


# --------------------------------------------------------------------------- fine-tuning
def _backbone_of(model: keras.Model) -> keras.Model:
    try:
        return model.get_layer(BACKBONE_NAME)
    except ValueError as err:
        raise ValueError(f"model {model.name!r} has no layer named {BACKBONE_NAME!r}") from err


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1: train the head only. Recompile the model afterwards."""
    # A frozen BatchNormalization runs in inference mode in Keras 3, so its statistics stay put.
    _backbone_of(model).trainable = False


def unfreeze_top(model: keras.Model, n_layers: int) -> int:
    """Phase 2: make the top `n_layers` backbone layers trainable, BatchNorm excluded.

    Counts layers in `backbone.layers` order (weightless ones included, as in the keras.io
    fine-tuning recipe). Every BatchNormalization stays non-trainable, hence in inference mode:
    updating its statistics with small batches would wreck the pretrained features.
    Returns how many layers were made trainable. Recompile the model afterwards.
    """
    if n_layers < 0:
        raise ValueError(f"n_layers must be >= 0, got {n_layers}")
    backbone = _backbone_of(model)
    backbone.trainable = True  # needed: a frozen parent model overrides its layers' flags
    layers = backbone.layers
    cut = max(len(layers) - n_layers, 0)
    n_trainable = 0
    for i, layer in enumerate(layers):
        layer.trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        n_trainable += layer.trainable
    return n_trainable


# --------------------------------------------------------------------------- loss
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


def make_loss(pos_weight: np.ndarray | None = None) -> keras.losses.Loss:
    """Binary cross-entropy, with positives of class k weighted by pos_weight[k] if given."""
    return WeightedBinaryCrossentropy(pos_weight)


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


# --------------------------------------------------------------------------- metrics
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


# --------------------------------------------------------------------------- devices, seeds
@dataclass(frozen=True)
class DeviceConfig:
    """What `configure_devices` resolved: pass jit_compile to `compile`, build in strategy.scope()."""

    gpus: int
    mixed_precision: bool
    jit_compile: bool
    strategy: tf.distribute.Strategy


def _resolve_switch(value: str | bool, name: str, default: bool) -> bool:
    # YAML 1.1 (PyYAML) reads unquoted on/off as booleans, so accept True/False as on/off.
    if isinstance(value, bool):
        return value
    if value == "auto":
        return default
    if value in ("on", "off"):
        return value == "on"
    raise ValueError(f"{name} must be 'auto', 'on' or 'off', got {value!r}")


def make_strategy(n_gpus: int) -> tf.distribute.Strategy:
    """MirroredStrategy over the first `n_gpus` GPUs when more than one, else the default."""
    if n_gpus > 1:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(n_gpus)])
    return tf.distribute.get_strategy()


def configure_devices(
    mixed_precision: str | bool = "auto", jit_compile: str | bool = "auto"
) -> DeviceConfig:
    """Resolve mixed precision / XLA ("auto": on when a GPU is visible) and pick a strategy.

    Each switch is "auto", "on" or "off" (True/False also accepted).

    Sets the global Keras dtype policy, so call it before building the model. Note Keras turns
    jit_compile off (with a warning) for models containing RandomRotation/RandomZoom, and when
    op determinism is enabled: those ops have no XLA kernel.
    """
    gpus = len(tf.config.list_physical_devices("GPU"))
    mp = _resolve_switch(mixed_precision, "mixed_precision", gpus > 0)
    jit = _resolve_switch(jit_compile, "jit_compile", gpus > 0)
    # Set the policy both ways so a second call in one process never inherits the first.
    keras.mixed_precision.set_global_policy("mixed_float16" if mp else "float32")
    config = DeviceConfig(gpus=gpus, mixed_precision=mp, jit_compile=jit, strategy=make_strategy(gpus))
    log.info(
        "devices: %d GPU(s), mixed_precision=%s, jit_compile=%s, strategy=%s",
        gpus, mp, jit, type(config.strategy).__name__,
    )
    return config


def set_seed(seed: int, deterministic_ops: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow; optionally force deterministic TF kernels.

    Still nondeterministic without `deterministic_ops`: some multi-threaded CPU kernels and
    many GPU kernels (cuDNN autotuning, atomic adds) sum floats in a varying order, so reruns
    agree only to rounding. Even with it, results change with the hardware, TF/Keras versions,
    the MirroredStrategy replica count, and any tf.data stage run with `deterministic=False`.
    Op determinism also turns XLA off and makes some GPU ops slower or raise.
    """
    keras.utils.set_random_seed(seed)
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()
