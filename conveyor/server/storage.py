"""open_storage: the one place that turns ``--storage`` into a LogStore and a StateStore.

``storage`` (config key ``storage``, env ``CONVEYOR_STORAGE``, flag ``--storage``):
- ``file:`` (the default) or ``file:PATH``: today's embedded mode. Partition logs
  under ``<data_dir>/logs``, state in SQLite at ``<data_dir>/state.sqlite3``
  (``file:PATH`` sets the data directory).
- ``postgresql://user[:password]@host[:port]/database`` (or ``postgres://``; several
  ``host:port`` separated by commas with ``?target_session_attrs=read-write`` follow
  a failover to a promoted standby): the
  state store is PostgreSQL (sql_engine.py / postgres_engine.py) and so are the
  partition logs (storage/postgres_log.py: one row per RecordBatch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from conveyor.clock import Clock
from conveyor.errors import InvalidConfigError
from conveyor.server.state_recovery import check_state_database
from conveyor.storage.fs import FileSystem
from conveyor.storage.log_api import LogStore
from conveyor.storage.log_store import FileLogStore
from conveyor.storage.postgres_dsn import parse_postgres_url
from conveyor.storage.state_store import SqliteStateStore, SqlStateStore, StateStore

logger = logging.getLogger("conveyor.server.storage")

POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class StorageLocation:
    kind: str  # "file" or "postgresql"
    path: Path | None = None  # file: the data directory named in the URL, if any
    dsn: str | None = None  # postgresql: the connection URL as given

    def describe(self) -> str:
        """Where the data lives, without a password (for logs)."""
        if self.dsn is None:
            return f"file:{self.path}" if self.path is not None else "file:"
        return parse_postgres_url(self.dsn).describe()


def parse_storage(text: str) -> StorageLocation:
    """``file:[PATH]`` or ``postgresql://...``; anything else is a config error."""
    scheme, colon, rest = text.partition(":")
    if not colon:
        raise InvalidConfigError(
            "storage must be file:[PATH] or postgresql://user@host:port/database",
            storage=text)
    if scheme == "file":
        return StorageLocation("file", Path(rest) if rest else None)
    if scheme in POSTGRES_SCHEMES:
        try:
            parts = parse_postgres_url(text)
        except ValueError as error:
            raise InvalidConfigError("bad PostgreSQL URL", error=str(error)) from None
        if not parts.hosts or not parts.database:
            raise InvalidConfigError(
                "a PostgreSQL storage URL names a host and a database: "
                "postgresql://user@host:port/database", storage=StorageLocation(
                    "postgresql", dsn=text).describe())
        return StorageLocation("postgresql", dsn=text)
    raise InvalidConfigError("unknown storage scheme (file: or postgresql://)", scheme=scheme)


@dataclass
class Storage:
    log_store: LogStore
    state_store: StateStore
    location: StorageLocation


def open_storage(location: StorageLocation, data_dir: Path, file_system: FileSystem,
                 clock: Clock, *, queue_bytes_max: int | None = None,
                 queue_appends_max: int | None = None) -> Storage:
    """The stores for ``location`` (not opened yet: the broker opens them). The queue
    bounds apply to PostgreSQL's appends waiting for the database (None: the default)."""
    if location.kind == "postgresql":
        from conveyor.storage.postgres_append import QUEUE_APPENDS_MAX, QUEUE_BYTES_MAX
        from conveyor.storage.postgres_engine import PostgresEngine
        from conveyor.storage.postgres_log import PostgresLogStore

        assert location.dsn is not None
        engine = PostgresEngine(location.dsn, clock)
        logger.info("state store and partition logs: PostgreSQL %s", location.describe())
        log_store = PostgresLogStore(
            location.dsn, clock,
            queue_bytes_max=QUEUE_BYTES_MAX if queue_bytes_max is None else queue_bytes_max,
            queue_appends_max=QUEUE_APPENDS_MAX if queue_appends_max is None
            else queue_appends_max)
        # appends also stop while the state writes waiting for the database are past
        # their bound (a producer's appends bring producer-state writes with them)
        log_store.admission = engine.busy
        return Storage(log_store, SqlStateStore(engine), location)
    check_state_database(data_dir / "state.sqlite3", clock)
    return Storage(FileLogStore(data_dir / "logs", file_system, clock),
                   SqliteStateStore(str(data_dir / "state.sqlite3")), location)
