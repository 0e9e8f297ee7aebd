"""Several ``conveyor serve`` processes on one embedded PostgreSQL, and a history checker.

The checker follows Jepsen's Kafka workload: every acknowledged record is read back
exactly once, at one offset per partition, and each partition's offsets are contiguous.
Given what PostgreSQL holds (``stored_log``), it also says where a missing record is: in
the database and not read back, or nowhere.
Its queue side (``check_queue``): every acknowledged publish delivered, no delivery
acquired after the value's ack was confirmed, nothing delivered that was never
published, and everything delivered but not acked delivered again until acked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from conveyor.storage.record_batch import decode_records, patch_base_offset, split_batches
from conveyor.testing.server import BrokerProcess

# short leases so the tests see a failover in a few seconds (defaults: 3 s / 10 s)
FAST_LEASES = {"CONVEYOR_BROKER__CLUSTER_HEARTBEAT_MS": "500",
               "CONVEYOR_BROKER__CLUSTER_LEASE_MS": "3000"}


def start_nodes(root: Path, dsn: str, count: int, environ: dict[str, str] | None = None,
                listeners: tuple[str, ...] = ("kafka", "http"),
                started: list[BrokerProcess] | None = None) -> list[BrokerProcess]:
    """Nodes 1..count on one database; each joins ``started`` (if given) as soon as it
    runs, so a caller can kill the ones that started when a later one fails."""
    nodes = [] if started is None else started
    for index in range(1, count + 1):
        node = BrokerProcess(root / f"node{index}", listeners=listeners,
                             extra_args=("--storage", dsn, "--node-id", str(index)),
                             environ={**FAST_LEASES, **(environ or {})})
        node.data_dir.mkdir(parents=True)
        node.start()
        nodes.append(node)
    return nodes


@contextmanager
def cluster(root: Path, dsn: str, count: int,
            listeners: tuple[str, ...] = ("kafka", "http")) -> Iterator[list[BrokerProcess]]:
    nodes: list[BrokerProcess] = []
    try:
        yield start_nodes(root, dsn, count, listeners=listeners, started=nodes)
    finally:
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.kill()


def http_json(node: BrokerProcess, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.ports['http']}{path}", data=data,
        headers={"content-type": "application/json"}, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
        return json.loads(raw) if raw else None


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    """Poll a condition that lives in another process (no event to await across it)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def bootstrap(nodes: Iterable[BrokerProcess]) -> str:
    return ",".join(f"127.0.0.1:{node.ports['kafka']}" for node in nodes)


@dataclass
class History:
    acknowledged: dict[str, tuple[int, int]] = field(default_factory=dict)  # value -> (p, o)
    failed: set[str] = field(default_factory=set)  # not acknowledged (may or may not exist)
    errors: dict[str, int] = field(default_factory=dict)  # error name -> count
    ack_times: dict[int, list[float]] = field(default_factory=dict)  # partition -> times

    def on_delivery(self, error: Any, message: Any) -> None:
        value = message.value().decode()
        if error is None:
            self.acknowledged[value] = (message.partition(), message.offset())
            self.ack_times.setdefault(message.partition(), []).append(time.monotonic())
        else:
            self.failed.add(value)
            self.errors[error.name()] = self.errors.get(error.name(), 0) + 1


def tally(history: History, read: list[tuple[int, int, str]]) -> dict[str, Any]:
    """What the checker found, counted, without asserting (an asynchronous standby's
    failover is measured, not required to lose nothing)."""
    by_value: dict[str, list[tuple[int, int]]] = {}
    by_partition: dict[int, list[int]] = {}
    for partition, offset, value in read:
        by_value.setdefault(value, []).append((partition, offset))
        by_partition.setdefault(partition, []).append(offset)
    lost = [value for value in history.acknowledged if value not in by_value]
    duplicated = [value for value, places in by_value.items() if len(set(places)) > 1]
    moved = [value for value, place in history.acknowledged.items()
             if value in by_value and by_value[value][0] != place]
    gaps = 0
    first_offsets = []
    for offsets in by_partition.values():
        ordered = sorted(set(offsets))
        gaps += sum(1 for a, b in itertools.pairwise(ordered) if b != a + 1)
        first_offsets.append(ordered[0])
    return {"acknowledged": len(history.acknowledged), "read": len(read),
            "failed": len(history.failed), "errors": history.errors, "lost": len(lost),
            "duplicated": len(duplicated), "moved": len(moved), "gaps": gaps,
            "lost_values": lost, "duplicated_values": duplicated, "moved_values": moved,
            "first_offsets": first_offsets}


def check(history: History, read: list[tuple[int, int, str]],
          stored: list[tuple[int, int, str]] | None = None) -> dict[str, Any]:
    """``read``: (partition, offset, value) of every record consumed from the start;
    ``stored`` (stored_log), when given: what PostgreSQL holds, so that a record missing
    from ``read`` is reported as in the database (a read-side failure) or not (lost)."""
    found = tally(history, read)
    assert all(first == 0 for first in found.pop("first_offsets")), \
        "a partition's first offset is 0"
    lost, duplicated, moved = (found.pop("lost_values"), found.pop("duplicated_values"),
                               found.pop("moved_values"))
    if stored is not None:
        _check_against_stored(history, read, stored, lost)
        found["stored"] = len(stored)
    assert not lost, f"acknowledged but never read: {lost[:10]} ({len(lost)})"
    assert not duplicated, f"read at two offsets: {duplicated[:10]}"
    assert not moved, f"read at another offset than acknowledged: {moved[:10]}"
    assert found["gaps"] == 0, "offsets are contiguous"
    return found


def _check_against_stored(history: History, read: list[tuple[int, int, str]],
                          stored: list[tuple[int, int, str]], lost: list[str]) -> None:
    """Where each missing record is: in the database but not read back, or nowhere."""
    at_place = {(partition, offset): value for partition, offset, value in stored}
    stored_values = set(at_place.values())
    in_database = [f"{value}@{history.acknowledged[value]}" for value in lost
                   if value in stored_values]
    nowhere = [value for value in lost if value not in stored_values]
    assert not nowhere, (
        f"acknowledged, not in the database: {nowhere[:10]} ({len(nowhere)}); "
        f"acknowledged, in the database, not read: {in_database[:10]} ({len(in_database)})")
    read_places = {(partition, offset) for partition, offset, _ in read}
    unread = [f"{value}@{place}" for place, value in at_place.items()
              if place not in read_places]
    assert not unread, (
        f"in the database, not read back: {unread[:10]} ({len(unread)}), "
        f"{len(in_database)} of them acknowledged")
    misread = [(partition, offset, value) for partition, offset, value in read
               if at_place.get((partition, offset)) != value]
    assert not misread, f"read other values than the database holds there: {misread[:10]}"


def stored_log(dsn: str, topic: str) -> list[tuple[int, int, str]]:
    """(partition, offset, value) of every record of ``topic`` as PostgreSQL holds it,
    read from the batch rows directly (no node, no consumer): what a verify read that
    misses records is compared with, to tell a record never written from one written
    and not read back."""
    async def read() -> list[tuple[int, int, str]]:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            rows = await connection.fetch(
                "SELECT p.partition, b.base_offset, b.payload FROM conveyor_log_batches b"
                " JOIN conveyor_log_partitions p USING (partition_id) WHERE p.topic = $1"
                " ORDER BY p.partition, b.base_offset", topic)
        finally:
            await connection.close()
        found = []
        for row in rows:
            payload = bytearray(row["payload"])
            for position, _ in split_batches(payload):
                patch_base_offset(payload, row["base_offset"], position)
                found.extend((row["partition"], record.offset,
                              (record.value or b"").decode())
                             for record in decode_records(payload, position))
        return found
    return asyncio.run(read())


def owner_rows(dsn: str, kind: str = "partition") -> dict[str, tuple[int | None, int]]:
    """name -> (owner node id, epoch) of the owner rows as PostgreSQL holds them (a node's
    ``/cluster`` shows its own view: the others' claims only after its next heartbeat)."""
    async def read() -> dict[str, tuple[int | None, int]]:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            rows = await connection.fetch(
                "SELECT name, owner, epoch FROM conveyor_owners WHERE kind = $1", kind)
        finally:
            await connection.close()
        return {row["name"]: (row["owner"], int(row["epoch"])) for row in rows}
    return asyncio.run(read())


def tally_queue(published: Iterable[str], unknown: Iterable[str],
                deliveries: list[tuple[str, float]], acked: dict[str, float]) -> dict[str, Any]:
    """The queue side, counted. ``published``: values whose publish was acknowledged
    (an AMQP confirm, an HTTP 2xx); ``unknown``: published without an answer (may or
    may not be in the queue); ``deliveries``: (value, when its acquire was sent), in
    order; ``acked``: value -> when its first confirmed ack was answered."""
    published, unknown = set(published), set(unknown)
    delivered = {value for value, _ in deliveries}
    after_ack = [value for value, sent in deliveries if value in acked and sent > acked[value]]
    return {
        "acknowledged": len(published), "unknown": len(unknown),
        "unknown_delivered": len(unknown & delivered), "deliveries": len(deliveries),
        "redelivered": len(deliveries) - len(delivered),
        "lost": len(published - delivered),
        "redelivered_after_confirmed_ack": len(after_ack),
        "never_published": len(delivered - published - unknown),
        "never_acked": len(delivered - acked.keys()),
        "lost_values": sorted(published - delivered)[:10],
        "after_ack_values": after_ack[:10],
        "never_published_values": sorted(delivered - published - unknown)[:10],
        "never_acked_values": sorted(delivered - acked.keys())[:10],
    }


def check_queue(published: Iterable[str], unknown: Iterable[str],
                deliveries: list[tuple[str, float]], acked: dict[str, float]) -> dict[str, Any]:
    """``tally_queue``, asserted: nothing acknowledged lost, no delivery after a
    confirmed ack, nothing delivered that was never published, every delivery that was
    not acked (held, an ack refused or unanswered) delivered again until acked."""
    found = tally_queue(published, unknown, deliveries, acked)
    examples = {key: found.pop(key) for key in list(found) if key.endswith("_values")}
    assert found["lost"] == 0, f"acknowledged but never delivered: {examples['lost_values']}"
    assert found["redelivered_after_confirmed_ack"] == 0, \
        f"delivered after a confirmed ack: {examples['after_ack_values']}"
    assert found["never_published"] == 0, \
        f"delivered, never published: {examples['never_published_values']}"
    assert found["never_acked"] == 0, \
        f"delivered, never acked nor delivered again: {examples['never_acked_values']}"
    return found
