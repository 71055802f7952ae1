"""The model for the `train` stage: preprocessing + backbone + pooled sigmoid head.

The saved `.keras` model takes raw RGB images, float32 in 0..255, shape (H, W, 3), and returns
one sigmoid probability per class. Each backbone's own `preprocess_input` convention lives
inside the model (a registered layer, or the backbone's own first layers), so callers can never
preprocess twice.

Layer layout (names are used by `freeze_backbone` / `unfreeze_top` and by tests):
    image -> preprocess -> backbone -> pool -> dropout -> probabilities
or, with the class-attention head (`pool: attention`):
    image -> preprocess -> backbone -> dropout -> class_maps -> pool -> probabilities
The file `train` saves with `train.tta_flip` nests that model twice over shared weights:
    image -> [model(image), model(flip(image))] -> flip_average   (`with_flip_tta`)

Training augmentation is not in the model: it runs in the tf.data pipeline (`augment.py`),
where it cannot switch XLA off (Keras's RandomRotation/RandomZoom have no XLA kernel).

Importing this module registers every custom layer (package "mlic"), so
`keras.models.load_model(path, compile=False)` needs no `custom_objects`; the losses a
checkpoint was compiled with are registered by `mlic.losses` (see there). Seeds and devices
live in `mlic.devices`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from mlic.params import Train

log = logging.getLogger(__name__)

BACKBONE_NAME = "backbone"
# From-scratch backbones' filters in their first block (then x2 per block). For simple_cnn 16
# learnt the built-in sample as well as 24 or 32 (val AUC-PR ~0.40 after 12 epochs on 1,500
# images at 96 px for all three) while training 2-4x faster on 2 CPU cores: cost grows with
# width squared. `train.width` sets it.
SIMPLE_CNN_WIDTH = 16

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
    """How to build one backbone: its constructor and input convention.

    factory: a keras.applications constructor (pretrained: include_top / weights / input_shape),
    or, when `from_scratch`, a function here taking (input_shape, width).
    """

    factory: Callable[..., keras.Model]
    # An ImagenetPreprocessing mode, "unit" (Rescaling 1/255) or None (the backbone normalises itself).
    preprocess: str | None
    min_size: int = 32
    from_scratch: bool = False


def _simple_cnn(input_shape: tuple[int, int, int], width: int) -> keras.Model:
    """Four VGG-style blocks of two Conv-BN-ReLU and a MaxPool (width, 2w, 4w, 8w filters).

    Two convolutions per block, at 64 px, learn the sample's shapes far faster than one per block
    at 96 px for the same CPU time (val AUC-PR 0.76 vs 0.52 after 40 epochs, 250 s vs 410 s).
    """
    inputs = keras.Input(shape=input_shape, name="backbone_input")
    return keras.Model(inputs, _vgg_blocks(inputs, width), name=BACKBONE_NAME)


def _vgg_blocks(x, width: int):
    """simple_cnn's four blocks: two 3x3 Conv-BN-ReLU and a 2x2 MaxPool each, width .. 8w filters."""
    for i, filters in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
        for j in (1, 2):
            # No conv bias: the following BatchNorm's beta does the same job.
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv{j}")(x)
            x = keras.layers.BatchNormalization(name=f"block{i}_bn{j}")(x)
            x = keras.layers.ReLU(name=f"block{i}_relu{j}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return x


def _strided_cnn(input_shape: tuple[int, int, int], width: int) -> keras.Model:
    """simple_cnn's four blocks behind a stride-2 stem: twice the input side for 1.4x the work.

    The stem (one 3x3 Conv-BN-ReLU with stride 2 and 2w filters) turns each 2x2 patch of the
    input into 2w learnt features instead of the one averaged pixel a resize to half the side
    would leave, so a 128 px input keeps the detail of small objects that a 64 px resize
    blurs away, and the blocks then run at 64 px cost: about 1.4x simple_cnn's multiply-adds
    at half the input side (bench/quality.py: the hard benchmark, docs/choosing.md).
    """
    inputs = keras.Input(shape=input_shape, name="backbone_input")
    return keras.Model(inputs, _vgg_blocks(_stem(inputs, 2 * width, stride=2), width), name=BACKBONE_NAME)


def _stem(x, filters: int, stride: int = 1):
    """The from-scratch backbones' first layer: one 3x3 Conv-BN-ReLU (stem_conv, stem_bn, stem_relu)."""
    x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name="stem_conv")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    return keras.layers.ReLU(name="stem_relu")(x)


def _basic_block(x, filters: int, stride: int, name: str):
    """ResNet basic block: two 3x3 Conv-BN, identity (or projection) shortcut, ReLU after the sum.

    The last BatchNorm starts at gamma 0, so each block starts as the identity and a from-scratch
    network trains like a shallower one first (Goyal et al. 2017). A downsampling shortcut
    average-pools before its 1x1 convolution rather than striding it (ResNet-D, He et al. 2019),
    so it sees every pixel: a stride-2 1x1 conv drops three of every four, small objects included.
    """
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(gamma_initializer="zeros", name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        if stride != 1:
            shortcut = keras.layers.AveragePooling2D(stride, padding="same", name=f"{name}_down_pool")(shortcut)
        shortcut = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_down_conv")(shortcut)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_down_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


# resnet_small: basic blocks per stage (stages of width, 2w, 4w, 8w filters) and each stage's stride.
RESNET_SMALL_BLOCKS = (1, 1, 1, 1)
RESNET_SMALL_STRIDES = (1, 2, 2, 2)


def _resnet_small(input_shape: tuple[int, int, int], width: int) -> keras.Model:
    """A small ResNet with BatchNorm for training from scratch on a CPU (ResNet-10-like).

    Stem: one 3x3 Conv-BN-ReLU at full resolution, no strided 7x7 and no max-pool: ImageNet
    ResNets divide the side by 4 before the first block, which leaves an object of 10 % of a
    96 px image about 2 pixels wide. Then four stages (width, 2w, 4w, 8w filters); the first
    block of a stage with stride 2 halves the side with a strided convolution. With the default
    strides (1, 2, 2, 2) the first stage works at full resolution and the feature map is 1/8 of
    the input side, at about simple_cnn's multiply-adds for the same input size.
    """
    inputs = keras.Input(shape=input_shape, name="backbone_input")
    x = _stem(inputs, width)
    filters = (width, 2 * width, 4 * width, 8 * width)
    for i, (n_blocks, f, stride) in enumerate(zip(RESNET_SMALL_BLOCKS, filters, RESNET_SMALL_STRIDES), 1):
        for j in range(n_blocks):
            x = _basic_block(x, f, stride if j == 0 else 1, name=f"stage{i}_block{j + 1}")
    return keras.Model(inputs, x, name=BACKBONE_NAME)


# The one list of backbones; params.py's `train.backbone` Literal equals its keys (a test checks).
BACKBONES: dict[str, BackboneSpec] = {
    # From scratch, CPU-friendly.
    "simple_cnn": BackboneSpec(_simple_cnn, "unit", from_scratch=True),
    "resnet_small": BackboneSpec(_resnet_small, "unit", from_scratch=True),
    "strided_cnn": BackboneSpec(_strided_cnn, "unit", from_scratch=True),
    # keras.applications, pretrained on ImageNet when weights ask for it.
    "mobilenet_v2": BackboneSpec(keras.applications.MobileNetV2, "tf"),
    # These four have their preprocessing as their own first layers (Rescaling, Normalization)
    # and a no-op preprocess_input, so nothing is added in front of them.
    "mobilenet_v3_small": BackboneSpec(keras.applications.MobileNetV3Small, None),
    "mobilenet_v3_large": BackboneSpec(keras.applications.MobileNetV3Large, None),
    "efficientnet_b0": BackboneSpec(keras.applications.EfficientNetB0, None),
    "efficientnetv2_b0": BackboneSpec(keras.applications.EfficientNetV2B0, None),
    "convnext_tiny": BackboneSpec(keras.applications.ConvNeXtTiny, None),
    "resnet50": BackboneSpec(keras.applications.ResNet50, "caffe"),
    "resnet50_v2": BackboneSpec(keras.applications.ResNet50V2, "tf"),
    "vgg16": BackboneSpec(keras.applications.VGG16, "caffe"),
    "vgg19": BackboneSpec(keras.applications.VGG19, "caffe"),
}


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
    width: from-scratch backbones only, filters of the first block (then x2 per block).
    """
    _check_backbone_args(name, input_shape, weights)
    spec = BACKBONES[name]
    if spec.from_scratch:
        return spec.factory(input_shape, width)

    if weights == "imagenet":
        try:
            backbone = spec.factory(include_top=False, weights="imagenet", input_shape=input_shape)
        except Exception as err:  # keras raises a plain Exception ("URL fetch failure") offline
            raise RuntimeError(
                f"could not get ImageNet weights for {name}: {err}. Offline? Put the file from "
                "the URL above into ~/.keras/models (or $KERAS_HOME/models; building this model "
                "once on a connected machine does it), or set weights to a local file path."
            ) from err
    else:
        backbone = spec.factory(include_top=False, weights=None, input_shape=input_shape)
    # Renamed after building: EfficientNetV2 looks its block layout up by the `name` argument.
    backbone.name = BACKBONE_NAME
    if weights not in (None, "imagenet"):
        load_backbone_weights(backbone, weights)
        if name == "efficientnet_b0":
            _fold_efficientnet_imagenet_std(backbone)
        log.info("loaded %s weights from %s", name, weights)
    return backbone


def _check_backbone_args(name: str, input_shape: tuple[int, int, int], weights: str | Path | None) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    if min(input_shape[:2]) < spec.min_size:
        raise ValueError(f"{name} needs images of at least {spec.min_size} px, got {input_shape}")
    if spec.from_scratch and weights is not None:
        raise ValueError(f"{name} is trained from scratch: weights must be None, got {weights!r}")


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


POOLS = ("avg", "max", "avgmax", "attention")  # params' train.pool Literal equals this (a test keeps it)


@keras.saving.register_keras_serializable(package="mlic")
class ClassAttentionPool(keras.layers.Layer):
    """Class-specific residual attention (CSRA, Zhu & Wu, ICCV 2021) over per-class score maps.

    Input (B, H, W, K): one logit map per class (a 1x1 convolution of the feature map, i.e. the
    classifier applied at every position). Output (B, K): each map's mean plus `lam` times its
    softmax-attention pooling, sum_i softmax(T * s)_i * s_i, which tends to the map's max as
    the temperature T grows. The mean is global average pooling followed by the classifier
    (the usual head); the attention term lets a class whose object lights a few cells of the
    map score as if it filled it: what small objects need, at the cost of one 1x1 convolution.
    CSRA-style rather than the paper's exact head: the classifier keeps its bias (counted 1 + lam
    times) and its weights are not normalised, so weight decay also sharpens or softens the
    attention; on a 1x1 map (32 px into strided_cnn) the attention term is the map itself.
    """

    def __init__(self, lam: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if lam < 0 or temperature <= 0:
            raise ValueError(f"lam must be >= 0 and temperature > 0, got {lam}, {temperature}")
        self.lam, self.temperature = float(lam), float(temperature)

    def call(self, maps):
        flat = keras.ops.reshape(maps, (keras.ops.shape(maps)[0], -1, maps.shape[-1]))
        weights = keras.ops.softmax(flat * self.temperature, axis=1)
        return keras.ops.mean(flat, axis=1) + self.lam * keras.ops.sum(weights * flat, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "lam": self.lam, "temperature": self.temperature}


def build_pool(pool: str):
    """The head's pooling of the backbone's feature map into one vector, as a callable on it.

    avg: global average (the usual head; every position votes, so an object filling 2 % of the
    map is 2 % of the vector). max: global max (a feature fires if the object is *anywhere*:
    presence, which is what a multi-label answer is, whatever the object's size). avgmax: both,
    concatenated (twice the features into the Dense layer). The output layer is named "pool".
    (`attention` pools class score maps, not features: `build_model` builds that head.)
    """
    if pool == "avg":
        return keras.layers.GlobalAveragePooling2D(name="pool")
    if pool == "max":
        return keras.layers.GlobalMaxPooling2D(name="pool")
    if pool != "avgmax":
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")

    def avgmax(x):
        return keras.layers.Concatenate(name="pool")([
            keras.layers.GlobalAveragePooling2D(name="pool_avg")(x),
            keras.layers.GlobalMaxPooling2D(name="pool_max")(x),
        ])
    return avgmax


def _derive_seed(seed: int, index: int) -> int:
    # A reproducible per-layer seed (dropout's) that does not collide with `seed` itself, which
    # also drives split, shuffling and augmentation.
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] % (2**31 - 1))


def build_model(
    backbone: str,
    n_classes: int,
    image_size: int | tuple[int, int],
    *,
    weights: str | Path | None = None,
    dropout: float = 0.2,
    seed: int = 0,
    width: int = SIMPLE_CNN_WIDTH,
    pool: str = "avg",
    attention_lambda: float = 1.0,
    any_size: bool = False,
) -> keras.Model:
    """Build the full model: raw 0..255 RGB in, `n_classes` sigmoid probabilities out.

    width: from-scratch backbones only. pool: one of POOLS (see `build_pool`). any_size: build a
    from-scratch backbone for any input side, so `resized_view` can train the same weights on
    smaller images (progressive resizing); the model itself still takes `image_size`. The head is
    pool -> Dropout -> Dense(sigmoid) in float32 so the output stays float32 under a
    mixed_float16 policy; with pool "attention", Dropout -> a 1x1 Conv2D giving one score map per
    class -> `ClassAttentionPool(attention_lambda)` -> sigmoid, in float32 too.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    input_shape = (h, w, 3)

    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = inputs
    preprocess = build_preprocessing(backbone)
    if preprocess is not None:
        x = preprocess(x)
    if any_size:
        if not BACKBONES[backbone].from_scratch:
            raise ValueError(f"{backbone} has a fixed input size here; any_size takes a from-scratch backbone "
                             f"({', '.join(n for n, s in BACKBONES.items() if s.from_scratch)})")
        _check_backbone_args(backbone, input_shape, weights)
        x = BACKBONES[backbone].factory((None, None, 3), width)(x)
    else:
        x = build_backbone(backbone, input_shape, weights=weights, width=width)(x)
    if pool == "attention":
        x = keras.layers.Dropout(dropout, seed=_derive_seed(seed, 5), name="dropout")(x)
        x = keras.layers.Conv2D(n_classes, 1, dtype="float32", name="class_maps")(x)
        x = ClassAttentionPool(attention_lambda, dtype="float32", name="pool")(x)
        outputs = keras.layers.Activation("sigmoid", dtype="float32", name="probabilities")(x)
        return keras.Model(inputs, outputs, name=f"mlic_{backbone}")
    x = build_pool(pool)(x)
    x = keras.layers.Dropout(dropout, seed=_derive_seed(seed, 5), name="dropout")(x)
    outputs = keras.layers.Dense(
        n_classes, activation="sigmoid", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name=f"mlic_{backbone}")


def from_params(cfg: Train, n_classes: int, image_size: int, seed: int) -> keras.Model:
    """`build_model` as `train`'s params ask (the stage and tune's trials build it here)."""
    progressive = cfg.progressive_scale > 0 and BACKBONES[cfg.backbone].from_scratch
    return build_model(cfg.backbone, n_classes, image_size, weights=cfg.weights, dropout=cfg.dropout, seed=seed,
                       width=cfg.width, pool=cfg.pool, attention_lambda=cfg.attention_lambda,
                       any_size=progressive)


def resized_view(model: keras.Model, size: int) -> keras.Model:
    """`model` (from `build_model(..., any_size=True)`) taking `size` px images: the same layers,
    so the same weights: training the view trains the model (progressive resizing)."""
    inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    x = inputs
    names = {layer.name for layer in model.layers}
    if "preprocess" in names:
        x = model.get_layer("preprocess")(x)
    x = model.get_layer(BACKBONE_NAME)(x)
    if "class_maps" in names:  # the attention head pools class score maps
        x = model.get_layer("pool")(model.get_layer("class_maps")(model.get_layer("dropout")(x)))
        return keras.Model(inputs, model.get_layer("probabilities")(x), name=f"{model.name}_{size}px")
    if "pool_avg" in names:
        x = model.get_layer("pool")([model.get_layer("pool_avg")(x), model.get_layer("pool_max")(x)])
    else:
        x = model.get_layer("pool")(x)
    x = model.get_layer("dropout")(x)
    return keras.Model(inputs, model.get_layer("probabilities")(x), name=f"{model.name}_{size}px")


@keras.saving.register_keras_serializable(package="mlic")
class HorizontalFlip(keras.layers.Layer):
    """Mirror a (B, H, W, C) batch left to right, always (test-time augmentation, not a random layer)."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape


def flips_at_test_time(cfg: Train) -> bool:
    """Whether `train` saves the model with the test-time flip: asked for, and valid (the model was
    trained on flipped images, so a mirror image keeps its labels)."""
    return cfg.tta_flip and cfg.augment_flip


def with_flip_tta(model: keras.Model) -> keras.Model:
    """`model` with horizontal-flip test-time augmentation: the mean of its probabilities for the
    image and for its mirror image, one model, so evaluate, `mlic predict` and the served model
    all see the same thing. Valid where training flipped images (a flip keeps every label true).
    The trained model is nested inside, with every weight shared; nothing else changes."""
    inputs = keras.Input(shape=model.input_shape[1:], dtype="float32", name="image")
    # float32 like `preprocess`: under mixed_float16 the mirrored pixels would be rounded, the others not
    both = [model(inputs), model(HorizontalFlip(dtype="float32", name="flip")(inputs))]
    outputs = keras.layers.Average(dtype="float32", name="flip_average")(both)
    return keras.Model(inputs, outputs, name=f"{model.name}_flip_tta")


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
