"""Atomic writes: a temp file (or folder) beside the target, then a rename.

An interrupted stage therefore leaves either the previous complete output or none,
never a half-written file that looks complete.

Temp siblings are named `.<target name>.<pid>-<start>-<random>.tmp` (`.old` for a folder being
replaced), after the process that made them and when it started. A process killed outright
(`kill -9`, power loss) cannot remove its own, so the next atomic write of the same target removes
those whose process is gone: the pid no longer runs, or now belongs to a process that started at
another time. Those of a live process (another write of the same target running now) are left
alone, and so are temp names of another shape. The project's .gitignore and .dvcignore hide them
meanwhile. A disk error (ENOSPC, EACCES...) on the way is raised again naming the target (the
file inside it, for a folder), not the temp, so the one-line disk error (`errors.disk_error`) says
which output failed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mlic import journal
from mlic.errors import InputError, MissingInput

if TYPE_CHECKING:  # pandas only where a CSV is written: preprocess workers import this module
    import pandas as pd

log = logging.getLogger(__name__)

# What follows `.<target name>.` in a temp sibling's name: `<pid>-<start>-<mkstemp's 8 random
# characters>` and `.tmp` or `.old`, or another suffix given to a file staged beside the temp
# (train and model_file stage `<temp stem>.keras`: Keras insists on the extension).
_TEMP_TAIL = re.compile(r"(\d+)-(\d+)-[a-z0-9_]{8}(?:\.\w+){1,2}")
# A pid that now runs a process started this many seconds apart from the one recorded is another
# process (the pid was reused). psutil's start times of one process can differ by about a second.
_START_SLACK = 2.0

_owner: tuple[int, str] | None = None   # (pid, "<pid>-<start>") of this process, made once per process


def _owner_tag() -> str:
    """`<pid>-<start time, whole seconds>` of this process (start 0 when it cannot be read)."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:  # a forked child is another owner
        started = journal.process_started(pid)
        _owner = (pid, f"{pid}-{0 if started is None else round(started)}")
    return _owner[1]


def _prefix(target: Path) -> str:
    return f".{target.name}.{_owner_tag()}-"


def _owner_gone(pid: int, started: int) -> bool:
    """True only when process `pid`, started at `started`, certainly runs no more."""
    if pid <= 0:
        return False
    now = journal.process_started(pid)
    if now is not None:
        return started > 0 and abs(now - started) > _START_SLACK  # 0: start unknown, keep it
    try:
        os.kill(pid, 0)  # no psutil, or not allowed to see it: ask the kernel whether it exists
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs, as another user
        return False
    return False


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove the temp siblings of `target` that a killed process left behind; return them.

    Only names this module makes (see the module docstring) whose owner process is gone.
    """
    target = Path(target)
    head = f".{target.name}."
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:  # no folder yet: nothing left behind
        return removed
    for path in siblings:
        match = _TEMP_TAIL.fullmatch(path.name[len(head):]) if path.name.startswith(head) else None
        if match is None or not _owner_gone(int(match.group(1)), int(match.group(2))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(path)
            log.info("removed %s, left by an interrupted run (process %s)", path, match.group(1))
    return removed


# Failures of a write, flush or fsync: the OSError names no file (an open that fails names its own).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
# The machine's failures (disk full, no permission, read-only): worth naming by the output's real path.
_DISK_ERRNOS = _WRITE_ERRNOS | {errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def _naming(target: Path, tmp: Path) -> Iterator[None]:
    """A disk error while writing `target` through its temp `tmp` names `target`, not the temp.

    An OSError that names no file (full disk on write or fsync) gets `target`; one that names a
    file in the temp folder gets that file's path in `target`. The user's fix is the same (free
    space or permissions where the output lives), and the temp's name would mean nothing to them.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        name = None if exc.filename is None else str(exc.filename)
        if name is None and exc.errno in _WRITE_ERRNOS:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        if name is not None and (name == str(tmp) or name.startswith(f"{tmp}{os.sep}")):
            raise OSError(exc.errno, exc.strerror, str(target) + name[len(str(tmp)):]) from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any file
    try:
        with _naming(target, tmp_path):
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
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        with _naming(target, tmp):
            yield tmp
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".old", dir=target.parent))
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
