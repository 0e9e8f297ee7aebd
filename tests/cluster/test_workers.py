"""``conveyor serve --workers N``: refused on file storage; on PostgreSQL, N node
processes that Kafka clients spread over, sharing the AMQP and HTTP ports with
SO_REUSEPORT (docs/cluster.md); Kafka over TLS on each worker's own port."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pika
from confluent_kafka import Consumer, Producer, TopicPartition

from conveyor.testing.server import BrokerProcess
from conveyor.testing.tls import TestPki, served_serial
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


def _worker_view(server: BrokerProcess) -> tuple[int, int]:
    """(node id, AMQP connections) of the worker that accepts one new HTTP connection:
    both requests go over that one connection, so to the same worker."""
    connection = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=10)
    try:
        connection.request("GET", "/cluster")
        node_id = int(json.loads(connection.getresponse().read())["node_id"])
        connection.request("GET", "/api/connections")
        views = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return node_id, sum(1 for view in views if "amqp" in str(view["protocol"]).lower())


def test_two_workers_share_the_amqp_and_http_ports(tmp_path: Path, postgres_dsn: str) -> None:
    server = BrokerProcess(tmp_path / "data", listeners=("amqp", "http"),
                           extra_args=("--storage", postgres_dsn, "--workers", "2"),
                           environ=FAST_LEASES)
    server.data_dir.mkdir()
    server.start()  # both workers bound the same AMQP and HTTP ports (SO_REUSEPORT)
    connections: list[pika.BlockingConnection] = []
    try:
        wait_for(lambda: len([n for n in http_json(server, "/cluster")["nodes"]
                              if n["live"]]) == 2, 15, "two live workers")
        http_json(server, "/queues", {"name": "shared"})
        for _ in range(16):  # the kernel spreads them over both workers
            connection = pika.BlockingConnection(pika.ConnectionParameters(
                "127.0.0.1", server.ports["amqp"],
                credentials=pika.PlainCredentials("guest", "guest")))
            connection.channel().queue_declare("shared", durable=True)  # on each worker
            connections.append(connection)
        per_worker: dict[int, int] = {}
        wait_for(lambda: per_worker.update([_worker_view(server)]) or len(per_worker) == 2,
                 30, "HTTP answered by both workers")
        assert sum(per_worker.values()) == 16 and all(per_worker.values()), per_worker
        # the queue works whichever worker each connection reached: one publisher,
        # consumers on every connection, every confirmed message delivered once
        publisher = connections[0].channel()
        publisher.confirm_delivery()
        for index in range(100):
            publisher.basic_publish("", "shared", f"w{index}".encode(),
                                    pika.BasicProperties(delivery_mode=2), mandatory=True)
        got: list[str] = []
        deadline = time.monotonic() + 60
        while len(got) < 100 and time.monotonic() < deadline:
            for connection in connections:
                method, _, body = connection.channel().basic_get("shared", auto_ack=True)
                if method is not None:
                    got.append(body.decode())
        assert sorted(got) == sorted(f"w{index}" for index in range(100))
    finally:
        for connection in connections:
            if connection.is_open:
                connection.close()
        assert server.stop() == 0


def test_two_workers_serve_kafka_over_tls(tmp_path: Path, postgres_dsn: str) -> None:
    """Each worker's Kafka port (kafka port + K - 1) speaks TLS and is advertised as such:
    a producer and a consumer over SSL reach both workers; the workers' internal ports
    speak TLS too (the [tls] section, no CA: the shared certificate is the anchor)."""
    pki = TestPki(tmp_path / "pki")
    issued = pki.server()
    config = tmp_path / "conveyor.toml"
    config.write_text(f'[tls]\ncert_file = "{issued.cert_file}"\n'
                      f'key_file = "{issued.key_file}"\n[listeners.http.tls]\nenabled = false\n')
    server = BrokerProcess(tmp_path / "data", listeners=("kafka", "http"), extra_args=(
        "--storage", postgres_dsn, "--workers", "2", "--config", str(config)),
        environ=FAST_LEASES)
    server.data_dir.mkdir()
    server.start()
    try:
        def nodes() -> list[dict[str, Any]]:
            return [node for node in http_json(server, "/cluster")["nodes"]
                    if node["live"] and "internal" in node["addresses"]]

        wait_for(lambda: len(nodes()) == 2, 15, "two live workers")
        for node in nodes():  # each worker's node-to-node port: TLS with the certificate
            port = node["addresses"]["internal"].rpartition(":")[2]
            assert served_serial(int(port), pki.ca_file) == issued.serial
        http_json(server, "/topics", {"name": "secure", "partitions": 6})
        tls = {"bootstrap.servers": f"127.0.0.1:{server.ports['kafka']}",
               "security.protocol": "SSL", "ssl.ca.location": str(pki.ca_file)}
        history = History()
        producer = Producer({**tls, "enable.idempotence": True, "acks": "all"})
        for index in range(120):
            producer.produce("secure", f"v{index}".encode(), key=str(index).encode(),
                             on_delivery=history.on_delivery)
        producer.flush(60)
        assert len(history.acknowledged) == 120
        # the partitions spread over both workers (each one's view of the other comes
        # with its next heartbeat): the consumer below reads from both, over TLS
        wait_for(lambda: len({row["owner"] for row in http_json(server, "/cluster")["owners"]
                              if row["kind"] == "partition"}) == 2, 10,
                 "both workers leading partitions")
        consumer = Consumer({**tls, "group.id": "s", "auto.offset.reset": "earliest"})
        consumer.assign([TopicPartition("secure", partition, 0) for partition in range(6)])
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(seen) < 120:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                seen.add(message.value().decode())
        consumer.close()
        assert seen == set(history.acknowledged)
    finally:
        assert server.stop() == 0
