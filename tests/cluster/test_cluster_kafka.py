"""Three ``conveyor serve`` nodes on one PostgreSQL, driven by confluent-kafka.

Fault-free, across a SIGKILL of one node, and across a SIGSTOP past the lease: every
acknowledged record is read back exactly once at the offset it was acknowledged at, and
each partition's offsets are contiguous (helpers.check). docs/cluster.md.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import (
    History,
    bootstrap,
    check,
    cluster,
    http_json,
    owner_rows,
    stored_log,
    wait_for,
)

PARTITIONS = 6
TOPIC = "orders"


def create_topic(nodes: list[BrokerProcess]) -> None:
    http_json(nodes[0], "/topics", {"name": TOPIC, "partitions": PARTITIONS})
    for node in nodes:  # every node has read the catalog (notified; re-read each heartbeat)
        wait_for(lambda node=node: any(t["name"] == TOPIC
                                       for t in http_json(node, "/topics")["topics"]),
                 10, "the topic on every node")


def producer(nodes: list[BrokerProcess], **settings: Any) -> Producer:
    return Producer({"bootstrap.servers": bootstrap(nodes), "enable.idempotence": True,
                     "acks": "all", "linger.ms": 5, "message.timeout.ms": 60_000,
                     "request.timeout.ms": 5_000,
                     "topic.metadata.refresh.interval.ms": 1000,
                     "reconnect.backoff.max.ms": 500, "retry.backoff.max.ms": 500,
                     **settings})


# librdkafka's client-side deadline of a request (Produce and Metadata alike; its
# request.timeout.ms is only the ack timeout the broker enforces). At its default, 60 s,
# a producer whose Metadata request went to a node just SIGSTOPped learns no new leader
# for 60 s: its records for that node's partitions time out unacknowledged, and no other
# node claims them (a claim is made by the first request that needs the partition).
SOCKET_TIMEOUT_MS = 5_000


def produce(client: Producer, history: History, values: range) -> None:
    """Produce ``values`` and wait for every one's outcome (acknowledged or failed: the
    flush outlasts message.timeout.ms, so none is left to be acknowledged later)."""
    for index in values:
        client.produce(TOPIC, f"v{index}".encode(), key=f"k{index % 17}".encode(),
                       on_delivery=history.on_delivery)
        client.poll(0)
    remaining = client.flush(90)
    assert remaining == 0, f"{remaining} records without an outcome after 90 s"


def consumer(nodes: list[BrokerProcess], group: str) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": group,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False,
                     "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                     "topic.metadata.refresh.interval.ms": 1000,
                     "reconnect.backoff.max.ms": 500, "retry.backoff.max.ms": 500})


REREAD: dict[int, int] = {}  # id(read list) -> records read a second time
# An OffsetCommit is a PostgreSQL transaction, answered in order on the coordinator's
# connection: committing every record queued ~1000 of them ahead of the consumer's
# Heartbeats, which then outlived session.timeout.ms under load (UNKNOWN_MEMBER_ID,
# rebalances; see docs/cluster.md). Applications commit in batches or on a timer.
COMMIT_EVERY = 50


def read_all(client: Consumer, wanted: int, timeout_s: float,
             seen: list[tuple[int, int, str]] | None = None) -> list[tuple[int, int, str]]:
    """Consume (committing as it goes) until ``wanted`` distinct records were read."""
    read = seen if seen is not None else []
    places = {(partition, offset) for partition, offset, _ in read}
    rereads = REREAD.setdefault(id(read), 0)
    since_commit = 0
    deadline = time.monotonic() + timeout_s
    while len(places) < wanted and time.monotonic() < deadline:
        message = client.poll(0.5)
        if message is None or message.error() is not None:
            continue
        place = (message.partition(), message.offset())
        if place not in places:
            places.add(place)
            read.append((*place, message.value().decode()))
        else:
            rereads += 1
        since_commit += 1
        if since_commit >= COMMIT_EVERY:
            client.commit(message, asynchronous=True)
            since_commit = 0
    REREAD[id(read)] = rereads
    return read


def full_log(nodes: list[BrokerProcess], dsn: str) -> list[tuple[int, int, str]]:
    """Every record of the topic, read from offset 0 by a fresh group, until as many as
    the database holds were read (not as many as were acknowledged: records a client
    gave up on may be written too, and a read that stopped at the acknowledged count
    left acknowledged records unread at the partitions' ends)."""
    wanted = len(stored_log(dsn, TOPIC))
    reader = consumer(nodes, f"verify-{random.randrange(1 << 30)}")
    reader.subscribe([TOPIC])
    try:
        return read_all(reader, wanted, 60)
    finally:
        reader.close()


def owners_by_node(node: BrokerProcess) -> dict[int, int]:
    status = http_json(node, "/cluster")
    counts: dict[int, int] = {}
    for row in status["owners"]:
        if row["kind"] == "partition" and row["owner"] is not None:
            counts[row["owner"]] = counts.get(row["owner"], 0) + 1
    return counts


def test_fault_free_three_nodes(tmp_path: Path, postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 3) as nodes:
        status = http_json(nodes[0], "/cluster")
        assert status["clustered"] and status["node_id"] == 1
        # every node sees the three (the topic now reaches them at once, by a catalog
        # notification: a node that saw fewer would claim partitions of the others)
        wait_for(lambda: all(sorted(n["node_id"] for n in http_json(node, "/cluster")["nodes"]
                                    if n["live"]) == [1, 2, 3] for node in nodes),
                 5, "every node seeing three nodes")
        create_topic(nodes)
        history = History()
        client = producer(nodes)
        produce(client, history, range(3000))
        assert len(history.acknowledged) == 3000 and not history.failed
        group = consumer(nodes, "fault-free")
        group.subscribe([TOPIC])
        read = read_all(group, 3000, 40)
        group.close()
        figures = check(history, read)
        assert figures["read"] == 3000
        # the partitions are spread over the nodes (rendezvous hashing), each led by its
        # owner; node 2 learns the others' claims at its next heartbeat (the run no longer
        # waits a heartbeat for the topic to reach every node, so it may not have yet)
        wait_for(lambda: len(owners_by_node(nodes[1])) >= 2, 5, "node 2 seeing two leaders")


def group_owner(node: BrokerProcess, group: str) -> int:
    return next(row["owner"] for row in http_json(node, "/cluster")["owners"]
                if row["kind"] == "group" and row["name"] == group)


# make chaos only, for now: in one clean-clone run of `make test` the consumer's poll
# after the coordinator's SIGKILL stopped returning (7 minutes, beyond pytest-timeout's
# reach inside librdkafka) while the machine was idle. Committing every record queued
# Heartbeats behind ~1000 OffsetCommits (session timeouts under load, see COMMIT_EVERY);
# the hang itself was not reproduced since (docs/cluster.md)
@pytest.mark.chaos
def test_sigkill_of_the_group_coordinator_loses_nothing(tmp_path: Path,
                                                       postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 3) as nodes:
        create_topic(nodes)
        history = History()
        client = producer(nodes)
        produce(client, history, range(1500))
        group = consumer(nodes, "across-kill")
        group.subscribe([TOPIC])
        read = read_all(group, 1000, 30)
        group.commit(asynchronous=False)
        victim_id = group_owner(nodes[0], "across-kill")  # the coordinator dies
        victim = nodes[victim_id - 1]
        victim.kill()  # SIGKILL: no drain; its leases lapse after 3 s
        started = time.monotonic()
        produce(client, history, range(1500, 3000))
        recovered_s = time.monotonic() - started
        read = read_all(group, len(history.acknowledged), 60, read)
        group.close()
        survivors = [node for node in nodes if node is not victim]
        assert victim_id not in owners_by_node(survivors[0]), "its partitions moved"
        assert group_owner(survivors[0], "across-kill") != victim_id, "the group moved"
        figures = check(history, full_log(survivors, postgres_dsn),
                        stored_log(postgres_dsn, TOPIC))
        print(f"sigkill: {figures}, produce after the kill took {recovered_s:.1f} s")
        assert figures["acknowledged"] == 3000
        assert {value for _, _, value in read} >= set(history.acknowledged)
        # how much the group read again after its coordinator died (at-least-once: not
        # asserted; 0 in most runs, once 1119 under load: see docs/cluster.md)
        print(f"records read again after the failover: {REREAD[id(read)]}")


class LogFollower(threading.Thread):
    """An assigned consumer (no group, no commits) reading every partition from offset 0
    for as long as a test runs. Across a SIGSTOP the takeover and then the woken node's
    re-claim raise the leader epochs of partitions it is fetching, so it validates its
    positions (OffsetForLeaderEpoch) and must go on reading: answered
    UNKNOWN_LEADER_EPOCH, as any epoch above 0 once was, it never fetched those
    partitions again (records in the database, never read back)."""

    def __init__(self, nodes: list[BrokerProcess]) -> None:
        super().__init__(daemon=True, name="log-follower")
        self.client = Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": "follower",
                                "enable.auto.commit": False,
                                "socket.timeout.ms": SOCKET_TIMEOUT_MS,
                                "topic.metadata.refresh.interval.ms": 1000,
                                "reconnect.backoff.max.ms": 500, "retry.backoff.max.ms": 500})
        self.client.assign([TopicPartition(TOPIC, partition, 0)
                            for partition in range(PARTITIONS)])
        self.read: list[tuple[int, int, str]] = []
        self._places: set[tuple[int, int]] = set()
        self._progress = threading.Condition()
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                messages = [message for message in self.client.consume(500, 0.2)
                            if message.error() is None]
                with self._progress:
                    for message in messages:
                        self._places.add((message.partition(), message.offset()))
                        self.read.append((message.partition(), message.offset(),
                                          message.value().decode()))
                    self._progress.notify_all()
        finally:
            self.client.close()

    def caught_up(self, wanted: int, timeout_s: float) -> bool:
        """Wait until ``wanted`` distinct records were read (False: the time is up)."""
        with self._progress:
            return self._progress.wait_for(lambda: len(self._places) >= wanted, timeout_s)

    def finish(self, wanted: int, timeout_s: float) -> list[tuple[int, int, str]]:
        """What it read once ``wanted`` distinct records were read (or the time is up)."""
        self.caught_up(wanted, timeout_s)
        self.stop()
        return list(self.read)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(30)


def test_sigstop_past_the_lease_is_fenced(tmp_path: Path, postgres_dsn: str) -> None:
    """A node paused (SIGSTOP) past its 3 s lease: the others take its partitions over
    while it sleeps, the producer goes on through them, and the woken node serves again
    only what it claims anew. Every acknowledged record is read back once, where it was
    acknowledged, and is in the database there.

    Method: which node leads what, and that the others claimed the paused node's
    partitions (at a higher epoch) during the pause, are read from the owner rows in
    PostgreSQL, not from a node's view (``/cluster`` shows another node's claims only
    after the next heartbeat). The claims are made by the producer's own requests: no
    node claims a partition before a request needs it. A consumer reads from offset 0
    through all of it (``LogFollower``: fetching while the leader epochs rise), and a new
    group reads the whole log afterwards; both are checked against the database."""
    with cluster(tmp_path, postgres_dsn, 3) as nodes:
        create_topic(nodes)
        history = History()
        client = producer(nodes, **{"socket.timeout.ms": SOCKET_TIMEOUT_MS})
        produce(client, history, range(600))  # every partition gets records: all claimed
        before = owner_rows(postgres_dsn)
        assert len(before) == PARTITIONS, before
        led = Counter(owner for owner, _ in before.values())
        paused_id = max(led, key=lambda node_id: led[node_id])  # it leads the most
        paused_items = {name: epoch for name, (owner, epoch) in before.items()
                        if owner == paused_id}
        paused = nodes[paused_id - 1]
        assert paused.process is not None
        follower = LogFollower(nodes)  # reads on through the pause and the wake-up
        follower.start()
        try:
            # fetching every partition when their leader epochs rise
            assert follower.caught_up(600, 30), f"{len(follower.read)} of 600 read"
            os.kill(paused.process.pid, signal.SIGSTOP)
            try:
                # every record's outcome comes before SIGCONT: what was acknowledged here was
                # acknowledged by the live nodes (a stopped process answers nothing)
                produce(client, history, range(600, 1200))
                during_rows = owner_rows(postgres_dsn)
            finally:
                os.kill(paused.process.pid, signal.SIGCONT)
            taken = {name: during_rows[name] for name in paused_items}
            assert all(owner not in (None, paused_id) and epoch > paused_items[name]
                       for name, (owner, epoch) in taken.items()), (paused_id, before, taken)
            # woken: it finds its lease lapsed, drops every ownership, and serves again only
            # what it claims anew (a higher epoch)
            wait_for(lambda: http_json(paused, "/cluster")["serving"], 10, "the node back")
            produce(client, history, range(1200, 1800))
            during = [f"v{index}" for index in range(600, 1200)]
            after = [f"v{index}" for index in range(1200, 1800)]
            # served on while the node was paused, on its partitions too (records a client
            # gave up on are allowed: never acknowledged), and fully once it is back
            moved = {int(name.rpartition("/")[2]) for name in paused_items}
            taken_over = [value for value in during if value in history.acknowledged
                          and history.acknowledged[value][0] in moved]
            assert taken_over, f"nothing acknowledged on {sorted(moved)}: {history.errors}"
            assert sum(value in history.acknowledged for value in during) >= 300, history.errors
            assert all(value in history.acknowledged for value in after), history.errors
            stored = stored_log(postgres_dsn, TOPIC)
            followed = check(history, follower.finish(len(stored), 60), stored)
            figures = check(history, full_log(nodes, postgres_dsn), stored)
            print(f"sigstop: node {paused_id} paused, its partitions {sorted(moved)} taken "
                  f"over (owner, epoch) {taken}; {len(taken_over)} records acknowledged on "
                  f"them during the pause; read through it: {followed['read']}; read after "
                  f"it by a new group: {figures}")
        finally:
            follower.stop()


@pytest.mark.parametrize("count", [2])
def test_cluster_status_command(tmp_path: Path, postgres_dsn: str, count: int) -> None:
    import subprocess
    import sys

    with cluster(tmp_path, postgres_dsn, count) as nodes:
        url = f"http://127.0.0.1:{nodes[0].ports['http']}"
        shown = subprocess.run([sys.executable, "-m", "conveyor.cli", "--url", url, "cluster",
                                "status"], capture_output=True, text=True, timeout=30,
                               check=True).stdout
        assert "node 1" in shown and "node 2" in shown
        ready = http_json(nodes[1], "/ready")
        assert ready["checks"]["cluster"] == "ok"
        assert nodes[1].stop() == 0  # SIGTERM: drain
        status = http_json(nodes[0], "/cluster")
        drained = [n for n in status["nodes"] if n["node_id"] == 2]
        wait_for(lambda: not [n for n in http_json(nodes[0], "/cluster")["nodes"]
                              if n["node_id"] == 2 and n["live"]], 5, "node 2 drained")
        assert drained


def test_a_long_poll_on_another_node_wakes_on_a_produce(tmp_path: Path,
                                                        postgres_dsn: str) -> None:
    """A read waiting on node B returns as soon as node A's append commits: the
    notification, not the poll (every 10 s here), wakes it."""
    import threading

    from tests.cluster.helpers import start_nodes

    slow_poll = {"CONVEYOR_BROKER__CLUSTER_HEARTBEAT_MS": "10000",
                 "CONVEYOR_BROKER__CLUSTER_LEASE_MS": "30000"}
    nodes = start_nodes(tmp_path, postgres_dsn, 2, slow_poll)
    try:
        http_json(nodes[0], "/topics", {"name": "wake", "partitions": 1})
        wait_for(lambda: any(t["name"] == "wake" for t in http_json(nodes[1], "/topics")["topics"]),
                 15, "the topic on node 2")
        answer: list[Any] = []
        reader = threading.Thread(target=lambda: answer.append(http_json(
            nodes[1], "/topics/wake/messages?partition=0&offset=0&wait_ms=8000")))
        reader.start()
        time.sleep(0.5)  # the read is parked on node 2 (nothing to observe it by)
        started = time.monotonic()
        http_json(nodes[0], "/topics/wake/messages", {"messages": [{"value": "hello"}]})
        reader.join(10)
        waited_s = time.monotonic() - started
        assert answer and answer[0]["messages"], answer
        assert waited_s < 3, f"woken after {waited_s:.1f} s"
    finally:
        for node in nodes:
            node.kill()


def test_postgresql_restarted_under_two_nodes(tmp_path: Path, postgres_server: Any,
                                              postgres_dsn: str) -> None:
    """``pg_ctl stop -m immediate`` and start under load: the nodes reconnect (each reads
    its own commit-sequence row back), nothing acknowledged is lost or duplicated."""
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        create_topic(nodes)
        history = History()
        client = producer(nodes)
        produce(client, history, range(500))
        postgres_server.restart("immediate")
        produce(client, history, range(500, 1000))
        figures = check(history, full_log(nodes, postgres_dsn),
                        stored_log(postgres_dsn, TOPIC))
        print(f"postgresql restart: {figures}")
        assert all(f"v{index}" in history.acknowledged for index in range(500))
        assert figures["acknowledged"] >= 900, history.errors
        for node in nodes:
            assert http_json(node, "/cluster")["serving"]
