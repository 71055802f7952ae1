"""Tests for the multi-label stratified split (`mlic.split`).

Tolerances stated here (2,000 rows, 12 classes, prevalence 0.75 down to 0.02, fractions
0.70/0.15/0.15):
- every class's prevalence in every split is within 0.01 (absolute) of its overall prevalence;
- every class's positive count in every split is within 1 of fraction x total positives, which
  for the rarest class (~37 positives, ~5.6 expected in val and test) is what "never left out,
  never doubled" means;
- split sizes are within 1% (absolute) of the fractions.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from mlic.split import (SPLITS, max_prevalence_gap, random_split, split_counts, split_fractions,
                        stratified_split)

N, K = 2000, 12
PREVALENCE_TOLERANCE = 0.01
COUNT_TOLERANCE = 1.0
SIZE_TOLERANCE = 0.01
FRACTIONS = split_fractions(0.15, 0.15)


def imbalanced_labels(seed: int, n: int = N, k: int = K) -> np.ndarray:
    """Multi-hot labels with prevalence falling geometrically from 0.75 to 0.02 and a shared
    latent factor, so classes co-occur (as 'clear' and 'primary' do in real sets)."""
    rng = np.random.default_rng(seed)
    prevalence = np.geomspace(0.75, 0.02, k)
    latent = 0.6 * rng.standard_normal((n, 1)) + 0.8 * rng.standard_normal((n, k))
    thresholds = np.array([np.quantile(latent[:, j], 1 - p) for j, p in enumerate(prevalence)])
    return (latent > thresholds).astype(np.uint8)


@pytest.fixture(scope="module")
def y() -> np.ndarray:
    labels = imbalanced_labels(0)
    counts = labels.sum(axis=0)
    assert counts[0] > 0.7 * N and 0.015 * N <= counts[-1] <= 0.025 * N  # the premise of the tests
    co = labels.T.astype(int) @ labels
    assert co[0, 1] > counts[0] * counts[1] / N  # classes co-occur more than by chance
    assert (labels.sum(axis=1) == 0).any()
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_class_keeps_its_prevalence_in_every_split(seed: int) -> None:
    y = imbalanced_labels(seed)
    assignment = stratified_split(y, FRACTIONS, seed=seed)
    overall = y.mean(axis=0)
    expected = np.outer(FRACTIONS, y.sum(axis=0))
    for s, name in enumerate(SPLITS):
        part = y[assignment == s]
        gap = np.abs(part.mean(axis=0) - overall)
        assert gap.max() <= PREVALENCE_TOLERANCE, (name, gap.round(4))
        deviation = np.abs(part.sum(axis=0) - expected[s])
        assert deviation.max() <= COUNT_TOLERANCE, (name, deviation.round(2))
    assert max_prevalence_gap(y, assignment).max() <= PREVALENCE_TOLERANCE


def test_rarest_class_is_placed_better_than_by_random_split(y: np.ndarray) -> None:
    rarest = int(np.argmin(y.sum(axis=0)))
    stratified = [max_prevalence_gap(y, stratified_split(y, FRACTIONS, seed))[rarest] for seed in range(5)]
    randomized = [max_prevalence_gap(y, random_split(len(y), FRACTIONS, seed))[rarest] for seed in range(20)]
    assert max(stratified) < np.median(randomized)
    assert max(stratified) < 0.5 * np.median(randomized)  # clearly, not marginally


@pytest.mark.parametrize("val, test", [(0.15, 0.15), (0.1, 0.2), (0.3, 0.05)])
def test_split_sizes_follow_the_fractions(y: np.ndarray, val: float, test: float) -> None:
    fractions = split_fractions(val, test)
    assignment = stratified_split(y, fractions, seed=0)
    sizes = np.bincount(assignment, minlength=3) / len(y)
    np.testing.assert_allclose(sizes, fractions, atol=SIZE_TOLERANCE)


def test_same_seed_same_assignment_different_seed_different(y: np.ndarray) -> None:
    a = stratified_split(y, FRACTIONS, seed=7)
    np.testing.assert_array_equal(a, stratified_split(y.copy(), FRACTIONS, seed=7))
    b = stratified_split(y, FRACTIONS, seed=8)
    assert (a != b).mean() > 0.1


def test_every_row_is_assigned_including_rows_with_no_label(y: np.ndarray) -> None:
    assignment = stratified_split(y, FRACTIONS, seed=0)
    assert assignment.shape == (len(y),)
    assert set(np.unique(assignment)) == {0, 1, 2}
    unlabelled = y.sum(axis=1) == 0
    per_split = np.bincount(assignment[unlabelled], minlength=3)
    assert per_split.sum() == unlabelled.sum()
    assert np.all(per_split > 0)  # unlabelled rows are spread, not dumped in one split


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, bool, np.float32])
def test_label_dtype_does_not_change_the_assignment(y: np.ndarray, dtype) -> None:
    np.testing.assert_array_equal(stratified_split(y.astype(dtype), FRACTIONS, 3),
                                  stratified_split(y, FRACTIONS, 3))


def test_too_few_rows_for_three_splits_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 images cannot fill 3 splits"):
        stratified_split(np.ones((2, 1)), FRACTIONS, 0)


@pytest.mark.parametrize(
    "val, test, message",
    [
        (0.0, 0.15, "split.val_fraction must be between 0 and 1"),
        (0.15, 0.0, "split.test_fraction must be between 0 and 1"),
        (-0.1, 0.15, "split.val_fraction must be between 0 and 1"),
        (1.0, 0.15, "split.val_fraction must be between 0 and 1"),
        (0.15, 1.5, "split.test_fraction must be between 0 and 1"),
        (float("nan"), 0.15, "split.val_fraction must be between 0 and 1"),
        (0.5, 0.5, "leaves no training data; keep their sum below 1"),
        (0.6, 0.45, "leaves no training data"),
    ],
)
def test_bad_fractions_are_rejected_with_a_clear_message(val: float, test: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_fractions(val, test)


def test_split_fractions_puts_the_rest_in_train() -> None:
    np.testing.assert_allclose(split_fractions(0.1, 0.2), [0.7, 0.1, 0.2])


@pytest.mark.parametrize("n", [10, 101, 2000])
def test_random_split_has_the_same_sizes_and_is_seeded(n: int) -> None:
    a = random_split(n, FRACTIONS, seed=1)
    assert np.bincount(a, minlength=3).tolist() == [n - 2 * int(0.15 * n), int(0.15 * n), int(0.15 * n)]
    np.testing.assert_array_equal(a, random_split(n, FRACTIONS, seed=1))


def test_split_counts_table_adds_up(y: np.ndarray) -> None:
    classes = [f"c{i}" for i in range(K)]
    assignment = stratified_split(y, FRACTIONS, 0)
    table = split_counts(y, assignment, classes)
    assert list(table.columns) == ["split", "class", "images", "count", "prevalence"]
    assert len(table) == 3 * K
    assert table.groupby("split", sort=False)["images"].first().tolist() == np.bincount(assignment).tolist()
    np.testing.assert_array_equal(table.groupby("class", sort=False)["count"].sum().to_numpy(), y.sum(axis=0))
    row = table[(table["split"] == "val") & (table["class"] == "c3")].iloc[0]
    assert row["prevalence"] == pytest.approx(y[assignment == 1, 3].mean(), abs=1e-6)


def test_max_prevalence_gap_on_a_hand_made_case() -> None:
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    # split 0 holds both class-0 rows: prevalence 1.0 vs 0.5 overall
    np.testing.assert_allclose(max_prevalence_gap(y, np.array([0, 0, 1, 1])), [0.5, 0.5])
    np.testing.assert_allclose(max_prevalence_gap(y, np.array([0, 1, 0, 1])), [0.0, 0.0])


# --- the split stage ------------------------------------------------------------------------


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture
def stage_run(tmp_path, monkeypatch, make_set, params_yaml, split_stage, dvc_stages):
    """Run stages/split.py's main with dvc.yaml's argv in tmp_path, on 30 images (or a given set)."""
    monkeypatch.chdir(tmp_path)
    argv, outputs = dvc_stages("split")

    def run(image_set=None, **data) -> tuple[int, list[str], list[str], object]:
        image_set = image_set or make_set(tmp_path / "raw", n=30, seed=4)
        params_yaml(tmp_path / "params.yaml", data=image_set.data_section(**data))
        return split_stage.main(argv), argv, outputs, image_set
    return run


def _stray(root) -> list[str]:
    return [p.name for p in root.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_split_stage_writes_every_declared_output(stage_run, tmp_path) -> None:
    code, argv, outputs, image_set = stage_run()
    assert code == 0
    for out in outputs:
        assert (tmp_path / out).exists(), out
    splits_dir = tmp_path / _arg(argv, "--splits-dir")
    assert sorted(p.name for p in splits_dir.iterdir()) == ["test.csv", "train.csv", "val.csv"]
    frames = {name: pd.read_csv(splits_dir / f"{name}.csv") for name in SPLITS}
    for frame in frames.values():
        assert list(frame.columns) == ["filename", *image_set.classes]
    names = [f for frame in frames.values() for f in frame["filename"]]
    assert sorted(names) == sorted(image_set.filenames)  # every image once, in exactly one split
    assert [len(frames[s]) for s in SPLITS] == [18, 6, 6]  # 0.6 / 0.2 / 0.2 of 30
    row = {name: i for i, name in enumerate(image_set.filenames)}
    for frame in frames.values():
        np.testing.assert_array_equal(frame[image_set.classes].to_numpy(),
                                      image_set.y[[row[f] for f in frame["filename"]]])

    reports = tmp_path / _arg(argv, "--reports-dir")
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["images"] == 30 and summary["classes"] == len(image_set.classes)
    assert summary["images_without_label"] == int((image_set.y.sum(axis=1) == 0).sum())
    assert {k: summary["split"][k] for k in SPLITS} == {"train": 18, "val": 6, "test": 6}
    assert pd.read_csv(reports / "skipped.csv").columns.tolist() == ["line", "filename", "reason"]
    assert len(pd.read_csv(reports / "skipped.csv")) == 0
    assert len(pd.read_csv(reports / "cooccurrence.csv")) == len(image_set.classes) ** 2
    assert _stray(tmp_path) == []


def test_split_stage_is_deterministic(stage_run, tmp_path) -> None:
    code, argv, outputs, image_set = stage_run()
    first = {out: _read_all(tmp_path / out) for out in outputs}
    assert stage_run(image_set)[0] == 0
    assert {out: _read_all(tmp_path / out) for out in outputs} == first


def _read_all(path) -> dict[str, bytes] | bytes:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.is_dir() else path.read_bytes()


def test_split_stage_reads_tags_with_a_delimiter(stage_run, make_set, tmp_path) -> None:
    image_set = make_set(tmp_path / "raw", n=30, seed=4, fmt="tags", delimiter=";")
    code, argv, _, _ = stage_run(image_set)
    assert code == 0
    frame = pd.read_csv(tmp_path / _arg(argv, "--splits-dir") / "train.csv")
    assert list(frame.columns) == ["filename", *sorted(image_set.classes)]


def test_split_stage_bad_labels_exit_2_with_the_message_and_no_output(stage_run, make_set, tmp_path,
                                                                      caplog) -> None:
    image_set = make_set(tmp_path / "raw", n=30, seed=4)
    text = image_set.labels_csv.read_text().splitlines()
    text[4] = text[4].rsplit(",", 1)[0] + ",yes"  # line 5, last class column
    image_set.labels_csv.write_text("\n".join(text) + "\n")
    with caplog.at_level(logging.ERROR):
        code, argv, outputs, _ = stage_run(image_set)
    assert code == 2
    assert f"{image_set.labels_csv}:5, column '{image_set.classes[-1]}'" in caplog.text
    assert "'yes' is not 0 or 1" in caplog.text
    for out in outputs:
        assert not (tmp_path / out).exists(), out
    assert _stray(tmp_path) == []


def test_split_stage_skips_bad_images_and_reports_them(stage_run, make_set, tmp_path) -> None:
    image_set = make_set(tmp_path / "raw", n=30, seed=4)
    (image_set.images_dir / image_set.filenames[20]).unlink()
    (image_set.images_dir / image_set.filenames[25]).write_text("not an image")
    code, argv, _, _ = stage_run(image_set, skip_bad_images=True)
    assert code == 0
    reports = tmp_path / _arg(argv, "--reports-dir")
    skipped = pd.read_csv(reports / "skipped.csv")
    assert skipped["line"].tolist() == [22, 27]  # header is line 1, row i is line i + 2
    assert skipped["filename"].tolist() == [image_set.filenames[20], image_set.filenames[25]]
    summary = json.loads((reports / "summary.json").read_text())
    assert (summary["images"], summary["skipped"]) == (28, 2)
    names = [f for s in SPLITS for f in pd.read_csv(tmp_path / _arg(argv, "--splits-dir") / f"{s}.csv")["filename"]]
    assert len(names) == 28 and image_set.filenames[20] not in names


def test_read_split_csv_reads_what_split_writes_filenames_as_text(tmp_path) -> None:
    import pandas as pd

    from mlic.atomic import write_csv
    from mlic.split import read_split_csv

    frame = pd.DataFrame({"filename": ["007", "NA", "a, b.jpg", 'q"uote.png', "ä/日.jpg"],
                          "cat": [1, 0, 0, 1, 1], "dog": [0, 0, 1, 1, 0]})
    write_csv(tmp_path / "train.csv", frame)
    filenames, y, classes = read_split_csv(tmp_path / "train.csv")
    assert filenames == frame["filename"].tolist() and classes == ["cat", "dog"]
    np.testing.assert_array_equal(y, frame[["cat", "dog"]].to_numpy())
    assert y.dtype == np.uint8


@pytest.mark.parametrize("text, message", [
    ("filename,cat\na.jpg,1\nb.jpg,2\n", "row 3 is not a filename and 1 0/1 values"),
    ("filename,cat\na.jpg\n", "row 2 is not a filename and 1 0/1 values"),
    ("name,cat\na.jpg,1\n", "not a split CSV"),
    ("", "not a split CSV"),
])
def test_read_split_csv_names_the_file_and_row_of_a_bad_one(tmp_path, text: str, message: str) -> None:
    from mlic.errors import InputError
    from mlic.split import read_split_csv

    (tmp_path / "val.csv").write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        read_split_csv(tmp_path / "val.csv")
    assert str(err.value).startswith(str(tmp_path / "val.csv")) and "dvc repro split" in str(err.value)
