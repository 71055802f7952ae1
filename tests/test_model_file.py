"""Tests for byte-stable `.keras` files (`mlic.model_file`).

Each "same bytes" test first checks that plain `model.save` gives *different* bytes in the same
situation, so it fails if the rewrite stops being needed or stops working, never vacuously.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mlic import model_file
from mlic.model_file import make_deterministic, save_model

keras = pytest.importorskip("keras")


def _model(seed: int = 0) -> keras.Model:
    """A small compiled model, trained one step so the optimizer state is saved too."""
    keras.utils.set_random_seed(seed)
    # One regularizer object for both layers: Keras writes it as a shared object whose id is
    # its id(), as it does for the process-wide dtype policy (which differs only across processes).
    shared = keras.regularizers.L2(1e-4)
    model = keras.Sequential([
        keras.Input((6,), name="x"),
        keras.layers.Dense(5, activation="relu", kernel_regularizer=shared, name="hidden"),
        keras.layers.Dense(3, activation="sigmoid", kernel_regularizer=shared, name="head"),
    ], name="tiny")  # explicit names: auto-names (dense_1, adam_1) count the process's earlier objects
    model.compile(optimizer=keras.optimizers.Adam(name="adam"), loss="binary_crossentropy")
    rng = np.random.default_rng(seed)
    model.fit(rng.normal(size=(8, 6)), rng.integers(0, 2, (8, 3)).astype("float32"), epochs=1, verbose=0)
    return model


def _inputs() -> np.ndarray:
    return np.random.default_rng(7).normal(size=(4, 6)).astype("float32")


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def saved_apart(tmp_path_factory) -> tuple[Path, Path]:
    """The same model saved twice, 1.1 s apart (metadata holds the second; zip times 2 s)."""
    folder = tmp_path_factory.mktemp("apart")
    model = _model()
    first, second = folder / "first.keras", folder / "second.keras"
    model.save(first)
    time.sleep(1.1)
    model.save(second)
    return first, second


def test_same_model_saved_apart_gives_same_bytes(saved_apart, tmp_path: Path) -> None:
    raw = [tmp_path / "a.keras", tmp_path / "b.keras"]
    for src, dst in zip(saved_apart, raw):
        dst.write_bytes(src.read_bytes())
    assert raw[0].read_bytes() != raw[1].read_bytes(), "precondition: Keras stamps the save time"
    for path in raw:
        make_deterministic(path)
    assert raw[0].read_bytes() == raw[1].read_bytes()


def test_weights_member_needs_no_rewrite(saved_apart) -> None:
    # h5py creates datasets with track_times=False: the HDF5 bytes carry no save time. If this
    # fails after an h5py/Keras upgrade, model_file must rewrite model.weights.h5 too.
    first, second = (_members(p) for p in saved_apart)
    assert first[model_file.WEIGHTS] == second[model_file.WEIGHTS]


def test_equal_models_built_apart_give_same_bytes(tmp_path: Path) -> None:
    # Two model objects stand in for two processes (a train re-run): shared_object_id is an id().
    a, b = _model(), _model()
    b.set_weights(a.get_weights())
    pa, pb = tmp_path / "a.keras", tmp_path / "b.keras"
    a.save(pa)
    b.save(pb)
    assert _members(pa)[model_file.CONFIG] != _members(pb)[model_file.CONFIG], "precondition: id()s differ"
    make_deterministic(pa)
    make_deterministic(pb)
    assert pa.read_bytes() == pb.read_bytes()


def test_different_weights_give_different_bytes(tmp_path: Path) -> None:
    pa, pb = tmp_path / "a.keras", tmp_path / "b.keras"
    save_model(_model(seed=0), pa)
    save_model(_model(seed=1), pb)
    assert pa.read_bytes() != pb.read_bytes()
    assert _members(pa)[model_file.CONFIG] == _members(pb)[model_file.CONFIG]  # only the weights differ


def test_loads_back_with_identical_predictions(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "m.keras"
    save_model(model, path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(_inputs(), verbose=0), model.predict(_inputs(), verbose=0))
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    keras.saving.KerasFileEditor(str(path)).summary()  # reads metadata.json's date_saved


def test_save_model_equals_save_then_rewrite_and_leaves_no_temp_files(saved_apart, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    save_model(_model(), folder / "m.keras")
    rewritten = tmp_path / "r.keras"
    rewritten.write_bytes(saved_apart[0].read_bytes())
    make_deterministic(rewritten)
    assert (folder / "m.keras").read_bytes() == rewritten.read_bytes()
    assert _listing(folder) == ["m.keras"]


def test_rewrite_is_idempotent(saved_apart, tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    path.write_bytes(saved_apart[0].read_bytes())
    make_deterministic(path)
    once = path.read_bytes()
    make_deterministic(path)
    assert path.read_bytes() == once


def test_archive_layout(saved_apart, tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    path.write_bytes(saved_apart[0].read_bytes())
    make_deterministic(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        meta = json.loads(zf.read(model_file.METADATA))
    assert [i.filename for i in infos] == list(model_file.KERAS_ORDER)
    assert {(i.date_time, i.compress_type, i.external_attr >> 16 & 0o777) for i in infos} == {
        ((1980, 1, 1, 0, 0, 0), zipfile.ZIP_STORED, 0o644)}
    assert meta == {"keras_version": keras.__version__, "date_saved": "unrecorded"}


@pytest.mark.parametrize("where, error", [
    ("canonical_config", RuntimeError("disk full")),
    ("shutil.copyfileobj", KeyboardInterrupt()),  # mid-way through the weights
], ids=["config-error", "interrupt-in-weights"])
def test_interrupted_rewrite_keeps_original(saved_apart, tmp_path: Path, monkeypatch, where, error) -> None:
    path = tmp_path / "m.keras"
    original = saved_apart[0].read_bytes()
    path.write_bytes(original)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(model_file if where == "canonical_config" else model_file.shutil,
                        where.split(".")[-1], fail)
    with pytest.raises(type(error)):
        make_deterministic(path)
    assert path.read_bytes() == original
    assert _listing(tmp_path) == ["m.keras"]


@pytest.mark.parametrize("content", [b"not a zip", None], ids=["not-a-zip", "zip-without-config"])
def test_rejects_files_that_are_not_keras_archives(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "m.keras"
    if content is None:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hello")
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="not a .keras model file"):
        make_deterministic(path)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["m.keras"]


def test_asset_entries_sorted_and_directories_kept(tmp_path: Path) -> None:
    # Keras adds assets/... from a directory listing, whose order the file system decides.
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("assets/b/vocab.txt", "config.json", "assets/", "model.weights.h5", "metadata.json",
                     "assets/a/x.txt"):
            zf.writestr(name, "" if name.endswith("/") else "{}" if name.endswith(".json") else name)
    make_deterministic(path)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == ["metadata.json", "config.json", "model.weights.h5",
                                           "assets/", "assets/a/x.txt", "assets/b/vocab.txt"]
    assert infos[3].is_dir() and infos[3].external_attr >> 16 & 0o777 == 0o755


@pytest.mark.parametrize("ids, expected", [
    ([140601318151440, 140601318151440], [0, 0]),  # one shared object stays one
    ([99, 7, 99, 7], [0, 1, 0, 1]),  # two stay two, numbered by first appearance
    ([], []),
], ids=["one-shared", "two-shared", "none"])
def test_shared_object_ids_renumbered_one_to_one(ids: list[int], expected: list[int]) -> None:
    config = {"layers": [{"config": {"dtype": {"shared_object_id": i}}} for i in ids], "name": "m"}
    out = json.loads(model_file.canonical_config(json.dumps(config).encode()))
    assert [layer["config"]["dtype"]["shared_object_id"] for layer in out["layers"]] == expected
    assert out["name"] == "m"
