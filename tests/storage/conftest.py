"""Fixtures of the storage tests: a SimClock and a FileLogStore on each file system."""

from __future__ import annotations

import os

import pytest

from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem


@pytest.fixture
def clock() -> SimClock:
    return SimClock()


@pytest.fixture
def memory_fs() -> MemoryFileSystem:
    return MemoryFileSystem()


@pytest.fixture(params=["os", "memory"])
def any_store(request: pytest.FixtureRequest, tmp_path: os.PathLike[str],
              clock: SimClock) -> FileLogStore:
    if request.param == "os":
        return FileLogStore(str(tmp_path), OsFileSystem(), clock)
    return FileLogStore("/data", MemoryFileSystem(), clock)

