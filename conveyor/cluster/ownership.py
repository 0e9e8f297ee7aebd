"""Who owns what: rendezvous (highest random weight) hashing over the live nodes.

Owns: the pure choice of an owner for a partition, a group, a shared group or a
transactional id among live node ids.
Every node computes the same answer from the same membership, and when a node joins
or leaves only the items it wins or held move (no global reshuffle).
Must not know: PostgreSQL, protocols, clocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

PARTITION: Final = "partition"
GROUP: Final = "group"
SHARED: Final = "shared"  # a queue's (or a topic's shared group's) deliveries
TXN: Final = "txn"  # a transactional id (its transaction coordinator)


def item_name(kind: str, *parts: object) -> str:
    """The key an item is hashed and stored under: ``topic/partition``, the group id or
    transactional id, or for shared deliveries the queue name (``topic`` or
    ``topic/group``)."""
    if kind == PARTITION:
        return f"{parts[0]}/{parts[1]}"
    if kind == SHARED:
        group, topic = parts
        return str(topic) if group == topic else f"{topic}/{group}"
    return str(parts[0])


def weight(kind: str, name: str, node_id: int) -> int:
    digest = hashlib.blake2b(f"{kind}\0{name}\0{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose_owner(kind: str, name: str, live_nodes: Iterable[int]) -> int | None:
    """The live node with the highest weight for this item; None without live nodes."""
    best: tuple[int, int] | None = None
    for node_id in live_nodes:
        candidate = (weight(kind, name, node_id), -node_id)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else -best[1]
