"""Byte-stable `.keras` files: the same model saved twice gives the same bytes, so DVC re-runs
nothing downstream of a training run that produced the same model.

A `.keras` file is a zip of `metadata.json`, `config.json`, `model.weights.h5` (and `assets/...`
for layers with assets). Saved as Keras 3.15 writes it, three things change from save to save:

- the zip entry timestamp of `model.weights.h5` (the save time; the two JSON entries get 1980);
- `metadata.json`'s `date_saved` (the save time, to the second);
- `config.json`'s `shared_object_id`s: Keras numbers objects shared between layers (the dtype
  policy of every layer, for one) by their `id()`, a memory address, so every *process* writes
  different ids. A re-run of `train` is a new process: this alone changed the file every run.

`model.weights.h5` itself was measured stable (h5py creates datasets with `track_times=False`
and Keras groups carry no times): same weights, same bytes, across saves and processes. Its
entry is copied as is.

`make_deterministic` rewrites such an archive: entries in Keras's order (metadata, config,
weights, then the rest sorted by name: assets come from a directory listing), every entry time
1980-01-01 00:00, mode 0644 (directories 0755), stored uncompressed as Keras stores them (no
dependence on a zlib version either), shared ids renumbered 0, 1, 2... in order of first
appearance, and `date_saved` set to "unrecorded". Keras's loader never reads `metadata.json`;
`keras.saving.KerasFileEditor.summary()` does read `date_saved` (a KeyError if the key is
gone), hence a plain word rather than a missing key or an invented date. When the model was
saved is on the file system, in DVC and in MLflow.

Bytes are stable for one Python, Keras and h5py version: a new `keras_version` is an honest
change, and another Python's `zipfile` may lay out headers differently.
"""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlic.atomic import atomic_path
from mlic.errors import InputError

if TYPE_CHECKING:  # keras only where a model is saved: make_deterministic works without it
    import keras

METADATA, CONFIG, WEIGHTS = "metadata.json", "config.json", "model.weights.h5"
KERAS_ORDER = (METADATA, CONFIG, WEIGHTS)  # the order Keras writes them in
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
FILE_ATTR = (stat.S_IFREG | 0o644) << 16
DIR_ATTR = (stat.S_IFDIR | 0o755) << 16 | 0x10  # 0x10: the MS-DOS directory flag
UNIX = 3  # ZipInfo.create_system; Windows would write 0 and so other bytes
DATE_SAVED = "unrecorded"


def canonical_config(config_json: bytes) -> bytes:
    """`config.json` with each `shared_object_id` renumbered 0, 1, 2... by first appearance.

    Keras only compares the ids with each other (objects with the same id are rebuilt as one
    shared object), so any one-to-one renumbering loads the same model.
    """
    new_ids: dict[Any, int] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "shared_object_id":
                    out[key] = new_ids.setdefault(value, len(new_ids))
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    # Keras writes json.dumps(config) with default separators; keep that shape (and key order).
    return json.dumps(walk(json.loads(config_json))).encode()


def canonical_metadata(metadata_json: bytes) -> bytes:
    """`metadata.json` with `date_saved` replaced by "unrecorded"; other keys kept as they are."""
    meta = json.loads(metadata_json)
    if "date_saved" in meta:
        meta["date_saved"] = DATE_SAVED
    return json.dumps(meta).encode()


def _entry_order(names: list[str]) -> list[str]:
    known = [n for n in KERAS_ORDER if n in names]
    return known + sorted(n for n in names if n not in KERAS_ORDER)


def _rewrite(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(src) as zin:
        infos = {info.filename: info for info in zin.infolist()}
        if len(infos) != len(zin.infolist()):
            raise InputError(f"{src}: duplicate entry names; not a file Keras wrote")
        if CONFIG not in infos:
            raise InputError(f"{src}: no {CONFIG}; not a .keras model file")
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
            for name in _entry_order(list(infos)):
                info = infos[name]
                out = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
                out.compress_type = zipfile.ZIP_STORED
                out.create_system = UNIX
                out.external_attr = DIR_ATTR if info.is_dir() else FILE_ATTR
                if name in (CONFIG, METADATA):
                    data = zin.read(info)
                    zout.writestr(out, canonical_config(data) if name == CONFIG else canonical_metadata(data))
                    continue
                out.file_size = info.file_size  # lets zipfile pick zip64 for members over 2 GiB
                with zin.open(info) as fin, zout.open(out, "w") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)  # weights can be large: stream them


def make_deterministic(path: str | Path) -> None:
    """Rewrite the `.keras` file at `path` in place so equal models give equal bytes.

    Atomic: the new archive is written to a temp file beside `path` and renamed over it, so an
    interruption leaves the original file. Idempotent: a second call gives the same bytes.
    ValueError if `path` is not a Keras zip archive.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a zip archive; not a .keras model file")
    with atomic_path(path) as tmp:
        _rewrite(path, tmp)


def save_model(model: keras.Model, path: str | Path) -> None:
    """`model.save(path)` with byte-stable output, atomically (see `make_deterministic`)."""
    with atomic_path(path) as tmp:
        staged = tmp.with_suffix(".keras")  # Keras insists on the extension
        try:
            model.save(staged)
            _rewrite(staged, tmp)
        finally:  # atomic_path removes its own temp file, not this one
            staged.unlink(missing_ok=True)
