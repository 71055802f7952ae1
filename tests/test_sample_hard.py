"""Tests for the hard benchmark set (`mlic.sample_hard`, `sample.kind: hard`) and the kind switch.

The spec (module docstring) is checked on one set of 1,600 images at the benchmark's sizes,
made once per session: label statistics from labels.csv, geometry from `plan_image` (the pure
planner the renderer draws from), modes/formats/sizes from the files written.
"""

from __future__ import annotations

import hashlib
import logging
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import _load_stage
from mlic import sample, sample_hard
from mlic.params import Sample
from mlic.sample_hard import CLASSES, SIZES, SMALL_ONLY, generate_hard, make_example, plan_image

N, SEED, MIN_SIZE, MAX_SIZE = 1600, 42, 96, 320  # the benchmark's sizes; ~10 s with 2 workers


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hard_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("hard") / "sample"
    return out, generate_hard(out, N, seed=SEED, min_size=MIN_SIZE, max_size=MAX_SIZE, workers=2)


@pytest.fixture(scope="module")
def plans() -> list[sample_hard.Plan]:
    return [plan_image(SEED, i, MIN_SIZE, MAX_SIZE) for i in range(N)]


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_for_any_worker_count(tmp_path: Path) -> None:
    runs = {}
    for name, workers in [("a", 2), ("b", 2), ("c", 1)]:
        generate_hard(tmp_path / name, 40, seed=3, min_size=MIN_SIZE, max_size=160, workers=workers)
        runs[name] = _tree_bytes(tmp_path / name)
    assert len(runs["a"]) == 41  # 40 images + labels.csv
    assert runs["a"] == runs["b"] == runs["c"]
    generate_hard(tmp_path / "d", 40, seed=4, min_size=MIN_SIZE, max_size=160, workers=1)
    other = _tree_bytes(tmp_path / "d")
    assert other["labels.csv"] != runs["a"]["labels.csv"]
    assert not [k for k in other if k.startswith("images/") and other[k] == runs["a"].get(k)]


def test_image_depends_only_on_seed_and_index() -> None:
    plan1, img1 = make_example(5, 17, MIN_SIZE, MAX_SIZE)
    make_example(5, 16, MIN_SIZE, MAX_SIZE)  # must not disturb 17
    plan2, img2 = make_example(5, 17, MIN_SIZE, MAX_SIZE)
    assert np.array_equal(plan1.labels, plan2.labels) and plan1.objects == plan2.objects
    assert img1.mode == "RGB" and img1.size == (plan1.width, plan1.height)
    assert img1.tobytes() == img2.tobytes()


def test_shapes_kind_is_unchanged() -> None:
    """Digests of the easy sample's labels.csv and rendered pixels, taken before the hard kind
    existed (commit f0e1b19): sharing its helpers must not move a single byte."""
    assert _load_stage("sample").GENERATORS["shapes"] is sample.generate_sample
    digest = hashlib.sha256()
    for i in range(30):
        lab, img = sample.make_example(3, i, 48, 96)
        digest.update(lab.tobytes())
        digest.update(img.tobytes())
    assert digest.hexdigest() == "405a4f7177e74c8dd0fcab9f5d77d4d8c188af8332c8a8797b1181cc6034568c"


def test_shapes_kind_labels_csv_is_unchanged(tmp_path: Path) -> None:
    sample.generate_sample(tmp_path / "s", 30, seed=3, min_size=48, max_size=96, workers=1)
    assert hashlib.sha256((tmp_path / "s" / "labels.csv").read_bytes()).hexdigest() == (
        "26be322f5be5723b7c1b10ae65e49cbb23785e3bfc5ed78ff3448d2db8583692")


# --- labels ---------------------------------------------------------------------------------


def test_long_tail_and_empty_share(hard_set: tuple[Path, pd.DataFrame]) -> None:
    out, returned = hard_set
    frame = pd.read_csv(out / "labels.csv")
    pd.testing.assert_frame_equal(frame, returned)
    assert list(frame.columns) == ["filename", *CLASSES]
    assert len(CLASSES) >= 20
    prevalence = frame[list(CLASSES)].mean()
    assert prevalence.min() <= 0.02
    assert (prevalence < 0.05).sum() >= 5
    assert (prevalence > 0.30).sum() >= 3
    assert (prevalence > 0).all()
    counts = frame[list(CLASSES)].sum(axis=1)
    assert 0.03 <= (counts == 0).mean() <= 0.06
    assert counts.max() <= sample_hard.MAX_LABELS


def test_cooccurrence_rules_show_in_the_labels(hard_set: tuple[Path, pd.DataFrame]) -> None:
    labels = hard_set[1][list(CLASSES)]
    prevalence = labels.mean()
    for given, then, prob in sample_hard.COOCCURRENCE:
        if prob >= 0.25:
            assert labels.loc[labels[given] == 1, then].mean() > prevalence[then] + 0.1, (given, then)


# --- geometry (from the plan) ---------------------------------------------------------------


def test_planned_objects_are_the_labels(plans: list[sample_hard.Plan]) -> None:
    for plan in plans:
        assert {o.name for o in plan.objects} == {CLASSES[k] for k in np.flatnonzero(plan.labels)}
        assert len(plan.objects) <= sample_hard.MAX_OBJECTS


def test_object_sizes_within_each_class_range(plans: list[sample_hard.Plan]) -> None:
    eps = 1e-9
    ratios: dict[str, list[float]] = {name: [] for name in CLASSES}
    for plan in plans:
        short = min(plan.width, plan.height)
        for o in plan.objects:
            ratios[o.name].append(o.diameter / short)
            assert SIZES[o.name].lo - eps <= o.diameter / short <= SIZES[o.name].hi + eps, o
            r = o.diameter / 2
            assert r - eps <= o.cx <= plan.width - r + eps and r - eps <= o.cy <= plan.height - r + eps, o
    assert len(SMALL_ONLY) >= 5
    small = np.concatenate([ratios[name] for name in SMALL_ONLY])
    assert small.min() >= 0.03 - eps and small.max() <= 0.12 + eps
    assert small.min() < 0.035  # the smallest sizes are really drawn
    large = np.concatenate([ratios[name] for name in CLASSES if SIZES[name] == sample_hard.LARGE])
    assert large.min() >= 0.20 - eps and large.max() <= 0.45 + eps
    # small objects beside large ones in the same picture
    both = sum(any(o.name in SMALL_ONLY for o in p.objects) and any(o.diameter / min(p.width, p.height) >= 0.2
                                                                     for o in p.objects) for p in plans)
    assert both > 0.2 * len(plans)


@pytest.mark.parametrize("size", [48, 64, 96])
def test_pixel_floors_never_break_the_size_range(size: int) -> None:
    """Glyphs' 10 px floor is capped at 12 % of the side when images are smaller than the bench's."""
    for i in range(300):
        plan = plan_image(1, i, size, size)
        for o in plan.objects:
            assert SIZES[o.name].lo * size - 1e-9 <= o.diameter <= SIZES[o.name].hi * size + 1e-9, o


def _segments(strokes) -> frozenset:
    return frozenset(frozenset(map(tuple, seg)) for seg in strokes)


def test_glyphs_differ_in_one_stroke_and_none_is_anothers_mirror() -> None:
    glyphs = {name: _segments(strokes) for name, strokes in sample_hard.GLYPHS.items()}
    assert len(glyphs) >= 4 and len(set(glyphs.values())) == len(glyphs)
    for a in glyphs.values():
        for b in glyphs.values():
            assert len(a ^ b) <= 2  # the same strokes with one moved
    for name, strokes in sample_hard.GLYPHS.items():
        mirror = _segments([[(-x, y) for x, y in seg] for seg in strokes])
        assert all(mirror != other for n, other in glyphs.items() if n != name), name


# --- pictures -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sample_hard.TEXTURES)
def test_texture_kinds(kind: str) -> None:
    colours = (np.array([250.0, 10, 10]), np.array([10.0, 10, 250]))
    tex = np.asarray(sample_hard.texture(np.random.default_rng(0), 40, 30, colours, kind), dtype=float)
    assert tex.shape == (30, 40, 3)
    spread = tex[..., 0].max() - tex[..., 0].min()
    assert spread == 0 if kind == "solid" else spread > 100


def test_silhouette_fill_varies() -> None:
    """The cat's mean colour inside its outline is spread over the colour space: colour is no cue."""
    means = []
    for i in range(400):
        plan, img = make_example(SEED, i, MIN_SIZE, MAX_SIZE)
        for o in plan.objects:
            if o.name == "cat":
                r = o.diameter * 0.15  # the body's middle
                means.append(np.asarray(img.crop((int(o.cx - r), int(o.cy), int(o.cx + r), int(o.cy + 2 * r))),
                                        dtype=float).reshape(-1, 3).mean(axis=0))
    means = np.array(means)
    assert len(means) >= 10
    assert (means.std(axis=0) > 40).all()


# --- files ----------------------------------------------------------------------------------


def test_files_mix_modes_and_formats_within_size_range(hard_set: tuple[Path, pd.DataFrame]) -> None:
    out, frame = hard_set
    kinds = []
    for index, name in enumerate(frame["filename"]):
        with Image.open(out / "images" / name) as img:
            assert Path(name).suffix == {"JPEG": ".jpg", "PNG": ".png"}[img.format], name
            assert MIN_SIZE <= img.width <= MAX_SIZE and MIN_SIZE <= img.height <= MAX_SIZE, name
            kinds.append((img.format, img.mode))
    assert sorted(p.name for p in (out / "images").iterdir()) == list(frame["filename"])
    share = pd.Series(kinds).value_counts(normalize=True)
    for kind in [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L"), ("PNG", "P")]:
        assert share.get(kind, 0) > 0.03, kind
    assert {m for _, m in kinds} == {"RGB", "L", "P"}


def test_labels_in_csv_are_the_plans(hard_set: tuple[Path, pd.DataFrame], plans: list[sample_hard.Plan]) -> None:
    matrix = hard_set[1][list(CLASSES)].to_numpy()
    assert np.array_equal(matrix, np.stack([p.labels for p in plans]))


# --- the kind switch ------------------------------------------------------------------------


def test_sample_kinds_are_the_stage_generators() -> None:
    kinds = typing.get_args(typing.get_type_hints(Sample)["kind"])
    assert set(kinds) == set(_load_stage("sample").GENERATORS)
    assert Sample().kind == "shapes"


def test_stage_main_writes_hard_set_from_params(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("common:\n  seed: 9\nsample:\n  kind: hard\n  n_images: 12\n  min_size: 96\n  max_size: 128\n")
    out = tmp_path / "data" / "sample"
    with caplog.at_level(logging.INFO):
        assert _load_stage("sample").main(["--params", str(params), "--out", str(out), "--workers", "1"]) == 0
    frame = pd.read_csv(out / "labels.csv")
    assert list(frame.columns) == ["filename", *CLASSES]
    assert len(frame) == 12
    assert f"hard: 12 images, {len(CLASSES)} classes" in caplog.text


def test_stage_rejects_unknown_kind(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("sample:\n  kind: medium\n")
    assert _load_stage("sample").main(["--params", str(params), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
