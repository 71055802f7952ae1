"""Tests for atomic writes (`mlic.atomic`): all or nothing, no temp files left behind, and those a\nkilled process left are removed by the next write."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mlic.atomic import atomic_dir, atomic_open, atomic_path, remove_stale_temps, write_csv, write_json
from mlic.errors import disk_error


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


# --- temp siblings left by a killed process -------------------------------------------------------

def _ended() -> int:
    """The pid of a process that has just ended (reused this fast only in theory)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp(folder: Path, target: str, pid: int, started: int, suffix: str = ".tmp", is_dir: bool = True) -> Path:
    path = folder / f".{target}.{pid}-{started}-abcd_123{suffix}"
    if is_dir:
        (path / "half").mkdir(parents=True)
        (path / "half" / "shard").write_bytes(b"x")
    else:
        path.write_bytes(b"x")
    return path


def _me() -> tuple[int, int]:
    import psutil

    return os.getpid(), round(psutil.Process().create_time())


@pytest.mark.parametrize("suffix, is_dir", [(".tmp", True), (".old", True), (".tmp", False), (".keras", False)],
                         ids=["temp-folder", "old-folder", "temp-file", "staged-model"])
@pytest.mark.parametrize("writer", ["atomic_dir", "atomic_path"])
def test_next_write_removes_temps_of_a_dead_process(tmp_path: Path, suffix: str, is_dir: bool, writer: str) -> None:
    stale = _temp(tmp_path, "out", _ended(), 1_700_000_000, suffix, is_dir)
    with (atomic_dir if writer == "atomic_dir" else atomic_path)(tmp_path / "out") as tmp:
        assert not stale.exists()  # gone before the new temp is made
        if writer == "atomic_path":
            tmp.write_text("new")
    assert _listing(tmp_path) == ["out"]


def test_a_pid_reused_by_a_later_process_counts_as_dead(tmp_path: Path) -> None:
    pid, started = _me()
    stale = _temp(tmp_path, "out", pid, started - 3600)  # our pid, but a process an hour older
    assert remove_stale_temps(tmp_path / "out") == [stale]


def test_temps_of_live_processes_and_other_names_are_kept(tmp_path: Path) -> None:
    pid, started = _me()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        other = round(psutil.Process(sleeper.pid).create_time())
        kept = [
            _temp(tmp_path, "out", pid, started),                 # this process (another write now)
            _temp(tmp_path, "out", sleeper.pid, other),           # another live process
            _temp(tmp_path, "out", sleeper.pid, 0),               # live, start unknown
            _temp(tmp_path, "out.1", _ended(), 1),                # another target's
            _temp(tmp_path, "other", _ended(), 1),
        ]
        for name in (".out.ab12cd34.tmp", ".out.tmp", "out.123-4-abcd_123.tmp", ".out.x-1-abcd_123.tmp"):
            (tmp_path / name).mkdir()                             # not a name atomic.py makes now
        assert remove_stale_temps(tmp_path / "out") == []
        assert all(p.exists() for p in kept)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_folder_left_by_kill_9_is_removed_by_the_next_run(tmp_path: Path) -> None:
    script = ("import sys, time\nfrom mlic.atomic import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'half.tfrecord').write_bytes(b'x' * 1000)\n"
              "    print(tmp.name, flush=True)\n"
              "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()
    assert name.startswith(f".out.{proc.pid}-") and name.endswith(".tmp")
    assert _listing(tmp_path) == [name, f"{name}/half.tfrecord"]  # what a killed stage leaves
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "whole.tfrecord").write_bytes(b"y")
    assert _listing(tmp_path) == ["out", "out/whole.tfrecord"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_names_the_output_it_was_writing(tmp_path: Path, code: int) -> None:
    target = tmp_path / "reports" / "m.json"
    with pytest.raises(OSError) as caught:
        with atomic_open(target) as fh:
            fh.write("{}")
            raise OSError(code, os.strerror(code))  # what write() or fsync() raise: no file name
    assert caught.value.errno == code and caught.value.filename == str(target)
    message = str(disk_error(caught.value))
    assert message.startswith(f"{target}: ") and "\n" not in message
    assert _listing(tmp_path) == ["reports"]  # nothing partial


def test_an_error_that_names_its_file_or_is_not_the_disk_passes_unchanged(tmp_path: Path) -> None:
    own = OSError(errno.EACCES, "Permission denied", "/elsewhere")
    with pytest.raises(OSError) as caught:
        with atomic_path(tmp_path / "a"):
            raise own
    assert caught.value is own
    with pytest.raises(ConnectionRefusedError):
        with atomic_dir(tmp_path / "d"):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_disk_error_inside_a_temp_folder_names_the_real_output(tmp_path: Path, code: int) -> None:
    target = tmp_path / "tfrecords"
    with pytest.raises(OSError) as caught:
        with atomic_dir(target) as tmp:
            raise OSError(code, os.strerror(code), str(tmp / "test-00000-of-00001.tfrecord"))
    assert caught.value.errno == code and caught.value.filename == str(target / "test-00000-of-00001.tfrecord")
    assert _listing(tmp_path) == []
