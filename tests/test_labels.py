"""Tests for reading and validating labels CSVs (`mlic.labels`) and the data summary."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic import labels
from mlic.labels import LabelError, LabelTable, check_filename, read_labels, summarize
from mlic.params import Data

GOOD_IMAGES = ("a.jpg", "b.png", "c.jpg", "d.png", "sub/e.jpg")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """tmp_path/images with five small readable images and `text.jpg`, a text file named like a JPEG."""
    images = tmp_path / "images"
    for i, name in enumerate(GOOD_IMAGES):
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24 + i, 30), (10 * i, 100, 200)).save(path)
    (images / "text.jpg").write_text("this is not an image\n")
    return tmp_path


def _read(folder: Path, text: str | bytes, **spec):
    """Write `text` as labels.csv in `folder` and read it with `data` params `spec`."""
    csv_path = folder / "labels.csv"
    if isinstance(text, bytes):
        csv_path.write_bytes(text)
    else:
        csv_path.write_text(text, encoding="utf-8")
    return read_labels(Data(labels_csv=str(csv_path), images_dir=str(folder / "images"), **spec))


def _problem(folder: Path, text: str | bytes, **spec) -> tuple[LabelError, str]:
    with pytest.raises(LabelError) as err:
        _read(folder, text, **spec)
    return err.value, str(err.value)


ONEHOT = dict(format="onehot")
TAGS = dict(format="tags", delimiter=";")

# (params, CSV text, line, column, words the message must contain: what is wrong and what to do)
ONE_PROBLEM_CASES = [
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,0\nnope.jpg,0,1\nb.png,1,1\n",
                 3, "filename", ["nope.jpg", "does not exist", "fix the filename or add the image"],
                 id="missing-image"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\ntext.jpg,0,1\n",
                 3, "filename", ["text.jpg", "cannot be read", "replace or remove it"], id="unreadable-image"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,0\nb.png,0,2\n",
                 3, "y", ["'2' is not 0 or 1", "write 1 if the image shows this class, else 0"], id="value-2"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,yes,1\nb.png,0,1\n",
                 2, "x", ["'yes' is not 0 or 1", "write 1"], id="value-yes"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\nb.png,,1\n",
                 3, "x", ["'' is not 0 or 1", "write 1"], id="value-empty"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\nb.png,0,-1\n",
                 3, "y", ["'-1' is not 0 or 1"], id="value-negative"),
    pytest.param(ONEHOT, "filename,x,y\r\na.jpg,1,0\r\nb.png,0,2\r\n",
                 3, "y", ["'2' is not 0 or 1"], id="windows-line-endings"),
    pytest.param(ONEHOT, 'filename,x,y\na.jpg,1,0\n"b\nc.png",0,1\nc.jpg,0,maybe\n',
                 5, "y", ["'maybe' is not 0 or 1"], id="quoted-newline-counts-as-a-line"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,0\nb.png,0,1\n\nb.png,1,1\n",
                 5, "filename", ["duplicate filename 'b.png' (first on line 3)", "keep one row per image"],
                 id="duplicate-after-blank-line"),
    pytest.param(ONEHOT, 'filename,x,y\nsub/e.jpg,1,0\n"sub\\e.jpg",0,1\n',
                 3, "filename", ["duplicate filename", "(first on line 2)"], id="duplicate-other-separator"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,0\n./a.jpg,0,1\n",
                 3, "filename", ["duplicate filename './a.jpg' (first on line 2)"], id="duplicate-dot-slash"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\n../x.jpg,0,1\n",
                 3, "filename", ["'../x.jpg' leaves the images folder", "move the image inside it"], id="dotdot"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\nsub/../../x.jpg,0,1\n",
                 3, "filename", ["leaves the images folder"], id="nested-dotdot"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\n/etc/passwd,0,1\n",
                 3, "filename", ["'/etc/passwd' is absolute", "give it relative to the images folder"], id="posix-abs"),
    pytest.param(ONEHOT, 'filename,x,y\na.jpg,1,1\n"C:\\x.jpg",0,1\n',
                 3, "filename", ["is absolute", "relative to the images folder"], id="windows-abs"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\n,0,1\n",
                 3, "filename", ["filename is empty"], id="empty-filename"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\n b.png,0,1\n",
                 3, "filename", ["leading or trailing spaces", "remove them"], id="spaces-in-filename"),
    pytest.param(ONEHOT, "file,x,y\na.jpg,1,1\n",
                 1, None, ["no 'filename' column", "found: file, x, y", "set data.filename_column"],
                 id="no-filename-column"),
    pytest.param(ONEHOT, "filename,x,x\na.jpg,1,1\n",
                 1, "x", ["appears more than once", "rename one"], id="duplicate-column"),
    pytest.param(ONEHOT, "filename\na.jpg\n",
                 1, None, ["no class columns", "data.format: tags"], id="no-class-columns"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\nb.png,1\n",
                 3, None, ["has 2 cells but the header has 3", "fix the row"], id="ragged-short"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,1\nb.png,1,0,1\n",
                 3, None, ["has 4 cells but the header has 3"], id="ragged-long"),
    pytest.param(ONEHOT, "filename,x,y\na.jpg,1,0\nb.png,1,0\n",
                 None, "y", ["no positive example", "remove it from the classes or add images"],
                 id="class-no-positive"),
    pytest.param(ONEHOT, "", None, None, ["the labels CSV is empty", "needs a header row"], id="empty-file"),
    pytest.param(ONEHOT, "filename,x,y\n", None, None, ["header but no rows", "add one row per image"],
                 id="header-only"),
    pytest.param(ONEHOT, "filename,x,y\n\n\n", None, None, ["header but no rows"], id="header-and-blank-lines"),
    pytest.param(dict(ONEHOT, classes=["x", "z"]), "filename,x,y\na.jpg,1,1\n",
                 1, "z", ["from data.classes has no column", "add the column"], id="listed-class-without-column"),
    pytest.param(dict(TAGS, classes=["x", "y"]), "filename,tags\na.jpg,x;y\nb.png,x;z\n",
                 3, "tags", ["unknown tag 'z'", "fix the tag or add it to data.classes"], id="tags-unknown"),
    pytest.param(TAGS, "filename,tags\na.jpg,x;y\nmissing.png,x\n",
                 3, "filename", ["missing.png", "does not exist"], id="tags-missing-image"),
    pytest.param(TAGS, "filename,tags\na.jpg,x;y\na.jpg,x\n",
                 3, "filename", ["duplicate filename 'a.jpg' (first on line 2)"], id="tags-duplicate"),
    pytest.param(TAGS, "filename,tags\na.jpg,x;y\nb.png,x,y\n",
                 3, None, ["has 3 cells but the header has 2", "need quotes"], id="tags-ragged"),
    pytest.param(TAGS, "filename,labels\na.jpg,x;y\n",
                 1, None, ["no 'tags' column", "set data.tags_column"], id="tags-no-tags-column"),
    pytest.param(TAGS, "filename,tags\na.jpg,\nb.png,\n",
                 None, "tags", ["no tags at all"], id="tags-none-at-all"),
    pytest.param(dict(TAGS, classes=["x", "y", "w"]), "filename,tags\na.jpg,x;y\n",
                 None, "w", ["no positive example"], id="tags-listed-class-no-positive"),
    pytest.param(dict(TAGS, filename_column="path"), "path,tags\na.jpg,x\nghost.jpg,x\n",
                 3, "path", ["ghost.jpg", "does not exist"], id="custom-filename-column"),
]


@pytest.mark.parametrize("spec, text, line, column, words", ONE_PROBLEM_CASES)
def test_bad_input_names_file_line_column_and_the_fix(folder: Path, spec: dict, text: str, line: int | None,
                                                      column: str | None, words: list[str]) -> None:
    err, message = _problem(folder, text, **spec)
    first = err.problems[0]
    assert (first.line, first.column) == (line, column)
    csv_path = str(folder / "labels.csv")
    location = csv_path if line is None else f"{csv_path}:{line}"
    if column is not None:
        location += f", column '{column}'"
    assert location in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("name", ["../x.jpg", "/etc/passwd", "C:\\x.jpg", "\\\\server\\share\\x.jpg",
                                  "a/../../b.jpg", "", "  ", " a.jpg"])
def test_check_filename_rejects_paths_outside_the_folder(name: str) -> None:
    assert check_filename(name) is not None


@pytest.mark.parametrize("name", ["a.jpg", "sub/a.jpg", "sub\\a.jpg", "a..b.jpg", "..a.jpg", "a b.jpg"])
def test_check_filename_accepts_relative_paths_inside(name: str) -> None:
    assert check_filename(name) is None


def test_symlink_pointing_outside_is_rejected(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (folder / "images" / "link.png").symlink_to(outside)
    err, message = _problem(folder, "filename,x\na.jpg,1\nlink.png,1\n")
    assert err.problems[0].line == 3 and "resolves outside the images folder" in message


def test_images_folder_must_exist(folder: Path) -> None:
    csv_path = folder / "labels.csv"
    csv_path.write_text("filename,x\na.jpg,1\n")
    with pytest.raises(LabelError, match="images folder does not exist; check data.images_dir"):
        read_labels(Data(labels_csv=str(csv_path), images_dir=str(folder / "nope")))


def test_labels_csv_must_exist(folder: Path) -> None:
    with pytest.raises(LabelError, match="does not exist; check data.labels_csv"):
        read_labels(Data(labels_csv=str(folder / "nope.csv"), images_dir=str(folder / "images")))


def test_non_utf8_csv_names_the_line(folder: Path) -> None:
    err, message = _problem(folder, "filename,x\na.jpg,1\nb\xe9.png,1\n".encode("latin-1"))
    assert err.problems[0].line == 3
    assert "labels.csv:3" in message and "0xe9 is not UTF-8" in message and "save the file as UTF-8" in message


def test_several_problems_are_reported_at_once(folder: Path) -> None:
    text = ("filename,x,y\n"
            "a.jpg,1,2\n"        # line 2: bad value
            "b.png,1,0\n"
            "b.png,0,1\n"        # line 4: duplicate
            "../c.jpg,0,1\n"     # line 5: outside the folder
            "d.png,1\n")         # line 6: ragged
    err, message = _problem(folder, text)
    assert sorted(p.line for p in err.problems) == [2, 4, 5, 6]
    assert message.startswith("4 problems in the labels:")
    for line in (2, 4, 5, 6):
        assert f"labels.csv:{line}" in message


def test_missing_and_unreadable_images_are_reported_together_with_the_skip_hint(folder: Path) -> None:
    err, message = _problem(folder, "filename,x\na.jpg,1\nghost.jpg,1\ntext.jpg,0\nb.png,1\n")
    assert [(p.line, p.column) for p in err.problems[:2]] == [(3, "filename"), (4, "filename")]
    assert "set data.skip_bad_images: true" in message


def test_long_problem_lists_are_capped_but_counted(folder: Path) -> None:
    rows = "".join(f"a.jpg,{i + 2}\n" for i in range(40))  # 1 duplicate-free row, then 39 duplicates
    err, message = _problem(folder, "filename,x\n" + rows)
    assert len(err.problems) > labels.MAX_REPORTED_PROBLEMS
    assert message.startswith(f"{len(err.problems)} problems")
    assert f"... and {len(err.problems) - labels.MAX_REPORTED_PROBLEMS} more" in message
    assert message.count("\n  - ") == labels.MAX_REPORTED_PROBLEMS


@pytest.mark.parametrize(
    "spec, text",
    [
        (ONEHOT, "filename,x,y\na.jpg,1,0\nb.png,0,0\nc.jpg,0,1\nd.png,0,0\n"),
        (TAGS, "filename,tags\na.jpg,x\nb.png,\nc.jpg,y\nd.png,\n"),
        (dict(format="tags", delimiter=" "), "filename,tags\na.jpg,x\nb.png,\nc.jpg,y\nd.png,  \n"),
    ],
    ids=["onehot-zeros", "tags-empty-cell", "tags-blank-cell"],
)
def test_rows_with_no_label_are_valid_and_counted(folder: Path, spec: dict, text: str) -> None:
    table, skipped = _read(folder, text, **spec)
    assert table.filenames == ["a.jpg", "b.png", "c.jpg", "d.png"]
    np.testing.assert_array_equal(table.y, [[1, 0], [0, 0], [0, 1], [0, 0]])
    metrics, *_ = summarize(table)
    assert metrics["images_without_label"] == 2
    assert skipped.empty


@pytest.mark.parametrize(
    "delimiter, cell",
    [(";", "road;cloud"), (" ", "road cloud"), ("|", " road | cloud "), (";", "cloud;road;")],
)
def test_tags_format_sorts_classes_and_accepts_any_delimiter(folder: Path, delimiter: str, cell: str) -> None:
    text = f'filename,tags\na.jpg,"{cell}"\nb.png,water\nc.jpg,\n'
    table, _ = _read(folder, text, format="tags", delimiter=delimiter)
    assert table.classes == ["cloud", "road", "water"]
    np.testing.assert_array_equal(table.y, [[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert table.y.dtype == np.uint8


@pytest.mark.parametrize(
    "spec, text",
    [
        (dict(ONEHOT, classes=["y", "x"]), "filename,x,y,z\na.jpg,1,0,1\nb.png,0,1,0\nc.jpg,1,1,1\n"),
        (dict(TAGS, classes=["y", "x"]), "filename,tags\na.jpg,x\nb.png,y\nc.jpg,y;x\n"),
    ],
    ids=["onehot", "tags"],
)
def test_given_classes_fix_the_column_order(folder: Path, spec: dict, text: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mlic.labels"):
        table, _ = _read(folder, text, **spec)
    assert table.classes == ["y", "x"]
    np.testing.assert_array_equal(table.y, [[0, 1], [1, 0], [1, 1]])
    if spec["format"] == "onehot":
        assert "ignored: z" in caplog.text  # a column outside data.classes is dropped, loudly


def test_onehot_reads_header_order_bom_floats_and_nested_paths(folder: Path) -> None:
    table, _ = _read(folder, "\ufefffilename , b , a\nsub/e.jpg,1.0,0.0\na.jpg,0,1\n")
    assert table.classes == ["b", "a"]  # header order, names stripped, BOM removed
    assert table.filenames == ["sub/e.jpg", "a.jpg"]
    assert table.lines == [2, 3]
    np.testing.assert_array_equal(table.y, [[1, 0], [0, 1]])


@pytest.mark.parametrize("written", ["sub\\e.jpg", "./sub/e.jpg", "sub//e.jpg"])
def test_filenames_are_normalised_to_posix(folder: Path, written: str) -> None:
    table, _ = _read(folder, f'filename,x\n"{written}",1\n')
    assert table.filenames == ["sub/e.jpg"]


def test_skip_bad_images_skips_and_lists_them(folder: Path) -> None:
    text = "filename,x,y\na.jpg,1,0\nghost.jpg,1,1\nb.png,0,1\ntext.jpg,1,0\nc.jpg,0,0\n"
    table, skipped = _read(folder, text, skip_bad_images=True)
    assert table.filenames == ["a.jpg", "b.png", "c.jpg"]
    assert table.lines == [2, 4, 6]
    np.testing.assert_array_equal(table.y, [[1, 0], [0, 1], [0, 0]])
    assert list(skipped.columns) == ["line", "filename", "reason"]
    assert skipped["line"].tolist() == [3, 5]
    assert skipped["filename"].tolist() == ["ghost.jpg", "text.jpg"]
    assert "does not exist" in skipped["reason"][0] and "cannot be read" in skipped["reason"][1]


def test_skipping_that_empties_a_class_is_still_an_error(folder: Path) -> None:
    err, message = _problem(folder, "filename,x,y\na.jpg,1,0\nghost.jpg,0,1\n", skip_bad_images=True)
    assert err.problems[0].column == "y" and "no positive example" in message


def test_bad_csv_values_are_not_hidden_by_skip_bad_images(folder: Path) -> None:
    err, _ = _problem(folder, "filename,x\na.jpg,1\nghost.jpg,maybe\n", skip_bad_images=True)
    assert (err.problems[0].line, err.problems[0].column) == (3, "x")


def test_subset_and_to_frame_keep_rows_and_order(folder: Path) -> None:
    table, _ = _read(folder, "filename,x,y\na.jpg,1,0\nb.png,0,1\nc.jpg,1,1\n")
    sub = table.subset(np.array([2, 0]))
    assert sub.filenames == ["c.jpg", "a.jpg"] and sub.lines == [4, 2]
    frame = sub.to_frame()
    assert list(frame.columns) == ["filename", "x", "y"]
    assert frame.values.tolist() == [["c.jpg", 1, 1], ["a.jpg", 1, 0]]


# --- summarize ------------------------------------------------------------------------------


def _table(y, classes) -> LabelTable:
    y = np.asarray(y, dtype=np.uint8)
    return LabelTable([f"{i}.jpg" for i in range(len(y))], list(classes), y, list(range(2, len(y) + 2)))


def test_summarize_counts_prevalence_histogram_and_cooccurrence() -> None:
    y = [[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]]
    metrics, prevalence, per_image, cooc = summarize(_table(y, "abc"), n_skipped=2)
    assert prevalence["count"].tolist() == [3, 2, 1]
    assert prevalence["prevalence"].tolist() == [0.75, 0.5, 0.25]
    assert per_image.to_dict("list") == {"labels": [0, 1, 2, 3], "images": [1, 1, 1, 1]}
    matrix = cooc.pivot(index="class_a", columns="class_b", values="count").loc[list("abc"), list("abc")]
    np.testing.assert_array_equal(matrix.to_numpy(), [[3, 2, 1], [2, 2, 1], [1, 1, 1]])
    p = cooc.set_index(["class_a", "class_b"])["p_b_given_a"]
    assert p["a", "b"] == pytest.approx(2 / 3, abs=1e-6) and p["b", "a"] == 1.0 and p["c", "a"] == 1.0
    assert metrics == {
        "images": 4, "classes": 3, "skipped": 2, "unlisted_images": 0, "images_without_label": 1,
        "labels_per_image_mean": 1.5, "labels_per_image_max": 3,
        "prevalence": {"a": 0.75, "b": 0.5, "c": 0.25}, "prevalence_min": 0.25, "prevalence_max": 0.75,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cooccurrence_is_symmetric_with_counts_on_the_diagonal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random((200, 6)) < np.linspace(0.5, 0.05, 6)).astype(np.uint8)
    metrics, prevalence, per_image, cooc = summarize(_table(y, [f"c{i}" for i in range(6)]))
    m = cooc["count"].to_numpy().reshape(6, 6)
    np.testing.assert_array_equal(m, m.T)
    np.testing.assert_array_equal(np.diag(m), y.sum(axis=0))
    assert per_image["images"].sum() == 200
    assert (per_image["labels"] * per_image["images"]).sum() == y.sum()
    assert metrics["images_without_label"] == int((y.sum(axis=1) == 0).sum())
