"""The HTTP API's ordered-group operations on a cluster node: served by the group's owner
(docs/cluster.md, "Ordered groups over HTTP").

Owns both sides of commit, read the commits, describe and delete of an ordered group
(``GroupOperations``, broker/group_operations.py) on a cluster node:
- On the group's rendezvous choice the group is claimed on demand (``serve``: the
  claim reloads the group, as a Kafka request's does) and the call runs on this node's
  coordinator, whose writes (commit, delete) carry the owner fence into their own
  transaction.
- On any other node the call is forwarded to the owner over the internal channel
  (internal_api.py). The owner answers ``NotOwnerError`` when it is not (or no longer)
  the owner; the asking node then resolves the owner again and retries with backoff
  for ``RETRY_MS``, then answers UnavailableError (HTTP 503). A local write refused by
  the fence (``NotCoordinatorError``: the group moved meanwhile) is retried the same
  way: it wrote nothing. A commit is idempotent (the same offsets upserted again); a
  delete whose answer was lost and whose retry finds no group counts as done.

Arguments from a peer are checked (types, ranges, counts) before anything runs:
``InvalidRequestError`` otherwise; a topic this node does not know is looked up again
in the catalog once (it may have been created on another node a moment ago).
Must not know: wire formats of the public protocols, SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.group_operations import GroupOperations, GroupSummary
from conveyor.broker.types import PartitionLag
from conveyor.cluster.internal_api import InternalClient, NotOwnerError
from conveyor.cluster.ownership import GROUP
from conveyor.cluster.peer_clients import PeerClients
from conveyor.cluster.remote_queues import RETRY_MS, _Backoff
from conveyor.config import TlsConfig
from conveyor.errors import (
    InvalidRequestError,
    NotCoordinatorError,
    UnavailableError,
    UnknownGroupError,
    UnknownTopicError,
)

if TYPE_CHECKING:
    from conveyor.broker.topics import TopicRegistry
    from conveyor.cluster.membership import Membership

logger = logging.getLogger("conveyor.cluster.groups")

COMMIT: Final = "group_commit"
COMMITTED: Final = "group_committed"
DESCRIBE: Final = "group_describe"
DELETE: Final = "group_delete"
OPS: Final = frozenset({COMMIT, COMMITTED, DESCRIBE, DELETE})
CALL_TIMEOUT_S: Final = 10.0  # a guarded write at the owner, with its claim
NAME_CHARS_MAX: Final = 32_767  # Kafka's string bound (group ids, topic names)
# partitions one call may name: the HTTP API's commit names one topic's, at most
# 2^20 (routes.py); a describe answers every partition the group committed to
PARTITIONS_MAX: Final = 1 << 20
OFFSET_MAX: Final = 2**63 - 1

Serve = Callable[[str], Awaitable[bool]]  # group id -> does this node serve it (claims)?


class RemoteGroups:
    """``GroupOperations`` of a cluster node, and its answers to other nodes' calls."""

    def __init__(self, membership: Membership, local: GroupOperations, serve: Serve,
                 topics: TopicRegistry, refresh_catalog: Callable[[], Awaitable[None]],
                 secret: bytes, tls: TlsConfig | None = None) -> None:
        self.membership = membership
        self.local = local  # this node's coordinator
        self.serve = serve  # ClusterNode.serve_group
        self.topics = topics
        self.refresh_catalog = refresh_catalog
        self.peers = PeerClients(membership, secret, tls)
        self.forwarded = 0  # calls sent to other nodes (tests)
        self.served = 0  # calls of other nodes answered here (tests)

    async def close(self) -> None:
        await self.peers.close()

    # --- GroupOperations -----------------------------------------------------------------
    async def commit(self, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
        wire = [[topic, partition, offset] for (topic, partition), offset in offsets.items()]
        await self._route(group, COMMIT, {"group": group, "offsets": wire},
                          lambda: self.local.commit(group, offsets))

    async def committed(self, group: str, partitions: Sequence[tuple[str, int]]
                        ) -> dict[tuple[str, int], int]:
        async def here() -> Any:
            return _offsets_to_wire(await self.local.committed(group, partitions))
        found = await self._route(group, COMMITTED, {
            "group": group, "partitions": [list(key) for key in partitions]}, here)
        return _offsets_from_wire(found)

    async def describe(self, group: str) -> GroupSummary:
        async def here() -> Any:
            return _summary_to_wire(await self.local.describe(group))
        return _summary_from_wire(await self._route(group, DESCRIBE, {"group": group}, here))

    async def delete(self, group: str) -> None:
        await self._route(group, DELETE, {"group": group}, lambda: self.local.delete(group))

    async def _route(self, group: str, op: str, args: dict[str, Any],
                     here: Callable[[], Awaitable[Any]]) -> Any:
        """``here()`` while this node serves the group, else the owner's answer."""
        backoff = _Backoff(RETRY_MS)
        maybe_applied = False  # a delete whose answer was lost may have been done
        while True:
            try:
                if await self.serve(group):
                    return await here()
                client = await self._client(group)
                if client is not None:
                    self.forwarded += 1
                    return await client.call(op, args, CALL_TIMEOUT_S)
            except UnknownGroupError:
                if op == DELETE and maybe_applied:
                    return None
                raise
            except (NotOwnerError, NotCoordinatorError) as error:
                logger.debug("%s of group %s: %s", op, group, error)
            except ConnectionError as error:
                logger.debug("%s of group %s: %s", op, group, error)
                maybe_applied = True
            if not await backoff.wait():
                raise UnavailableError("the group's coordinator node cannot be reached",
                                       group=group)

    async def _client(self, group: str) -> InternalClient | None:
        """The client of the group's owner by this node's view; None when no live node
        (other than this one) advertises an internal address for it."""
        owner, _ = self.membership.owner_of(GROUP, group)
        if owner is None or owner == self.membership.node_id:
            return None
        return await self.peers.get(owner)

    # --- another node asks ---------------------------------------------------------------
    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        """Run another node's call here, only while this node is the group's owner."""
        if op not in OPS:
            raise InvalidRequestError("unknown internal request", op=op)
        group = _name(args, "group")
        if op == COMMIT:
            offsets = {(topic, partition): offset
                       for topic, partition, offset in _entries(args, "offsets", 3)}
            await self._known_topics({topic for topic, _ in offsets})
            await self._owned(group)
            await self.local.commit(group, offsets)
            return None
        if op == COMMITTED:
            partitions = [(topic, partition)
                          for topic, partition in _entries(args, "partitions", 2)]
            await self._owned(group)
            return _offsets_to_wire(await self.local.committed(group, partitions))
        await self._owned(group)
        if op == DESCRIBE:
            return _summary_to_wire(await self.local.describe(group))
        await self.local.delete(group)
        return None

    async def _owned(self, group: str) -> None:
        if not await self.serve(group):
            raise NotOwnerError("not the group's coordinator", group=group)
        self.served += 1

    async def _known_topics(self, names: set[str]) -> None:
        """Topics created on another node a moment ago are read from the catalog first;
        a name that is still no topic is refused before the group is claimed."""
        if all(self.topics.find(name) is not None for name in names):
            return
        await self.refresh_catalog()
        for name in names:
            if self.topics.find(name) is None:
                raise UnknownTopicError("unknown topic", topic=name)


def _name(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= NAME_CHARS_MAX:
        raise InvalidRequestError(f"internal request: {key} must be a non-empty string",
                                  key=key)
    return value


def _entries(args: dict[str, Any], key: str, width: int) -> list[tuple[Any, ...]]:
    """A list of [topic, partition] or [topic, partition, offset]: a non-empty topic name
    and integers in range, at most ``PARTITIONS_MAX`` of them."""
    value = args.get(key)
    if not isinstance(value, list) or len(value) > PARTITIONS_MAX:
        raise InvalidRequestError(f"internal request: {key} must be a list",
                                  key=key, limit=PARTITIONS_MAX)
    found = []
    for entry in value:
        if (not isinstance(entry, list) or len(entry) != width
                or not isinstance(entry[0], str) or not 0 < len(entry[0]) <= NAME_CHARS_MAX
                or not all(type(number) is int and 0 <= number <= OFFSET_MAX
                           for number in entry[1:])):
            raise InvalidRequestError(
                f"internal request: {key} entries must be [topic, partition"
                + (", offset]" if width == 3 else "]"), key=key)
        found.append(tuple(entry))
    return found


def _offsets_to_wire(offsets: Mapping[tuple[str, int], int]) -> list[list[Any]]:
    return [[topic, partition, offset] for (topic, partition), offset in offsets.items()]


def _offsets_from_wire(wire: Any) -> dict[tuple[str, int], int]:
    """The owner's answer (a node of the cluster: trusted to be well formed, yet a
    malformed one is an error, never a traceback)."""
    try:
        return {(str(topic), int(partition)): int(offset)
                for topic, partition, offset in wire}
    except (TypeError, ValueError) as error:
        raise UnavailableError("malformed answer from another node") from error


def _summary_to_wire(summary: GroupSummary) -> dict[str, Any]:
    return {"group": summary.group, "state": summary.state, "members": summary.members,
            "partitions": [[lag.topic, lag.partition, lag.committed_offset,
                            lag.high_watermark, lag.lag] for lag in summary.partitions]}


def _summary_from_wire(wire: Any) -> GroupSummary:
    try:
        return GroupSummary(str(wire["group"]), str(wire["state"]), int(wire["members"]),
                            tuple(PartitionLag(str(topic), int(partition), int(committed),
                                               int(high_watermark), int(lag))
                                  for topic, partition, committed, high_watermark, lag
                                  in wire["partitions"]))
    except (TypeError, ValueError, KeyError) as error:
        raise UnavailableError("malformed answer from another node") from error
