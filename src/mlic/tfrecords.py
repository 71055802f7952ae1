"""The TFRecord schema and the sharded, deterministic, parallel writer.

Schema (the tensorflow/models `official/vision` convention): one `tf.train.Example` per image
with `image/encoded`, `image/format`, `image/source_id`, `image/filename`, `image/height`,
`image/width` and the labels as a list of class ids under `image/class/label`, expanded to a
multi-hot vector at parse time (`parse_example`). Shards are named
`<split>-00000-of-00004.tfrecord`; each split has a `<split>.manifest.json` beside its shards.

Determinism: records are placed in a seeded order, cut into contiguous shards, and serialized
with `deterministic=True` (protobuf map ordering is otherwise not stable from run to run), so
the same inputs and params give byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
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


def serialize_example(encoded: bytes, image_format: str, filename: str, height: int, width: int,
                      class_ids: Iterable[int]) -> bytes:
    """One image as a serialized `tf.train.Example`, byte-stable across runs."""
    import tensorflow as tf  # deferred: workers and light tools never pay TF's import

    def _bytes(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def _ints(v: Iterable[int]) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

    name = filename.encode("utf-8")
    example = tf.train.Example(features=tf.train.Features(feature={
        KEY_ENCODED: _bytes(encoded),
        KEY_FORMAT: _bytes(image_format.encode("ascii")),
        KEY_SOURCE_ID: _bytes(name),
        KEY_FILENAME: _bytes(name),
        KEY_HEIGHT: _ints([height]),
        KEY_WIDTH: _ints([width]),
        KEY_LABEL: _ints(class_ids),
    }))
    return example.SerializeToString(deterministic=True)


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


def _prepare_chunk(tasks: list[tuple[str, EncodeSettings]]) -> list[tuple[bytes | None, str | None]]:
    return [_prepare_one(t) for t in tasks]


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
    """A process pool for image work, or None to work in this process when `workers` <= 1.

    spawn, not fork: the parent has TensorFlow loaded and forking a multi-threaded process is
    unsafe. Create it once per stage: each spawned worker pays a second or so of imports. The
    workers end quietly when the stage fails, is interrupted or killed (`_QuietWorker`).
    """
    if workers <= 1:
        yield None
        return
    if os.name == "posix":
        _start_resource_tracker()
    with _QuietPool(workers, initializer=_ignore_sigint, context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def ordered_map(pool: Any, fn: Callable[[list[Any]], list[Any]], items: list[Any],
                chunk: int = 32, inflight_per_worker: int = 8) -> Iterator[Any]:
    """Map `fn` over chunks of `items` in `pool` (None: in-process), yielding results in input order.

    The first chunks are submitted on the call, not on the first read, so the workers start while
    the caller is still busy (importing TensorFlow takes ~3 s). At most `inflight_per_worker`
    chunks per worker are pending at once, so memory stays flat however many items there are
    (Pool.imap would queue every result the parent hasn't read): a few MB of encoded images.
    """
    chunks = (items[i:i + chunk] for i in range(0, len(items), chunk))
    if pool is None:
        return (result for c in chunks for result in fn(c))
    limit = max(1, pool._processes * inflight_per_worker)
    pending = collections.deque(pool.apply_async(fn, (c,)) for c in itertools.islice(chunks, limit))

    def drain() -> Iterator[Any]:
        while pending:
            yield from pending.popleft().get()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.apply_async(fn, (nxt,)))

    return drain()


def record_order(filenames: list[str], seed: int) -> np.ndarray:
    """Seeded permutation of the records, fixed by filenames and seed, not by input order."""
    base = np.argsort(np.asarray(filenames, dtype=object), kind="stable")
    rng = np.random.default_rng(seed)
    return base[rng.permutation(len(base))]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# strerror text -> errno for the write failures that are the machine's, not the code's.
_ERRNO_BY_TEXT = {os.strerror(code): code for code in
                  (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO)}


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Writing `path`, a full disk or a refused write is raised as an OSError naming `path`.

    TensorFlow's writer reports it as a `tf.errors.OpError` ("<path>; No space left on device"),
    and Python's write() as an OSError without a file name: either way `errors.disk_error` could
    not say which file failed, or would not recognise the error at all.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in _ERRNO_BY_TEXT.values():
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except Exception as exc:
        tf = sys.modules.get("tensorflow")
        code = _ERRNO_BY_TEXT.get(str(getattr(exc, "message", "")).rsplit("; ", 1)[-1].strip())
        if tf is None or not isinstance(exc, tf.errors.OpError) or code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc


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
    n = len(filenames)
    order = record_order(filenames, seed)
    n_shards = max(1, -(-n // shard_size))
    groups = np.array_split(order, n_shards)
    tasks = [(str(images_dir / filenames[i]), settings) for i in order]
    results = ordered_map(pool, _prepare_chunk, tasks)
    import tensorflow as tf  # after the workers have their first images: the import takes ~3 s
    image_format = "jpeg" if settings.encoding == "jpeg" else "png"

    shards = []
    for s, group in enumerate(groups):
        path = out_dir / shard_name(split, s, n_shards)
        with _writing(path), tf.io.TFRecordWriter(str(path)) as writer:
            for i in group:
                encoded, error = next(results)
                if error is not None:
                    raise images.ImageError(
                        f"{images_dir / filenames[i]}: cannot be decoded ({error}), though split could decode "
                        "it: the file changed since; run `dvc repro split` (which checks every image again), "
                        "then preprocess")
                ids = np.flatnonzero(y[i]).tolist()
                writer.write(serialize_example(encoded, image_format, filenames[i],
                                               settings.image_size, settings.image_size, ids))
        shards.append({"file": path.name, "records": len(group), "sha256": _sha256(path)})

    manifest = Manifest(
        schema_version=SCHEMA_VERSION, split=split, count=n,
        classes=list(classes), image_size=settings.image_size, channels=3,
        resize_mode=settings.resize_mode, encoding=settings.encoding,
        jpeg_quality=settings.jpeg_quality if settings.encoding == "jpeg" else None,
        positives={c: int(v) for c, v in zip(classes, np.asarray(y).sum(axis=0))},
        shards=[Shard(**s) for s in shards], fingerprint="", directory=Path(out_dir),
    )
    manifest = dataclasses.replace(manifest, fingerprint=fingerprint(manifest.to_dict()))
    manifest.write()
    return manifest


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
