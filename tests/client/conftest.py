"""Fixtures: ``server`` (a BrokerThread with the HTTP listener, one per test module)
and ``client`` (a Client connected to it, closed after the test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conveyor import Client
from conveyor.testing.server import BrokerThread


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("broker"), listeners=("http",)) as running:
        yield running


@pytest.fixture
def client(server: BrokerThread) -> Iterator[Client]:
    with Client(f"http://127.0.0.1:{server.ports['http']}") as connected:
        yield connected
