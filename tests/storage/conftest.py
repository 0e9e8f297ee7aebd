"""Fixtures of the storage tests: a SimClock, a FileLogStore on each file system, and
the LogStore backends of the conformance suite."""

from __future__ import annotations

import os
import random

import pytest
from log_backends import Backend, file_backend, postgres_backend

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



# --- the LogStore backends of the conformance suite (tests/storage/log_backends.py) ----
LOG_BACKENDS = ["file-os", "file-memory", "postgresql"]


@pytest.fixture(params=LOG_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: os.PathLike[str],
            clock: SimClock) -> Backend:
    if request.param == "file-os":
        return file_backend(str(tmp_path), OsFileSystem(), clock)
    if request.param == "file-memory":
        fs = MemoryFileSystem()
        return file_backend("/data", fs, clock,
                            crash=lambda: fs.crash(random.Random(11), flip_bits=True))
    server = request.getfixturevalue("postgres_server")
    dsn = request.getfixturevalue("postgres_dsn")
    return postgres_backend(dsn, clock, lambda: server.restart("immediate"))
