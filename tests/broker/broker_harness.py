"""BrokerHarness: a Broker on the real FileLogStore (MemoryFileSystem or the OS file
system under tmp_path) and SQLite state in tmp_path, with a SimClock; ``restart``
closes it and opens a new Broker on the same directory and file system. On a
PostgreSQL test pass (``CONVEYOR_TEST_STORAGE=postgresql``) the state is in a
PostgreSQL database of its own for the directory instead."""

from __future__ import annotations

import os
import random
from pathlib import Path

from conveyor.broker.broker import Broker, BrokerConfig
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore
from conveyor.storage.postgres_engine import PostgresEngine
from conveyor.storage.state_store import SqliteStateStore, SqlStateStore, StateStore
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem
from conveyor.testing.server import storage_for


def seed() -> int:
    value = int(os.environ.get("CONVEYOR_SEED", random.randrange(1 << 30)))
    print(f"CONVEYOR_SEED={value}")
    return value


class BrokerHarness:
    """One broker at a time on a fixed data directory and file system."""

    def __init__(self, directory: Path, fs: MemoryFileSystem | OsFileSystem,
                 config: BrokerConfig | None = None) -> None:
        self.directory = directory
        self.fs = fs
        self.clock = SimClock()
        self.rng = random.Random(seed())
        self.config = config or BrokerConfig()
        self.broker: Broker | None = None

    async def start(self) -> Broker:
        log_root = str(self.directory / "logs")
        log_store = FileLogStore(log_root, self.fs, self.clock)
        storage = storage_for(self.directory)
        state_store: StateStore = (
            SqliteStateStore(self.directory / "state.sqlite3") if storage == "file:"
            else SqlStateStore(PostgresEngine(storage, self.clock)))
        self.broker = Broker(log_store, state_store, self.clock, self.rng, self.config)
        await self.broker.open()
        return self.broker

    async def restart(self) -> Broker:
        assert self.broker is not None
        await self.broker.close()
        return await self.start()

    async def stop(self) -> None:
        if self.broker is not None:
            await self.broker.close()
            self.broker = None
