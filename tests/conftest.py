"""Fixtures shared by every test directory: a real PostgreSQL, started once per session.

``postgres_server`` starts the server the first time a test asks for it (tests that never
ask pay nothing) and stops it at the end of the session. ``postgres_dsn`` gives each test
a fresh, empty database on it and drops that database afterwards. A test that crashes
the server (``postgres_server.crash()``) must ``start()`` it again; the fixture checks
and restarts it for the next test if one forgot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from conveyor.testing.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres_session_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long cluster runs (marker ``chaos``) belong to ``make chaos``: outside it they
    are deselected, not collected as skips. In the PostgreSQL pass, tests of the file
    LogStore's own mechanics are skipped (shown as skipped by ``-ra``, never counted as
    passed)."""
    if os.environ.get("CONVEYOR_CHAOS") != "1":
        chaos = [item for item in items if item.get_closest_marker("chaos") is not None]
        if chaos:
            config.hook.pytest_deselected(items=chaos)
            items[:] = [item for item in items if item.get_closest_marker("chaos") is None]
    if os.environ.get("CONVEYOR_TEST_STORAGE") != "postgresql":
        return
    skip = pytest.mark.skip(
        reason="file storage only: segment files or state.sqlite3 "
               "(CONVEYOR_TEST_STORAGE=postgresql)")
    for item in items:
        if item.get_closest_marker("file_storage") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def postgres_test_pass() -> Iterator[None]:
    """``CONVEYOR_TEST_STORAGE=postgresql``: every broker the tests start (run_broker,
    BrokerThread, BrokerProcess) keeps its state in this session's PostgreSQL."""
    if os.environ.get("CONVEYOR_TEST_STORAGE") != "postgresql":
        yield
        return
    server = PostgresServer()
    try:
        server.start()
        os.environ["CONVEYOR_TEST_POSTGRES_URL"] = server.dsn()
        yield
    finally:
        os.environ.pop("CONVEYOR_TEST_POSTGRES_URL", None)
        server.close()


@pytest.fixture
def postgres_server(postgres_session_server: PostgresServer) -> PostgresServer:
    if not postgres_session_server.is_running():
        postgres_session_server.start()
    return postgres_session_server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    dsn = postgres_server.create_database()
    yield dsn
    if not postgres_server.is_running():
        postgres_server.start()
    postgres_server.drop_database(dsn)
