"""Where the MLflow tracking store is, and whether it can be used: the only tracking code `train` needs.

`train` checks the store before a long training (one clear line instead of a failure at the end)
and must not re-run when how runs are logged changes (`tracking.py`), so this lives apart.
No mlflow import at module level: a sqlite check needs none, a server check imports it late.
"""

from __future__ import annotations

import contextlib
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from mlic.errors import UserError

DB_FILE = "mlflow.db"


class TrackingUnavailable(UserError, RuntimeError):
    """The MLflow tracking store cannot be used. The message is one line, fit for a log."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = one_line(reason)
        super().__init__(
            f"MLflow tracking store {redact_uri(uri)} is not reachable: {self.reason}; "
            "start the server or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
        )


# --------------------------------------------------------------------------- tracking store
def default_project_root() -> Path:
    """Where the local mlflow.db lives: DVC's repo root when run by DVC, else the current folder.

    `dvc exp run --queue/--temp` runs stages in a temporary copy of the repo but sets DVC_ROOT to
    the real one, so runs land in the project's mlflow.db instead of vanishing with the copy.
    """
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def resolve_tracking_uri(params_uri: str | None, project_root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else params `tracking.uri`, else `<project_root>/mlflow.db`.

    The fallback is MLflow 3's own default store, made absolute, so `mlflow ui` started in the
    project folder shows these runs with no flags.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if params_uri:
        return params_uri
    root = (project_root or default_project_root()).resolve()
    return f"sqlite:///{root.as_posix()}/{DB_FILE}"


def redact_uri(uri: str) -> str:
    """The URI without a password (`https://user:***@host`), for logs and files."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (relative to the cwd if relative), or None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingUnavailable (one line) unless the tracking store at `uri` can be used.

    sqlite: the database's folder must exist and be writable (nothing is created yet).
    http(s): GET <uri>/health, then one small API call through MlflowClient (so auth settings
    apply), with MLflow's retries turned off. Other schemes: that API call only.
    Returns within about `timeout_s` (plus the first `import mlflow`, 1-3 s, outside the sqlite
    case): a call that hangs is abandoned in a daemon thread.
    """
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        _check_sqlite(uri)
        return
    started = time.monotonic()
    if scheme in ("http", "https"):
        _check_health(uri, timeout_s)
    budget = max(1.0, timeout_s - (time.monotonic() - started))
    import mlflow  # noqa: F401  (not counted in the budget)

    _probe_with_client(uri, budget)


def _check_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        return  # in-memory database
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise TrackingUnavailable(uri, f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingUnavailable(uri, f"folder {folder} is not writable")
    if path.exists() and not (path.is_file() and os.access(path, os.R_OK | os.W_OK)):
        raise TrackingUnavailable(uri, f"{path} is not a writable file")
    if path.exists() and path.stat().st_size > 0:
        problem = sqlite_schema_problem(path)
        if problem:
            raise TrackingUnavailable(uri, problem)


# Tables every MLflow 3 store has; a store missing one was left half-created (see first_use).
CORE_TABLES = ("alembic_version", "experiments", "runs", "metrics", "params", "tags",
               "registered_models", "model_versions")


def mlflow_schema_heads() -> tuple[set[str], set[str]]:
    """(every schema revision the installed MLflow knows, its head revisions), read from its
    migration scripts without importing mlflow; two empty sets if they cannot be found."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return set(), set()
    versions = Path(list(spec.submodule_search_locations)[0]) / "store" / "db_migrations" / "versions"
    known: set[str] = set()
    parents: set[str] = set()
    for script in versions.glob("*.py"):
        text = script.read_text(encoding="utf-8", errors="replace")
        rev = re.search(r'^revision\s*=\s*["\']([0-9a-f]+)["\']', text, re.M)
        down = re.search(r'^down_revision\s*=\s*["\']([0-9a-f]+)["\']', text, re.M)
        if rev:
            known.add(rev.group(1))
        if down:
            parents.add(down.group(1))
    return known, known - parents


def sqlite_schema_problem(path: Path) -> str | None:
    """Why the SQLite MLflow store at `path` cannot be used as it is, or None if it can.

    Checks what MLflow itself would trip over later: a file that is not SQLite, tables missing
    (a store whose creation was interrupted), and a schema revision other than the installed
    MLflow's (older: `mlflow db upgrade`; newer: written by a newer MLflow).
    """
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in CORE_TABLES if t not in tables]
            if missing:
                return (f"{path} is not a complete MLflow store (missing tables: {', '.join(missing)}); "
                        "its creation was interrupted: move it aside, and the next run creates a fresh one")
            versions = [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.DatabaseError as exc:
        return f"{path} is not a readable SQLite database ({exc}); move it aside or point MLFLOW_TRACKING_URI elsewhere"
    known, heads = mlflow_schema_heads()
    if len(versions) != 1:
        return f"{path} holds {len(versions)} schema versions, not one: move it aside"
    if heads and versions[0] not in heads:
        if versions[0] in known:
            return (f"{path} has an older MLflow schema ({versions[0]}); upgrade it: "
                    f"mlflow db upgrade sqlite:///{path}")
        return f"{path} was written by a newer MLflow (schema {versions[0]}); upgrade mlflow"
    return None


@contextlib.contextmanager
def first_use(uri: str) -> Iterator[None]:
    """Hold a lock beside a SQLite store while MLflow first opens (and so maybe creates) it.

    Two processes creating a fresh store at once race MLflow's table creation (Alembic errors,
    once a store left half-made); `dvc queue start -j 2` on a new clone does exactly that. The
    lock (`<db>.lock`, flock) serializes first use; other stores need none.
    """
    path = sqlite_path(uri)
    if path is None or os.name != "posix":
        yield
        return
    import fcntl

    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_health(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) only)
            response.read(64)
    except urllib.error.HTTPError:
        return  # the server answered (401, 404 behind a proxy...): let the API call decide
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            return  # MLflow may have its own TLS settings (MLFLOW_TRACKING_SERVER_CERT_PATH...)
        raise TrackingUnavailable(uri, f"GET /health failed: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        raise TrackingUnavailable(uri, f"GET /health failed: {exc}") from None


def _probe_with_client(uri: str, timeout_s: float) -> None:
    from mlflow import MlflowClient

    outcome: dict[str, BaseException] = {}

    def probe() -> None:
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            outcome["error"] = exc

    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s)))}
    with _environ(quick):
        thread = threading.Thread(target=probe, name="mlflow-store-check", daemon=True)
        thread.start()
        thread.join(timeout_s)
    if thread.is_alive():
        raise TrackingUnavailable(uri, f"no answer within {timeout_s:.1f} s")
    if "error" in outcome:
        raise TrackingUnavailable(uri, str(outcome["error"]) or type(outcome["error"]).__name__)


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in before.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def one_line(text: str, limit: int = 300) -> str:
    """`text` on one line (whitespace runs become one space), cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


