"""``--storage``: file: keeps the embedded mode, postgresql:// puts the state in PostgreSQL.

Checked: the setting's precedence (TOML < CONVEYOR_STORAGE < --storage) and its
errors; then a real server on ``postgresql://`` with a real Kafka client (aiokafka):
a topic and a consumer group's committed offset land in PostgreSQL's tables, and a
restarted server (same database, same data directory for the logs) still knows
both. The CLI refuses an unknown scheme with a one-line error, not a traceback.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from conveyor.config import load_config
from conveyor.errors import InvalidConfigError
from conveyor.server.storage import parse_storage
from conveyor.testing.server import free_port, run_broker


def test_storage_from_file_environment_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "conveyor.toml"
    path.write_text('storage = "postgresql://a@file-host/db"\n')
    assert load_config(path, environ={}).storage == "postgresql://a@file-host/db"
    environ = {"CONVEYOR_STORAGE": "postgresql://b@env-host:5433/db"}
    assert load_config(path, environ=environ).storage == "postgresql://b@env-host:5433/db"
    flagged = load_config(path, environ=environ, flags={"storage": "file:/srv/conveyor"})
    assert flagged.storage == "file:/srv/conveyor"
    assert flagged.data_dir == Path("/srv/conveyor")
    assert load_config(environ={}).storage == "file:"


def test_storage_urls_are_checked() -> None:
    assert parse_storage("file:").kind == "file"
    location = parse_storage("postgresql://user:secret@db.example:5433/conveyor")
    assert location.kind == "postgresql"
    assert "secret" not in location.describe()
    assert location.describe() == "postgresql://user@db.example:5433/conveyor"
    several = parse_storage("postgresql://u:pw@h1:5433,[::1]:5434,h3/db"
                            "?target_session_attrs=read-write&password=pw")
    assert several.kind == "postgresql"
    assert several.describe() == ("postgresql://u@h1:5433,::1:5434,h3/db"
                                  "?target_session_attrs=read-write")
    for bad in ("mysql://x/y", "conveyor-data", "postgresql://host-only", "postgres://h:99x/d",
                "postgresql://a:1,b:2x/d"):
        with pytest.raises(InvalidConfigError):
            parse_storage(bad)


@pytest.mark.parametrize(("storage", "expected"), [
    ("mysql://x/y", "unknown storage scheme"),
    (f"postgresql://postgres@127.0.0.1:{free_port()}/x", "cannot connect to PostgreSQL"),
])
def test_cli_reports_a_bad_storage_in_one_line(
    tmp_path: Path, storage: str, expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "serve", "--data-dir", str(tmp_path / "d"),
         "--listeners", "http", "--http-port", "0", "--storage", storage],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


async def test_kafka_state_lives_in_postgresql_across_a_restart(
    tmp_path: Path, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    caplog.set_level(logging.INFO, logger="conveyor.server.storage")
    async with run_broker(data_dir, ("kafka",), storage=postgres_dsn) as server:
        assert "state store and partition logs: PostgreSQL" in caplog.text
        bootstrap = f"127.0.0.1:{server.ports['kafka']}"
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                    enable_idempotence=True)
        await producer.start()
        try:
            for index in range(10):
                await producer.send_and_wait("orders", b"value-%d" % index)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="billing",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition("orders", 0)])
            await consumer.commit({TopicPartition("orders", 0): OffsetAndMetadata(7, "")})
        finally:
            await consumer.stop()

    connection = await asyncpg.connect(postgres_dsn)
    try:
        assert await connection.fetchval("SELECT count(*) FROM topics WHERE name = 'orders'") == 1
        assert await connection.fetchval(
            "SELECT committed_offset FROM group_offsets WHERE group_id = 'billing'") == 7
        assert await connection.fetchval("SELECT version FROM conveyor_schema") == 1
        assert await connection.fetchval(  # the records themselves, one row per batch
            "SELECT sum(record_count) FROM conveyor_log_batches") == 10
    finally:
        await connection.close()
    assert not (data_dir / "state.sqlite3").exists()

    async with run_broker(data_dir, ("kafka",), storage=postgres_dsn) as server:
        bootstrap = f"127.0.0.1:{server.ports['kafka']}"
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="billing",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            assert await consumer.committed(TopicPartition("orders", 0)) == 7
            partitions = await consumer.topics()
            assert "orders" in partitions
        finally:
            await consumer.stop()
