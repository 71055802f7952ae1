"""tf.data input pipelines over the TFRecord shards written by `preprocess`.

The reader interleaves shards in parallel, parses and decodes in parallel, batches, then
prefetches. Evaluation datasets are unshuffled and order-deterministic, so predictions line up
with filenames; training shuffles shard order and records with the one seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow as tf

from mlic.tfrecords import parse_example, read_manifest

AUTOTUNE = tf.data.AUTOTUNE


def shard_paths(tfrecord_dir: str | Path, split: str) -> list[str]:
    """The split's shard files in manifest order, checked to exist."""
    manifest = read_manifest(tfrecord_dir, split)
    paths = [str(Path(tfrecord_dir) / s["file"]) for s in manifest["shards"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in the {split} manifest are missing: {', '.join(missing)}; "
                                "run `dvc repro preprocess`")
    return paths


def make_dataset(tfrecord_dir: str | Path, split: str, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, shuffle_buffer: int = 2048, repeat: bool = False,
                 with_filenames: bool = False, drop_remainder: bool = False,
                 deterministic: bool = True) -> tf.data.Dataset:
    """Batches of (images float32 0..255 [B,H,W,3], multi-hot labels float32 [B,k]).

    With `with_filenames` the element is (images, labels, filenames) for evaluation. Images
    stay 0..255: the model applies its backbone's own preprocessing, so it cannot happen twice.
    """
    manifest = read_manifest(tfrecord_dir, split)
    n_classes = len(manifest["classes"])
    size = int(manifest["image_size"])
    paths = shard_paths(tfrecord_dir, split)

    files = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle:
        # Reshuffled every epoch, but the sequence of epochs is fixed by the seed.
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(paths), 4),
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def _parse(serialized: tf.Tensor) -> tuple[Any, ...]:
        ex = parse_example(serialized, n_classes)
        image = tf.ensure_shape(tf.cast(ex["image"], tf.float32), (size, size, 3))
        labels = tf.ensure_shape(ex["labels"], (n_classes,))
        if with_filenames:
            return image, labels, ex["filename"]
        return image, labels

    ds = ds.map(_parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    # Batch before prefetch: prefetching whole batches keeps the model fed, one element ahead
    # of the accelerator, instead of prefetching single images.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(AUTOTUNE)
