"""When each stage last ran and how fast: kept beside the project, outside git and DVC.

Timings differ on every run, so they are not DVC outputs (a reproduction would change dvc.lock
and the metrics files in git), yet the MLflow run should say how long the pipeline took and how
fast training went. Each stage run from the command line (`stage.Stage.script`) that succeeds records one small file,
`.mlic/stages/<stage>.json` (overwritten by the stage's next success), tagged with the pipeline
invocation it belongs to: the `dvc` process that ran it (`session`). `track` spans its MLflow
run over the stages of its own invocation and logs their facts as metrics; so a `train` forced
alone yesterday does not stretch today's calibrate-only experiment. Run by hand (no `dvc`
above), the stages that ran since the previous `track` count.

`dvc exp run --temp/--queue` runs in a fresh copy of the repository, which has no `.mlic`: only
that experiment's own stages are seen there, which is what its run should span.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

JOURNAL_DIR = Path(".mlic") / "stages"

_facts: dict[str, float | str] = {}


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One successful run of a stage: wall-clock start and end (Unix seconds) and its facts."""

    stage: str
    started: float
    ended: float
    facts: dict[str, float | str] = dataclasses.field(default_factory=dict)  # text: a setting (a tag)
    session: str = ""   # the `dvc` invocation that ran it ("" when run by hand)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def note(**facts: float | str) -> None:
    """Record a fact of this stage run for its journal entry: a number (images_per_second, an
    MLflow metric) or a text (an effective setting such as jit_compile=off, an MLflow tag)."""
    _facts.update({k: _fact(v) for k, v in facts.items()})


def _fact(value: object) -> float | str:
    return value if isinstance(value, str) else float(value)  # type: ignore[arg-type]


def take_facts() -> dict[str, float | str]:
    """The facts noted so far, which are then forgotten (one stage run per process)."""
    facts = dict(_facts)
    _facts.clear()
    return facts


def process_started(pid: int | None = None) -> float | None:
    """When process `pid` (default: this one) started, in Unix seconds; None if it does not run
    (or cannot be seen). psutil is a DVC dependency."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - gone, not ours to see, or no psutil
        return None


def process_start() -> float:
    """When this process started (Unix seconds): a stage's imports count towards its time.
    Falls back to now, which only loses the import time."""
    started = process_started()
    return time.time() if started is None else started


def session() -> str:
    """The pipeline invocation this process belongs to: the nearest `dvc` process above it
    (`<pid>-<start time>`, unique on this machine), or "" when no `dvc` runs it."""
    try:
        import psutil

        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if proc.name() == "dvc" or any(Path(part).name == "dvc" for part in cmd[:2]):
                return f"{proc.pid}-{proc.create_time():.2f}"
            proc = proc.parent()
    except Exception:  # noqa: BLE001 - no psutil, a vanished parent, no permission: "by hand"
        pass
    return ""


def write(root: Path, run: StageRun) -> None:
    """Save `run` as `<root>/.mlic/stages/<stage>.json`. Never raises: timing is not worth a failed stage."""
    from mlic.atomic import write_json

    try:
        (Path(root) / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
        write_json(Path(root) / JOURNAL_DIR / f"{run.stage}.json", dataclasses.asdict(run))
    except OSError as exc:
        log.warning("could not record the stage's timing (%s); its MLflow run will lack it", exc)


def read(root: Path) -> dict[str, StageRun]:
    """Every recorded stage run under `root`, by stage; unreadable entries are skipped with a warning."""
    runs: dict[str, StageRun] = {}
    for path in sorted((Path(root) / JOURNAL_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            run = StageRun(str(data["stage"]), float(data["started"]), float(data["ended"]),
                           {str(k): _fact(v) for k, v in dict(data.get("facts") or {}).items()},
                           str(data.get("session") or ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable stage record, ignored (%s)", path, exc)
            continue
        runs[run.stage] = run
    return runs


def since(runs: Mapping[str, StageRun], after: str = "track", current: str = "") -> list[StageRun]:
    """The runs of pipeline invocation `current` (other than stage `after`), by start; with no
    `current` (run by hand), those that started after `after` last ended (all if it never ran)."""
    others = [r for s, r in runs.items() if s != after]
    if current:
        chosen = [r for r in others if r.session == current]
    else:
        previous = runs.get(after)
        cut = previous.ended if previous is not None else -math.inf
        chosen = [r for r in others if r.started >= cut]
    return sorted(chosen, key=lambda r: r.started)
