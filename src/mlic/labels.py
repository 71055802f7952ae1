"""Read and validate a user's labels CSV, in either of the two formats users bring.

- ``onehot``: a ``filename`` column plus one 0/1 column per class (the header names the classes).
- ``tags``: a ``filename`` column plus one column of tags joined by a delimiter
  (``clear primary water``).

Everything is checked before any work is done, and every problem found is reported at once,
each naming the file, line and column and saying what to do. Rows with no label are valid
("none of the classes") and are counted. Missing or unreadable images (every listed image is
decoded in full, `image_check`) stop the run unless ``skip_bad_images`` is set; then they are
skipped and listed, never silently dropped. Class names that differ only in case (``Cat`` and
``cat``) are almost always one class spelt two ways: they are an error unless ``data.classes``
says which classes are meant.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from mlic import image_check
from mlic.errors import UserError
from mlic.params import Data

log = logging.getLogger(__name__)

# Cap on how many problems one error message lists; the total is always given.
MAX_REPORTED_PROBLEMS = 25


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located as precisely as we can."""

    file: str
    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: {self.message}"


class LabelError(UserError, ValueError):
    """The labels CSV or the images it names cannot be used; lists every problem found.

    One problem is one line (file:line, column: what is wrong; what to do); several are a count
    line and then one line each. `hint` is advice for them all (e.g. the skip_bad_images switch).
    """

    def __init__(self, problems: list[Problem], hint: str | None = None):
        self.problems = problems
        self.hint = hint
        if len(problems) == 1:
            super().__init__(f"{problems[0]}" + (f" ({hint})" if hint else ""))
            return
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_REPORTED_PROBLEMS])
        more = len(problems) - MAX_REPORTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        advice = f" ({hint})" if hint else ""
        super().__init__(f"{len(problems)} problems in the labels{advice}:\n{shown}{tail}")


@dataclasses.dataclass(frozen=True)
class LabelTable:
    """Validated labels: one row per usable image, one column per class."""

    filenames: list[str]          # relative to the images folder, POSIX separators
    classes: list[str]            # column order of `y`
    y: np.ndarray                 # (n, k) uint8 multi-hot
    lines: list[int]              # the CSV line each row came from (header = line 1)

    def to_frame(self) -> pd.DataFrame:
        """`filename` + one 0/1 column per class: the onehot format, ready to write."""
        frame = pd.DataFrame(self.y.astype(np.int64), columns=self.classes)
        frame.insert(0, "filename", self.filenames)
        return frame

    def subset(self, index: np.ndarray) -> "LabelTable":
        """Rows `index` of the table, in that order."""
        return LabelTable(
            filenames=[self.filenames[i] for i in index],
            classes=list(self.classes),
            y=self.y[index],
            lines=[self.lines[i] for i in index],
        )


def check_filename(name: str) -> str | None:
    """Return why `name` is not a safe relative path inside the images folder, or None."""
    if not name.strip():
        return "the filename is empty; give the image's path relative to the images folder"
    if name != name.strip():
        return f"the filename {name!r} has leading or trailing spaces; remove them"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or name.startswith(("/", "\\")):
        return f"the filename {name!r} is absolute; give it relative to the images folder"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return f"the filename {name!r} leaves the images folder ('..'); move the image inside it"
    return None


def _parse_binary(value: str) -> int | None:
    value = value.strip()
    if value in ("0", "1"):
        return int(value)
    if value in ("0.0", "1.0"):  # spreadsheets often save integers as floats
        return int(float(value))
    return None


def read_header(path: Path) -> list[str]:
    """The labels CSV's column names (LabelError, naming the file, when it cannot be read)."""
    return _read_rows(path)[0]


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) rows of a CSV; line numbers as an editor shows them."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LabelError([Problem(str(path), None, None,
                                  "the labels CSV does not exist; check data.labels_csv in params.yaml")]) from None
    try:
        # Decoded whole, not streamed: a streamed decode error surfaces at whichever line the
        # reader's buffer was on (the header, for small files), so the line reported was wrong.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelError([Problem(str(path), data[:exc.start].count(b"\n") + 1, None,
                                  f"byte {data[exc.start]:#04x} is not UTF-8 text; save the file as UTF-8 CSV")]) from None
    with io.StringIO(text, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise LabelError([Problem(str(path), None, None,
                                      "the labels CSV is empty; it needs a header row and one row per image")]) from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise LabelError([Problem(str(path), 1, None, f"cannot parse the header: {exc}")]) from None
        rows = []
        line = reader.line_num
        try:
            for cells in reader:
                start = line + 1
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue  # blank lines carry no image
                rows.append((start, cells))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise LabelError([Problem(str(path), line + 1, None,
                                      f"cannot parse this line: {exc}; save the file as UTF-8 CSV")]) from None
    return [h.strip() for h in header], rows


def read_labels(spec: Data) -> tuple[LabelTable, pd.DataFrame]:
    """Read, validate and return the labels, plus a table of skipped rows (may be empty).

    `spec` is the `data` section of params.yaml (paths relative to the working directory).

    Raises LabelError listing every problem found when the input cannot be used as is.
    """
    path = Path(spec.labels_csv)
    src = str(path)
    header, rows = _read_rows(path)
    problems: list[Problem] = []

    if spec.format not in ("onehot", "tags"):
        raise LabelError([Problem(src, None, None,
                                  f"unknown format {spec.format!r}; set data.format to onehot or tags")])
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise LabelError([Problem(src, 1, d, "this column name appears more than once; rename one") for d in dupes])
    if spec.filename_column not in header:
        raise LabelError([Problem(src, 1, None,
                                  f"no '{spec.filename_column}' column (found: {', '.join(header)}); "
                                  "rename the column or set data.filename_column")])
    if not rows:
        raise LabelError([Problem(src, None, None, "the labels CSV has a header but no rows; add one row per image")])
    fcol = header.index(spec.filename_column)

    if spec.format == "onehot":
        classes, ys = _onehot_rows(src, header, rows, spec, problems)
    else:
        classes, ys = _tag_rows(src, header, rows, spec, problems)

    filenames: list[str] = []
    seen: dict[str, int] = {}
    unsafe: set[int] = set()  # rows whose filename must not be opened
    for r, (line, cells) in enumerate(rows):
        name = cells[fcol] if fcol < len(cells) else ""
        why = check_filename(name)
        # Compared normalised (backslashes, "./", "//"): two spellings of one image are one image,
        # else its two rows could land in different splits.
        key = PurePosixPath(name.replace("\\", "/")).as_posix()
        if why:
            problems.append(Problem(src, line, spec.filename_column, why))
            unsafe.add(r)
        elif key in seen:
            problems.append(Problem(src, line, spec.filename_column,
                                    f"duplicate filename {name!r} (first on line {seen[key]}); "
                                    "keep one row per image and merge their labels"))
        else:
            seen[key] = line
        filenames.append(key)

    lines = [line for line, _ in rows]
    images_dir = Path(spec.images_dir)
    if not images_dir.is_dir():
        raise LabelError(problems + [Problem(str(images_dir), None, None, "the images folder does not exist; "
                                             "check data.images_dir in params.yaml")])
    # Images are checked even when the CSV has problems, so one run reports everything.
    safe = [i for i in range(len(rows)) if i not in unsafe]
    reasons = image_check.check_images(images_dir, [filenames[i] for i in safe], spec.max_image_pixels)
    bad = [(i, reason) for i, reason in zip(safe, reasons) if reason is not None]
    hint = None
    if bad and not spec.skip_bad_images:
        problems += [Problem(src, lines[i], spec.filename_column, reason) for i, reason in bad]
        hint = ("to skip rows whose image is missing or unusable instead, set data.skip_bad_images: true; "
                "they are then listed in reports/data/skipped.csv")
    if problems:
        raise LabelError(problems, hint)
    if bad:
        log.warning("skipped %d rows with missing or unreadable images", len(bad))
    skipped = pd.DataFrame({"line": [lines[i] for i, _ in bad], "filename": [filenames[i] for i, _ in bad],
                            "reason": [reason for _, reason in bad]}, columns=["line", "filename", "reason"])
    dropped = {i for i, _ in bad}
    keep = [i for i in range(len(rows)) if i not in dropped]

    y = np.asarray(ys, dtype=np.uint8).reshape(len(rows), len(classes))
    table = LabelTable(
        filenames=[filenames[i] for i in keep],
        classes=classes,
        y=y[keep],
        lines=[lines[i] for i in keep],
    )

    empty = [c for c, n in zip(classes, table.y.sum(axis=0)) if n == 0]
    if empty:
        raise LabelError([Problem(src, None, c, "this class has no positive example; remove it from the "
                                  "classes or add images that show it") for c in empty])
    log.info("read %d labelled images, %d classes, %d skipped, %d with no label",
             len(table.filenames), len(classes), len(skipped), int((table.y.sum(axis=1) == 0).sum()))
    return table, skipped


CASE_FIX = "list the classes you mean in data.classes (listing both spellings keeps them apart)"


def _case_note(name: str, names: list[str], where: str) -> str:
    """"<where> has 'Cat': case matters" when `name` equals one of `names` but for case, else ""."""
    near = [n for n in names if n != name and n.casefold() == name.casefold()]
    return f"{where} has {near[0]!r}: case matters" if near else ""


def _lines_text(lines: list[int], limit: int = 3) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


def _case_collisions(spellings: dict[str, list[int]]) -> list[list[tuple[str, list[int]]]]:
    """Groups of 2+ names equal but for case, from {name: lines it appears on}, in order of appearance."""
    groups: dict[str, list[tuple[str, list[int]]]] = {}
    for name, lines in sorted(spellings.items(), key=lambda kv: (kv[1][0], kv[0])):
        groups.setdefault(name.casefold(), []).append((name, lines))
    return [g for g in groups.values() if len(g) > 1]


def _onehot_rows(src, header, rows, spec, problems):
    candidates = [h for h in header if h != spec.filename_column]
    if spec.classes is not None:
        missing = [c for c in spec.classes if c not in header]
        if missing:
            raise LabelError([Problem(src, 1, c, "this class from data.classes has no column" +
                                      _case_note(c, candidates, "; the header") + "; add the column "
                                      "or remove the class from data.classes") for c in missing])
        classes = list(spec.classes)
        ignored = [c for c in candidates if c not in classes]
        if ignored:
            log.warning("%s: columns not in data.classes are ignored: %s", src, ", ".join(ignored))
    else:
        classes = candidates
        for group in _case_collisions({c: [i] for i, c in enumerate(candidates)}):  # header order
            names = " and ".join(repr(name) for name, _ in group)
            problems.append(Problem(src, 1, group[1][0], f"columns {names} differ only in case; merge them into "
                                    f"one column, or {CASE_FIX}"))
    if not classes:
        raise LabelError([Problem(src, 1, None, "no class columns after the filename column; with format onehot "
                                  "each class needs a 0/1 column (or set data.format: tags)")])
    idx = [header.index(c) for c in classes]
    ys = []
    for line, cells in rows:
        if len(cells) != len(header):
            problems.append(Problem(src, line, None, f"has {len(cells)} cells but the header has {len(header)}; "
                                    "fix the row (a comma inside a filename needs quotes)"))
            ys.append([0] * len(classes))
            continue
        row = []
        for c, i in zip(classes, idx):
            v = _parse_binary(cells[i])
            if v is None:
                problems.append(Problem(src, line, c, f"value {cells[i]!r} is not 0 or 1; write 1 if the image "
                                        "shows this class, else 0"))
                v = 0
            row.append(v)
        ys.append(row)
    return classes, ys


def _tag_rows(src, header, rows, spec, problems):
    if spec.tags_column not in header:
        raise LabelError([Problem(src, 1, None, f"no '{spec.tags_column}' column (found: {', '.join(header)}); "
                                  "rename the column or set data.tags_column")])
    if not spec.delimiter:
        raise LabelError([Problem(src, None, None, "data.delimiter is empty; set it to the character between tags")])
    ti = header.index(spec.tags_column)
    tag_lists = []
    for line, cells in rows:
        if len(cells) != len(header):
            problems.append(Problem(src, line, None, f"has {len(cells)} cells but the header has {len(header)}; "
                                    "fix the row (tags joined by a comma need quotes)"))
            tag_lists.append([])
            continue
        tags = [t.strip() for t in cells[ti].split(spec.delimiter)]
        tag_lists.append([t for t in tags if t])
    if spec.classes is not None:
        classes = list(spec.classes)
    else:
        classes = sorted({t for tags in tag_lists for t in tags})
        seen: dict[str, list[int]] = {}
        for (line, _), tags in zip(rows, tag_lists):
            for t in dict.fromkeys(tags):
                seen.setdefault(t, []).append(line)
        for group in _case_collisions(seen):
            names = " and ".join(f"{name!r} ({_lines_text(lines)})" for name, lines in group)
            problems.append(Problem(src, group[1][1][0], spec.tags_column,
                                    f"tags {names} differ only in case; write the class one way, or {CASE_FIX}"))
    pos = {c: i for i, c in enumerate(classes)}
    ys = []
    for (line, _), tags in zip(rows, tag_lists):
        row = [0] * len(classes)
        for t in tags:
            if t not in pos:
                problems.append(Problem(src, line, spec.tags_column, f"unknown tag {t!r} (not in data.classes"
                                        f"{_case_note(t, classes, ', which')}); "
                                        "fix the tag or add it to data.classes"))
            else:
                row[pos[t]] = 1
        ys.append(row)
    if not classes and not problems:
        raise LabelError([Problem(src, None, spec.tags_column, "no tags at all; at least one class is needed")])
    return classes, ys


def summarize(table: LabelTable, n_skipped: int = 0, n_unlisted: int = 0
              ) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Data summary: metrics dict, per-class prevalence, labels-per-image histogram, co-occurrence.

    `n_skipped`: rows skipped for a bad image; `n_unlisted`: images in the folder the CSV does not list.

    Co-occurrence is returned long (class_a, class_b, count, p_b_given_a) so DVC can plot it.
    """
    y = table.y.astype(np.int64)
    n, k = y.shape
    counts = y.sum(axis=0)
    per_image = y.sum(axis=1)
    prevalence = pd.DataFrame({"class": table.classes, "count": counts, "prevalence": counts / max(n, 1)})
    hist = np.bincount(per_image, minlength=k + 1)
    labels_per_image = pd.DataFrame({"labels": np.arange(k + 1), "images": hist})
    co = y.T @ y
    a, b = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    cooccurrence = pd.DataFrame({
        "class_a": np.asarray(table.classes)[a.ravel()],
        "class_b": np.asarray(table.classes)[b.ravel()],
        "count": co.ravel(),
        "p_b_given_a": (co / np.maximum(counts[:, None], 1)).ravel().round(6),
    })
    metrics = {
        "images": int(n),
        "classes": int(k),
        "skipped": int(n_skipped),
        "unlisted_images": int(n_unlisted),
        "images_without_label": int((per_image == 0).sum()),
        "labels_per_image_mean": round(float(per_image.mean()), 6) if n else 0.0,
        "labels_per_image_max": int(per_image.max()) if n else 0,
        "prevalence": {c: round(float(p), 6) for c, p in zip(table.classes, prevalence["prevalence"])},
        "prevalence_min": round(float(prevalence["prevalence"].min()), 6),
        "prevalence_max": round(float(prevalence["prevalence"].max()), 6),
    }
    return metrics, prevalence, labels_per_image, cooccurrence
