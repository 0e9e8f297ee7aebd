"""Lag for ``conveyor cluster status`` (``GET /cluster?lag=true``): per consumer group
the committed offsets against the partitions' heads, per queue its backlog.

Owns: reading both from where they are current on every node. A consumer group's
committed offsets and a partition's head are read from PostgreSQL in one query (the
group's coordinator writes its commits through before answering, and every append
moves the head row in its transaction), so any node answers the same, owner or not.
A queue's counts live in its owner's window only: they are asked of the owner through
the queue forwarding (``Broker.list_queues``; an owner that cannot be asked within 1 s
leaves this node's own copy, possibly stale, as ``GET /queues/<name>`` does).
Must not know: wire formats, the CLI's tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from conveyor.cluster.ownership import GROUP, SHARED, item_name

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

# lag is measured to the log end offset (what a read_uncommitted consumer can reach);
# a committed offset past the head (a truncated log) counts as no lag
GROUP_LAG_SQL: Final = (
    "SELECT o.group_id, o.topic, o.partition, o.committed_offset, p.next_offset, "
    "p.log_start_offset FROM group_offsets o JOIN conveyor_log_partitions p "
    "ON p.topic = o.topic AND p.partition = o.partition "
    "ORDER BY o.group_id, o.topic, o.partition")


def group_lag(rows: list[Any], owners: dict[tuple[str, str], int | None]
              ) -> list[dict[str, Any]]:
    """``rows``: (group, topic, partition, committed, end, log start) as GROUP_LAG_SQL
    reads them; one entry per group with its owner, total lag and partitions."""
    groups: dict[str, dict[str, Any]] = {}
    for group_id, topic, partition, committed, end, start in rows:
        entry = groups.setdefault(group_id, {
            "group": group_id, "owner": owners.get((GROUP, item_name(GROUP, group_id))),
            "lag": 0, "partitions": []})
        lag = max(0, int(end) - max(int(committed), int(start)))
        entry["lag"] += lag
        entry["partitions"].append({"topic": topic, "partition": int(partition),
                                    "committed": int(committed), "end": int(end),
                                    "lag": lag})
    return list(groups.values())


async def queue_backlog(broker: Broker, owners: dict[tuple[str, str], int | None]
                        ) -> list[dict[str, Any]]:
    """Every queue's ready, unacked (in flight) and delayed counts, from its owner."""
    queues = []
    for info in await broker.list_queues():
        owner = owners.get((SHARED, item_name(SHARED, info.name, info.name)))
        queues.append({"queue": info.name, "owner": owner, "ready": info.ready,
                       "unacked": info.in_flight, "delayed": info.delayed,
                       "backlog": info.ready + info.in_flight})
    return queues
