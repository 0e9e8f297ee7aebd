"""Exchanges and bindings made on one node route on the other at once (docs/cluster.md,
"The catalog on every node").

Two ``conveyor serve`` processes on one embedded PostgreSQL, with the default heartbeat
(3 s: the catalog's poll fallback), so what is seen sooner came by a notification or by
the publishing node's re-read before it answered "unroutable". A consumer on node A
declares queue q and binds it to exchange x; right after the bind, a publisher on node B
(publisher confirms, mandatory) publishes to x: every message reaches the consumer and
none is returned. Then the time from a bind on A to B's routing table holding it is
measured, an unbind on A stops B routing there, a passive declare on B finds an exchange
declared on A a moment before, and an exchange deleted on A answers 404 on B.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import http_json, wait_for
from tests.cluster.test_cluster_amqp_consumers import Consumer, connect

MESSAGES = 50
POLL_MS = 3_000  # the default heartbeat: the catalog's poll fallback


def start(root: Path, dsn: str) -> list[BrokerProcess]:
    nodes = []
    for index in (1, 2):
        node = BrokerProcess(root / f"node{index}", listeners=("amqp", "http"),
                             extra_args=("--storage", dsn, "--node-id", str(index)),
                             environ={"CONVEYOR_BROKER__CLUSTER_HEARTBEAT_MS": str(POLL_MS)})
        node.data_dir.mkdir(parents=True)
        node.start()
        nodes.append(node)
    return nodes


def exchange_on(node: BrokerProcess, name: str) -> dict[str, Any] | None:
    """The node's own view of an exchange (None: 404)."""
    url = f"http://127.0.0.1:{node.ports['http']}/exchanges/{name}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def keys_on(node: BrokerProcess, name: str) -> set[str]:
    document = exchange_on(node, name)
    return {b["routing_key"] for b in (document or {}).get("bindings", [])
            if b["destination"] == "q"}


def publish(channel: Any, key: str, values: list[str]) -> int:
    """Publish with confirms and mandatory; how many came back unroutable."""
    returned = 0
    for value in values:
        try:
            channel.basic_publish("x", key, value.encode(),
                                  pika.BasicProperties(delivery_mode=2), mandatory=True)
        except pika.exceptions.UnroutableError:
            returned += 1
    return returned


def seen_after(predicate: Any, what: str) -> float:
    """Seconds until ``predicate`` holds (polled every 5 ms; it reads another process)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > 10:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - started


def test_a_bind_on_one_node_routes_publishes_on_the_other(tmp_path: Path, postgres_dsn: str,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    node_a, node_b = start(tmp_path, postgres_dsn)
    consumer: Consumer | None = None
    try:
        # both nodes in each other's view first: otherwise q may be claimed by A alone
        # and move to B a heartbeat later, and deliveries whose acks were in flight
        # then come again (at least once, docs/cluster.md "Queues")
        wait_for(lambda: all(sum(n["live"] for n in http_json(node, "/cluster")["nodes"]) == 2
                             for node in (node_a, node_b)), 20, "two live nodes")
        a = connect(node_a)
        on_a = a.channel()
        b = connect(node_b)
        on_b = b.channel()
        on_b.confirm_delivery()
        # node B opened before x and q existed: it learns them while it runs
        on_a.exchange_declare("x", "direct", durable=True)
        on_a.queue_declare("q", durable=True)
        on_a.queue_bind("q", "x", "k")
        values = [f"m{index}" for index in range(MESSAGES)]
        returned = publish(on_b, "k", values)  # at once: no wait for the notification
        assert returned == 0, f"{returned} of {MESSAGES} returned unroutable"
        consumer = Consumer(node_a)
        consumer.start()
        assert consumer.ready.wait(20)
        wait_for(lambda: len(consumer.got) >= MESSAGES, 30, "every message delivered")
        got = [value for value, _ in consumer.got]
        twice = [(value, flag) for value, flag in consumer.got if got.count(value) > 1]
        assert sorted(got) == sorted(values), f"delivered twice: {twice}"

        # the notification's latency: bind on A -> B's table holds it (no publish asks)
        on_a.queue_bind("q", "x", "k2")
        bind_s = seen_after(lambda: "k2" in keys_on(node_b, "x"), "the bind on node B")
        on_a.queue_unbind("q", "x", "k")
        unbind_s = seen_after(lambda: "k" not in keys_on(node_b, "x"), "the unbind on B")
        with capsys.disabled():
            print(f"\ncatalog: bind on A seen on B after {bind_s * 1000:.0f} ms, "
                  f"unbind after {unbind_s * 1000:.0f} ms (poll {POLL_MS} ms)")
        assert bind_s < POLL_MS / 1000 and unbind_s < POLL_MS / 1000
        assert publish(on_b, "k", ["gone"]) == 1, "B no longer routes k to q"
        assert publish(on_b, "k2", ["kept"]) == 0
        wait_for(lambda: any(value == "kept" for value, _ in consumer.got), 20, "kept")
        assert all(value != "gone" for value, _ in consumer.got)

        # an exchange declared on A a moment ago: B's passive declare finds it, and an
        # HTTP publish on B right after a bind on A is routed
        on_a.exchange_declare("y", "fanout", durable=True)
        on_b.exchange_declare("y", passive=True)
        on_a.queue_bind("q", "y")
        answer = http_json(node_b, "/exchanges/y/messages",
                           {"routing_key": "", "messages": [{"value": "over-http"}]})
        assert answer["routed"] is True
        wait_for(lambda: any(value == "over-http" for value, _ in consumer.got), 20,
                 "the HTTP publish delivered")

        # deleted on A: once B has heard, its passive declare answers 404
        on_a.exchange_delete("x")
        gone_s = seen_after(lambda: exchange_on(node_b, "x") is None, "x gone on B")
        with capsys.disabled():
            print(f"catalog: exchange deleted on A gone on B after {gone_s * 1000:.0f} ms")
        assert gone_s < POLL_MS / 1000
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
            on_b.exchange_declare("x", passive=True)
        assert closed.value.reply_code == 404
        a.close()
        b.close()
    finally:
        if consumer is not None:
            consumer.stop.set()
            consumer.join(10)
        for node in (node_a, node_b):
            if node.process is not None and node.process.poll() is None:
                node.kill()
