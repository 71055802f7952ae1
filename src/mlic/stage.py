"""The stage skeleton shared by the scripts in stages/: user mistakes end in one clear line, not a
traceback, and each successful run records its timing (`journal.py`) for the MLflow run."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlic import journal
from mlic.params import ParamsError

log = logging.getLogger("mlic")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """INFO-level logging in the one format every stage prints (called from main, never on import)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def run_stage(main: Callable[[], int], name: str | None = None, root: Path | None = None) -> int:
    """Run a stage's `main()`; a bad params.yaml value is logged as one line and exits with 2.

    Other exceptions keep their traceback: they are bugs to report, not input to fix. A run
    that returns 0 is recorded in the journal under `name` (default: the script's name).
    """
    started = journal.process_start()
    try:
        code = main()
    except ParamsError as exc:
        setup_logging()
        log.error("%s", exc)
        return 2
    if code == 0:
        journal.write(root or Path.cwd(), journal.StageRun(name or Path(sys.argv[0]).stem, started,
                                                           time.time(), journal.take_facts(), journal.session()))
    return code
