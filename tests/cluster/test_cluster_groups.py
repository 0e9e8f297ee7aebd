"""KIP-848 consumer groups and KIP-932 share groups across the death of their coordinator
(two ``conveyor serve`` processes on one PostgreSQL; docs/cluster.md).

A consumer with ``group.protocol=consumer`` keeps its member epoch and partitions when
its coordinator is SIGKILLed (the survivor reads the group's members from PostgreSQL).
A consumer with ``group.protocol=consumer`` commits, its coordinator is SIGKILLed, and
the group goes on on the other node from its committed offsets: every acknowledged
record is read, and a record is read twice only at or after the last offset committed
before the kill. A share consumer holds records unacknowledged when the node serving
its group dies: the survivor redelivers them once their locks expire, and every record
is accepted exactly once.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from confluent_kafka import AcknowledgeType, Consumer, Producer, ShareConsumer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from conveyor.cluster.ownership import GROUP, PARTITION, SHARED, choose_owner, item_name
from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import History, bootstrap, cluster, http_json, wait_for

WAIT_S = 20


def create_topic(nodes: list[BrokerProcess], name: str, partitions: int) -> None:
    http_json(nodes[0], "/topics", {"name": name, "partitions": partitions})
    for node in nodes:
        wait_for(lambda node=node: any(t["name"] == name
                                       for t in http_json(node, "/topics")["topics"]),
                 10, "the topic on every node")


def set_group_configs(nodes: list[BrokerProcess], group: str, **configs: str) -> None:
    """Before the group's first request: its coordinator reads them when it claims it."""
    admin = AdminClient({"bootstrap.servers": bootstrap(nodes)})
    entries = [ConfigEntry(name.replace("_", "."), value,
                           incremental_operation=AlterConfigOpType.SET)
               for name, value in configs.items()]
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=WAIT_S)


def produce(nodes: list[BrokerProcess], topic: str, history: History, values: range) -> None:
    producer = Producer({"bootstrap.servers": bootstrap(nodes), "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5, "message.timeout.ms": 30_000,
                         "request.timeout.ms": 5_000,
                         "topic.metadata.refresh.interval.ms": 1000,
                         "reconnect.backoff.max.ms": 500, "retry.backoff.max.ms": 500})
    for index in values:
        producer.produce(topic, f"v{index}".encode(), key=f"k{index}".encode(),
                         on_delivery=history.on_delivery)
        producer.poll(0)
    assert producer.flush(WAIT_S) == 0


def owner(node: BrokerProcess, kind: str, name: str) -> int | None:
    return next((row["owner"] for row in http_json(node, "/cluster")["owners"]
                 if row["kind"] == kind and row["name"] == name), None)


# make chaos (its 60 s deadline). It used to leave one partition's post-kill records unread
# in about 1 run of 6: OffsetForLeaderEpoch answered a cluster's leader epochs as unknown,
# so the consumer validated that partition's position for ever (docs/cluster.md)
@pytest.mark.chaos
def test_a_kip848_group_goes_on_from_its_commits_after_its_coordinator_dies(
        tmp_path: Path, postgres_dsn: str) -> None:
    topic, group = "kip848", "kip848-group"
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        create_topic(nodes, topic, 4)
        set_group_configs(nodes, group, consumer_heartbeat_interval_ms="300")
        history = History()
        produce(nodes, topic, history, range(400))
        consumer = Consumer({
            "bootstrap.servers": bootstrap(nodes), "group.id": group,
            "group.protocol": "consumer", "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "fetch.wait.max.ms": 100,
            "topic.metadata.refresh.interval.ms": 500,
            "reconnect.backoff.max.ms": 500, "retry.backoff.max.ms": 500})
        consumer.subscribe([topic])
        read: list[tuple[int, int, str]] = []
        committed: dict[int, int] = {}

        def consume(wanted: int, timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            since_commit = 0
            while len({(p, o) for p, o, _ in read}) < wanted and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is None or message.error() is not None:
                    continue
                read.append((message.partition(), message.offset(), message.value().decode()))
                since_commit += 1
                if since_commit >= 50:  # commit in batches, as applications do
                    commit()
                    since_commit = 0

        def commit() -> None:
            try:
                for part in consumer.commit(asynchronous=False) or []:
                    if part.offset >= 0:  # -1001: nothing new to commit there
                        committed[part.partition] = part.offset
            except Exception as error:  # a failover in progress: the next one retries
                print(f"commit failed during the failover: {error}")

        try:
            consume(200, 40)  # deadlines for a loaded machine; healthy runs take seconds
            assert len(read) >= 200
            commit()
            before_kill = dict(committed)
            assert before_kill, "nothing committed before the kill"
            coordinator = owner(nodes[0], GROUP, group)
            assert coordinator in (1, 2)
            victim = nodes[coordinator - 1]
            survivor = nodes[2 - coordinator]
            victim.kill()  # SIGKILL: its lease lapses after 3 s
            reads_before = len(read)
            produce([survivor], topic, history, range(400, 800))
            consume(800, 60)
            commit()
            print(f"assignment at the end: {consumer.assignment()}")
        finally:
            consumer.close()
        assert len(history.acknowledged) == 800
        assert owner(survivor, GROUP, group) == 3 - coordinator, "the group moved"
        seen = {value for _, _, value in read}
        lost = [value for value in history.acknowledged if value not in seen]
        assert not lost, f"acknowledged, never read: {lost[:10]} ({len(lost)})"
        # read again only at or after the last offset committed before the kill
        first_read: set[tuple[int, int]] = {(p, o) for p, o, _ in read[:reads_before]}
        again = [(p, o) for p, o, _ in read[reads_before:] if (p, o) in first_read]
        early = [(p, o) for p, o in again if o < before_kill.get(p, 0)]
        assert not early, f"read again below the committed offset: {early[:10]}"
        print(f"kip848 failover: {len(read)} reads, {len(again)} read again after the kill, "
              f"committed before it {before_kill}")


def stored_group(dsn: str, group: str) -> tuple[int, dict[str, int]]:
    """The consumer group's epoch and its members' epochs as PostgreSQL holds them."""
    async def read() -> tuple[int, dict[str, int]]:
        connection = await asyncpg.connect(dsn)
        try:
            state = await connection.fetchval(
                "SELECT state FROM kafka_groups WHERE protocol = 'consumer'"
                " AND group_id = $1", group)
            rows = await connection.fetch(
                "SELECT member_id, state FROM kafka_group_members"
                " WHERE protocol = 'consumer' AND group_id = $1", group)
        finally:
            await connection.close()
        return (int(json.loads(state)["epoch"]),
                {row["member_id"]: int(json.loads(row["state"])["epoch"]) for row in rows})
    return asyncio.run(read())


def test_kip848_members_keep_their_epochs_when_their_coordinator_dies(
        tmp_path: Path, postgres_dsn: str) -> None:
    """The survivor claims the group and reads its members from PostgreSQL: the
    consumer goes on with its member epoch and partitions (no partitions lost, nothing
    revoked or assigned again), and reads what is produced after the kill."""
    topic, group = "kip848-keep", "kip848-keep-group"
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        create_topic(nodes, topic, 4)
        set_group_configs(nodes, group, consumer_heartbeat_interval_ms="300")
        history = History()
        produce(nodes, topic, history, range(100))
        events: list[tuple[str, list[int]]] = []

        def record(kind: str) -> Any:
            def called(_: Consumer, partitions: list[Any]) -> None:
                if partitions:  # an empty change is no rebalance
                    events.append((kind, sorted(tp.partition for tp in partitions)))
            return called

        consumer = Consumer({
            "bootstrap.servers": bootstrap(nodes), "group.id": group,
            "group.protocol": "consumer", "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "fetch.wait.max.ms": 100,
            "topic.metadata.refresh.interval.ms": 500,
            "reconnect.backoff.max.ms": 500, "retry.backoff.max.ms": 500})
        consumer.subscribe([topic], on_assign=record("assign"), on_revoke=record("revoke"),
                           on_lost=record("lost"))
        seen: set[str] = set()

        def consume(wanted: int, timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while len(seen) < wanted and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    seen.add(message.value().decode())

        try:
            consume(100, WAIT_S)
            assert len(seen) == 100
            before = stored_group(postgres_dsn, group)
            assert len(before[1]) == 1 and min(before[1].values()) > 0
            assert events == [("assign", [0, 1, 2, 3])]
            wait_for(lambda: owner(nodes[0], GROUP, group) in (1, 2), WAIT_S,
                     "the group's owner in node 1's view")
            coordinator = owner(nodes[0], GROUP, group) or 0
            nodes[coordinator - 1].kill()  # SIGKILL: its lease lapses after 3 s
            survivor = nodes[2 - coordinator]
            produce([survivor], topic, history, range(100, 200))
            consume(200, 40)
            wait_for(lambda: owner(survivor, GROUP, group) == 3 - coordinator, WAIT_S,
                     "the survivor to claim the group")
            for _ in range(5):  # a few heartbeats on the new coordinator
                consumer.poll(0.2)
            rebalances = list(events)  # before close, which revokes everything (and leaves)
            after = stored_group(postgres_dsn, group)
        finally:
            consumer.close()
        assert sorted(seen) == sorted(history.acknowledged), "records not read"
        assert rebalances == [("assign", [0, 1, 2, 3])], "the failover made the member rejoin"
        assert after[1] == before[1], "the member epoch changed (it joined again)"
        print(f"kip848 epochs across the failover: group {before[0]} -> {after[0]}, "
              f"members {before[1]} -> {after[1]}")


def share_names(nodes: list[int]) -> tuple[str, str, int]:
    """A topic (one partition) and a share group whose partition leader, group
    coordinator and shared-group owner are the same node, the one the test kills (the
    roles apart: tests/cluster/test_cluster_share_groups.py)."""
    for index in range(500):
        topic, group = f"share{index}", f"share-group{index}"
        chosen = {choose_owner(PARTITION, item_name(PARTITION, topic, 0), nodes),
                  choose_owner(GROUP, group, nodes),
                  choose_owner(SHARED, item_name(SHARED, group, topic), nodes)}
        if len(chosen) == 1:
            return topic, group, chosen.pop() or 0
    raise AssertionError("no co-located names")


def test_a_share_group_redelivers_what_a_dead_node_held(tmp_path: Path,
                                                         postgres_dsn: str) -> None:
    topic, group, serving = share_names([1, 2])
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        create_topic(nodes, topic, 1)
        set_group_configs(nodes, group, share_auto_offset_reset="earliest",
                          share_record_lock_duration_ms="3000")
        history = History()
        produce(nodes, topic, history, range(60))
        config: dict[str, Any] = {"bootstrap.servers": bootstrap(nodes), "group.id": group,
                                  "topic.metadata.refresh.interval.ms": 500,
                                  "reconnect.backoff.max.ms": 500,
                                  "retry.backoff.max.ms": 500}
        holder = ShareConsumer({**config, "share.acknowledgement.mode": "explicit"})
        holder.subscribe([topic])
        # accepts each poll's records and commits them at once (well inside their locks)
        later = ShareConsumer({**config, "share.acknowledgement.mode": "explicit"})
        received: list[tuple[str, int]] = []
        try:
            got: list[Any] = []
            deadline = time.monotonic() + WAIT_S
            while not got and time.monotonic() < deadline:
                got = [message for message in holder.poll(0.5) if message.error() is None]
            assert len(got) > 20, len(got)
            accepted = [message.value().decode() for message in got[:20]]
            held = {message.value().decode() for message in got[20:]}  # in flight at the kill
            for message in got[:20]:
                holder.acknowledge(message, AcknowledgeType.ACCEPT)
            holder.commit_sync(WAIT_S)
            assert owner(nodes[0], GROUP, group) == serving
            nodes[serving - 1].kill()
            survivor = nodes[2 - serving]
            produce([survivor], topic, history, range(60, 80))
            later.subscribe([topic])
            wanted = len(held) + 20 + (60 - len(got))
            deadline = time.monotonic() + 30
            while len(received) < wanted and time.monotonic() < deadline:
                polled = [message for message in later.poll(0.5) if message.error() is None]
                for message in polled:
                    later.acknowledge(message, AcknowledgeType.ACCEPT)
                    received.append((message.value().decode(), message.delivery_count()))
                if polled:
                    later.commit_sync(WAIT_S)
        finally:
            later.close()
            holder.close()
        assert owner(survivor, GROUP, group) == 3 - serving, "the group moved"
        values = [value for value, _ in received]
        twice = sorted({value for value in values if values.count(value) > 1})
        assert not twice, f"delivered twice after the kill: {twice} in {received}"
        assert not set(values) & set(accepted), "an accepted record came back"
        assert sorted([*accepted, *values]) == sorted(history.acknowledged)
        redelivered = [(value, count) for value, count in received if value in held]
        assert {value for value, _ in redelivered} == held
        # delivery counts: KIP-932 lets an acquire's count be lost in a crash (not asserted)
        print(f"share failover: {len(held)} held at the kill and redelivered (delivery "
              f"counts {sorted({count for _, count in redelivered})}), "
              f"{len(received)} received after it")
