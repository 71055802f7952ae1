"""The TFRecord schema and the sharded, deterministic, parallel writer.

Schema (the tensorflow/models `official/vision` convention): one `tf.train.Example` per image
with `image/encoded`, `image/format`, `image/source_id`, `image/filename`, `image/height`,
`image/width` and the labels as a list of class ids under `image/class/label`, expanded to a
multi-hot vector at parse time (`parse_example`). Shards are named
`<split>-00000-of-00004.tfrecord`; each split has a `<split>.manifest.json` beside its shards.

Determinism: records are placed in a seeded order and cut into contiguous shards (`plan_split`);
each shard is then one self-contained task (`write_shard`): decode and resize its images, serialize
them in order with a fixed field order (what TensorFlow's `SerializeToString(deterministic=True)`
writes: a test holds the two byte-equal), frame them as TFRecords and rename the finished file into
place. The same inputs and params give byte-identical shards whatever runs the tasks: this process,
a pool of local workers, or Ray (`mlic.runners`), and a retried task rewrites the same bytes.

The writer needs no TensorFlow: a worker that would import it pays ~3 s and ~400 MB before its
first image, and the stage's own TensorFlow import was most of what kept 2 workers from 2x.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import queue
import signal
import struct
import sys
from collections.abc import Iterable, Iterator
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import numpy as np

from mlic import images
from mlic.atomic import read_json
from mlic.errors import InputError, MissingInput

log = logging.getLogger(__name__)

KEY_ENCODED = "image/encoded"
KEY_FORMAT = "image/format"
KEY_SOURCE_ID = "image/source_id"
KEY_FILENAME = "image/filename"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
KEY_LABEL = "image/class/label"

MANIFEST_SUFFIX = ".manifest.json"
# 2: no `skipped` list any more (split decodes every image first, so preprocess skips none)
SCHEMA_VERSION = 2


def shard_name(split: str, index: int, count: int) -> str:
    """`train-00000-of-00004.tfrecord`."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 on the wire: a negative number is its two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    # Feature.bytes_list (1) -> BytesList.value (1)
    return _field(1, _field(1, value))


def _int64_feature(values: Iterable[int]) -> bytes:
    # Feature.int64_list (3) -> Int64List.value (1), packed (proto3); an empty list is an empty message
    packed = b"".join(_varint(int(v)) for v in values)
    return _field(3, _field(1, packed) if packed else b"")


def serialize_example(encoded: bytes, image_format: str, filename: str, height: int, width: int,
                      class_ids: Iterable[int]) -> bytes:
    """One image as a serialized `tf.train.Example`, byte-stable across runs, without TensorFlow.

    Example.features (1) -> Features.feature (1), a map written entry by entry in key order, each
    entry (key 1, value 2) a `Feature`: exactly what `SerializeToString(deterministic=True)` gives
    (`tests/test_tfrecords.py` checks byte equality against TensorFlow on random records).
    """
    name = filename.encode("utf-8")
    features = {
        KEY_ENCODED: _bytes_feature(encoded),
        KEY_FORMAT: _bytes_feature(image_format.encode("ascii")),
        KEY_SOURCE_ID: _bytes_feature(name),
        KEY_FILENAME: _bytes_feature(name),
        KEY_HEIGHT: _int64_feature([height]),
        KEY_WIDTH: _int64_feature([width]),
        KEY_LABEL: _int64_feature(class_ids),
    }
    entries = b"".join(_field(1, _field(1, key.encode("utf-8")) + _field(2, features[key]))
                       for key in sorted(features))
    return _field(1, entries)


def _masked_crc(data: bytes) -> bytes:
    """TFRecord's checksum: CRC-32C, rotated right by 15 and offset (so a CRC of CRCs is not trivial)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length (uint64 LE), its masked CRC, the data, the data's masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def decode_pixels(encoded: Any) -> Any:
    """Encoded JPEG/PNG bytes -> uint8 HxWx3: how every consumer of `images.prepare`'s bytes decodes.

    The TFRecord reader and the prediction path (`inference.Predictor`) both decode here, with
    TensorFlow's decoder: PIL's JPEG decoder differs from it by up to ~11 levels on the same bytes.
    """
    import tensorflow as tf

    # decode_image handles both JPEG and PNG; expand_animations=False keeps a static 3-D shape.
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def parse_example(serialized: Any, n_classes: int) -> dict[str, Any]:
    """Parse one serialized example into image (uint8 HxWx3), multi-hot labels (float32) and filename.

    Works eagerly and inside `tf.data.Dataset.map`.
    """
    import tensorflow as tf

    features = tf.io.parse_single_example(serialized, {
        KEY_ENCODED: tf.io.FixedLenFeature([], tf.string),
        KEY_FORMAT: tf.io.FixedLenFeature([], tf.string),
        KEY_FILENAME: tf.io.FixedLenFeature([], tf.string),
        KEY_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        KEY_WIDTH: tf.io.FixedLenFeature([], tf.int64),
        KEY_LABEL: tf.io.VarLenFeature(tf.int64),
    })
    image = decode_pixels(features[KEY_ENCODED])
    ids = tf.sparse.to_dense(features[KEY_LABEL])
    # Sum of one-hots (not max) so an image with no label gives zeros, not -inf.
    labels = tf.minimum(tf.reduce_sum(tf.one_hot(ids, n_classes, dtype=tf.float32), axis=0), 1.0)
    return {"image": image, "labels": labels, "filename": features[KEY_FILENAME],
            "height": features[KEY_HEIGHT], "width": features[KEY_WIDTH]}


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """How images become records (the `preprocess` section of params.yaml, and data.max_image_pixels)."""

    image_size: int
    resize_mode: str
    encoding: str
    jpeg_quality: int
    max_pixels: int | None = None   # data.max_image_pixels; None: PIL's own limit


def _prepare_one(task: tuple[str, EncodeSettings]) -> tuple[bytes | None, str | None]:
    """Worker: encoded bytes, or the reason the image failed (never raises across processes)."""
    path, s = task
    try:
        return images.prepare(path, s.image_size, s.resize_mode, s.encoding, s.jpeg_quality, s.max_pixels), None
    except Exception as exc:  # noqa: BLE001 - reported with the file name by the parent
        return None, " ".join(f"{exc.__class__.__name__}: {exc}".split())


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group, but the parent handles it (leaving
    `worker_pool` terminates the workers), so the workers do not each print a KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _QuietWorker(SpawnProcess):
    """A pool worker that ends without a word when the stage that started it is gone.

    A stage killed outright (`kill -9`, SIGTERM) leaves its workers with broken pipes. An idle one
    reads end-of-file and leaves quietly (multiprocessing's own rule); a busy one would get
    BrokenPipeError sending its result and print two tracebacks. Here that error ends it
    silently when the parent is gone: the result has nobody to go to. (Ending it by SIGPIPE
    instead would be simpler but can kill it holding the result pipe's lock, and a second
    worker then waits for that lock for ever.) With the parent alive the error is raised as usual.
    """

    def run(self) -> None:
        try:
            super().run()
        except (BrokenPipeError, ConnectionResetError, EOFError):
            parent = multiprocessing.parent_process()
            if parent is None or parent.is_alive():
                raise


# The resource tracker removes the pool's semaphores when a killed stage could not, and warns
# "There appear to be 6 leaked semaphore objects to clean up at shutdown": after `kill -9`, that
# is expected, not a leak to report. The tracker takes its warning filters from -W options.
_TRACKER_QUIET = "ignore:resource_tracker:UserWarning"


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (if it does not run yet) without that warning."""
    from multiprocessing import resource_tracker

    sys.warnoptions.append(_TRACKER_QUIET)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(_TRACKER_QUIET)


class _QuietPool(multiprocessing.pool.Pool):
    @staticmethod
    def Process(ctx: Any, *args: Any, **kwds: Any) -> _QuietWorker:  # how Pool makes its workers
        return _QuietWorker(*args, **kwds)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Any]:
    """Processes to share image work with this one: `workers` in all, this process included.

    Yields a pool of `workers - 1` processes, or None (work in this process alone) when `workers`
    <= 1. The caller works too (`run_tasks`): it would otherwise sit idle, and it starts at once
    while the pool's processes are still starting (about a second each: spawn re-imports Python).
    spawn, not fork: a parent may hold threads (TensorFlow's, in callers that loaded it), and
    forking a multi-threaded process is unsafe. Create it once per stage. The workers end quietly
    when the stage fails, is interrupted or killed (`_QuietWorker`).
    """
    if workers <= 1:
        yield None
        return
    if os.name == "posix":
        _start_resource_tracker()
    with _QuietPool(workers - 1, initializer=_ignore_sigint, context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def record_order(filenames: list[str], seed: int) -> np.ndarray:
    """Seeded permutation of the records, fixed by filenames and seed, not by input order."""
    base = np.argsort(np.asarray(filenames, dtype=object), kind="stable")
    rng = np.random.default_rng(seed)
    return base[rng.permutation(len(base))]


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Writing `path` (through a temp file beside it), a disk error is an OSError naming `path`.

    Python's write() raises a full disk as an OSError without a file name, and an open() or
    rename names the temp file: either way `errors.disk_error` could not tell the user which output.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS and str(exc.filename or "") != str(path):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO}


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard to write: everything a worker on any machine needs, and nothing else (it pickles).

    `records` are (filename as in the labels CSV, class ids) in the shard's record order.
    """

    split: str
    index: int
    count: int                      # shards in the split
    records: tuple[tuple[str, tuple[int, ...]], ...]
    images_dir: str
    out_dir: str
    settings: EncodeSettings

    @property
    def file(self) -> str:
        return shard_name(self.split, self.index, self.count)


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What `write_shard` did: the shard's hash, or the image that failed (`error`, a full message)."""

    split: str
    index: int
    file: str
    records: int
    sha256: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """One split cut into shard tasks, plus what its manifest needs besides the shards' hashes."""

    split: str
    classes: list[str]
    count: int
    positives: dict[str, int]
    out_dir: str
    settings: EncodeSettings
    tasks: list[ShardTask]


def plan_split(split: str, filenames: list[str], y: np.ndarray, classes: list[str], images_dir: Path,
               out_dir: Path, settings: EncodeSettings, shard_size: int, seed: int) -> SplitPlan:
    """Cut one split into shard tasks: the seeded record order (`record_order`), in contiguous shards."""
    order = record_order(filenames, seed)
    n_shards = max(1, -(-len(filenames) // shard_size))
    y = np.asarray(y)
    tasks = [ShardTask(split, s, n_shards,
                       tuple((filenames[i], tuple(np.flatnonzero(y[i]).tolist())) for i in group),
                       str(images_dir), str(out_dir), settings)
             for s, group in enumerate(np.array_split(order, n_shards))]
    positives = {c: int(v) for c, v in zip(classes, y.sum(axis=0))} if len(filenames) else {c: 0 for c in classes}
    return SplitPlan(split, list(classes), len(filenames), positives, str(out_dir), settings, tasks)


def write_shard(task: ShardTask) -> ShardResult:
    """Decode, resize and encode the task's images and write its shard; run by any worker.

    The shard is written to a temp file beside it and renamed when complete, so a task that is
    killed and retried (a Ray worker lost, a pool restarted) rewrites the same bytes and never
    leaves a half shard under the final name. A disk error names the shard, not the temp file.
    An image that no longer decodes is returned as `error` (never raised: an exception would cross
    processes and engines as a traceback, not as the one-line message the user needs).
    """
    s = task.settings
    image_format = "jpeg" if s.encoding == "jpeg" else "png"
    path = Path(task.out_dir) / task.file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with _writing(path), open(tmp, "wb") as fh:
            for filename, ids in task.records:
                source = Path(task.images_dir) / filename
                encoded, error = _prepare_one((str(source), s))
                if error is not None:
                    return ShardResult(task.split, task.index, task.file, len(task.records), error=(
                        f"{source}: cannot be decoded ({error}), though split could decode it: the file "
                        "changed since; run `dvc repro split` (which checks every image again), then preprocess"))
                record = frame_record(serialize_example(encoded, image_format, filename, s.image_size,
                                                        s.image_size, ids))
                digest.update(record)
                fh.write(record)
        with _writing(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardResult(task.split, task.index, task.file, len(task.records), sha256=digest.hexdigest())


def finish_split(plan: SplitPlan, results: Iterable[ShardResult]) -> "Manifest":
    """The split's manifest from its shards' results (any order); written beside the shards.

    Raises `images.ImageError` for the first shard (in shard order) that hit an image it could not
    decode, so the message does not depend on which worker finished first.
    """
    by_index = {r.index: r for r in results if r.split == plan.split}
    missing = [t.file for t in plan.tasks if t.index not in by_index]
    if missing:
        raise RuntimeError(f"{plan.split}: no result for shard(s) {', '.join(missing)}")
    ordered = [by_index[t.index] for t in plan.tasks]
    for r in ordered:
        if r.error is not None:
            raise images.ImageError(r.error)
    s = plan.settings
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, split=plan.split, count=plan.count,
        classes=list(plan.classes), image_size=s.image_size, channels=3,
        resize_mode=s.resize_mode, encoding=s.encoding,
        jpeg_quality=s.jpeg_quality if s.encoding == "jpeg" else None,
        positives=dict(plan.positives),
        shards=[Shard(file=r.file, records=r.records, sha256=r.sha256) for r in ordered],
        fingerprint="", directory=Path(plan.out_dir),
    )
    manifest = dataclasses.replace(manifest, fingerprint=fingerprint(manifest.to_dict()))
    manifest.write()
    return manifest


class _Failed:
    """A worker's exception, passed back through the results queue."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def run_tasks(tasks: list[ShardTask], pool: Any = None) -> Iterator[ShardResult]:
    """`write_shard` over `tasks`, yielding results as they finish, in this process and `pool`'s.

    One task per shard, not per image: each process writes whole shards and only their hashes come
    back, so throughput grows with the processes. This process takes tasks too (`worker_pool`).
    Biggest shards first, so the last to start are the small val/test ones; each pool process
    holds one task at a time and gets the next from its own completion callback, so none waits
    for this process to finish a shard before it is fed, and none hoards tasks at the end.
    """
    todo = collections.deque(sorted(tasks, key=lambda t: -len(t.records)))
    if pool is None:
        while todo:
            yield write_shard(todo.popleft())
        return
    finished: queue.SimpleQueue = queue.SimpleQueue()

    def feed(result: ShardResult | _Failed | None = None) -> None:
        # Runs in the pool's result thread too: deque.popleft is atomic, so a task goes to one taker.
        if result is not None:
            finished.put(result)
            if isinstance(result, _Failed):
                return
        try:
            task = todo.popleft()
        except IndexError:
            return
        try:
            pool.apply_async(write_shard, (task,), callback=feed, error_callback=lambda exc: feed(_Failed(exc)))
        except ValueError:  # "Pool not running": the stage is failing or interrupted; nothing to feed
            pass

    def take(block: bool) -> Iterator[ShardResult]:
        while True:
            try:
                result = finished.get(block=block)
            except queue.Empty:
                return
            if isinstance(result, _Failed):
                raise result.exc
            yield result
            block = False

    for _ in range(pool._processes):
        feed()
    remaining = len(tasks)
    while remaining:
        try:
            task = todo.popleft()
        except IndexError:  # all handed out: wait for the pool's last ones
            for result in take(block=True):
                remaining -= 1
                yield result
            continue
        yield write_shard(task)
        remaining -= 1
        for result in take(block=False):
            remaining -= 1
            yield result


def write_split(split: str, filenames: list[str], y: np.ndarray, classes: list[str], images_dir: Path,
                out_dir: Path, settings: EncodeSettings, shard_size: int, seed: int, pool: Any = None) -> "Manifest":
    """Write one split's shards and manifest into `out_dir`; return the manifest.

    `pool` comes from `worker_pool` (None works in this process). The caller makes `out_dir`
    atomic (a temp folder renamed into place), so shards are written straight into it.

    Every image is expected to decode: `split` decoded each one the same way and skipped (or
    refused) the bad ones, so the split CSVs, the manifests and reports/data/skipped.csv agree.
    An image that fails here changed after `split` ran: `images.ImageError` names it and says to
    re-run split; nothing is skipped here.
    """
    plan = plan_split(split, filenames, y, classes, images_dir, out_dir, settings, shard_size, seed)
    return finish_split(plan, run_tasks(plan.tasks, pool))


def fingerprint(manifest: dict[str, Any]) -> str:
    """Content fingerprint of a split: its shards' hashes plus what decoding them needs to know."""
    core = {k: manifest[k] for k in ("schema_version", "classes", "image_size", "encoding")}
    core["shards"] = [s["sha256"] for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Shard:
    file: str      # name inside the manifest's folder
    records: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """`<split>.manifest.json`: what one split's shards hold. Read once per split with `read`.

    `directory` is where the manifest and its shards are (not stored in the file).
    """

    schema_version: int
    split: str
    count: int
    classes: list[str]              # label column order
    image_size: int
    channels: int
    resize_mode: str
    encoding: str
    jpeg_quality: int | None
    positives: dict[str, int]       # positive records per class
    shards: list[Shard]
    fingerprint: str
    directory: Path = dataclasses.field(default=Path("."), compare=False)

    @classmethod
    def read(cls, tfrecord_dir: str | Path, split: str) -> "Manifest":
        """The manifest of one split, with a clear error if preprocess has not produced it."""
        path = Path(tfrecord_dir) / f"{split}{MANIFEST_SUFFIX}"
        raw = read_json(path, "manifest", "run `dvc repro preprocess` first")
        names = {f.name for f in dataclasses.fields(cls)} - {"directory"}
        if not isinstance(raw, dict) or set(raw) != names:
            raise InputError(f"{path}: not a manifest of schema {SCHEMA_VERSION}; run `dvc repro preprocess`")
        return cls(**{**raw, "shards": [Shard(**s) for s in raw["shards"]]}, directory=Path(tfrecord_dir))

    def to_dict(self) -> dict[str, Any]:
        """The file's content (everything but `directory`)."""
        out = dataclasses.asdict(self)
        del out["directory"]
        return out

    def write(self) -> Path:
        """Write `<directory>/<split>.manifest.json` (sorted keys: stable bytes)."""
        path = self.directory / f"{self.split}{MANIFEST_SUFFIX}"
        with _writing(path), open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        return path

    @property
    def prevalence(self) -> np.ndarray:
        """Per-class fraction of positive records, in class order."""
        return np.array([self.positives[c] for c in self.classes], dtype=np.float64) / max(self.count, 1)

    def shard_paths(self) -> list[str]:
        """The shard files in manifest order, checked to exist."""
        paths = [str(self.directory / s.file) for s in self.shards]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise MissingInput(f"shards listed in the {self.split} manifest are missing: "
                                    f"{', '.join(missing)}; run `dvc repro preprocess`")
        return paths


def resolve_workers(workers: int) -> int:
    """0 means every core."""
    return workers if workers > 0 else (os.cpu_count() or 1)
