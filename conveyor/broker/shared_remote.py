"""SharedRemote: queue deliveries whose authoritative window lives on another node.

Several nodes on one PostgreSQL (conveyor/cluster, docs/cluster.md): one node owns a
queue's (shared group's) in-memory window; a consumer connected to any other node is
served through it. ``SharedGroups`` asks ``serves(group, topic)`` before it acts: when
this node does not own the group, the acquire, the settles of its receipts and the
release of a consumer go to the ``SharedRemote`` (conveyor/cluster/remote_queues.py),
which forwards them to the owner. Protocols see the same ``Broker`` surface either way.

Owns: the contract, and splitting one settle call between the local window and the
remote owners with every receipt's outcome kept in order.
Must not know: sockets, PostgreSQL, protocols.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from conveyor.errors import OperatingError

from .types import Delivery

ACK: Final = "ack"
RELEASE: Final = "release"
EXTEND: Final = "extend"
REJECT: Final = "reject"

# one receipt's result: its error (None: applied) and, for extend, its new deadline
Outcome = tuple[OperatingError | None, int | None]


class SharedRemote(Protocol):
    async def serves(self, group: str, topic: str) -> bool:
        """Does this node hold the group's window (claiming it when it is the choice)?"""
        ...

    def exports(self, group: str, topic: str) -> bool:
        """Is this node the group's owner in its current view of the cluster (without a
        claim)? Only the owner exports the queue's per-queue metrics."""
        ...

    async def acquire(self, topic: str, group: str, records_max: int, lock_ms: int | None,
                      wait_ms: int, consumer_id: str | None,
                      partitions: Sequence[int] | None = None) -> list[Delivery]:
        """``partitions``: only records of these (None: any partition)."""
        ...

    async def settle(self, op: str, receipts: Sequence[str], arg: int,
                     wait_durable: bool) -> list[Outcome]:
        """Apply ``op`` (ack, release with ``arg`` = delay ms, extend with ``arg`` =
        lock ms, reject) at the receipts' owners; one outcome per receipt, in order."""
        ...

    async def release_consumer(self, consumer_id: str) -> int:
        """Release what ``consumer_id`` holds at other nodes."""
        ...

    async def counts(self, queue: str) -> tuple[int, int, int] | None:
        """(ready, in flight, delayed) by the queue's owner; None when it cannot be
        asked quickly (the caller counts its own, possibly stale, copy)."""
        ...

    async def purge(self, queue: str) -> int:
        """Purge the queue at its owner (UnavailableError when it cannot be reached)."""
        ...

    async def delete(self, queue: str, if_unused: bool, if_empty: bool) -> int | None:
        """Delete the queue at its owner (its window, its rows, its topic; the owner
        checks ``if_unused`` / ``if_empty``): the ready records dropped, or None when
        this node should delete it itself (it owns the queue now, or the owner does not
        know it). UnavailableError when the owner cannot be reached."""
        ...


def group_of(receipt: str) -> tuple[str, str] | None:
    """(group, topic) of a receipt ``topic:partition:offset:token:group``; None if malformed."""
    parts = receipt.split(":", 4)
    if len(parts) != 5:
        return None
    return parts[4], parts[0]


LocalSettle = Callable[[list[str], list[Exception | None]], Awaitable[list[int]]]


async def split_settle(remote: SharedRemote, op: str, receipts: Sequence[str], arg: int,
                       wait_durable: bool, local: LocalSettle) -> list[Outcome] | None:
    """None when every receipt is this node's (the caller settles them as usual);
    otherwise each receipt's outcome, the local ones settled through ``local`` (which
    fills one outcome per receipt and returns the new deadlines of those extended)."""
    served: dict[tuple[str, str], bool] = {}
    mine: list[int] = []
    theirs: list[int] = []
    for index, receipt in enumerate(receipts):
        key = group_of(receipt)
        if key is None:
            mine.append(index)  # malformed: the local path answers UnknownDeliveryError
            continue
        if key not in served:
            served[key] = await remote.serves(*key)
        (mine if served[key] else theirs).append(index)
    if not theirs:
        return None
    results: list[Outcome] = [(None, None)] * len(receipts)
    if mine:
        errors: list[Exception | None] = []
        deadlines = iter(await local([receipts[index] for index in mine], errors))
        for index, error in zip(mine, errors, strict=True):
            if error is None:
                results[index] = (None, next(deadlines, None) if op == EXTEND else None)
            else:
                assert isinstance(error, OperatingError)
                results[index] = (error, None)
    remote_results = await remote.settle(op, [receipts[index] for index in theirs], arg,
                                         wait_durable)
    for index, outcome in zip(theirs, remote_results, strict=True):
        results[index] = outcome
    return results


def unpack(results: list[Outcome], outcomes: list[Exception | None] | None) -> list[int]:
    """Fill ``outcomes`` (or raise the first error) and return the new deadlines."""
    deadlines = [deadline for error, deadline in results if error is None and deadline is not None]
    if outcomes is not None:
        outcomes.extend(error for error, _ in results)
        return deadlines
    for error, _ in results:
        if error is not None:
            raise error
    return deadlines


__all__ = [
    "ACK",
    "EXTEND",
    "REJECT",
    "RELEASE",
    "Outcome",
    "SharedRemote",
    "group_of",
    "split_settle",
    "unpack",
]
