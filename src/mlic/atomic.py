"""Atomic writes: a temp file (or folder) beside the target, then a rename.

An interrupted stage therefore leaves either the previous complete output or none,
never a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mlic.errors import InputError, MissingInput

if TYPE_CHECKING:  # pandas only where a CSV is written: preprocess workers import this module
    import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any file
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(target: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file for writing; it replaces `target` when the block exits cleanly."""
    with atomic_path(target) as tmp:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
            kwargs.setdefault("newline", "")
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `target`; it replaces `target` when the block succeeds.

    The old folder is moved aside before the new one is renamed in, so at every moment the
    target is either the old complete output, absent, or the new complete output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def require_files(given: Iterable[tuple[str | Path | None, str]], files_only: bool = False) -> None:
    """Each (path, what) that was given (not None) must exist (as a file, with `files_only`);
    FileNotFoundError names the first that does not.

    For inputs a caller was asked to use: checked together before any work starts, so a missing
    one leaves nothing half-done.
    """
    for path, what in given:
        if path is not None and not (Path(path).is_file() if files_only else Path(path).exists()):
            raise MissingInput(f"{path}: {what} not found (it was passed, so it is required)")


def read_json(path: str | Path, what: str, remedy: str) -> Any:
    """Read a JSON file written by a stage; a missing or broken one says `what` it is and the `remedy`.

    FileNotFoundError (`<path>: no <what>; <remedy>`) or ValueError for invalid JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInput(f"{path}: no {what}; {remedy}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({exc}); {remedy}") from None


def write_json(path: str | Path, obj: Any, sort_keys: bool = True) -> None:
    """Write `obj` as pretty JSON, atomically; keys sorted unless their order means something.

    Stable bytes either way, so DVC hashes only change when the content does.
    """
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=sort_keys, ensure_ascii=False)
        fh.write("\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV without its index, atomically."""
    with atomic_open(path) as fh:
        frame.to_csv(fh, index=False, lineterminator="\n")
