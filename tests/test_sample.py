"""Tests for the built-in synthetic sample set (`mlic.sample`) and its stage script."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from mlic import sample
from mlic.sample import CLASSES, draw_labels, generate_sample, make_example, render_image

ROOT = Path(__file__).resolve().parents[1]
MIN_SIZE, MAX_SIZE = 48, 96  # small images keep the tests fast
EXIF_ORIENTATION = 0x0112


def _tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file under `out`, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample300(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """300 small images, generated once for the format, statistics and size tests."""
    out = tmp_path_factory.mktemp("sample300") / "sample"
    return out, generate_sample(out, 300, seed=7, min_size=MIN_SIZE, max_size=MAX_SIZE, workers=2)


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_for_any_worker_count(tmp_path: Path) -> None:
    runs = {}
    for name, workers in [("a", 2), ("b", 2), ("c", 1)]:
        generate_sample(tmp_path / name, 40, seed=3, min_size=MIN_SIZE, max_size=MAX_SIZE, workers=workers)
        runs[name] = _tree_bytes(tmp_path / name)
    assert len(runs["a"]) == 41  # 40 images + labels.csv
    assert runs["a"] == runs["b"]
    assert runs["a"] == runs["c"]


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    generate_sample(tmp_path / "s3", 20, seed=3, min_size=MIN_SIZE, max_size=MAX_SIZE, workers=1)
    generate_sample(tmp_path / "s4", 20, seed=4, min_size=MIN_SIZE, max_size=MAX_SIZE, workers=1)
    a, b = _tree_bytes(tmp_path / "s3"), _tree_bytes(tmp_path / "s4")
    assert a["labels.csv"] != b["labels.csv"]
    same = [k for k in a if k.startswith("images/") and a[k] == b.get(k)]
    assert not same


def test_image_depends_only_on_seed_and_index() -> None:
    labels1, img1 = make_example(seed=5, index=17, min_size=MIN_SIZE, max_size=MAX_SIZE)
    make_example(seed=5, index=16, min_size=MIN_SIZE, max_size=MAX_SIZE)  # must not disturb 17
    labels2, img2 = make_example(seed=5, index=17, min_size=MIN_SIZE, max_size=MAX_SIZE)
    assert np.array_equal(labels1, labels2)
    assert img1.tobytes() == img2.tobytes()


# --- rendering ------------------------------------------------------------------------------


def test_every_class_has_a_shape() -> None:
    assert len(CLASSES) >= 8
    assert set(sample.SHAPES) == set(CLASSES)
    assert all(0 < rate < 1 for rate in sample.BASE_RATES.values())


@pytest.mark.parametrize(
    "classes",
    [(), ("circle",), ("ring", "crescent"), ("star", "cross", "heart", "arrow"), CLASSES[:4]],
    ids=["empty", "one", "holes", "four", "common"],
)
def test_render_image_gives_rgb_of_requested_size(classes: tuple[str, ...]) -> None:
    labels = np.array([c in classes for c in CLASSES], dtype=np.uint8)
    img = render_image(labels, np.random.default_rng(0), 70, 50)
    assert img.mode == "RGB"
    assert img.size == (70, 50)
    again = render_image(labels, np.random.default_rng(0), 70, 50)
    assert img.tobytes() == again.tobytes()


# --- labels ---------------------------------------------------------------------------------


def test_draw_labels_follows_stated_rates() -> None:
    """5,000 draws (no images): the rates the module comments promise, with sampling slack."""
    labels = np.stack([draw_labels(np.random.default_rng([11, i])) for i in range(5000)])
    prevalence = labels.mean(axis=0)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    assert (prevalence > 0.6).sum() >= 2
    rare = prevalence[prevalence < 0.1]
    assert len(rare) >= 2 and (rare >= 0.04).all()
    counts = labels.sum(axis=1)
    assert counts.max() <= sample.MAX_LABELS
    assert 0.03 <= (counts == 0).mean() <= 0.06


def test_csv_has_filename_and_one_int_column_per_class(sample300: tuple[Path, pd.DataFrame]) -> None:
    out, returned = sample300
    frame = pd.read_csv(out / "labels.csv")
    assert list(frame.columns) == ["filename", *CLASSES]
    pd.testing.assert_frame_equal(frame, returned)
    values = frame[list(CLASSES)]
    assert all(pd.api.types.is_integer_dtype(t) for t in values.dtypes)
    assert values.isin([0, 1]).all().all()
    stems = [Path(f).stem for f in frame["filename"]]
    assert stems == [f"img_{i:05d}" for i in range(300)]
    assert sorted(frame["filename"]) == list(frame["filename"])  # sorted order = generation order
    assert sorted(p.name for p in (out / "images").iterdir()) == list(frame["filename"])
    for name in frame["filename"]:
        with Image.open(out / "images" / name) as img:
            img.load()


def test_label_statistics_on_generated_set(sample300: tuple[Path, pd.DataFrame]) -> None:
    _, frame = sample300
    labels = frame[list(CLASSES)]
    prevalence = labels.mean()
    assert (prevalence > 0.6).sum() >= 2
    rare = prevalence[prevalence < 0.1]
    assert len(rare) >= 2 and (rare > 0).all()
    counts = labels.sum(axis=1)
    assert counts.between(0, 4).all()
    assert 0 < (counts == 0).sum() < 0.1 * len(frame)
    for given, then, _ in sample.COOCCURRENCE:
        p_then_given = labels.loc[labels[given] == 1, then].mean()
        assert p_then_given > prevalence[then] + 0.15, (given, then)


# --- files ----------------------------------------------------------------------------------


def test_format_mix_is_present(sample300: tuple[Path, pd.DataFrame]) -> None:
    out, frame = sample300
    kinds = []
    for name in frame["filename"]:
        with Image.open(out / "images" / name) as img:
            kinds.append((img.format, img.mode, img.getexif().get(EXIF_ORIENTATION)))
    kinds_set = set(kinds)
    assert ("JPEG", "L", None) in kinds_set
    assert ("PNG", "RGBA", None) in kinds_set
    assert ("PNG", "P", None) in kinds_set
    assert ("JPEG", "CMYK", None) in kinds_set
    assert any(k[0] == "JPEG" and k[2] in (6, 8) for k in kinds)
    assert kinds.count(("JPEG", "RGB", None)) > 0.85 * len(kinds)


def test_image_sizes_within_range_and_exif_restores_upright(sample300: tuple[Path, pd.DataFrame]) -> None:
    out, frame = sample300
    rotated = 0
    for index, name in enumerate(frame["filename"]):
        with Image.open(out / "images" / name) as img:
            upright = ImageOps.exif_transpose(img)
            for side in (*img.size, *upright.size):
                assert MIN_SIZE <= side <= MAX_SIZE, name
            if img.getexif().get(EXIF_ORIENTATION) in (6, 8):
                rotated += 1
                assert upright.size == img.size[::-1]
                # The stored pixels, turned back by EXIF, are the rendered picture (up to JPEG loss).
                _, reference = make_example(7, index, MIN_SIZE, MAX_SIZE)
                diff = np.abs(np.asarray(upright.convert("RGB"), float) - np.asarray(reference, float))
                assert diff.mean() < 8, name
    assert rotated > 0


def test_failed_run_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sample.render_image
    calls = []

    def flaky(labels, rng, width, height):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        return real(labels, rng, width, height)

    monkeypatch.setattr(sample, "render_image", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_sample(tmp_path / "out", 10, seed=1, min_size=MIN_SIZE, max_size=MAX_SIZE, workers=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("n_images", "min_size", "max_size"),
    [(0, 48, 96), (10, 96, 48), (10, 8, 48)],
    ids=["no-images", "min-above-max", "too-small"],
)
def test_generate_rejects_bad_arguments(
    tmp_path: Path, n_images: int, min_size: int, max_size: int
) -> None:
    with pytest.raises(ValueError):
        generate_sample(tmp_path / "out", n_images, seed=1, min_size=min_size, max_size=max_size)
    assert not (tmp_path / "out").exists()


# --- stage ----------------------------------------------------------------------------------


def _load_stage():
    spec = importlib.util.spec_from_file_location("stage_sample", ROOT / "stages" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_main_writes_sample_from_params(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("common:\n  seed: 9\nsample:\n  n_images: 12\n  min_size: 40\n  max_size: 56\n")
    out = tmp_path / "data" / "sample"
    with caplog.at_level(logging.INFO):
        assert _load_stage().main(["--params", str(params), "--out", str(out), "--workers", "1"]) == 0
    frame = pd.read_csv(out / "labels.csv")
    assert len(frame) == 12
    assert len(list((out / "images").iterdir())) == 12
    assert f"12 images, {len(CLASSES)} classes" in caplog.text
