"""SimStateStore: SQLite with the fault model of a power cut (for the simulation).

``SqliteEngine`` answers a committer only after an ``fdatasync`` of the WAL (a job of
the durability barrier's pass); a COMMIT nobody awaited is fsynced later (by the next
pass, which any append or awaited commit starts, or a timer).
A power cut in between loses it. This store's engine keeps an image of the database
as of its last sync (``sqlite3.Connection.serialize``) and ``crash(lose_unsynced=True)``
puts that image back as the database file: every commit no fsync covered is gone,
every commit a caller was told is durable stays. The background sync timer (real
time, so not deterministic) is switched off: unawaited commits stay volatile until
the next awaited one, the most a real disk can lose.
"""

from __future__ import annotations

import os
from pathlib import Path

from conveyor.storage.durability import SyncJob
from conveyor.storage.sqlite_engine import SqliteEngine
from conveyor.storage.state_store import SqlStateStore


class SimSqliteEngine(SqliteEngine):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.durable_image: bytes | None = None

    def open_sync(self) -> None:
        super().open_sync()
        self.durable_image = self.connection.serialize()

    def _wal_sync_job(self, wal_fd: int) -> SyncJob:
        """The barrier's WAL fdatasync: the image of the database as it is when the job
        runs (a real fdatasync covers every COMMIT written to the WAL by then)."""
        def snapshot() -> None:
            if self._connection is not None:
                self.durable_image = self.connection.serialize()
        return snapshot

    def _background_sync(self) -> None:
        self._background_sync_handle = None  # see the module docstring

    def crash(self, lose_unsynced: bool) -> None:
        """Kill: drop the open transaction; with ``lose_unsynced`` also every commit
        no fsync covered (a power cut), else keep them (a killed process)."""
        if self._background_sync_handle is not None:
            self._background_sync_handle.cancel()
            self._background_sync_handle = None
        if self._in_transaction:
            self.connection.execute("ROLLBACK")
            self._in_transaction = False
        self.connection.close()
        self._connection = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        if lose_unsynced and self.durable_image is not None:
            for suffix in ("-wal", "-shm"):
                Path(self.path + suffix).unlink(missing_ok=True)
            Path(self.path).write_bytes(self.durable_image)


class SimStateStore(SqlStateStore):
    def __init__(self, path: Path) -> None:
        self.sim_engine = SimSqliteEngine(path)
        super().__init__(self.sim_engine)

    def crash(self, lose_unsynced: bool) -> None:
        self.sim_engine.crash(lose_unsynced)
