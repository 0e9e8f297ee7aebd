"""AMQP consumers of one queue on two nodes: the node that does not own the queue serves
its consumer through the owner (docs/cluster.md, "Queues"). Every confirmed message is
delivered exactly once across both consumers; a consumer's unacked deliveries on a node
killed with SIGKILL go to the other node's consumer once the dead node's lease lapses."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pika

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import FAST_LEASES, http_json, wait_for


def start(root: Path, dsn: str) -> list[BrokerProcess]:
    nodes = []
    for index in (1, 2):
        node = BrokerProcess(root / f"node{index}", listeners=("amqp", "http"),
                             extra_args=("--storage", dsn, "--node-id", str(index)),
                             environ=FAST_LEASES)
        node.data_dir.mkdir(parents=True)
        node.start()
        nodes.append(node)
    return nodes


def connect(node: BrokerProcess) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", node.ports["amqp"], credentials=pika.PlainCredentials("guest", "guest")))


def owner_and_other(nodes: list[BrokerProcess]) -> tuple[BrokerProcess, BrokerProcess]:
    """An empty HTTP acquire makes the queue's owner claim it; its row names it."""
    wait_for(lambda: all(any(t["name"] == "q" for t in http_json(n, "/topics")["topics"])
                         for n in nodes), 10, "the queue on every node")
    for node in nodes:
        http_json(node, "/topics/q/groups/q/acquire", {"limit": 1})

    def owner_id() -> int | None:
        rows = http_json(nodes[0], "/cluster")["owners"]
        return next((row["owner"] for row in rows
                     if row["kind"] == "shared" and row["name"] == "q"), None)

    wait_for(lambda: owner_id() is not None, 10, "the queue's owner row")
    index = int(owner_id() or 0) - 1
    return nodes[index], nodes[1 - index]


def publish(node: BrokerProcess, values: list[str]) -> None:
    connection = connect(node)
    channel = connection.channel()
    channel.queue_declare("q", durable=True)  # known to this node's default exchange
    channel.confirm_delivery()
    for value in values:
        channel.basic_publish("", "q", value.encode(),
                              pika.BasicProperties(delivery_mode=2), mandatory=True)
    connection.close()


class Consumer(threading.Thread):
    """A pika consumer in its own thread: acks each message (or none, ``ack=False``)."""

    def __init__(self, node: BrokerProcess, ack: bool = True, prefetch: int = 5) -> None:
        super().__init__(daemon=True)
        self.node, self.ack, self.prefetch = node, ack, prefetch
        self.got: list[tuple[str, bool]] = []  # (value, redelivered)
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            connection = connect(self.node)
            channel = connection.channel()
            channel.queue_declare("q", durable=True)
            channel.basic_qos(prefetch_count=self.prefetch)
            self.ready.set()
            for method, _, body in channel.consume("q", inactivity_timeout=0.2):
                if self.stop.is_set():
                    break
                if method is None:
                    continue
                self.got.append((body.decode(), bool(method.redelivered)))
                if self.ack:
                    channel.basic_ack(method.delivery_tag)
            connection.close()
        except Exception as error:  # the node was killed under it, or a real failure
            self.error = error
            self.ready.set()


def test_consumers_on_two_nodes_share_one_queue(tmp_path: Path, postgres_dsn: str) -> None:
    nodes = start(tmp_path, postgres_dsn)
    consumers: list[Consumer] = []
    try:
        http_json(nodes[0], "/queues", {"name": "q"})
        owner, other = owner_and_other(nodes)
        consumers = [Consumer(owner), Consumer(other)]
        for consumer in consumers:
            consumer.start()
            assert consumer.ready.wait(20)
        values = [f"m{index}" for index in range(200)]
        publish(other, values[:100])  # confirmed by either node: appends go to PostgreSQL
        publish(owner, values[100:])
        wait_for(lambda: sum(len(c.got) for c in consumers) >= 200, 60, "200 deliveries")
        for consumer in consumers:
            consumer.stop.set()
            consumer.join(10)
        assert [c.error for c in consumers] == [None, None]
        every = [value for consumer in consumers for value, _ in consumer.got]
        assert sorted(every) == sorted(values), "each confirmed message delivered once"
        assert all(consumer.got for consumer in consumers), [len(c.got) for c in consumers]
        assert http_json(owner, "/queues/q")["ready"] == 0
        assert http_json(owner, "/queues/q")["in_flight"] == 0  # every ack applied
    finally:
        for consumer in consumers:
            consumer.stop.set()
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.kill()


def test_a_killed_nodes_unacked_deliveries_go_to_the_other(tmp_path: Path,
                                                           postgres_dsn: str) -> None:
    nodes = start(tmp_path, postgres_dsn)
    consumers: list[Consumer] = []
    try:
        http_json(nodes[0], "/queues", {"name": "q"})
        owner, other = owner_and_other(nodes)
        holder = Consumer(other, ack=False, prefetch=100)  # through the owner, never acks
        consumers.append(holder)
        holder.start()
        assert holder.ready.wait(20)
        publish(owner, [f"m{index}" for index in range(20)])
        wait_for(lambda: len(holder.got) == 20, 30,
                 f"the non-owner's consumer holding 20 (has {holder.got}, {holder.error!r})")
        taker = Consumer(owner)
        consumers.append(taker)
        taker.start()
        assert taker.ready.wait(20)
        other.kill()  # its consumer's locks last 30 min (consumer_timeout) at the owner
        killed = time.monotonic()
        wait_for(lambda: len(taker.got) >= 20, 30, "the 20 unacked deliveries again")
        assert time.monotonic() - killed < 30
        assert sorted(value for value, _ in taker.got) == sorted(f"m{i}" for i in range(20))
        assert all(redelivered for _, redelivered in taker.got)
    finally:
        for consumer in consumers:
            consumer.stop.set()
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.kill()
