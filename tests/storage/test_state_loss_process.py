"""Losing or damaging state.sqlite3 never orphans the logs silently (issue 9 item 4).

Method: a real ``conveyor serve`` process; create a topic and a queue over HTTP,
publish, stop or kill -9 it, damage the state database (delete it; delete its WAL
after a kill; flip bits in its WAL after a kill; overwrite pages so quick_check
fails), start again and assert the data
is served and the log names what was rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor.client.sync import Client
from conveyor.testing.server import BrokerProcess


def publish_some(process: BrokerProcess) -> None:
    with Client(f"http://127.0.0.1:{process.ports['http']}") as client:
        client.create_topic("events", partitions=2)
        client.create_queue("jobs")
        for index in range(10):
            client.publish("events", f"e{index}", partition=index % 2)
            client.publish("jobs", f"j{index}")


def assert_data_served(process: BrokerProcess) -> None:
    with Client(f"http://127.0.0.1:{process.ports['http']}") as client:
        result = client.fetch("events", offsets={0: 0, 1: 0}, limit=100)
        assert sorted(message.value for message in result.messages) == sorted(
            f"e{index}".encode() for index in range(10))
        messages = client.acquire("jobs", limit=100)
        assert sorted(message.value for message in messages) == sorted(
            f"j{index}".encode() for index in range(10))


def delete_state(data_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"state.sqlite3{suffix}").unlink(missing_ok=True)


def delete_wal(data_dir: Path) -> None:
    for suffix in ("-wal", "-shm"):
        (data_dir / f"state.sqlite3{suffix}").unlink(missing_ok=True)


def corrupt_pages(data_dir: Path) -> None:
    path = data_dir / "state.sqlite3"
    data = bytearray(path.read_bytes())
    page_bytes = int.from_bytes(data[16:18], "big") or 65536
    for position in range(page_bytes + 8, min(len(data), 4 * page_bytes), 7):
        data[position] ^= 0x5A  # b-tree pages after the header page: quick_check fails
    path.write_bytes(bytes(data))
    delete_wal(data_dir)


def flip_wal_bits(data_dir: Path) -> None:
    """Flip bits in the first WAL frame: its checksum fails, so SQLite drops that frame
    and every later one, every commit since the last checkpoint."""
    path = data_dir / "state.sqlite3-wal"
    data = bytearray(path.read_bytes())
    assert len(data) > 32 + 24 + 512, "the kill left no WAL frames"
    for position in range(32 + 24 + 100, 32 + 24 + 500, 50):
        data[position] ^= 0x21
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, kill", [(delete_state, False), (delete_wal, True),
                                          (corrupt_pages, False), (flip_wal_bits, True)])
def test_damaged_state_is_rebuilt_from_the_logs_loudly(
    tmp_path: Path, damage: Callable[[Path], None], kill: bool,
) -> None:
    data_dir = tmp_path / "data"
    process = BrokerProcess(data_dir)
    process.start()
    try:
        publish_some(process)
    finally:
        process.kill() if kill else process.stop()
    damage(data_dir)
    process = BrokerProcess(data_dir)
    with process:
        assert_data_served(process)
    log = process.log_path.read_text()
    assert "rebuilt from the logs" in log
    assert "topic events (2 partitions)" in log and "queue jobs (1 partitions)" in log
    if damage is corrupt_pages:
        assert "failed PRAGMA quick_check" in log
        assert list(data_dir.glob("state.sqlite3.damaged-*"))


def test_healthy_restart_rebuilds_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with BrokerProcess(data_dir) as process:
        publish_some(process)
    with BrokerProcess(data_dir) as process:
        assert_data_served(process)
    assert "rebuilt from the logs" not in process.log_path.read_text()
