"""tf.data input pipelines over the TFRecord shards written by `preprocess`.

The reader reads the shards, batches the serialized records, parses and decodes whole batches
in parallel, then prefetches. Evaluation datasets are unshuffled and order-deterministic, so
predictions line up with filenames; training shuffles shard order and records with the one seed,
epoch by epoch (`epoch_seeds`), so a resumed training reads what an uninterrupted one would.
Training augmentation runs here too, per batch, seeded by (seed, epoch, batch) (`augment.py`): on
the CPU beside the accelerator's step, and out of the model, which stays XLA-compilable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from mlic.augment import Augmentation, augment_batch, batch_seed
from mlic.tfrecords import KEY_LABEL, Manifest, parse_example

AUTOTUNE = tf.data.AUTOTUNE


def epoch_seeds(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """Two shuffle seeds (shards, records) for one epoch: a pure function of (seed, epoch).

    Stateless, so epoch k is shuffled the same whether the process ran epochs 0..k-1 before it
    or resumed at k (`resume.py`); reshuffle_each_iteration would tie it to the iterations so far.
    """
    pair = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.stateless_uniform([2], seed=pair, minval=0, maxval=2**31 - 1, dtype=tf.int64)


def repeat_factors(prevalence: np.ndarray, threshold: float) -> np.ndarray:
    """Per-class repeat factors of repeat-factor sampling (Gupta et al., LVIS, CVPR 2019):
    r_c = max(1, sqrt(t / f_c)) for a class in a fraction f_c of the training images; 1 for a
    class with no training image (nothing to repeat), and all 1 when t = 0."""
    f = np.asarray(prevalence, dtype=np.float64)
    with np.errstate(divide="ignore"):
        r = np.sqrt(np.where(f > 0, threshold / np.where(f > 0, f, 1.0), 0.0))
    return np.maximum(r, 1.0)


def _record_repeats(records: tf.data.Dataset, factors: tf.Tensor, seed: int, epoch: tf.Tensor) -> tf.data.Dataset:
    """Each record as many times as its image's repeat factor says, on average: the factor is the
    largest of its classes' (1 for an unlabelled image), rounded up or down at random so that
    E[copies] = factor. The draw is stateless, from (seed, epoch, position in the pass)."""
    def copies(index: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        ids = tf.io.parse_single_example(record, {KEY_LABEL: tf.io.VarLenFeature(tf.int64)})[KEY_LABEL].values
        r = tf.reduce_max(tf.concat([tf.gather(factors, ids), [1.0]], axis=0))
        pair = tf.stack([tf.constant(seed, tf.int64) + 7_919, tf.cast(epoch, tf.int64) * 10_000_019 + index])
        extra = tf.random.stateless_uniform([], seed=pair) < r - tf.floor(r)
        return record, tf.cast(tf.floor(r), tf.int64) + tf.cast(extra, tf.int64)

    return records.enumerate().map(copies).flat_map(
        lambda record, n: tf.data.Dataset.from_tensors(record).repeat(n))


def make_dataset(manifest: Manifest, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, shuffle_buffer: int = 2048, epochs: range | None = None,
                 repeat: bool = False, with_filenames: bool = False, drop_remainder: bool = False,
                 deterministic: bool = True, augment: Augmentation | None = None,
                 repeat_threshold: float = 0.0, resize_to: int | None = None) -> tf.data.Dataset:
    """Batches of (images float32 0..255 [B,H,W,3], multi-hot labels float32 [B,k]) of one split.

    The dataset is the passes `epochs` (default one pass, epoch 0) one after another, or with
    `repeat` the passes from `epochs.start` on, forever; each pass ends with its own short batch
    (unless `drop_remainder`). Shuffled, a pass's shard and record order depends on (seed, epoch)
    alone; unshuffled, every pass is in manifest order. Give a training loop all its epochs at
    once with `steps_per_epoch` (Keras then keeps one iterator across epochs).

    With `with_filenames` the element is (images, labels, filenames) for evaluation. Images
    stay 0..255: the model applies its backbone's own preprocessing, so it cannot happen twice.
    `augment` (training): each batch augmented with the stateless seed of (seed, epoch, batch index),
    so batch b of epoch e gets the same transforms in any process, resumed or not.
    `resize_to`: images downscaled to that side (antialiased) before augmentation (progressive
    resizing's small epochs).
    `repeat_threshold` (training, with `shuffle`): repeat-factor sampling (`repeat_factors`) of
    images holding classes rarer than it, then the pass cut back to the split's size: an epoch
    costs the same, rare classes are seen more often and commoner images make room at random.
    """
    n_classes = len(manifest.classes)
    size = int(manifest.image_size)
    paths = manifest.shard_paths()
    epochs = range(1) if epochs is None else epochs
    count = int(manifest.count)
    resample = shuffle and repeat_threshold > 0
    factors = tf.constant(repeat_factors(manifest.prevalence, repeat_threshold), tf.float32) if resample else None

    def one_pass(epoch: tf.Tensor) -> tf.data.Dataset:
        files = tf.data.Dataset.from_tensor_slices(paths)
        if shuffle:
            seeds = epoch_seeds(seed, epoch)
            files = files.shuffle(len(paths), seed=seeds[0])
        ds = files.interleave(
            tf.data.TFRecordDataset,
            # Unshuffled: one shard after another, so records come in manifest order (shard 0, then
            # shard 1, ...). Round-robin interleaving is deterministic too, but matches no listing.
            cycle_length=min(len(paths), 4) if shuffle else 1,
            num_parallel_calls=AUTOTUNE,
            deterministic=deterministic,
        )
        if resample:
            ds = _record_repeats(ds, factors, seed, epoch)
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=seeds[1])
        if resample:
            ds = ds.take(count)
        # Batched within the pass, so a batch never straddles two epochs; numbered within it, so
        # augmentation can seed each batch by (epoch, batch index).
        batches = ds.batch(batch_size, drop_remainder=drop_remainder).enumerate()
        return batches.map(lambda index, records: (tf.cast(epoch, tf.int64), index, records))

    def _parse_one(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        ex = parse_example(serialized, n_classes)
        image = tf.ensure_shape(ex["image"], (size, size, 3))
        return image, tf.ensure_shape(ex["labels"], (n_classes,)), ex["filename"]

    one_signature = (tf.TensorSpec((size, size, 3), tf.uint8), tf.TensorSpec((n_classes,), tf.float32),
                     tf.TensorSpec((), tf.string))

    augmenting = augment is not None and augment.active

    def _parse_batch(epoch: tf.Tensor, index: tf.Tensor, serialized: tf.Tensor) -> tuple[Any, ...]:
        images, labels, filenames = tf.map_fn(_parse_one, serialized, fn_output_signature=one_signature)
        images = tf.cast(images, tf.float32)  # one cast per batch
        if resize_to is not None and resize_to != size:
            # Progressive resizing's small epochs: downscaled before augmenting, so the warps and
            # colour changes cost the small side's pixels, not the shards'.
            images = downscale(images, resize_to)
        if augmenting:
            images = augment_batch(images, batch_seed(seed, epoch, index), augment)
        return (images, labels, filenames) if with_filenames else (images, labels)

    # Batch the serialized records first (in `one_pass`), then parse and decode one batch per map
    # call: tf.data's per-element cost is paid once per batch instead of once per image, which at
    # 96 px is about a quarter of the reader's CPU time (bench/input_pipeline.py). Batch before
    # prefetch: prefetching whole batches keeps the model fed, one element ahead, instead of
    # prefetching single images.
    numbers = (tf.data.Dataset.counter(epochs.start) if repeat
               else tf.data.Dataset.range(epochs.start, epochs.stop))
    ds = numbers.flat_map(one_pass)
    if not repeat:
        # Interleaving hides the length from tf.data; stating it lets Keras size its progress and
        # stops its "input ran out of data" warning at the end of every epoch.
        per_pass = count // batch_size if drop_remainder else -(-count // batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(per_pass * len(epochs)))
    ds = ds.map(_parse_batch, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return ds.prefetch(AUTOTUNE)


def downscale(images: tf.Tensor, size: int) -> tf.Tensor:
    """A batch of images resized to `size` x `size`, antialiased (progressive resizing's small side)."""
    return tf.image.resize(images, (size, size), antialias=True)


def downscaled(ds: tf.data.Dataset, size: int) -> tf.data.Dataset:
    """`ds`'s batches with the images downscaled to `size`: progressive resizing's small epochs
    validate on these (their training batches come from `make_dataset(resize_to=)`)."""
    def resize(images: tf.Tensor, *rest: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return (downscale(images, size), *rest)

    return ds.map(resize, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)
