"""Tests for the TFRecord schema and writer (`mlic.tfrecords`), the tf.data reader (`mlic.dataset`)
and the `preprocess` stage script.

The core check is the write -> read round trip: what comes out of the shards is what
`images.resize(images.load_rgb(...))` made of the source file (exactly for PNG, within JPEG
error for JPEG), with the labels and filenames unchanged.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from mlic import dataset, images, tfrecords
from mlic.augment import Augmentation
from mlic.errors import disk_error
from mlic.tfrecords import EncodeSettings, parse_example, shard_name, worker_pool, write_split

SIZE = 32
JPEG = EncodeSettings(image_size=SIZE, resize_mode="pad", encoding="jpeg", jpeg_quality=92)
PNG = dataclasses.replace(JPEG, encoding="png")
N_IMAGES, SHARD_SIZE = 40, 16  # 40 records in shards of <= 16: three shards
# JPEG tolerance, in 0..255 levels. Over a split the mean error is ~2.5; single tiny images with
# saturated shapes against pad's black border reach ~5 (4:2:0 chroma subsampling), and single
# pixels on that border ~70. Comparing against the wrong image gives means of 25 and more.
JPEG_MEAN_ERROR, JPEG_IMAGE_MEAN_ERROR, JPEG_MAX_ERROR = 3.0, 7.0, 96


def _write(image_set, out: Path, settings: EncodeSettings = JPEG, shard_size: int = SHARD_SIZE, seed: int = 5,
           rows: np.ndarray | None = None, pool: Any = None) -> dict:
    """write_split of `rows` (default: all) of the set as split `train` into `out`."""
    rows = np.arange(len(image_set.filenames)) if rows is None else rows
    out.mkdir(parents=True, exist_ok=True)
    return write_split("train", [image_set.filenames[i] for i in rows], image_set.y[rows], image_set.classes,
                       image_set.images_dir, out, settings, shard_size, seed, pool=pool)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _records(out: Path, split: str = "train") -> list[dict[str, Any]]:
    """Every record of a split, parsed eagerly, reading the shards one after another in manifest order."""
    manifest = tfrecords.Manifest.read(out, split)
    k = len(manifest.classes)
    raw = tf.data.TFRecordDataset([str(out / s.file) for s in manifest.shards])
    return [{key: v.numpy() for key, v in parse_example(r, k).items()} for r in raw]


def _expected_pixels(image_set, filename: str, settings: EncodeSettings) -> np.ndarray:
    im = images.resize(images.load_rgb(image_set.images_dir / filename), settings.image_size,
                       settings.resize_mode)
    return np.asarray(im, dtype=np.int32)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory: pytest.TempPathFactory, make_set):
    """40 images of mixed modes and sizes, built once for this module."""
    return make_set(tmp_path_factory.mktemp("tfr_set"), n=N_IMAGES, seed=1)


@pytest.fixture(scope="module")
def jpeg_out(tmp_path_factory: pytest.TempPathFactory, image_set) -> tuple[Path, dict]:
    """The image set written once as JPEG shards (in this process)."""
    out = tmp_path_factory.mktemp("tfr_jpeg")
    return out, _write(image_set, out)


# --- schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "split, index, count, name",
    [("train", 0, 3, "train-00000-of-00003.tfrecord"),
     ("val", 2, 3, "val-00002-of-00003.tfrecord"),
     ("test", 11, 120, "test-00011-of-00120.tfrecord")],
)
def test_shard_name_follows_the_tf_models_convention(split: str, index: int, count: int, name: str) -> None:
    assert shard_name(split, index, count) == name


def _tf_serialize(encoded: bytes, image_format: str, filename: str, height: int, width: int,
                  class_ids: list[int]) -> bytes:
    """The oracle: TensorFlow's own Example proto, serialized deterministically."""
    def _bytes(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def _ints(v: list[int]) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    name = filename.encode("utf-8")
    return tf.train.Example(features=tf.train.Features(feature={
        tfrecords.KEY_ENCODED: _bytes(encoded), tfrecords.KEY_FORMAT: _bytes(image_format.encode()),
        tfrecords.KEY_SOURCE_ID: _bytes(name), tfrecords.KEY_FILENAME: _bytes(name),
        tfrecords.KEY_HEIGHT: _ints([height]), tfrecords.KEY_WIDTH: _ints([width]),
        tfrecords.KEY_LABEL: _ints(class_ids)})).SerializeToString(deterministic=True)


def test_examples_are_byte_equal_to_tensorflow_s_on_random_records() -> None:
    rng = np.random.default_rng(0)
    for case in range(300):
        encoded = rng.bytes(int(rng.integers(0, 300 if case % 2 else 70_000)))  # 1- to 3-byte lengths
        ids = sorted(rng.choice(1000, size=int(rng.integers(0, 30)), replace=False).tolist())
        if case % 10 == 0:
            ids = [-1, 2**40, *ids]  # 10-byte and long varints
        name = "".join(rng.choice(list("ab/_.äé日本"), size=int(rng.integers(0, 150))))
        size = int(rng.integers(0, 2**31))
        args = (encoded, ["jpeg", "png"][case % 2], name, size, size // 3 + 1, ids)
        assert tfrecords.serialize_example(*args) == _tf_serialize(*args), case


def test_framed_records_are_byte_equal_to_tensorflow_s_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    records = [rng.bytes(int(rng.integers(0, 5000))) for _ in range(40)] + [b""]
    ours = tmp_path / "ours.tfrecord"
    ours.write_bytes(b"".join(tfrecords.frame_record(r) for r in records))
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for r in records:
            writer.write(r)
    assert ours.read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == records


@pytest.mark.parametrize(
    "class_ids, n_classes, expected",
    [([], 3, [0, 0, 0]), ([1], 3, [0, 1, 0]), ([0, 2], 3, [1, 0, 1]), ([0, 1, 2, 3], 4, [1, 1, 1, 1])],
    ids=["no-label", "one", "two", "all"],
)
def test_serialize_then_parse_eagerly_and_in_tf_data(class_ids: list[int], n_classes: int,
                                                     expected: list[int]) -> None:
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    encoded = tf.io.encode_png(pixels).numpy()
    record = tfrecords.serialize_example(encoded, "png", "sub/ä.png", 4, 6, class_ids)
    assert record == tfrecords.serialize_example(encoded, "png", "sub/ä.png", 4, 6, class_ids)  # byte-stable

    eager = parse_example(record, n_classes)
    in_graph = next(iter(tf.data.Dataset.from_tensors(record).map(lambda r: parse_example(r, n_classes))))
    for ex in (eager, in_graph):
        assert ex["image"].dtype == tf.uint8
        np.testing.assert_array_equal(ex["image"].numpy(), pixels)
        assert ex["labels"].dtype == tf.float32
        np.testing.assert_array_equal(ex["labels"].numpy(), expected)
        assert ex["filename"].numpy().decode("utf-8") == "sub/ä.png"
        assert (int(ex["height"]), int(ex["width"])) == (4, 6)

    parsed = tf.train.Example.FromString(record).features.feature
    assert parsed[tfrecords.KEY_SOURCE_ID].bytes_list.value[0] == "sub/ä.png".encode()
    assert parsed[tfrecords.KEY_FORMAT].bytes_list.value[0] == b"png"
    assert list(parsed[tfrecords.KEY_LABEL].int64_list.value) == class_ids  # ids, not multi-hot


# --- writer ---------------------------------------------------------------------------------


def test_jpeg_round_trip_pixels_labels_and_filenames(image_set, jpeg_out) -> None:
    out, manifest = jpeg_out
    records = _records(out)
    assert len(records) == manifest.count == N_IMAGES
    row = {name: i for i, name in enumerate(image_set.filenames)}
    seen, errors, wrong_image_errors = [], [], []
    for rec in records:
        name = rec["filename"].decode()
        seen.append(name)
        np.testing.assert_array_equal(rec["labels"], image_set.y[row[name]].astype(np.float32))
        assert rec["image"].shape == (SIZE, SIZE, 3) and rec["image"].dtype == np.uint8
        assert (rec["height"], rec["width"]) == (SIZE, SIZE)
        diff = np.abs(rec["image"].astype(np.int32) - _expected_pixels(image_set, name, JPEG))
        assert diff.mean() < JPEG_IMAGE_MEAN_ERROR and diff.max() <= JPEG_MAX_ERROR, (name, diff.mean(), diff.max())
        errors.append(diff.mean())
        other = image_set.filenames[(row[name] + 1) % N_IMAGES]
        wrong_image_errors.append(np.abs(rec["image"] - _expected_pixels(image_set, other, JPEG)).mean())
    assert np.mean(errors) < JPEG_MEAN_ERROR
    assert np.mean(wrong_image_errors) > 4 * np.mean(errors)  # the comparison can tell images apart
    assert sorted(seen) == sorted(image_set.filenames)
    assert seen != image_set.filenames  # records are placed in a seeded order, not input order
    assert any(not r["labels"].any() for r in records)  # rows with no label survive as all-zero


def test_png_round_trip_is_exact(image_set, tmp_path: Path) -> None:
    rows = np.arange(0, N_IMAGES, 3)  # every mode in IMAGE_KINDS appears
    _write(image_set, tmp_path, PNG, rows=rows)
    records = _records(tmp_path)
    assert len(records) == len(rows)
    for rec in records:
        np.testing.assert_array_equal(rec["image"], _expected_pixels(image_set, rec["filename"].decode(), PNG))


@pytest.mark.parametrize(
    "n, shard_size, expected",
    [(40, 16, [14, 13, 13]), (40, 40, [40]), (40, 100, [40]), (10, 3, [3, 3, 2, 2]), (5, 1, [1] * 5)],
)
def test_shard_count_and_names_for_a_shard_size(image_set, tmp_path: Path, n: int, shard_size: int,
                                                expected: list[int]) -> None:
    manifest = _write(image_set, tmp_path, PNG, shard_size=shard_size, rows=np.arange(n))
    k = len(expected)
    names = [shard_name("train", i, k) for i in range(k)]
    assert [s.file for s in manifest.shards] == names
    assert [s.records for s in manifest.shards] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["train.manifest.json"])
    assert max(expected) <= shard_size
    for s in manifest.shards:
        assert sum(1 for _ in tf.data.TFRecordDataset(str(tmp_path / s.file))) == s.records


def test_manifest_describes_the_split(image_set, jpeg_out) -> None:
    out, manifest = jpeg_out
    assert json.loads((out / "train.manifest.json").read_text()) == manifest.to_dict()
    assert manifest == tfrecords.Manifest.read(out, "train")
    assert manifest.count == N_IMAGES and manifest.split == "train"
    assert manifest.classes == image_set.classes  # column order of the labels
    assert (manifest.image_size, manifest.channels) == (SIZE, 3)
    assert (manifest.resize_mode, manifest.encoding, manifest.jpeg_quality) == ("pad", "jpeg", 92)
    assert "skipped" not in manifest.to_dict()  # split skips bad images; preprocess skips none
    assert manifest.positives == dict(zip(image_set.classes, image_set.y.sum(axis=0).tolist()))
    assert [s.file for s in manifest.shards] == [shard_name("train", i, 3) for i in range(3)]
    assert sum(s.records for s in manifest.shards) == manifest.count
    for s in manifest.shards:
        assert s.sha256 == hashlib.sha256((out / s.file).read_bytes()).hexdigest()
    assert manifest.fingerprint == tfrecords.fingerprint(manifest.to_dict())


def test_shards_are_byte_identical_across_runs_and_worker_counts(image_set, jpeg_out, tmp_path: Path) -> None:
    out, manifest = jpeg_out
    again = _write(image_set, tmp_path / "again")
    with worker_pool(2) as pool:
        assert pool is not None
        parallel = _write(image_set, tmp_path / "workers2", pool=pool)
    assert again.fingerprint == parallel.fingerprint == manifest.fingerprint
    reference = _tree(out)
    assert _tree(tmp_path / "again") == reference
    assert _tree(tmp_path / "workers2") == reference


def test_record_order_depends_on_filenames_and_seed_not_input_order(image_set, jpeg_out, tmp_path: Path) -> None:
    out, manifest = jpeg_out
    reversed_rows = np.arange(N_IMAGES)[::-1]
    assert _write(image_set, tmp_path / "reversed", rows=reversed_rows).fingerprint == manifest.fingerprint
    other = _write(image_set, tmp_path / "seed6", seed=6)
    assert other.fingerprint != manifest.fingerprint
    assert [r["filename"] for r in _records(tmp_path / "seed6")] != [r["filename"] for r in _records(out)]


@pytest.mark.parametrize(
    "change",
    [{"resize_mode": "crop"}, {"jpeg_quality": 70}, {"image_size": 24}, {"encoding": "png"}],
    ids=lambda c: next(iter(c)),
)
def test_fingerprint_changes_when_params_change(image_set, tmp_path: Path, change: dict) -> None:
    rows = np.arange(12)
    base = _write(image_set, tmp_path / "base", rows=rows)
    assert _write(image_set, tmp_path / "same", rows=rows).fingerprint == base.fingerprint
    changed = _write(image_set, tmp_path / "changed", dataclasses.replace(JPEG, **change), rows=rows)
    assert changed.fingerprint != base.fingerprint


def truncate(path: Path) -> None:
    """Cut an image file so its header still opens (the split stage's check passes) but its
    pixels do not decode: a JPEG just after its start-of-scan marker, a PNG in half."""
    data = path.read_bytes()
    cut = data.index(b"\xff\xda") + 24 if path.suffix == ".jpg" else len(data) // 2
    path.write_bytes(data[:cut])
    with Image.open(path) as im:
        assert im.size[0] > 0


def _with_truncated_image(make_set, root: Path, n: int = 14):
    """An image set whose first JPEG is truncated."""
    image_set = make_set(root, n=n, seed=2)
    bad = next(f for f in image_set.filenames if f.endswith(".jpg"))
    truncate(image_set.images_dir / bad)
    return image_set, bad


@pytest.mark.parametrize("workers", [1, 2])
def test_an_image_that_no_longer_decodes_is_a_user_error_saying_to_rerun_split(make_set, tmp_path: Path,
                                                                              workers: int) -> None:
    image_set, bad = _with_truncated_image(make_set, tmp_path / "set")
    with worker_pool(workers) as pool, pytest.raises(images.ImageError) as err:
        _write(image_set, tmp_path / "out", shard_size=4, pool=pool)
    message = str(err.value)
    assert str(image_set.images_dir / bad) in message and "\n" not in message
    assert "cannot be decoded (OSError: image file is truncated" in message
    assert "run `dvc repro split`" in message


def test_max_pixels_reaches_the_workers(make_set, tmp_path: Path) -> None:
    image_set = make_set(tmp_path / "set", n=6, seed=2, min_size=20, max_size=30)
    with pytest.raises(images.ImageError, match=r"too many pixels|more than the limit of 100"):
        _write(image_set, tmp_path / "out", settings=dataclasses.replace(JPEG, max_pixels=100), shard_size=4)


@pytest.mark.parametrize("workers, expected", [(0, os.cpu_count() or 1), (1, 1), (3, 3)])
def test_resolve_workers_zero_means_every_core(workers: int, expected: int) -> None:
    assert tfrecords.resolve_workers(workers) == expected


# A stage using a pool: prints "busy" once the workers are at work, then waits to be stopped.
_POOL_STAGE = """
import sys, time
from mlic import tfrecords

def slow(x):
    time.sleep(0.2)
    return x * 2

if __name__ == "__main__":
    try:
        with tfrecords.worker_pool(3) as pool:  # this process + 2 pool workers
            results = pool.imap_unordered(slow, range(400), chunksize=1)
            next(results)
            print(" ".join(str(w.pid) for w in pool._pool), flush=True)
            time.sleep(60)
    except KeyboardInterrupt:
        sys.exit(130)
"""


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM", "Ctrl-C"])
def test_workers_of_a_stopped_stage_end_quietly(tmp_path: Path, how: str) -> None:
    """Killed or interrupted mid-work: every worker ends, and nothing but the stage's own words is
    printed (no BrokenPipeError or KeyboardInterrupt tracebacks, no leaked-semaphore warning)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "pool_stage.py"
    script.write_text(_POOL_STAGE, encoding="utf-8")
    # As from a terminal: SIGINT at its default. A test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        workers = [psutil.Process(int(pid)) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "no workers"
        time.sleep(0.3)  # mid-task: each worker holds a chunk it will try to send back
        if how == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the whole foreground group
        else:
            proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)  # end of file: every process holding stderr has ended
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == {"kill -9": -9, "SIGTERM": -15, "Ctrl-C": 130}[how]
    assert stderr == ""
    for w in workers:
        assert not w.is_running() or w.status() == psutil.STATUS_ZOMBIE, w

# --- reader ---------------------------------------------------------------------------------


def _filenames(ds: tf.data.Dataset) -> list[str]:
    return [f.decode() for _, _, names in ds for f in names.numpy()]


def test_unshuffled_order_follows_the_manifest(jpeg_out) -> None:
    out, _ = jpeg_out
    expected = [r["filename"].decode() for r in _records(out)]
    ds = dataset.make_dataset(tfrecords.Manifest.read(out, "train"), batch_size=7, with_filenames=True)
    assert _filenames(ds) == expected
    assert _filenames(ds) == expected  # every pass, not only the first


def test_shuffle_is_seeded(jpeg_out) -> None:
    out, _ = jpeg_out
    manifest_order = _filenames(dataset.make_dataset(tfrecords.Manifest.read(out, "train"), 8, with_filenames=True))

    def shuffled(seed: int) -> list[str]:
        return _filenames(dataset.make_dataset(tfrecords.Manifest.read(out, "train"), 8, shuffle=True, seed=seed, shuffle_buffer=64,
                                               with_filenames=True))

    a = shuffled(1)
    assert a == shuffled(1)
    assert a != shuffled(2)
    assert a != manifest_order and sorted(a) == sorted(manifest_order)


@pytest.mark.parametrize("batch_size, drop_remainder, sizes", [(16, False, [16, 16, 8]), (16, True, [16, 16]),
                                                                 (40, False, [40])])
def test_batches_are_float32_images_and_multi_hot_labels(image_set, jpeg_out, batch_size: int,
                                                         drop_remainder: bool, sizes: list[int]) -> None:
    out, _ = jpeg_out
    k = len(image_set.classes)
    ds = dataset.make_dataset(tfrecords.Manifest.read(out, "train"), batch_size, drop_remainder=drop_remainder)
    assert ds.element_spec[0].shape.as_list()[1:] == [SIZE, SIZE, 3]
    assert ds.element_spec[1].shape.as_list()[1:] == [k]
    got = []
    for x, y in ds:
        assert x.dtype == tf.float32 and y.dtype == tf.float32
        assert x.shape[1:] == (SIZE, SIZE, 3) and y.shape[1:] == (k,)
        assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255.0
        assert float(tf.reduce_max(x)) > 1.0  # 0..255, not rescaled to 0..1
        assert set(np.unique(y.numpy())) <= {0.0, 1.0}
        got.append(int(x.shape[0]))
    assert got == sizes


def test_with_filenames_lines_up_images_labels_and_names(image_set, jpeg_out) -> None:
    out, _ = jpeg_out
    row = {name: i for i, name in enumerate(image_set.filenames)}
    ds = dataset.make_dataset(tfrecords.Manifest.read(out, "train"), 16, shuffle=True, seed=3, with_filenames=True)
    assert len(ds.element_spec) == 3 and ds.element_spec[2].dtype == tf.string
    x, y, names = next(iter(ds))
    for img, labels, name in zip(x.numpy(), y.numpy(), names.numpy()):
        name = name.decode()
        np.testing.assert_array_equal(labels, image_set.y[row[name]])
        diff = np.abs(img - _expected_pixels(image_set, name, JPEG))
        assert diff.mean() < JPEG_IMAGE_MEAN_ERROR


def test_repeat_gives_more_than_one_epoch_each_ending_with_its_own_batch(jpeg_out) -> None:
    out, _ = jpeg_out
    ds = dataset.make_dataset(tfrecords.Manifest.read(out, "train"), 16, shuffle=True, seed=0, repeat=True)
    assert [int(x.shape[0]) for x, _ in ds.take(5)] == [16, 16, 8, 16, 16]  # 40 records a pass


def test_each_epoch_order_depends_on_the_seed_and_epoch_alone(jpeg_out) -> None:
    # What lets a resumed training read epoch k as a run that never stopped did (resume.py).
    out, _ = jpeg_out
    manifest = tfrecords.Manifest.read(out, "train")

    def order(epochs: range, seed: int = 4, **kwargs) -> list[str]:
        return _filenames(dataset.make_dataset(manifest, 8, shuffle=True, seed=seed, shuffle_buffer=64,
                                               with_filenames=True, epochs=epochs, **kwargs))

    n = manifest.count
    four = order(range(4))
    assert len(four) == 4 * n
    passes = [four[i * n:(i + 1) * n] for i in range(4)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # each epoch is every record once
    assert len({tuple(p) for p in passes}) == 4  # in a new order each epoch
    assert order(range(2, 4)) == four[2 * n:]  # started at epoch 2: the same epochs 2 and 3
    assert order(range(3, 4)) == order(range(3, 4))
    assert order(range(3, 4), seed=5) != passes[3]
    repeated = dataset.make_dataset(manifest, 8, shuffle=True, seed=4, shuffle_buffer=64, with_filenames=True,
                                    epochs=range(1, 2), repeat=True)
    assert _filenames(repeated.take(2 * n // 8)) == four[n:3 * n]


def test_augmented_epochs_depend_on_seed_epoch_and_batch_alone(jpeg_out) -> None:
    """Training batches are augmented in tf.data, each by (seed, epoch, batch index): epoch k gets
    the same images started at k (resumed) or not, another seed differs, labels are untouched."""
    out, _ = jpeg_out
    manifest = tfrecords.Manifest.read(out, "train")
    aug = Augmentation()

    def batches(epochs: range, seed: int = 4, augment: Augmentation | None = aug) -> list[tuple[np.ndarray, np.ndarray]]:
        ds = dataset.make_dataset(manifest, 8, shuffle=True, seed=seed, shuffle_buffer=64, epochs=epochs,
                                  augment=augment)
        return [(x.numpy(), y.numpy()) for x, y in ds]

    two, plain = batches(range(2)), batches(range(2), augment=None)
    per_epoch = len(two) // 2
    assert len(two) == len(plain) and all(np.array_equal(a, b) for (_, a), (_, b) in zip(two, plain))  # same labels
    assert all(x.min() >= 0 and x.max() <= 255 and x.dtype == np.float32 for x, _ in two)
    assert not any(np.array_equal(a, b) for (a, _), (b, _) in zip(two, plain))  # every batch augmented
    for (a, _), (b, _) in zip(batches(range(1, 2)), two[per_epoch:]):    # resumed at epoch 1
        np.testing.assert_array_equal(a, b)
    other_seed = batches(range(1), seed=5, augment=aug)
    other_plain = batches(range(1), seed=5, augment=None)
    assert not np.array_equal(other_seed[0][0], other_plain[0][0])


def test_repeat_factors_follow_lvis() -> None:
    r = dataset.repeat_factors(np.array([0.5, 0.1, 0.025, 0.0]), 0.1)
    np.testing.assert_allclose(r, [1.0, 1.0, 2.0, 1.0])           # sqrt(0.1 / 0.025) = 2; absent class: 1
    assert np.all(dataset.repeat_factors(np.array([0.5, 0.01]), 0.0) == 1.0)


def test_repeat_factor_sampling_shows_rare_classes_more_in_same_size_epochs(image_set, tmp_path: Path) -> None:
    # A long tail made on purpose: every image without class 0, and three with it.
    has = image_set.y[:, 0] > 0
    rows = np.concatenate([np.flatnonzero(~has), np.flatnonzero(has)[:3]])
    _write(image_set, tmp_path, rows=rows)
    manifest = tfrecords.Manifest.read(tmp_path, "train")
    n, y, t = manifest.count, image_set.y[rows] > 0, 1.0
    # Each image's expected copies: its classes' largest factor (1 without a label); a pass of n
    # drawn from them holds class 0 in proportion to its images' copies.
    factors = dataset.repeat_factors(manifest.prevalence, t)
    copies = np.array([factors[row].max() if row.any() else 1.0 for row in y])
    expected = n * copies[y[:, 0]].sum() / copies.sum()
    assert expected > 3.6, (expected, factors)

    def epochs(threshold: float, seed: int = 4, span: range = range(40)) -> list[tuple[list[str], np.ndarray]]:
        ds = dataset.make_dataset(manifest, 8, shuffle=True, seed=seed, shuffle_buffer=256, epochs=span,
                                  with_filenames=True, repeat_threshold=threshold)
        rows = [(f.numpy().tolist(), y.numpy()) for _, y, f in ds]
        names = [name for f, _ in rows for name in f]
        labels = np.concatenate([y for _, y in rows])
        return [(names[i * n:(i + 1) * n], labels[i * n:(i + 1) * n]) for i in range(len(span))]

    plain, resampled = epochs(0.0), epochs(t)
    assert len(plain) == len(resampled) == 40
    assert all(len(names) == n for names, _ in resampled)              # an epoch keeps its size
    assert all(labels[:, 0].sum() == 3 for _, labels in plain)
    seen = np.mean([labels[:, 0].sum() for _, labels in resampled])
    assert seen == pytest.approx(expected, rel=0.15), (seen, expected)  # 3 without resampling
    assert any(len(set(names)) < len(names) for names, _ in resampled)  # by repeating its images
    assert [names for names, _ in epochs(t)] == [names for names, _ in resampled]
    assert [names for names, _ in epochs(t, span=range(30, 40))] == [names for names, _ in resampled[30:]]
    assert [names for names, _ in epochs(t, seed=5, span=range(5))] != [names for names, _ in resampled[:5]]


def test_reader_errors_say_to_run_preprocess(jpeg_out, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest; run `dvc repro preprocess`"):
        dataset.make_dataset(tfrecords.Manifest.read(tmp_path, "train"), 4)
    out, manifest = jpeg_out
    (tmp_path / "train.manifest.json").write_text(json.dumps(manifest.to_dict()))
    with pytest.raises(FileNotFoundError, match="shards listed in the train manifest are missing"):
        dataset.make_dataset(tfrecords.Manifest.read(tmp_path, "train"), 4)
    (tmp_path / "train.manifest.json").write_text(json.dumps({"count": 3}))
    with pytest.raises(ValueError, match="not a manifest of schema"):
        tfrecords.Manifest.read(tmp_path, "train")


# --- the preprocess stage -------------------------------------------------------------------


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture
def stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_set, split_stage, params_yaml, dvc_stages):
    """tmp_path as the working directory with 30 images and the split stage already run; yields
    (image set, preprocess argv and declared outputs from dvc.yaml, tfrecords folder, splits folder)."""
    monkeypatch.chdir(tmp_path)
    image_set = make_set(tmp_path / "raw", n=30, seed=4)
    params_yaml(tmp_path / "params.yaml", data=image_set.data_section())
    assert split_stage.main(dvc_stages("split")[0]) == 0
    argv, outputs = dvc_stages("preprocess")
    return image_set, argv, outputs, tmp_path / _arg(argv, "--out"), tmp_path / _arg(argv, "--splits-dir")


def _stray(tmp_path: Path) -> list[str]:
    """Temp files/folders the atomic writers leave only if they are interrupted."""
    return [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_preprocess_stage_writes_every_declared_output(stage, preprocess_stage, tmp_path: Path) -> None:
    image_set, argv, outputs, out, splits_dir = stage
    assert preprocess_stage.main(argv) == 0
    for path in outputs:
        assert (tmp_path / path).exists(), path
    metrics = json.loads((tmp_path / _arg(argv, "--metrics")).read_text())
    assert set(metrics) == {"train", "val", "test"}
    files = {"train.manifest.json", "val.manifest.json", "test.manifest.json"}
    for split in ("train", "val", "test"):
        frame = pd.read_csv(splits_dir / f"{split}.csv")
        manifest = tfrecords.Manifest.read(out, split)
        assert manifest.count == len(frame) == metrics[split]["records"]
        assert manifest.classes == list(frame.columns[1:]) == image_set.classes
        assert manifest.image_size == 32  # from the tiny params.yaml
        assert metrics[split]["shards"] == len(manifest.shards) == -(-len(frame) // 8)  # shard_size 8
        assert sorted(r["filename"].decode() for r in _records(out, split)) == sorted(frame["filename"])
        files |= {s.file for s in manifest.shards}
    assert sum(metrics[s]["records"] for s in metrics) == 30
    assert {p.name for p in out.iterdir()} == files  # nothing else in the folder
    assert _stray(tmp_path) == []


def _corrupt_one_test_image(splits_dir: Path, image_set) -> str:
    name = pd.read_csv(splits_dir / "test.csv")["filename"].iloc[-1]
    truncate(image_set.images_dir / name)
    return name


def test_preprocess_failing_halfway_leaves_no_output(stage, preprocess_stage, tmp_path: Path, caplog) -> None:
    image_set, argv, outputs, out, splits_dir = stage
    bad = _corrupt_one_test_image(splits_dir, image_set)  # train and val are written before test fails
    with caplog.at_level(logging.ERROR):
        assert preprocess_stage.main(argv) == 2
    assert str(image_set.images_dir / bad) in caplog.text and "cannot be decoded" in caplog.text
    for path in outputs:
        assert not (tmp_path / path).exists(), path
    assert _stray(tmp_path) == []


def test_preprocess_failure_keeps_the_previous_output(stage, preprocess_stage, tmp_path: Path) -> None:
    image_set, argv, outputs, out, splits_dir = stage
    assert preprocess_stage.main(argv) == 0
    before = _tree(out)
    _corrupt_one_test_image(splits_dir, image_set)
    assert preprocess_stage.main(argv) == 2
    assert _tree(out) == before
    assert _stray(tmp_path) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_while_writing_a_shard_is_an_oserror_naming_it(image_set, tmp_path: Path) -> None:
    """A real ENOSPC: the second shard is a link to /dev/full, which refuses every write."""
    out = tmp_path / "out"
    out.mkdir()
    shard = out / shard_name("train", 1, 3)
    (out / f".{shard.name}.{os.getpid()}.tmp").symlink_to("/dev/full")  # its temp, written in this process
    with pytest.raises(OSError) as caught:
        _write(image_set, out)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(shard)
    assert caught.value.__cause__.filename is None  # what write() raised: no file named
    assert not shard.exists()  # never renamed into place
    assert str(disk_error(caught.value)).startswith(f"{shard}: no space left on the device; free some space")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EBADF])
def test_disk_errors_of_a_shard_name_the_shard_not_its_temp(image_set, tmp_path: Path, monkeypatch,
                                                            code: int) -> None:
    """Opening the temp fails (it names the temp) or writing fails (it names nothing): either way
    the machine's failures name the shard; any other OSError is raised unchanged."""
    out = tmp_path / "out"
    out.mkdir()

    def refusing(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(tfrecords, "open", refusing, raising=False)  # shadows the builtin in tfrecords only
    with pytest.raises(OSError) as caught:
        _write(image_set, out)
    first = str(out / shard_name("train", 0, 3))
    assert caught.value.errno == code
    if code == errno.EBADF:  # a bug, not the disk: left as it was
        assert caught.value.filename.endswith(".tmp")
    else:
        assert caught.value.filename == first
        assert str(disk_error(caught.value)).startswith(f"{first}: ")
    assert sorted(p.name for p in out.iterdir()) == []  # no shard, no temp left


def test_preprocess_on_a_full_disk_fails_in_one_line_naming_the_shard_and_leaves_nothing(
        stage, preprocess_stage, params_yaml, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """The disk fills while the stage writes the test shard, train and val being complete."""
    image_set, argv, outputs, out, splits_dir = stage
    # In this process (workers: 1), writes to the test shard's temp go to /dev/full.
    params_yaml(tmp_path / "params.yaml", data=image_set.data_section(), preprocess={"workers": 1})
    monkeypatch.setattr(tfrecords, "open", lambda path, *a, **k: open(
        "/dev/full" if ".test-00000-" in str(path) else path, *a, **k), raising=False)
    with caplog.at_level(logging.ERROR):
        assert preprocess_stage.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    shard = Path(_arg(argv, "--out")) / "test-00000-of-00001.tfrecord"  # where it was going, not the temp
    assert errors[0].startswith(f"{shard}: no space left on the device; free some space"), errors[0]
    for path in outputs:
        assert not (tmp_path / path).exists(), path
    assert _stray(tmp_path) == []


def test_an_image_broken_after_split_is_named_then_skipped_by_split_and_every_count_agrees(
        stage, preprocess_stage, split_stage, dvc_stages, params_yaml, tmp_path: Path, caplog) -> None:
    image_set, argv, outputs, out, splits_dir = stage
    bad = _corrupt_one_test_image(splits_dir, image_set)
    params_yaml(tmp_path / "params.yaml", data=image_set.data_section(skip_bad_images=True))
    with caplog.at_level(logging.ERROR):
        assert preprocess_stage.main(argv) == 2  # preprocess never skips: the split CSVs would lie
    assert f"{image_set.images_dir / bad}: cannot be decoded" in caplog.text
    assert "run `dvc repro split`" in caplog.text

    assert split_stage.main(dvc_stages("split")[0]) == 0  # what `dvc repro` does next: split skips it
    reports = tmp_path / _arg(dvc_stages("split")[0], "--reports-dir")
    skipped = pd.read_csv(reports / "skipped.csv")
    assert skipped["filename"].tolist() == [bad] and "cannot be decoded" in skipped["reason"][0]
    assert preprocess_stage.main(argv) == 0
    metrics = json.loads((tmp_path / _arg(argv, "--metrics")).read_text())
    summary = json.loads((reports / "summary.json").read_text())
    for split in ("train", "val", "test"):
        frame = pd.read_csv(splits_dir / f"{split}.csv")
        assert bad not in frame["filename"].tolist()
        assert metrics[split]["records"] == tfrecords.Manifest.read(out, split).count == len(frame)
        assert summary["split"][split] == len(frame)
    assert sum(metrics[s]["records"] for s in metrics) == summary["images"] == 29 and summary["skipped"] == 1


def test_preprocess_stage_output_is_the_same_for_any_worker_count(stage, preprocess_stage, params_yaml,
                                                                  tmp_path: Path) -> None:
    image_set, argv, outputs, out, splits_dir = stage
    assert preprocess_stage.main(argv) == 0
    first = _tree(out)
    params_yaml(tmp_path / "params.yaml", data=image_set.data_section(), preprocess={"workers": 2})
    assert preprocess_stage.main(argv) == 0
    assert _tree(out) == first


def test_preprocess_keeps_filenames_that_look_like_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           make_set, split_stage, preprocess_stage, params_yaml,
                                                           dvc_stages) -> None:
    monkeypatch.chdir(tmp_path)
    image_set = make_set(tmp_path / "raw", n=12, seed=4)
    renames = {"img_001.png": "007", "img_002.png": "NA"}  # no extension: PIL reads the content
    text = image_set.labels_csv.read_text()
    for old, new in renames.items():
        (image_set.images_dir / old).rename(image_set.images_dir / new)
        text = text.replace(old, new)
    image_set.labels_csv.write_text(text)
    params_yaml(tmp_path / "params.yaml", data=image_set.data_section())
    assert split_stage.main(dvc_stages("split")[0]) == 0
    argv, _ = dvc_stages("preprocess")
    assert preprocess_stage.main(argv) == 0
    out = tmp_path / _arg(argv, "--out")
    names = {r["filename"].decode() for split in ("train", "val", "test") for r in _records(out, split)}
    assert set(renames.values()) <= names and len(names) == 12
