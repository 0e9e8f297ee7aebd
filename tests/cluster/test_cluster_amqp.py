"""AMQP publisher confirms across a SIGKILL of the node the publisher is connected to:
every confirmed message is in the queue once, delivered by the queue's owner node."""

from __future__ import annotations

from pathlib import Path

import pika
import pika.exceptions

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import FAST_LEASES, http_json, wait_for


def start(root: Path, dsn: str) -> list[BrokerProcess]:
    nodes = []
    for index in (1, 2, 3):
        node = BrokerProcess(root / f"node{index}", listeners=("amqp", "http"),
                             extra_args=("--storage", dsn, "--node-id", str(index)),
                             environ=FAST_LEASES)
        node.data_dir.mkdir(parents=True)
        node.start()
        nodes.append(node)
    return nodes


def publish(node: BrokerProcess, values: list[str], confirmed: list[str]) -> None:
    """Publish with confirms until done or the connection dies."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", node.ports["amqp"], credentials=pika.PlainCredentials("guest", "guest")))
    channel = connection.channel()
    channel.queue_declare("q", durable=True)  # known to this node (declared anywhere)
    channel.confirm_delivery()
    for value in values:
        channel.basic_publish("", "q", value.encode(),
                              pika.BasicProperties(delivery_mode=2), mandatory=True)
        confirmed.append(value)
    connection.close()


def drain(nodes: list[BrokerProcess], wanted: set[str]) -> list[str]:
    """Acquire and ack over HTTP from whichever node owns the queue."""
    import json
    import urllib.error
    import urllib.request

    got: list[str] = []

    def once() -> bool:
        for node in nodes:
            base = f"http://127.0.0.1:{node.ports['http']}/topics/q/groups/q"
            request = urllib.request.Request(
                base + "/acquire", data=json.dumps({"limit": 500}).encode(),
                headers={"content-type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    messages = json.loads(response.read())["messages"]
            except urllib.error.HTTPError:
                continue  # 503: not the owner
            if messages:
                got.extend(m["value"] for m in messages)
                http_json(node, "/topics/q/groups/q/ack",
                          {"receipts": [m["receipt"] for m in messages]})
        return wanted <= set(got)

    wait_for(once, 40, "every confirmed message")
    return got


def test_confirmed_messages_survive_a_sigkill(tmp_path: Path, postgres_dsn: str) -> None:
    nodes = start(tmp_path, postgres_dsn)
    try:
        http_json(nodes[0], "/queues", {"name": "q"})
        wait_for(lambda: all(any(t["name"] == "q" for t in http_json(n, "/topics")["topics"])
                             for n in nodes), 10, "the queue on every node")
        confirmed: list[str] = []
        publish(nodes[0], [f"a{index}" for index in range(300)], confirmed)
        victim = nodes[0]
        victim.kill()
        publish(nodes[1], [f"b{index}" for index in range(300)], confirmed)
        survivors = nodes[1:]
        got = drain(survivors, set(confirmed))
        assert len(confirmed) == 600
        assert sorted(got) == sorted(set(got)), "a confirmed message delivered twice"
    finally:
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.kill()
