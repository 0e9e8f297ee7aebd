"""KIP-932 share groups whose roles sit on different nodes (three ``conveyor serve``
processes on one PostgreSQL; docs/cluster.md, "Share groups").

Goal: a share group works when its partitions' leaders, its coordinator and the owner
of the shared group under it are different nodes, and a dead node loses nothing.
Method: names are picked so that rendezvous hashing puts the group's coordinator (C)
and the shared group's owner (O) on two nodes and the third (L) leads some partitions
while C and O lead others. confluent-kafka ShareConsumers (explicit acknowledgement)
read every produced record; one member (the holder) keeps what it got from L's
partitions unacknowledged, and a victim node is SIGKILLed: L in the short form (its
acquisitions, made at O for its clients, are released when its lease lapses); in the
``chaos`` forms O (its successor reloads the group without locks) and C (the holder's
session at L lives on: what it holds comes back at lock expiry). Checked: every
record the producer got acknowledged is accepted, none is delivered again once
accepted, a record is delivered twice only if it was held at the kill, and those come
back with a higher delivery count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import AcknowledgeType, ShareConsumer

from conveyor.cluster.ownership import GROUP, PARTITION, SHARED, choose_owner, item_name
from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import History, bootstrap, cluster, wait_for
from tests.cluster.test_cluster_groups import create_topic, owner, produce, set_group_configs

NODES = [1, 2, 3]
PARTITIONS = 4
WAIT_S = 30  # a loaded 2-core machine; a healthy run takes a few seconds
LOCK_S = 20  # share.record.lock.duration.ms: far beyond the 3 s lease (FAST_LEASES)


@dataclass(frozen=True)
class Roles:
    topic: str
    group: str
    coordinator: int
    owner: int
    leader_only: int  # leads partitions, neither coordinator nor owner
    leaders: tuple[int, ...]  # by partition


def spread_names() -> Roles:
    """Names whose coordinator, shared-group owner and partition leaders differ, and
    every node leads at least one partition."""
    for index in range(2000):
        topic, group = f"spread{index}", f"spread-group{index}"
        coordinator = choose_owner(GROUP, group, NODES)
        shared_owner = choose_owner(SHARED, item_name(SHARED, group, topic), NODES)
        leaders = tuple(choose_owner(PARTITION, item_name(PARTITION, topic, partition), NODES)
                        or 0 for partition in range(PARTITIONS))
        if coordinator is None or shared_owner is None or coordinator == shared_owner:
            continue
        if set(leaders) == set(NODES):
            third = (set(NODES) - {coordinator, shared_owner}).pop()
            return Roles(topic, group, coordinator, shared_owner, third, leaders)
    raise AssertionError("no names spread over three nodes")


@dataclass
class Reads:
    received: list[tuple[str, int, int]] = field(default_factory=list)  # value, partition, count
    accepted: list[str] = field(default_factory=list)
    accepted_at: dict[str, float] = field(default_factory=dict)  # value -> monotonic s

    def values(self) -> list[str]:
        return [value for value, _, _ in self.received]


def consumer_config(nodes: list[BrokerProcess], group: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap(nodes), "group.id": group,
            "share.acknowledgement.mode": "explicit",
            "topic.metadata.refresh.interval.ms": 500, "reconnect.backoff.max.ms": 500,
            "retry.backoff.max.ms": 500}


def hold_from(holder: ShareConsumer, reads: Reads, held_partitions: set[int],
              wanted: int) -> set[str]:
    """Poll until the holder got records of ``held_partitions``; accept every other
    record and commit; return the values kept unacknowledged."""
    held: set[str] = set()
    deadline = time.monotonic() + WAIT_S
    while len(held) < wanted and time.monotonic() < deadline:
        polled = [message for message in holder.poll(0.5) if message.error() is None]
        for message in polled:
            value = message.value().decode()
            reads.received.append((value, message.partition(), message.delivery_count()))
            if message.partition() in held_partitions:
                held.add(value)  # in flight at the kill: never acknowledged
                continue
            holder.acknowledge(message, AcknowledgeType.ACCEPT)
            reads.accepted.append(value)
        if polled:
            holder.commit_sync(WAIT_S)
    return held


def consume_all(worker: ShareConsumer, reads: Reads, wanted: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not wanted <= set(reads.accepted) and time.monotonic() < deadline:
        polled = [message for message in worker.poll(0.5) if message.error() is None]
        for message in polled:
            value = message.value().decode()
            reads.received.append((value, message.partition(), message.delivery_count()))
            worker.acknowledge(message, AcknowledgeType.ACCEPT)
            reads.accepted.append(value)
            reads.accepted_at.setdefault(value, time.monotonic())
        if polled:
            worker.commit_sync(WAIT_S)


def run(tmp_path: Path, postgres_dsn: str, victim_role: str, records: int,
        back_s_max: float = LOCK_S) -> None:
    """``back_s_max``: by when the held records must be accepted after the kill."""
    roles = spread_names()
    with cluster(tmp_path, postgres_dsn, len(NODES)) as nodes:
        create_topic(nodes, roles.topic, PARTITIONS)
        set_group_configs(nodes, roles.group, share_auto_offset_reset="earliest",
                          share_record_lock_duration_ms=str(LOCK_S * 1000),
                          share_heartbeat_interval_ms="500")
        history = History()
        produce(nodes, roles.topic, history, range(records))
        config = consumer_config(nodes, roles.group)
        holder, worker = ShareConsumer(config), ShareConsumer(config)
        reads = Reads()
        led_by_third = {partition for partition, leader in enumerate(roles.leaders)
                        if leader == roles.leader_only}
        try:
            holder.subscribe([roles.topic])
            held = hold_from(holder, reads, led_by_third, 1)
            assert held, "the holder got nothing from the third node's partitions"
            # the owner rows as the nodes see them (refreshed every heartbeat)
            shared_item = item_name(SHARED, roles.group, roles.topic)
            wait_for(lambda: (owner(nodes[0], GROUP, roles.group),
                              owner(nodes[0], SHARED, shared_item))
                     == (roles.coordinator, roles.owner), 10, "the roles' owner rows")
            victim = {"leader": roles.leader_only, "owner": roles.owner,
                      "coordinator": roles.coordinator}[victim_role]
            nodes[victim - 1].kill()
            killed_at = time.monotonic()
            survivors = [node for index, node in enumerate(nodes) if index + 1 != victim]
            produce(survivors, roles.topic, history, range(records, records + records // 2))
            worker.subscribe([roles.topic])
            consume_all(worker, reads, set(history.acknowledged), LOCK_S + 30)
        finally:
            worker.close()
            holder.close()
    values = reads.values()
    lost = sorted(set(history.acknowledged) - set(reads.accepted))
    assert not lost, f"acknowledged by the broker, never accepted: {lost[:10]} ({len(lost)})"
    twice_accepted = sorted({value for value in reads.accepted if reads.accepted.count(value) > 1})
    assert not twice_accepted, f"accepted twice: {twice_accepted[:10]}"
    again = {value for value in values if values.count(value) > 1}
    assert again <= held, f"delivered twice but not held at the kill: {sorted(again - held)[:10]}"
    assert held <= set(reads.accepted), "a held record was not delivered again"
    counts = {value: count for value, _, count in reads.received if value in held}
    assert all(count >= 2 for count in counts.values()), \
        f"a held record came back with its first delivery count: {counts}"
    # a dead leader's or owner's: released when the victim's lease lapsed (3 s), not when
    # their locks expired (20 s)
    back_s = max(reads.accepted_at[value] for value in held) - killed_at
    assert back_s < back_s_max, f"held records came back {back_s:.1f} s after the kill"
    print(f"share group across nodes (coordinator {roles.coordinator}, owner {roles.owner}, "
          f"leaders {roles.leaders}, killed {victim_role} {victim}): "
          f"{len(history.acknowledged)} produced, {len(values)} deliveries, {len(held)} held "
          f"at the kill and redelivered (counts {sorted(set(counts.values()))}) within "
          f"{back_s:.1f} s of the kill")


def test_a_share_group_spread_over_three_nodes_survives_a_dead_leader(
        tmp_path: Path, postgres_dsn: str) -> None:
    run(tmp_path, postgres_dsn, "leader", 200)


@pytest.mark.chaos
def test_a_share_group_spread_over_three_nodes_survives_a_dead_owner(
        tmp_path: Path, postgres_dsn: str) -> None:
    run(tmp_path, postgres_dsn, "owner", 3000)


@pytest.mark.chaos
def test_a_share_group_spread_over_three_nodes_survives_a_dead_coordinator(
        tmp_path: Path, postgres_dsn: str) -> None:
    """The members rejoin at the next coordinator; the holder's share session at the
    third node lives on, so what it held comes back when its locks expire."""
    run(tmp_path, postgres_dsn, "coordinator", 1000, back_s_max=LOCK_S + 15)
