"""Test kit for a team's tracking server (a helper module imported by tests, not a test file).

A throwaway PostgreSQL cluster (`postgres_cluster`) and an `mlflow server` over any backend store
(`mlflow_server`), each a context manager that starts one process group on a free loopback port
and stops it by its PID on exit. Both hand back a `Service` whose `stopped()` says whether
anything of it is left: a process in its group, or a listener on its port.

PostgreSQL refuses to run as root, and CI runs as root: there the cluster runs as an unprivileged
user (Debian's `postgres`, else `nobody`), in a folder under the system temp dir (pytest's own
temp dirs are root-only). Where PostgreSQL is missing, `require_postgres` skips with the reason,
or fails if MLIC_REQUIRE_POSTGRES or MLIC_REQUIRE_ALL is set (`.ci/run` sets the latter and installs `postgresql`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_ENV = "MLIC_REQUIRE_POSTGRES"
# Where Debian's `postgresql-<ver>` puts its binaries (only psql & co. are linked onto PATH).
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
DATABASE = "mlflow"
SUPERUSER = "mlflow"  # initdb's superuser name: no password, trust auth, loopback only


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process we may not signal is still a process
        return True
    return True


@dataclasses.dataclass
class Service:
    """One server process, leader of its own process group, listening on 127.0.0.1:port."""

    name: str
    process: subprocess.Popen
    port: int
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, *, whole_group: bool = True, grace_s: float = 20.0) -> None:
        """Send `sig` to its process group (`whole_group`) or to the leader alone, by PID, and wait;
        then SIGKILL whatever is left of the group. Idempotent."""
        with contextlib.suppress(ProcessLookupError):
            if whole_group and group_alive(self.pid):
                os.killpg(self.pid, sig)
            elif self.process.poll() is None:
                self.process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace_s)
        deadline = time.monotonic() + 5.0
        while group_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # children may end just after their leader
        if group_alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=10)

    def stopped(self) -> bool:
        """Nothing of it left: the leader reaped, no process in its group, nobody on its port."""
        return self.process.poll() is not None and not group_alive(self.pid) and not listening(self.port)

    def log_tail(self, chars: int = 5000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]


class ServiceFailed(RuntimeError):
    """A server did not start; the message holds the tail of its log."""


def _skip_or_fail(reason: str) -> None:
    from conftest import required

    if required(REQUIRE_ENV):
        pytest.fail(f"{reason} ({REQUIRE_ENV} or MLIC_REQUIRE_ALL is set: this run must test the PostgreSQL "
                    "server)", pytrace=False)
    pytest.skip(reason)


@dataclasses.dataclass(frozen=True)
class Postgres:
    """PostgreSQL's server binaries and the account to run them as (None: the current user)."""

    bindir: Path
    user: pwd.struct_passwd | None

    def popen_kwargs(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}


def find_bindir() -> Path | None:
    """The folder holding `initdb` and `postgres`: PATH first, else Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).resolve().parent
    versions = sorted(glob.glob(DEBIAN_BIN_GLOB), key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    for folder in reversed(versions):
        if all(os.access(Path(folder) / exe, os.X_OK) for exe in ("initdb", "postgres")):
            return Path(folder)
    return None


def require_postgres() -> Postgres:
    """PostgreSQL's binaries and the account to run them as, or skip (fail under MLIC_REQUIRE_POSTGRES or MLIC_REQUIRE_ALL)
    with what is missing and how to get it."""
    bindir = find_bindir()
    if bindir is None:
        _skip_or_fail("PostgreSQL is not installed (no initdb/postgres on PATH or under "
                      f"{DEBIAN_BIN_GLOB}); install it, e.g. `apt-get install -y postgresql`")
    try:
        import psycopg2  # noqa: F401  (the SQLAlchemy driver of postgresql+psycopg2:// URIs)
    except ImportError:
        _skip_or_fail("psycopg2 is not installed; `pip install -e '.[test]'` installs psycopg2-binary")
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam(name)
                break
        if user is None:
            _skip_or_fail("running as root and no unprivileged account (postgres, nobody) to run PostgreSQL as")
    return Postgres(bindir, user)


def _wait(ready, process: subprocess.Popen, what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {process.returncode}" if process.poll() is not None else f"no answer in {timeout_s:.0f} s"
            raise ServiceFailed(f"{what}: {state}\n{log.read_text(encoding='utf-8', errors='replace')[-5000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def postgres_cluster(pg: Postgres, timeout_s: float = 60.0) -> Iterator[tuple[Service, str]]:
    """A fresh cluster (initdb) with database `mlflow`, served on a free loopback port.

    Yields the server and the SQLAlchemy URI of the database (`postgresql+psycopg2://`: with
    SQLAlchemy 2.1 a bare `postgresql://` means psycopg 3). On exit the postmaster gets SIGINT
    (PostgreSQL's fast shutdown: backends end, the cluster closes cleanly) and the folder goes.
    """
    import psycopg2

    # Under the system temp dir, not pytest's: the unprivileged account must reach it.
    root = Path(tempfile.mkdtemp(prefix="mlic-pg-"))
    try:
        if pg.user is not None:
            os.chown(root, pg.user.pw_uid, pg.user.pw_gid)
        data, log = root / "data", root / "postgres.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        # --no-locale: no dependence on which locales the machine has; --no-sync: a throwaway cluster.
        init = subprocess.run([str(pg.bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                               "-E", "UTF8", "--no-locale", "--no-sync"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=120, **pg.popen_kwargs())
        if init.returncode != 0:
            raise ServiceFailed(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}\n{init.stderr[-3000:]}")
        port = free_port()
        with open(log, "w", encoding="utf-8") as out:
            if pg.user is not None:
                os.chown(log, pg.user.pw_uid, pg.user.pw_gid)
            # The postmaster itself, not `pg_ctl start` (which daemonizes): its PID is the Popen's.
            # Socket in our folder (Debian's default /var/run/postgresql may not exist); TCP on
            # loopback only; fsync off: nothing here needs to survive a power cut.
            proc = subprocess.Popen(
                [str(pg.bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                **pg.popen_kwargs())
        service = Service("postgres", proc, port, f"postgresql://{SUPERUSER}@127.0.0.1:{port}", log)
        try:
            def accepts() -> bool:
                try:
                    psycopg2.connect(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres",
                                     connect_timeout=2).close()
                    return True
                except psycopg2.OperationalError:
                    return False

            _wait(accepts, proc, "postgres", log, timeout_s)
            con = psycopg2.connect(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres")
            try:
                con.autocommit = True  # CREATE DATABASE cannot run inside a transaction
                with con.cursor() as cur:
                    cur.execute(f"CREATE DATABASE {DATABASE}")
            finally:
                con.close()
            yield service, f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            service.stop(signal.SIGINT, whole_group=False)  # the postmaster stops its backends
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, log: Path, *, artifacts_destination: Path | None = None,
                  default_artifact_root: Path | None = None, timeout_s: float = 120.0) -> Iterator[Service]:
    """`mlflow server --workers 1` over `backend_store_uri` on a free loopback port, until /health answers.

    `artifacts_destination`: artifacts go through the server (proxied, `mlflow-artifacts:/`) into
    that folder, as a team server does with a bucket. `default_artifact_root`: clients write
    artifacts straight to that folder. Job execution is off: its extra workers outlive a kill.
    Create a fresh SQLite store before starting: two processes creating one at once race.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
           "--port", str(port), "--backend-store-uri", backend_store_uri]
    if artifacts_destination is not None:
        cmd += ["--artifacts-destination", str(artifacts_destination)]
    if default_artifact_root is not None:
        cmd += ["--default-artifact-root", str(default_artifact_root)]
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    url = f"http://127.0.0.1:{port}"
    # A file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks it.
    with open(log, "w", encoding="utf-8") as out:
        # Own session: `mlflow server` starts uvicorn as a child, and the whole group must go.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    service = Service("mlflow server", proc, port, url, log)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    return response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        _wait(healthy, proc, f"mlflow server at {url}", log, timeout_s)
        yield service
    finally:
        service.stop(signal.SIGTERM)
