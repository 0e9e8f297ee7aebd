"""Deletes and alters made on one node reach the other's memory (docs/cluster.md, "The
catalog on every node").

Two ``conveyor serve`` processes on one embedded PostgreSQL (helpers.cluster). A queue
deleted on its owner is dropped from the other node: its AMQP consumer there is
cancelled (basic.cancel, consumer_cancel_notify), a publish there is unroutable and its
HTTP API answers 404. A topic deleted on one node is gone from the other's Kafka
Metadata. A queue deleted and declared again at once on one node is the new queue on
the other node (its copy of the old one is not kept, and the new one is not dropped by
the delete's notification): a publish through the other node reaches it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from aiokafka.conn import create_conn
from aiokafka.protocol.metadata import MetadataRequest
from confluent_kafka.admin import AdminClient, NewTopic

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import cluster, http_json, start_nodes, wait_for
from tests.cluster.test_cluster_queue_delete import status_of
from tests.cluster.test_cluster_queues import owner_of_jobs
from tests.integration.test_metrics import samples_of, scrape, value


def connect(node: BrokerProcess) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", node.ports["amqp"], credentials=pika.PlainCredentials("guest", "guest")))


def two_live(nodes: list[BrokerProcess]) -> None:
    wait_for(lambda: all(sum(n["live"] for n in http_json(node, "/cluster")["nodes"]) == 2
                         for node in nodes), 20, "two live nodes")


def queue_series(node: BrokerProcess) -> dict[str, float]:
    """The node's per-queue series of queue jobs, and its omitted-queues count."""
    text, _ = scrape(f"http://127.0.0.1:{node.ports['http']}")
    samples = samples_of(text)
    found = {name: number for (name, labels), number in samples.items()
             if name.startswith("conveyor_queue_") and ("queue", "jobs") in labels}
    found["omitted"] = value(samples, "conveyor_metrics_series_omitted", family="queues")
    return found


def test_a_queue_deleted_on_one_node_is_gone_on_the_other(tmp_path: Path,
                                                          postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 2, listeners=("amqp", "http")) as nodes:
        two_live(nodes)
        http_json(nodes[0], "/queues", {"name": "jobs"})
        wait_for(lambda: status_of(nodes[1], "/queues/jobs") == 200, 10, "jobs on node 2")
        owner, other = owner_of_jobs(nodes)
        # per-queue metrics come from the owner's window only (a sum over the nodes by
        # queue counts each message once); the other's copy is not even "omitted"
        http_json(other, "/topics/jobs/messages",
                  {"messages": [{"value": f"m{index}"} for index in range(4)]})
        wait_for(lambda: queue_series(owner).get("conveyor_queue_messages_ready") == 4, 10,
                 "4 ready in the owner's series")
        assert queue_series(other) == {"omitted": 0}
        assert queue_series(owner)["omitted"] == 0
        connection = connect(other)
        try:
            channel = connection.channel()
            cancelled = threading.Event()
            channel.add_on_cancel_callback(lambda frame: cancelled.set())
            channel.basic_consume("jobs", lambda *args: None)
            # deleted on the owner: the other node's consumer is told, its copy goes
            assert status_of(owner, "/queues/jobs", "DELETE") == 204
            wait_for(lambda: (connection.process_data_events(0.05), cancelled.is_set())[1],
                     10, "basic.cancel on the other node")
            # (the cancel may come first: the consumer's acquire is answered by the owner)
            wait_for(lambda: status_of(other, "/queues/jobs") == 404, 10,
                     "jobs gone from the other node")
            # a publish there is unroutable, as on one node after a delete
            publisher = connection.channel()
            publisher.confirm_delivery()
            returned = False
            try:
                publisher.basic_publish("", "jobs", b"late", mandatory=True)
            except pika.exceptions.UnroutableError:
                returned = True
            assert returned, "a publish to the deleted queue was routed"
            assert status_of(other, "/topics/jobs") == 404
        finally:
            connection.close()


def test_a_queue_deleted_and_declared_again_is_the_new_one_everywhere(
        tmp_path: Path, postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 2, listeners=("http",)) as nodes:
        two_live(nodes)
        first, second = nodes
        http_json(first, "/queues", {"name": "jobs"})
        http_json(first, "/topics/jobs/messages",
                  {"messages": [{"value": f"old{index}"} for index in range(3)]})
        wait_for(lambda: status_of(second, "/queues/jobs") == 200, 10, "jobs on node 2")
        # at once, one after the other: node 2 hears both notifications after both
        assert status_of(first, "/queues/jobs", "DELETE") == 204
        http_json(first, "/queues", {"name": "jobs", "visibility_timeout_ms": 7000})

        def seen(node: BrokerProcess) -> Any:
            return http_json(node, "/queues/jobs")

        # node 2 holds the new queue (its config), not its copy of the old one
        wait_for(lambda: seen(second)["config"]["visibility_timeout_ms"] == 7000, 10,
                 "the new queue on node 2")
        # and its topic: a publish through node 2 reaches the new queue
        http_json(second, "/topics/jobs/messages", {"messages": [{"value": "new"}]})
        for node in nodes:  # the new message only
            wait_for(lambda node=node: seen(node)["ready"] == 1, 10, "1 ready")
        status, values = acquire_values(second)
        assert (status, values) == (200, ["new"])


def acquire_values(node: BrokerProcess) -> tuple[int, list[str]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.ports['http']}/topics/jobs/groups/jobs/acquire",
        data=b'{"limit": 10, "lock_ms": 5000}', headers={"content-type": "application/json"},
        method="POST")
    with urllib.request.urlopen(request, timeout=20) as response:
        body = json.loads(response.read())
        return int(response.status), [m["value"] for m in body["messages"]]


def metadata_topics(node: BrokerProcess) -> set[str]:
    """The topics in this node's own Metadata answer (every topic; librdkafka would ask
    any node it knows, not the one named)."""
    async def ask() -> set[str]:
        connection = await create_conn("127.0.0.1", node.ports["kafka"])
        try:
            response = await connection.send(MetadataRequest(None))
            return {str(topic[1]) for topic in response.topics}
        finally:
            connection.close()

    return asyncio.run(ask())


# the default heartbeat, so what node 2 sees sooner than 3 s came by the notification
# (or by a poll that happened to fall there); auto-creation off: librdkafka asks for the
# Metadata of topics it knew, and a topic created again would hide whether it was dropped
SLOW_POLL = {"CONVEYOR_BROKER__CLUSTER_HEARTBEAT_MS": "3000",
             "CONVEYOR_BROKER__CLUSTER_LEASE_MS": "10000",
             "CONVEYOR_BROKER__AUTO_CREATE_TOPICS": "false"}


def test_a_topic_deleted_on_one_node_leaves_the_others_metadata(
        tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    nodes: list[BrokerProcess] = []
    try:
        start_nodes(tmp_path, postgres_dsn, 2, SLOW_POLL, listeners=("kafka", "http"),
                    started=nodes)
        two_live(nodes)
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{nodes[0].ports['kafka']}"})
        admin.create_topics([NewTopic("events", 2, 1)])["events"].result(10)

        wait_for(lambda: "events" in metadata_topics(nodes[1]), 10,
                 "events in node 2's Metadata")
        admin.delete_topics(["events"])["events"].result(10)
        started = time.monotonic()
        wait_for(lambda: "events" not in metadata_topics(nodes[1]), 10,
                 "events gone from node 2's Metadata")
        gone_after_s = time.monotonic() - started
        assert status_of(nodes[1], "/topics/events") == 404
        with capsys.disabled():
            print(f"\ncatalog: topic deleted on node 1 gone from node 2's Metadata after "
                  f"{gone_after_s * 1000:.0f} ms (poll 3000 ms)")
    finally:
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.kill()
