"""One notion of a user error: input the user can fix, reported as one line (exit 2), never a traceback.

Every module raises its own subclass (params, labels, images, tracking, disk), and the stage
skeleton (`stage.py`) and `mlic` CLI catch `UserError` once. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno

# errno values that mean "the machine, not the code": out of space or quota, no permission, read-only.
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


class UserError(Exception):
    """Input the user can fix: the message names the file (line, column or key) and what to do."""


class InputError(UserError, ValueError):
    """An input file (the user's, or one an earlier stage wrote) is malformed or does not fit the
    others; the message names it and what to re-run or fix. A ValueError, so callers that
    validate with `except ValueError` keep working."""


class MissingInput(UserError, FileNotFoundError):
    """A required input file is absent; the message names it and the stage that makes it."""


class DiskError(UserError):
    """Writing an output failed for a reason outside the code (full disk, no permission)."""


def disk_error(exc: BaseException) -> DiskError | None:
    """A `DiskError` in one line for an OSError caused by the disk or permissions, else None."""
    if not isinstance(exc, OSError) or exc.errno not in _DISK_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else "an output"
    fix = ("free some space (or point TMPDIR and the outputs at a bigger disk) and re-run"
           if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable by this user, or change the path, and re-run")
    return DiskError(f"{where}: {_DISK_ERRNOS[exc.errno]}; {fix}")
