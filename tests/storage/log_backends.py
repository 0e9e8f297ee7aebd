"""The LogStore backends the conformance suite runs against, behind one small shape.

A ``Backend`` opens a store over the same data as often as a test asks (close/reopen)
and crashes it: the file backend on MemoryFileSystem loses whatever was not fsynced
(and may keep a torn tail); the PostgreSQL backend stops a real server with
``pg_ctl stop -m immediate`` and starts it again (WAL replay).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from conveyor.storage.log_api import LogStore
from conveyor.storage.log_config import LogConfig
from conveyor.testing.clock import SimClock

SMALL = LogConfig(segment_bytes=2_000, index_interval_bytes=256)


@dataclass
class Backend:
    name: str
    clock: SimClock
    opener: Callable[[], LogStore]
    crasher: Callable[[LogStore], Awaitable[None]]
    # a config under which retention works in small steps (file: tiny segments)
    small_config: LogConfig = SMALL

    async def open(self) -> LogStore:
        store = self.opener()
        await store.open()
        return store

    async def crash(self, store: LogStore) -> None:
        """Lose what the backend never made durable; ``store`` is abandoned."""
        await self.crasher(store)


def file_backend(root: str, fs: object, clock: SimClock,
                 crash: Callable[[], None] | None = None) -> Backend:
    from conveyor.storage.log_store import FileLogStore

    def opener() -> LogStore:
        return FileLogStore(root, fs, clock)  # type: ignore[arg-type]

    async def crasher(store: LogStore) -> None:
        if crash is None:  # a real disk: close without syncing more than was acked
            await store.close()
        else:
            crash()

    return Backend(f"file-{type(fs).__name__}", clock, opener, crasher)


def postgres_backend(dsn: str, clock: SimClock, restart: Callable[[], None]) -> Backend:
    from conveyor.storage.postgres_log import PostgresLogStore

    def opener() -> LogStore:
        return PostgresLogStore(dsn, clock, random.Random(7), chunk_offsets=8)

    async def crasher(store: LogStore) -> None:
        restart()  # pg_ctl stop -m immediate, then start: WAL replay
        with contextlib.suppress(Exception):
            await store.close()  # its connections died with the server

    return Backend("postgresql", clock, opener, crasher)
