"""Training augmentation in the input pipeline, as stateless functions of (seed, epoch, batch).

Why not Keras's RandomRotation/RandomZoom layers inside the model: they have no XLA kernel, so
Keras silently turns `jit_compile` off for any model holding them, and their random state lives
in the model (a resumed training must restore it). Here each batch's transforms are drawn from
`tf.random.stateless_*` with a seed made of (seed, epoch, batch index): the same batch gets the
same transforms in any process, on any device, resumed or not; the model stays XLA-compilable
and ships without augmentation layers. The work runs on the CPU in tf.data, overlapping the
accelerator's step.

Transforms, per image: horizontal flip (p = 0.5), rotation by up to `rotation` of a full turn,
zoom in or out by up to `zoom` (one affine warp, bilinear, zero fill like the `pad` resize),
contrast scaled by a factor in [1 - contrast, 1 + contrast] around the image mean, and with
`colour` the colours themselves: the RGB channels in one of their 6 orders, then grayscale
(p = 0.2) and inverted (p = 0.2), so a class is learnt by its shape and not by the colours its
few training images happened to have (label-safe only where colour does not define a class).
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """0 / False switches a transform off (see the module docstring for each one's meaning)."""

    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    contrast: float = 0.1
    colour: bool = False

    @classmethod
    def from_params(cls, cfg) -> "Augmentation":
        """The augmentation a `params.Train` section asks for (train and tune's trials alike)."""
        return cls(cfg.augment_flip, cfg.augment_rotation, cfg.augment_zoom, cfg.augment_contrast, cfg.augment_colour)

    @property
    def active(self) -> bool:
        return bool(self.flip or self.rotation or self.zoom or self.contrast or self.colour)


def batch_seed(seed: int, epoch: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    """The stateless seed of one training batch: a pure function of (seed, epoch, batch index)."""
    mixed = tf.cast(epoch, tf.int64) * 1_000_003 + tf.cast(batch, tf.int64)
    return tf.stack([tf.constant(seed, tf.int64), mixed])


def _affine(n: tf.Tensor, size: int, rotation: float, zoom: float, seed: tf.Tensor) -> tf.Tensor:
    """(n, 8) projective transforms (output -> input pixel maps) rotating and zooming about the centre."""
    angle = tf.random.stateless_uniform([n], seed=seed, minval=-rotation, maxval=rotation) * (2 * math.pi)
    scale = tf.random.stateless_uniform([n], seed=seed + [0, 1], minval=1 - zoom, maxval=1 + zoom)
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    c = (size - 1) / 2.0
    # input = R(angle)/scale @ (output - c) + c
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = c - a0 * c - a1 * c
    b2 = c - b0 * c - b1 * c
    zeros = tf.zeros_like(cos)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, aug: Augmentation) -> tf.Tensor:
    """Augment a float32 (B, S, S, 3) batch of 0..255 images; `seed` from `batch_seed`."""
    n = tf.shape(images)[0]
    size = int(images.shape[1])
    if aug.flip:
        flip = tf.random.stateless_uniform([n], seed=seed + [0, 2]) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    if aug.rotation or aug.zoom:
        transforms = _affine(n, size, float(aug.rotation), float(aug.zoom), seed + [0, 3])
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=tf.constant([size, size]),
            fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="CONSTANT")
    if aug.contrast:
        factor = tf.random.stateless_uniform([n], seed=seed + [0, 4], minval=1 - aug.contrast,
                                             maxval=1 + aug.contrast)
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = (images - mean) * factor[:, None, None, None] + mean
    images = tf.clip_by_value(images, 0.0, 255.0)
    if aug.colour:
        images = _recolour(images, seed + [0, 5])
    return images


# The 6 orders of the RGB channels.
_CHANNEL_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
COLOUR_GRAY_P = 0.2
COLOUR_INVERT_P = 0.2


def _recolour(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Channel order, grayscale and inversion per image (`Augmentation.colour`), 0..255 in and out."""
    n = tf.shape(images)[0]
    order = tf.random.stateless_uniform([n], seed=seed, minval=0, maxval=len(_CHANNEL_ORDERS), dtype=tf.int32)
    images = tf.gather(images, tf.gather(tf.constant(_CHANNEL_ORDERS), order), axis=3, batch_dims=1)
    u = tf.random.stateless_uniform([n, 2], seed=seed + [0, 1])
    gray = tf.repeat(tf.reduce_mean(images, axis=3, keepdims=True), 3, axis=3)
    images = tf.where((u[:, 0] < COLOUR_GRAY_P)[:, None, None, None], gray, images)
    return tf.where((u[:, 1] < COLOUR_INVERT_P)[:, None, None, None], 255.0 - images, images)
