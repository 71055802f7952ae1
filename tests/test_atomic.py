"""Tests for atomic writes (`mlic.atomic`): all or nothing, no temp files left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mlic.atomic import atomic_dir, atomic_open, atomic_path, write_csv, write_json


class Boom(RuntimeError):
    pass


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("existing", [None, "old content\n"], ids=["new-file", "replace-file"])
def test_atomic_open_writes_on_success(tmp_path: Path, existing: str | None) -> None:
    target = tmp_path / "out" / "a.txt"
    if existing is not None:
        target.parent.mkdir()
        target.write_text(existing)
    with atomic_open(target) as fh:
        fh.write("new content\n")
        assert not target.exists() or target.read_text() == existing  # not visible until the block ends
    assert target.read_text() == "new content\n"
    assert _listing(tmp_path / "out") == ["a.txt"]


@pytest.mark.parametrize("mode, payload", [("w", "half"), ("wb", b"half")])
def test_atomic_open_keeps_old_content_when_block_raises(tmp_path: Path, mode: str, payload) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old\n")
    with pytest.raises(Boom):
        with atomic_open(target, mode) as fh:
            fh.write(payload)
            raise Boom()
    assert target.read_text() == "old\n"
    assert _listing(tmp_path) == ["a.txt"]


def test_atomic_open_leaves_nothing_when_new_file_fails(tmp_path: Path) -> None:
    with pytest.raises(Boom):
        with atomic_open(tmp_path / "a.txt") as fh:
            fh.write("x")
            raise Boom()
    assert _listing(tmp_path) == []


def test_atomic_path_removes_its_temp_file_on_failure(tmp_path: Path) -> None:
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
            assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.")
            raise Boom()
    assert _listing(tmp_path) == []


def test_atomic_dir_replaces_the_whole_folder_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with atomic_dir(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        assert (target / "stale.txt").exists()  # the old output stays until the block ends
    assert _listing(target) == ["sub", "sub/new.txt"]
    assert _listing(tmp_path) == ["out", "out/sub", "out/sub/new.txt"]  # no .tmp / .old folders


@pytest.mark.parametrize("existing", [False, True], ids=["no-old-folder", "old-folder"])
def test_atomic_dir_keeps_old_folder_and_no_temp_when_block_raises(tmp_path: Path, existing: bool) -> None:
    target = tmp_path / "out"
    if existing:
        target.mkdir()
        (target / "keep.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise Boom()
    if existing:
        assert _listing(tmp_path) == ["out", "out/keep.txt"]
        assert (target / "keep.txt").read_text() == "old"
    else:
        assert _listing(tmp_path) == []


def test_write_json_is_sorted_and_stable(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"b": 1, "a": {"z": 0.5, "y": "é"}})
    first = (tmp_path / "m.json").read_bytes()
    write_json(tmp_path / "m.json", {"a": {"y": "é", "z": 0.5}, "b": 1})
    assert (tmp_path / "m.json").read_bytes() == first
    assert first.endswith(b"}\n") and "é".encode() in first
    assert list(json.loads(first)) == ["a", "b"]


def test_write_csv_has_no_index_and_unix_newlines(tmp_path: Path) -> None:
    write_csv(tmp_path / "t.csv", pd.DataFrame({"filename": ["a.jpg", "b.jpg"], "x": [0, 1]}))
    assert (tmp_path / "t.csv").read_bytes() == b"filename,x\na.jpg,0\nb.jpg,1\n"
