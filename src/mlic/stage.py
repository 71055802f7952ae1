"""The stage skeleton shared by the scripts in stages/: user mistakes end in one clear line, not a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mlic.params import ParamsError

log = logging.getLogger("mlic")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """INFO-level logging in the one format every stage prints (called from main, never on import)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def run_stage(main: Callable[[], int]) -> int:
    """Run a stage's `main()`; a bad params.yaml value is logged as one line and exits with 2.

    Other exceptions keep their traceback: they are bugs to report, not input to fix.
    """
    try:
        return main()
    except ParamsError as exc:
        setup_logging()
        log.error("%s", exc)
        return 2
