"""``conveyor serve --workers N``: refused on file storage; on PostgreSQL, N node
processes that Kafka clients spread over (docs/cluster.md)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import FAST_LEASES, History, http_json, wait_for


def test_workers_on_file_storage_are_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "serve", "--data-dir", str(tmp_path),
         "--storage", "file:", "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--workers needs --storage postgresql://" in done.stderr
    assert "Traceback" not in done.stderr


def test_two_workers_share_the_kafka_load(tmp_path: Path, postgres_dsn: str) -> None:
    server = BrokerProcess(tmp_path / "data", listeners=("kafka", "http"),
                           extra_args=("--storage", postgres_dsn, "--workers", "2"),
                           environ=FAST_LEASES)
    server.data_dir.mkdir()
    server.start()
    try:
        wait_for(lambda: len([n for n in http_json(server, "/cluster")["nodes"]
                              if n["live"]]) == 2, 15, "two live workers")
        http_json(server, "/topics", {"name": "spread", "partitions": 8})
        history = History()
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{server.ports['kafka']}",
                             "enable.idempotence": True, "acks": "all"})
        for index in range(400):
            producer.produce("spread", f"v{index}".encode(), key=str(index).encode(),
                             on_delivery=history.on_delivery)
        producer.flush(60)
        assert len(history.acknowledged) == 400
        wait_for(lambda: len({row["owner"] for row in http_json(server, "/cluster")["owners"]
                              if row["kind"] == "partition"}) == 2, 10,
                 "both workers leading partitions")
        consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{server.ports['kafka']}",
                             "group.id": "w", "auto.offset.reset": "earliest"})
        consumer.subscribe(["spread"])
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                seen.add(message.value().decode())
            if len(seen) == 400:
                break
        consumer.close()
        assert seen == set(history.acknowledged)
    finally:
        assert server.stop() == 0  # SIGTERM reaches both workers; they drain and exit
