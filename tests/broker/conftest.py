"""Fixtures: ``harness`` (a BrokerHarness on MemoryFileSystem and on the OS file
system) and ``broker`` (its running Broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.storage.fs import OsFileSystem
from conveyor.testing.memory_fs import MemoryFileSystem


@pytest.fixture(params=["memory", "os"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    fs: MemoryFileSystem | OsFileSystem = (
        MemoryFileSystem() if request.param == "memory" else OsFileSystem()
    )
    if request.param == "memory":
        fs.make_dirs(str(tmp_path))
    result = BrokerHarness(tmp_path, fs)
    await result.start()
    try:
        yield result
    finally:
        await result.stop()


@pytest.fixture
async def broker(harness: BrokerHarness) -> Broker:
    assert harness.broker is not None
    return harness.broker
