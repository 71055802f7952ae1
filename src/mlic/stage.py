"""The one skeleton every script in stages/ runs in: argv as `dvc.yaml` passes it, params loaded
whole and validated once, logging, and user mistakes ending in one clear line (exit 2) instead of
a traceback. A bug (anything that is not a `UserError` nor a full or unwritable disk) keeps its
traceback. A successful run from the command line records its timing (`journal.py`).

A stage script declares what it reads and does its work in `run`:

    SECTIONS = ("common", "data", "split")      # == the stage's `params` in dvc.yaml

    def add_args(ap): ap.add_argument("--splits-dir", required=True)

    def run(args, params) -> int:               # params.common, params.data, params.split
        ...

    main = Stage(__doc__, SECTIONS, add_args, run)
    if __name__ == "__main__":
        main.script()
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlic import journal
from mlic.errors import UserError, disk_error
from mlic.params import load_section, read_params_file

log = logging.getLogger("mlic")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def setup_logging() -> None:
    """INFO-level logging in the one format every stage prints (called from main, never on import)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


class Params:
    """The params sections a stage declared, as attributes (`params.train`); reading one it did not
    declare is a bug in the stage (DVC would not re-run it when that section changes)."""

    def __init__(self, sections: Mapping[str, Any], path: Path):
        self._sections = dict(sections)
        self.path = path

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_sections"][name]
        except KeyError:
            raise AttributeError(f"params section {name!r} was not declared by this stage "
                                 f"(declared: {', '.join(self.__dict__['_sections'])})") from None


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage's entry point: `Stage(...)(argv)` runs it and returns the exit code."""

    doc: str
    sections: tuple[str, ...]                      # the params sections it reads: dvc.yaml's `params`
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Params], int]
    # Read for a pre-flight check only (train checks the tracking store before a long training):
    # they shape no output, so they are deliberately not DVC params of the stage.
    checks: tuple[str, ...] = ()

    def parser(self) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(description=self.doc.strip().splitlines()[0],
                                     epilog=f"params sections read: {', '.join(self.sections)}")
        ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file")
        self.add_args(ap)
        return ap

    def __call__(self, argv: list[str] | None = None) -> int:
        args = self.parser().parse_args(argv)
        setup_logging()
        journal.take_facts()  # a run starts with no facts (an earlier in-process run may have noted some)
        try:
            raw = read_params_file(args.params)
            # Every section present is validated, not only this stage's: a typo anywhere in the
            # file is reported by the first stage that runs, before any work.
            loaded = {name: load_section(name, args.params, raw) for name in raw}
            wanted = (*self.sections, *self.checks)
            params = Params({s: loaded[s] if s in loaded else load_section(s, args.params, raw) for s in wanted},
                            args.params)
            return self.run(args, params)
        except UserError as exc:
            log.error("%s", exc)
            return EXIT_USER_ERROR
        except OSError as exc:
            if (disk := disk_error(exc)) is None:
                raise
            log.error("%s", disk)
            return EXIT_USER_ERROR

    def script(self, name: str | None = None, root: Path | None = None) -> None:
        """Run as a command (argv from `dvc.yaml`) and exit with its code; a success is journalled
        under `name` (default: the script's file name)."""
        started = journal.process_start()
        # SIGTERM (`dvc queue kill`, a scheduler's timeout) unwinds like Ctrl-C, so the temp outputs
        # of `atomic.py` are removed on the way out instead of being left behind.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            code = self(None)
        except KeyboardInterrupt:  # one line, no traceback
            log.error("interrupted; no output was replaced (they are written atomically). Re-run to continue")
            sys.exit(EXIT_INTERRUPTED)
        if code == 0:
            journal.write(root or Path.cwd(), journal.StageRun(
                name or Path(sys.argv[0]).stem, started, time.time(), journal.take_facts(), journal.session()))
        sys.exit(code)
