"""The test PostgreSQL harness: a real server starts, answers queries, survives a crash.

The harness is what every PostgreSQL test stands on, so it is checked directly: a query
over a real asyncpg connection, durability settings as production needs them, data
committed before ``pg_ctl stop -m immediate`` present after the restart, and, as root,
the server process running as an unprivileged user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import asyncpg
import pytest

from conveyor.testing.postgres import PostgresServer, RunAs, usable_install, wheel_install_dir


async def test_fixture_starts_a_server_that_runs_queries(postgres_dsn: str) -> None:
    connection = await asyncpg.connect(postgres_dsn)
    try:
        assert await connection.fetchval("SELECT 6 * 7") == 42
        assert await connection.fetchval("SHOW fsync") == "on"
        assert await connection.fetchval("SHOW synchronous_commit") == "on"
        tables = await connection.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        assert tables == 0
    finally:
        await connection.close()


async def test_committed_rows_survive_an_immediate_stop(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    connection = await asyncpg.connect(postgres_dsn)
    await connection.execute("CREATE TABLE t (n INTEGER)")
    await connection.execute("INSERT INTO t VALUES (1), (2)")
    postgres_server.crash()
    assert not postgres_server.is_running()
    with pytest.raises((asyncpg.PostgresConnectionError, ConnectionError, OSError)):
        await connection.fetchval("SELECT 1")
    connection.terminate()
    postgres_server.start()
    connection = await asyncpg.connect(postgres_dsn)
    try:
        assert await connection.fetchval("SELECT sum(n) FROM t") == 3
    finally:
        await connection.close()


def test_server_process_never_runs_as_root(postgres_server: PostgresServer) -> None:
    owner = postgres_server.data_dir.stat().st_uid
    assert owner != 0
    pid = int((postgres_server.data_dir / "postmaster.pid").read_text().split()[0])
    assert Path(f"/proc/{pid}").stat().st_uid == owner


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs the copied install")
def test_root_copies_binaries_the_server_user_cannot_reach(tmp_path: Path) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    shutil.copytree(wheel_install_dir(), hidden / "pginstall", symlinks=True)
    run_as = RunAs.for_current_process()
    assert not run_as.can_execute(hidden / "pginstall" / "bin" / "postgres")
    scratch = Path(tempfile.mkdtemp(prefix="conveyor-pg-copy-", dir="/tmp"))
    try:
        scratch.chmod(0o755)
        install = usable_install(run_as, scratch, hidden / "pginstall")
        assert install == scratch / "pginstall"
        assert run_as.can_execute(install / "bin" / "postgres")
    finally:
        shutil.rmtree(scratch)
