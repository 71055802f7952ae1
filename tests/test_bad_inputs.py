"""The bad-input catalogue: one fault at a time among valid rows, and what the user sees.

Each case takes a small valid image set (10 images, 16-24 px, mixed modes and formats, a labels
CSV) and injects one fault: into an image file, the images folder, or the labels CSV. Then:

- `error`: `labels.read_labels` raises one `LabelError` whose message is one line naming the file,
  the CSV line (the header is line 1) and the column where that makes sense, and saying what to
  do, and blaming only the faulty line (no valid row is reported);
- `skip`: with `data.skip_bad_images: true` the split stage runs, lists the row in
  reports/data/skipped.csv with the CSV line and a reason, and every valid row is in exactly one
  of train/val/test with its labels (no valid row lost);
- `accept`: an unusual but valid input (1x1, huge, CMYK, 16-bit, EXIF-rotated...) goes through
  split with nothing skipped, and through the very function preprocess encodes with.

Cases marked `stage=True` also run the real `python stages/split.py` in a subprocess: exit 2,
exactly one line on stderr, no traceback.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, ImageSet, make_image_set, save_as
from mlic import images
from mlic.labels import LabelError, read_labels
from mlic.split import SPLITS

N = 10
ROW = 7                 # the faulty row: 0-based among the data rows...
LINE = ROW + 2          # ...so CSV line 9 (the header is line 1)
CLASSES = ["cloud", "road", "water", "field"]


# --- faults ---------------------------------------------------------------------------------


def _image(s: ImageSet, row: int = ROW) -> Path:
    return s.images_dir / s.filenames[row]


def _lines(s: ImageSet) -> list[str]:
    return s.labels_csv.read_text(encoding="utf-8").splitlines()


def _write_lines(s: ImageSet, lines: list[str], ending: str = "\n") -> None:
    s.labels_csv.write_bytes((ending.join(lines) + ending).encode("utf-8"))


def _set_cell(s: ImageSet, row: int, column: int | slice, value: str) -> None:
    lines = _lines(s)
    cells = lines[row + 1].split(",")
    cells[column] = [value] if isinstance(column, slice) else value
    lines[row + 1] = ",".join(cells)
    _write_lines(s, lines)


def _rename_row(s: ImageSet, row: int, name: str) -> None:
    """Point `row` of the CSV at `name` (the old file stays, as an unlisted image)."""
    _set_cell(s, row, 0, name)


def _swap_image(s: ImageSet, name: str, write: Callable[[Path], None], row: int = ROW) -> None:
    """Replace `row`'s image by a new file `name` written by `write`, and point the CSV at it."""
    _image(s, row).unlink()
    write(s.images_dir / name)
    _rename_row(s, row, name)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (a decompression bomb's header), 100 bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def _outside(s: ImageSet) -> Path:
    target = s.root / "elsewhere" / "real.png"
    target.parent.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(target)
    return target


def _picture(width: int = 40, height: int = 20) -> Image.Image:
    """Upright test picture: red top half, blue bottom half."""
    im = Image.new("RGB", (width, height), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, width, height // 2))
    return im


def _exif_rotated(path: Path) -> None:
    """A phone photo: the 40x20 picture stored turned (20x40) plus EXIF orientation 6."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _picture().transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


def _i16(path: Path) -> None:
    im = Image.new("I;16", (20, 12))
    im.putdata([i * 250 for i in range(240)])
    im.save(path)


def _palette_transparent(path: Path) -> None:
    im = Image.new("P", (20, 12), 1)
    im.putpalette([0, 0, 0, 200, 100, 50, 10, 20, 30] + [0] * (256 * 3 - 9))
    im.paste(2, (0, 0, 10, 12))
    im.save(path, transparency=2)


def _animated_gif(path: Path) -> None:
    frames = [Image.new("P", (16, 16), i) for i in (1, 2, 3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _case_collision_tags(s: ImageSet) -> None:
    _set_cell(s, ROW, 1, "Water")  # 'water' is on an earlier line (rows 0-3 hold one class each)


def _onehot_case_collision(s: ImageSet) -> None:
    lines = _lines(s)
    lines[0] += ",Water"
    for i in range(1, len(lines)):
        lines[i] += ",1" if i == ROW + 1 else ",0"
    _write_lines(s, lines)


def _unlisted(s: ImageSet) -> None:
    save_as(_picture(), s.images_dir / "extra.png", "RGB")
    save_as(_picture(), s.images_dir / "deep" / "more.JPG", "RGB")
    (s.images_dir / "notes.txt").write_text("not an image, not counted")
    (s.images_dir / "._img_001.png").write_bytes(b"macOS metadata, hidden: not counted")


# --- the catalogue --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fault: Callable[[ImageSet], None]
    outcome: str                           # "error" | "skip" | "accept"
    words: tuple[str, ...] = ()            # what is wrong and what to do (error: message; skip: reason)
    line: int | None = LINE                # error: the CSV line the message names (None: the whole file)
    column: str | None = "filename"        # error: the column it names (None: the whole row)
    fmt: str = "onehot"
    data: dict = dataclasses.field(default_factory=dict)   # data params beside the set's own
    labels_kept: bool = True               # accept: every row keeps the labels the set was made with
    check: Callable[[ImageSet, Path, Path], None] | None = None  # accept: more to assert (set, splits, reports)
    stage: bool = False                    # error: also through `python stages/split.py`
    names_images_dir: bool = False         # error: the message names the images folder, not the CSV


def _expect_unlisted(s: ImageSet, splits: Path, reports: Path) -> None:
    assert pd.read_csv(reports / "unlisted.csv")["filename"].tolist() == ["deep/more.JPG", "extra.png"]
    assert json.loads((reports / "summary.json").read_text())["unlisted_images"] == 2


def _expect_classes(*classes: str) -> Callable[[ImageSet, Path, Path], None]:
    def check(s: ImageSet, splits: Path, reports: Path) -> None:
        for name in SPLITS:
            assert pd.read_csv(splits / f"{name}.csv").columns.tolist() == ["filename", *classes]
    return check


def _no_unlisted(s: ImageSet, splits: Path, reports: Path) -> None:
    assert pd.read_csv(reports / "unlisted.csv").empty


FIX_IMAGE = "replace or remove it"
SKIP_HINT = "set data.skip_bad_images: true"

CASES = [
    # --- image files: a bad one is an error naming its CSV line, or a listed skip ---
    Case("missing", lambda s: _image(s).unlink(), "error",
         ("img_007.jpg", "does not exist", "fix the filename or add the image", SKIP_HINT), stage=True),
    Case("missing-skipped", lambda s: _image(s).unlink(), "skip", ("does not exist",)),
    Case("empty-file", lambda s: _image(s).write_bytes(b""), "error", ("is empty (0 bytes)", FIX_IMAGE)),
    Case("empty-file-skipped", lambda s: _image(s).write_bytes(b""), "skip", ("is empty (0 bytes)",)),
    Case("truncated-jpeg", lambda s: _truncate(_image(s)), "error", ("cannot be decoded", "runcated", FIX_IMAGE),
         stage=True),
    Case("truncated-jpeg-skipped", lambda s: _truncate(_image(s)), "skip", ("cannot be decoded",)),
    Case("truncated-png", lambda s: _truncate(_image(s, 2)), "error", ("img_002.png", "cannot be decoded", FIX_IMAGE),
         line=4),
    Case("not-an-image", lambda s: _image(s).write_text("<html>a web page saved as .jpg</html>"), "error",
         ("cannot be read", "not an image file", FIX_IMAGE)),
    Case("not-an-image-skipped", lambda s: _image(s).write_text("<html></html>"), "skip", ("cannot be read",)),
    Case("decompression-bomb", lambda s: _png_header_only(_image(s), 30000, 30000), "error",
         ("30000x30000 = 900,000,000 pixels", "more than the limit of 100,000,000", "decompression bomb",
          "raise data.max_image_pixels"), stage=True),
    Case("decompression-bomb-skipped", lambda s: _png_header_only(_image(s), 30000, 30000), "skip",
         ("900,000,000 pixels", "data.max_image_pixels")),
    # between 1x and 2x the limit PIL alone only warns; the limit is exact
    Case("above-a-lowered-pixel-limit", lambda s: _swap_image(s, "big.png", lambda p: _picture(50, 50).save(p)),
         "error", ("50x50 = 2,500 pixels", "more than the limit of 2,000", "raise data.max_image_pixels"),
         data={"max_image_pixels": 2000}),
    Case("symlink-out-of-the-folder", lambda s: _swap_image(s, "link.png", lambda p: p.symlink_to(_outside(s))),
         "error", ("'link.png' resolves outside the images folder", "copy the image into it")),
    Case("symlink-out-of-the-folder-skipped",
         lambda s: _swap_image(s, "link.png", lambda p: p.symlink_to(_outside(s))), "skip", ("outside the images",)),
    Case("broken-symlink", lambda s: _swap_image(s, "gone.png", lambda p: p.symlink_to(s.images_dir / "nowhere.png")),
         "error", ("gone.png does not exist", "fix the filename")),
    Case("folder-named-like-an-image", lambda s: _swap_image(s, "album.jpg", lambda p: p.mkdir()), "error",
         ("album.jpg is a folder, not an image file", "fix the filename")),
    Case("images-folder-missing", lambda s: os.rename(s.images_dir, s.root / "moved"), "error",
         ("the images folder does not exist", "check data.images_dir"), line=None, column=None,
         names_images_dir=True),
    # --- unusual but valid images: accepted, nothing skipped, and preprocessed ---
    Case("one-pixel", lambda s: _swap_image(s, "dot.png", lambda p: Image.new("RGB", (1, 1), (9, 9, 9)).save(p)),
         "accept"),
    Case("huge-within-the-limit", lambda s: _swap_image(s, "huge.jpg", lambda p: _picture(4000, 3000).save(p)),
         "accept"),
    Case("cmyk-jpeg", lambda s: _swap_image(s, "print.jpg", lambda p: _picture().convert("CMYK").save(p)), "accept"),
    Case("16-bit-grayscale-png", lambda s: _swap_image(s, "deep.png", _i16), "accept"),
    Case("16-bit-grayscale-tiff", lambda s: _swap_image(s, "deep.tif", _i16), "accept"),
    Case("palette-with-transparency", lambda s: _swap_image(s, "icon.png", _palette_transparent), "accept"),
    Case("exif-rotated", lambda s: _swap_image(s, "phone.jpg", _exif_rotated), "accept"),
    Case("animated-gif", lambda s: _swap_image(s, "anim.gif", _animated_gif), "accept"),
    Case("webp", lambda s: _swap_image(s, "photo.webp", lambda p: _picture().save(p)), "accept"),
    Case("symlink-inside-the-folder", lambda s: _swap_image(
        s, "alias.jpg", lambda p: p.symlink_to(s.images_dir / s.filenames[1])), "accept"),
    Case("unlisted-images-are-counted-and-listed", _unlisted, "accept", check=_expect_unlisted),
    # --- the labels CSV ---
    Case("bom", lambda s: s.labels_csv.write_bytes(b"\xef\xbb\xbf" + s.labels_csv.read_bytes()), "accept",
         check=_no_unlisted),
    Case("windows-line-endings", lambda s: _write_lines(s, _lines(s), "\r\n"), "accept"),
    Case("blank-lines", lambda s: _write_lines(s, [x for line in _lines(s) for x in (line, "")]), "accept"),
    Case("floats-1.0-and-0.0", lambda s: _write_lines(s, [_lines(s)[0]] + [
        line.replace(",1", ",1.0").replace(",0", ",0.0") for line in _lines(s)[1:]]), "accept"),
    Case("ragged-short-row", lambda s: _write_lines(s, [*_lines(s)[:LINE - 1], _lines(s)[LINE - 1].rsplit(",", 1)[0],
                                                        *_lines(s)[LINE:]]),
         "error", ("has 4 cells but the header has 5", "fix the row"), column=None, stage=True),
    Case("ragged-long-row", lambda s: _set_cell(s, ROW, 4, "1,0"), "error",
         ("has 6 cells but the header has 5", "a comma inside a filename needs quotes"), column=None),
    Case("value-2", lambda s: _set_cell(s, ROW, 2, "2"), "error",
         ("'2' is not 0 or 1", "write 1 if the image shows this class, else 0"), column="road"),
    Case("value-nan", lambda s: _set_cell(s, ROW, 3, "NaN"), "error", ("'NaN' is not 0 or 1", "write 1"),
         column="water"),
    Case("value-empty", lambda s: _set_cell(s, ROW, 1, ""), "error", ("'' is not 0 or 1",), column="cloud"),
    Case("value-yes", lambda s: _set_cell(s, ROW, 4, "yes"), "error", ("'yes' is not 0 or 1",), column="field"),
    Case("duplicate-filename", lambda s: _rename_row(s, ROW, s.filenames[1]), "error",
         ("duplicate filename 'img_001.png' (first on line 3)", "keep one row per image and merge their labels")),
    Case("duplicate-other-spelling", lambda s: _rename_row(s, ROW, "./" + s.filenames[1]), "error",
         ("duplicate filename './img_001.png' (first on line 3)",)),
    Case("dotdot-path", lambda s: _rename_row(s, ROW, "../labels.csv"), "error",
         ("'../labels.csv' leaves the images folder ('..')", "move the image inside it")),
    Case("absolute-path", lambda s: _rename_row(s, ROW, str(_image(s).resolve())), "error",
         ("is absolute", "give it relative to the images folder")),
    Case("windows-absolute-path", lambda s: _rename_row(s, ROW, "C:\\photos\\img_007.jpg"), "error",
         ("is absolute",)),
    Case("empty-filename", lambda s: _rename_row(s, ROW, ""), "error",
         ("the filename is empty", "give the image's path relative to the images folder")),
    Case("filename-with-trailing-space", lambda s: _rename_row(s, ROW, s.filenames[ROW] + " "), "error",
         ("leading or trailing spaces", "remove them")),
    Case("non-utf8-byte", lambda s: s.labels_csv.write_bytes(
        s.labels_csv.read_bytes().replace(b"img_007", b"img_\xe9")), "error",
         ("byte 0xe9 is not UTF-8 text", "save the file as UTF-8 CSV"), column=None),
    Case("unknown-tag", lambda s: _set_cell(s, ROW, 1, "cloud sky"), "error",
         ("unknown tag 'sky' (not in data.classes)", "fix the tag or add it to data.classes"),
         column="tags", fmt="tags", data={"classes": CLASSES}),
    Case("case-only-tag-collision", _case_collision_tags, "error",
         ("tags 'water' (line", "and 'Water' (line 9) differ only in case", "write the class one way",
          "list the classes you mean in data.classes"), column="tags", fmt="tags", stage=True),
    Case("case-collision-one-spelling-in-data-classes", _case_collision_tags, "error",
         ("unknown tag 'Water' (not in data.classes, which has 'water': case matters)",), column="tags", fmt="tags",
         data={"classes": CLASSES}),
    Case("case-collision-both-spellings-in-data-classes", _case_collision_tags, "accept", fmt="tags",
         data={"classes": [*CLASSES, "Water"]}, labels_kept=False, check=_expect_classes(*CLASSES, "Water")),
    Case("case-only-column-collision", _onehot_case_collision, "error",
         ("columns 'water' and 'Water' differ only in case", "merge them into one column", "data.classes"),
         line=1, column="Water"),
    Case("column-collision-settled-by-data-classes", _onehot_case_collision, "accept",
         data={"classes": CLASSES}, check=_expect_classes(*CLASSES)),
    Case("empty-csv", lambda s: s.labels_csv.write_bytes(b""), "error",
         ("the labels CSV is empty", "it needs a header row and one row per image"), line=None, column=None),
    Case("header-only", lambda s: _write_lines(s, _lines(s)[:1]), "error",
         ("has a header but no rows", "add one row per image"), line=None, column=None),
    Case("class-with-no-positives", lambda s: _write_lines(s, [_lines(s)[0]] + [
        line[:-1] + "0" for line in _lines(s)[1:]]), "error",
         ("this class has no positive example", "remove it from the classes or add images that show it"),
         line=None, column="field"),
    Case("no-filename-column", lambda s: _write_lines(s, ["file" + _lines(s)[0][8:], *_lines(s)[1:]]), "error",
         ("no 'filename' column", "set data.filename_column"), line=1, column=None),
    Case("duplicate-column", lambda s: _write_lines(s, [_lines(s)[0].replace("road", "cloud"), *_lines(s)[1:]]),
         "error", ("this column name appears more than once", "rename one"), line=1, column="cloud"),
    Case("labels-csv-missing", lambda s: s.labels_csv.unlink(), "error",
         ("the labels CSV does not exist", "check data.labels_csv"), line=None, column=None),
    Case("row-with-no-label", lambda s: _set_cell(s, ROW, slice(1, None), "0,0,0,0"), "accept", labels_kept=False),
]
assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


def _build(root: Path, case: Case) -> ImageSet:
    image_set = make_image_set(root / "set", n=N, fmt=case.fmt, seed=5, min_size=16, max_size=24)
    case.fault(image_set)
    return image_set


def _one_line_error(image_set: ImageSet, case: Case, message: str) -> None:
    assert "\n" not in message, message
    where = str(image_set.images_dir if case.names_images_dir else image_set.labels_csv)
    if case.line is not None:
        where += f":{case.line}"
    if case.column is not None:
        where += f", column '{case.column}'"
    assert where in message, (where, message)
    for word in case.words:
        assert word in message, (word, message)


@pytest.fixture
def run_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params_yaml, split_stage, dvc_stages):
    """Run stages/split.py's main with dvc.yaml's argv in tmp_path; returns (exit code, splits dir, reports dir)."""
    monkeypatch.chdir(tmp_path)
    argv, _ = dvc_stages("split")

    def run(image_set: ImageSet, **data) -> tuple[int, Path, Path]:
        params_yaml(tmp_path / "params.yaml", data=image_set.data_section(**data))
        code = split_stage.main(argv)
        return code, tmp_path / argv[argv.index("--splits-dir") + 1], tmp_path / argv[argv.index("--reports-dir") + 1]
    return run


def _split_rows(splits: Path) -> pd.DataFrame:
    frames = [pd.read_csv(splits / f"{name}.csv", dtype={"filename": str}, keep_default_na=False) for name in SPLITS]
    return pd.concat(frames, ignore_index=True)


def _assert_valid_rows_kept(image_set: ImageSet, rows: pd.DataFrame, lost: set[int]) -> None:
    """Every row but `lost` is in exactly one split, with the labels the set was made with."""
    names = [f for i, f in enumerate(_csv_filenames(image_set)) if i not in lost]
    assert sorted(rows["filename"]) == sorted(names)
    by_name = rows.set_index("filename")
    for i, name in enumerate(_csv_filenames(image_set)):
        if i not in lost:
            got = by_name.loc[name, image_set.classes].to_numpy(dtype=int)
            np.testing.assert_array_equal(got, image_set.y[i], err_msg=name)


def _csv_filenames(image_set: ImageSet) -> list[str]:
    """The filenames the (possibly edited) CSV lists, in row order."""
    text = image_set.labels_csv.read_bytes().decode("utf-8-sig")
    return [line.split(",")[0] for line in text.splitlines()[1:] if line.strip()]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, run_split) -> None:
    image_set = _build(tmp_path, case)
    if case.outcome == "error":
        with pytest.raises(LabelError) as err:
            read_labels(image_set.spec(**case.data))
        _one_line_error(image_set, case, str(err.value))
        # only the faulty line is blamed: no valid row is reported as a problem
        assert [(p.line, p.column) for p in err.value.problems] == [(case.line, case.column)]
        return

    skipping = case.outcome == "skip"
    code, splits, reports = run_split(image_set, skip_bad_images=skipping, **case.data)
    assert code == 0
    skipped = pd.read_csv(reports / "skipped.csv", dtype={"filename": str})
    rows = _split_rows(splits)
    summary = json.loads((reports / "summary.json").read_text())
    if skipping:
        assert skipped["line"].tolist() == [LINE]
        assert skipped["filename"].tolist() == [_csv_filenames(image_set)[ROW]]
        for word in case.words:
            assert word in skipped["reason"][0], (word, skipped["reason"][0])
        _assert_valid_rows_kept(image_set, rows, lost={ROW})
        assert (summary["images"], summary["skipped"]) == (N - 1, 1)
        return

    assert skipped.empty
    assert sorted(rows["filename"]) == sorted(_csv_filenames(image_set))
    if case.labels_kept:
        _assert_valid_rows_kept(image_set, rows, lost=set())
    assert (summary["images"], summary["skipped"]) == (N, 0)
    if case.check:
        case.check(image_set, splits, reports)
    # ...and preprocess can use every accepted image (its unit of work, with the same pixel limit)
    for name in rows["filename"]:
        encoded = images.prepare(image_set.images_dir / name, 32, "pad", "png", max_pixels=100_000_000)
        with Image.open(io.BytesIO(encoded)) as im:
            assert (im.size, im.mode) == ((32, 32), "RGB")


def test_exif_rotation_is_applied_before_padding(tmp_path: Path) -> None:
    """The phone photo is 40x20 upright: padded to a square, the black bars are above and below."""
    _exif_rotated(tmp_path / "phone.jpg")
    with Image.open(io.BytesIO(images.prepare(tmp_path / "phone.jpg", 32, "pad", "png"))) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    assert a[2, 16].sum() < 30 and a[29, 16].sum() < 30              # bars above and below
    assert a[10, 16, 0] > 200 and a[21, 16, 2] > 200                 # red on top, blue below: upright
    assert a[16, 1].sum() > 150 and a[16, 30].sum() > 150            # no bars at the sides


STAGE_CASES = [c for c in CASES if c.stage]


@pytest.mark.parametrize("case", STAGE_CASES, ids=[c.id for c in STAGE_CASES])
def test_the_split_stage_prints_one_line_and_exits_2(case: Case, tmp_path: Path, params_yaml, dvc_stages) -> None:
    image_set = _build(tmp_path, case)
    params_yaml(tmp_path / "params.yaml", data=image_set.data_section(**case.data))
    argv, outputs = dvc_stages("split")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "split.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR "), proc.stderr
    _one_line_error(image_set, case, lines[0])
    for out in outputs:
        assert not (tmp_path / out).exists(), out


def test_preprocess_encodes_every_unusual_image_split_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             params_yaml, split_stage, preprocess_stage,
                                                             dvc_stages) -> None:
    """All the accepted unusual images in one folder, through the real split and preprocess stages."""
    monkeypatch.chdir(tmp_path)
    image_set = make_image_set(tmp_path / "set", n=N + 4, seed=5, min_size=16, max_size=24)
    writers = {"dot.png": lambda p: Image.new("RGB", (1, 1)).save(p), "print.jpg": lambda p: _picture().convert(
        "CMYK").save(p), "deep.png": _i16, "icon.png": _palette_transparent, "phone.jpg": _exif_rotated,
        "anim.gif": _animated_gif, "photo.webp": lambda p: _picture().save(p),
        "big.jpg": lambda p: _picture(1600, 1200).save(p)}
    for row, (name, write) in zip(range(6, 6 + len(writers)), writers.items()):
        _swap_image(image_set, name, write, row=row)
    params_yaml(tmp_path / "params.yaml", data=image_set.data_section())
    assert split_stage.main(dvc_stages("split")[0]) == 0
    argv, _ = dvc_stages("preprocess")
    assert preprocess_stage.main(argv) == 0
    from mlic.tfrecords import Manifest

    out = tmp_path / argv[argv.index("--out") + 1]
    assert sum(Manifest.read(out, s).count for s in SPLITS) == N + 4


def test_checking_in_a_process_pool_gives_the_same_reasons(tmp_path: Path) -> None:
    """Big folders are checked in a pool (image_check.PARALLEL_FROM_BYTES): same reasons, same order."""
    from mlic import image_check

    image_set = make_image_set(tmp_path / "set", n=12, seed=5, min_size=16, max_size=24)
    _truncate(_image(image_set, 3))
    _image(image_set, 5).write_bytes(b"")
    _png_header_only(_image(image_set, 9), 30000, 30000)
    names = [*image_set.filenames, "ghost.png"]
    alone = image_check.check_images(image_set.images_dir, names, 100_000_000, workers=1)
    assert [i for i, r in enumerate(alone) if r] == [3, 5, 9, 12]
    assert image_check.check_images(image_set.images_dir, names, 100_000_000, workers=2) == alone


def test_the_pixel_limit_is_scoped_to_the_image(tmp_path: Path) -> None:
    """PIL's limit is a module global: `load_rgb(..., max_pixels)` leaves it as it found it, even on error."""
    before = Image.MAX_IMAGE_PIXELS
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(images.TooManyPixels, match="30000x30000"):
        images.load_rgb(tmp_path / "bomb.png", 1000)
    assert images.load_rgb(tmp_path / "ok.png", 64).size == (8, 8)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(Image.DecompressionBombError):  # without a limit, PIL's own default still applies
        images.load_rgb(tmp_path / "bomb.png")
