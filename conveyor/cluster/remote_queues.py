"""Queue consumers on any node: acquires and settles forwarded to the queue's owner.

Owns both sides of the forwarding (docs/cluster.md, "Queues"):
- ``RemoteQueues`` (``SharedRemote`` for this node's SharedGroups): for a group another
  node owns, it sends the acquire, the settles of its receipts and a consumer's
  release to that owner over the internal channel (internal_api.py), re-resolving the
  owner and retrying with backoff when the owner moves or cannot be reached.
- Queue deletes (AMQP queue.delete, HTTP DELETE, SQS DeleteQueue) through a node that
  does not own the queue are forwarded the same way: the owner deletes it (its window
  first), then the asking node drops its own copy.
- ``OwnerSide``: runs what other nodes forward, on this node's own window, only while
  this node owns the group (else ``NotOwnerError``: the caller asks again). Consumers
  of other nodes are named ``node<N>/<their id>``; when node N is seen dead (its lease
  lapsed) or restarted (a new incarnation), what they hold is released at once (not
  after the lock, which is 30 minutes for AMQP).

Failure rules: an acquire that cannot reach an owner returns nothing when it was a
long poll (the consumer polls again) and is UnavailableError when it was not (HTTP
503, SQS's retriable error). A settle that cannot reach an owner within
``settle_retry_ms`` (a lease and two heartbeats, at least ``SETTLE_RETRY_MS``: long
enough for a dead owner's successor to be seen) is UnavailableError for those
receipts. An owner that changed answers with what its reloaded window knows: locks
do not survive a move, the delivery was made available again, so the ack comes back
UnknownDeliveryError (or LockExpiredError) and the message is delivered again: at
least once, never lost.
Must not know: wire formats of the public protocols.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.shared_remote import ACK, EXTEND, REJECT, RELEASE, Outcome, group_of
from conveyor.broker.types import Delivery
from conveyor.cluster.internal_api import (
    InternalClient,
    NotOwnerError,
    error_from_wire,
    error_to_wire,
)
from conveyor.cluster.ownership import SHARED, item_name
from conveyor.cluster.peer_clients import PeerClients
from conveyor.config import TlsConfig
from conveyor.errors import (
    InvalidRequestError,
    OperatingError,
    UnavailableError,
    UnknownGroupError,
    UnknownQueueError,
    UnknownTopicError,
)
from conveyor.tasks import Supervisor

if TYPE_CHECKING:
    from conveyor.broker.shared_groups import SharedGroups
    from conveyor.cluster.membership import Membership

logger = logging.getLogger("conveyor.cluster.queues")

RETRY_MS: Final = 5_000  # an acquire without a wait keeps looking for the owner this long
COUNTS_RETRY_MS: Final = 1_000  # a queue's counts: then this node's own copy answers
SETTLE_RETRY_MS: Final = 15_000  # the least a settle keeps looking for an owner
BACKOFF_FIRST_S: Final = 0.05
BACKOFF_MAX_S: Final = 1.0
CALL_MARGIN_S: Final = 10.0  # beyond a long poll's own wait
CONSUMERS_TRACKED_MAX: Final = 100_000  # per map below; the oldest are forgotten
# partitions one forwarded acquire may name (a share session's bound, share_coordinator.py)
PARTITIONS_MAX: Final = 10_000

# (group, topic) -> does this node hold its window (claiming it when it is the choice)?
Serve = Callable[[str, str], Awaitable[bool]]


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def delivery_to_wire(delivery: Delivery) -> list[Any]:
    return [delivery.receipt, delivery.topic, delivery.partition, delivery.offset,
            delivery.timestamp_ms, _b64(delivery.key), _b64(delivery.value),
            [[name, _b64(value)] for name, value in delivery.headers],
            delivery.delivery_count, delivery.lock_deadline_ms]


def delivery_from_wire(wire: list[Any]) -> Delivery:
    (receipt, topic, partition, offset, timestamp_ms, key, value, headers, count,
     deadline_ms) = wire
    return Delivery(str(receipt), str(topic), int(partition), int(offset), int(timestamp_ms),
                    _unb64(key), _unb64(value),
                    tuple((str(name), _unb64(data)) for name, data in headers),
                    int(count), int(deadline_ms))


class _Backoff:
    def __init__(self, budget_ms: int) -> None:
        self.deadline = time.monotonic() + budget_ms / 1000
        self.delay = BACKOFF_FIRST_S

    async def wait(self) -> bool:
        """Sleep before the next try; False once the budget is spent."""
        if time.monotonic() + self.delay > self.deadline:
            return False
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, BACKOFF_MAX_S)
        return True


class RemoteQueues:
    """This node's consumers of queues other nodes own (``SharedRemote``)."""

    def __init__(self, membership: Membership, shared: SharedGroups, secret: bytes,
                 serve: Serve, tls: TlsConfig | None = None) -> None:
        self.membership = membership
        self.tls = tls  # TLS to other nodes' internal ports (None: plain)
        self.shared = shared
        self.serve = serve
        self.secret = secret
        self._peers = PeerClients(membership, secret, tls, self._orphan)
        # consumer id -> the groups it acquired from through other nodes
        self._held: OrderedDict[str, set[tuple[str, str]]] = OrderedDict()
        self._tasks = Supervisor("conveyor.cluster.remote-queues")
        settings = membership.settings
        self.settle_retry_ms = max(SETTLE_RETRY_MS,
                                   settings.lease_ms + 2 * settings.heartbeat_ms + 1_000)
        self.forwarded = 0  # requests sent to owners (tests, metrics)

    async def close(self) -> None:
        await self._tasks.close(cancel=True)
        await self._peers.close()

    # --- SharedRemote ------------------------------------------------------------------
    async def serves(self, group: str, topic: str) -> bool:
        return await self.serve(group, topic)

    def exports(self, group: str, topic: str) -> bool:
        owner, _ = self.membership.owner_of(SHARED, item_name(SHARED, group, topic))
        return owner == self.membership.node_id

    async def acquire(self, topic: str, group: str, records_max: int, lock_ms: int | None,
                      wait_ms: int, consumer_id: str | None,
                      partitions: Sequence[int] | None = None) -> list[Delivery]:
        started = time.monotonic()
        backoff = _Backoff(max(wait_ms, RETRY_MS))
        while True:
            remaining_ms = max(0, wait_ms - int((time.monotonic() - started) * 1000))
            client = await self._owner_client(group, topic)
            if client is None and await self.serves(group, topic):  # it moved here
                return await self.shared.acquire(topic, group, records_max, lock_ms,
                                                 remaining_ms, consumer_id, local=True,
                                                 partitions=partitions)
            if client is not None:
                if consumer_id is not None:
                    self._remember(consumer_id, group, topic)
                args = {"topic": topic, "group": group, "records_max": records_max,
                        "lock_ms": lock_ms, "wait_ms": remaining_ms, "consumer": consumer_id,
                        "partitions": None if partitions is None else list(partitions)}
                try:
                    self.forwarded += 1
                    found = await client.call("acquire", args, remaining_ms / 1000
                                              + CALL_MARGIN_S)
                    return [delivery_from_wire(item) for item in found]
                except (NotOwnerError, ConnectionError) as error:
                    logger.debug("acquire of %s/%s: %s", topic, group, error)
            if not await backoff.wait():
                if wait_ms > 0:
                    return []  # a long poll that found nothing: the consumer polls again
                raise UnavailableError("the queue's owner node cannot be reached",
                                       topic=topic, group=group)

    async def settle(self, op: str, receipts: Sequence[str], arg: int,
                     wait_durable: bool) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(receipts)
        todo = list(range(len(receipts)))
        backoff = _Backoff(self.settle_retry_ms)
        while True:
            retry: list[int] = []
            by_owner: dict[int, list[int]] = {}
            clients: dict[int, InternalClient] = {}
            for index in todo:
                key = group_of(receipts[index])
                assert key is not None  # split_settle kept malformed ones local
                found_owner = await self._owner(*key)
                if found_owner is None:
                    if await self.serves(*key):  # it moved here: settle on this window
                        results[index] = await self._settle_here(op, receipts[index], arg,
                                                                 wait_durable)
                    else:
                        retry.append(index)
                    continue
                owner, clients[owner] = found_owner
                by_owner.setdefault(owner, []).append(index)
            for owner, indexes in by_owner.items():
                client = clients[owner]
                args = {"op": op, "receipts": [receipts[index] for index in indexes],
                        "arg": arg, "wait_durable": wait_durable}
                try:
                    self.forwarded += 1
                    answers = await client.call("settle", args, self.settle_retry_ms / 1000)
                except (NotOwnerError, ConnectionError) as error:
                    logger.debug("settle at node %d: %s", owner, error)
                    retry.extend(indexes)
                    continue
                for index, (error_wire, deadline) in zip(indexes, answers, strict=True):
                    found = None if error_wire is None else error_from_wire(error_wire)
                    if isinstance(found, NotOwnerError):
                        retry.append(index)  # the group moved meanwhile: ask its new owner
                    else:
                        results[index] = (found, deadline)
            if not retry:
                break
            todo = retry
            if not await backoff.wait():
                for index in todo:
                    results[index] = (UnavailableError(
                        "the queue's owner node cannot be reached; an unsettled delivery "
                        "is delivered again after its lock", receipt=receipts[index][:80]),
                        None)
                break
        return [result if result is not None else (None, None) for result in results]

    async def _settle_here(self, op: str, receipt: str, arg: int,
                           wait_durable: bool) -> Outcome:
        found: list[Exception | None] = []
        deadlines = await settle_local(self.shared, op, [receipt], arg, wait_durable, found)
        error = found[0] if found else None
        assert error is None or isinstance(error, OperatingError)
        return error, (deadlines[0] if deadlines and error is None else None)

    async def release_consumer(self, consumer_id: str) -> int:
        groups = self._held.pop(consumer_id, None)
        if not groups:
            return 0
        released = 0
        owners: set[int] = set()
        for group, topic in groups:
            found_owner = await self._owner(group, topic)
            if found_owner is None or found_owner[0] in owners:
                continue
            owner, client = found_owner
            owners.add(owner)
            backoff = _Backoff(RETRY_MS)
            while True:
                try:
                    released += int(await client.call(
                        "release_consumer", {"consumer": consumer_id}, RETRY_MS / 1000))
                    break
                except (OperatingError, ConnectionError) as error:
                    if not await backoff.wait():
                        logger.warning("could not release consumer %s at node %d (its "
                                       "deliveries come back after their lock): %s",
                                       consumer_id, owner, error)
                        break
        return released

    async def counts(self, queue: str) -> tuple[int, int, int] | None:
        backoff = _Backoff(COUNTS_RETRY_MS)
        while True:
            client = await self._owner_client(queue, queue)
            if client is None and await self.serves(queue, queue):
                info = await self.shared.get_queue(queue, local=True)
                return info.ready, info.in_flight, info.delayed
            if client is not None:
                try:
                    found = await client.call("counts", {"queue": queue}, COUNTS_RETRY_MS / 1000)
                    return int(found[0]), int(found[1]), int(found[2])
                except (NotOwnerError, ConnectionError):
                    pass
                except OperatingError:
                    return None  # the owner does not know the queue: this node's copy
            if not await backoff.wait():
                return None

    async def purge(self, queue: str) -> int:
        backoff = _Backoff(RETRY_MS)
        while True:
            client = await self._owner_client(queue, queue)
            if client is None and await self.serves(queue, queue):
                return await self.shared.purge_queue(queue, local=True)
            if client is not None:
                try:
                    return int(await client.call("purge", {"queue": queue}, RETRY_MS / 1000))
                except (NotOwnerError, ConnectionError):
                    pass
            if not await backoff.wait():
                raise UnavailableError("the queue's owner node cannot be reached", queue=queue)

    async def delete(self, queue: str, if_unused: bool, if_empty: bool) -> int | None:
        backoff = _Backoff(RETRY_MS)
        args = {"queue": queue, "if_unused": if_unused, "if_empty": if_empty}
        while True:
            client = await self._owner_client(queue, queue)
            if client is None and await self.serves(queue, queue):
                return None  # it moved here: this node deletes it
            if client is not None:
                try:
                    return int(await client.call("delete", args, RETRY_MS / 1000))
                except (NotOwnerError, ConnectionError):
                    pass
                except (UnknownQueueError, UnknownTopicError):
                    return None  # the owner cannot find it: this node's copy is stale
            if not await backoff.wait():
                raise UnavailableError("the queue's owner node cannot be reached", queue=queue)

    # --- internals -------------------------------------------------------------------
    def _remember(self, consumer_id: str, group: str, topic: str) -> None:
        groups = self._held.get(consumer_id)
        if groups is None:
            groups = self._held[consumer_id] = set()
            while len(self._held) > CONSUMERS_TRACKED_MAX:
                self._held.popitem(last=False)
        groups.add((group, topic))

    async def _owner_client(self, group: str, topic: str) -> InternalClient | None:
        """The client of the group's owner by this node's view (``_owner``)."""
        found = await self._owner(group, topic)
        return None if found is None else found[1]

    async def _owner(self, group: str, topic: str) -> tuple[int, InternalClient] | None:
        """The group's owner by this node's view and its client; None when that is this
        node or no live node advertises an internal address."""
        owner, _ = self.membership.owner_of(SHARED, item_name(SHARED, group, topic))
        if owner is None or owner == self.membership.node_id:
            return None
        client = await self._peers.get(owner)
        return None if client is None else (owner, client)

    def _orphan(self, op: str, args: dict[str, Any], result: Any) -> None:
        """An acquire answered after its consumer went away: give the records back."""
        if op != "acquire" or not result:
            return
        receipts = [str(item[0]) for item in result]
        self._tasks.start(self.settle(RELEASE, receipts, 0, True), name="release orphans")


def _text(args: dict[str, Any], key: str) -> str:
    """A string argument of a forwarded request (a peer's bug is InvalidRequestError)."""
    value = args.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"internal request: {key} must be a string", key=key)
    return value


def _number(args: dict[str, Any], key: str) -> int:
    """An integer argument within 0..2^63-1 (the broker clamps it to its own bounds)."""
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidRequestError(f"internal request: {key} must be an integer >= 0", key=key)
    return value


def _flag(args: dict[str, Any], key: str) -> bool:
    """A boolean argument of a forwarded request."""
    value = args.get(key)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"internal request: {key} must be a boolean", key=key)
    return value


async def settle_local(shared: SharedGroups, op: str, receipts: list[str], arg: int,
                       wait_durable: bool, found: list[Exception | None]) -> list[int]:
    """Apply one forwarded settle on this node's windows; one entry per receipt in
    ``found``; the new deadlines of those extended."""
    if op == ACK:
        await shared.ack(receipts, wait_durable, found, local=True)
    elif op == RELEASE:
        await shared.release(receipts, arg, found, local=True)
    elif op == EXTEND:
        return await shared.extend(receipts, arg, found, local=True)
    elif op == REJECT:
        await shared.reject(receipts, outcomes=found, local=True)
    else:
        raise InvalidRequestError("unknown settle", op=op)
    return []


class OwnerSide:
    """What other nodes forward to this node: acquires and settles on its own windows."""

    def __init__(self, membership: Membership, shared: SharedGroups, serve: Serve,
                 refresh_catalog: Callable[[], Awaitable[None]],
                 delete_queue: Callable[[str, bool, bool], Awaitable[int]]) -> None:
        self.membership = membership
        self.shared = shared
        self.serve = serve
        # the broker's whole delete of a queue here (its topic and bindings too)
        self.delete_queue = delete_queue
        # re-read the topic catalog: a queue another node declared a moment ago
        self.refresh_catalog = refresh_catalog
        # peer node -> (its incarnation, the consumer ids it acquired for, oldest first)
        self._holders: dict[int, tuple[int, OrderedDict[str, None]]] = {}
        self._tasks = Supervisor("conveyor.cluster.owner-side")
        self.served = 0  # forwarded requests answered (tests, metrics)

    async def close(self) -> None:
        await self._tasks.close(cancel=True)

    async def handle(self, op: str, args: dict[str, Any], node: int, incarnation: int) -> Any:
        self.served += 1
        await self._seen(node, incarnation)
        if op == "acquire":
            return await self._acquire(args, node, incarnation)
        if op == "settle":
            return await self._settle(args)
        if op in ("counts", "purge", "delete"):
            queue = _text(args, "queue")
            if not await self._owns(queue, queue):
                raise NotOwnerError("not the owner of this queue", queue=queue)
            await self._load(queue, queue)
            if op == "purge":
                return await self.shared.purge_queue(queue, local=True)
            if op == "delete":
                return await self.delete_queue(queue, _flag(args, "if_unused"),
                                               _flag(args, "if_empty"))
            info = await self.shared.get_queue(queue, local=True)
            return [info.ready, info.in_flight, info.delayed]
        if op == "release_consumer":
            consumer = f"node{node}/{_text(args, 'consumer')}"
            held = self._holders.get(node)
            if held is not None:
                held[1].pop(consumer, None)
            return await self.shared.release_consumer(consumer)
        raise InvalidRequestError("unknown internal request", op=op)

    async def _acquire(self, args: dict[str, Any], node: int, incarnation: int) -> Any:
        group, topic = _text(args, "group"), _text(args, "topic")
        consumer = _text(args, "consumer") if args.get("consumer") is not None else None
        records_max, wait_ms = _number(args, "records_max"), _number(args, "wait_ms")
        lock_ms = _number(args, "lock_ms") if args.get("lock_ms") is not None else None
        if not await self._owns(group, topic):
            raise NotOwnerError("not the owner of this queue", group=group, topic=topic)
        await self._load(group, topic)
        remote_id = None if consumer is None else f"node{node}/{consumer}"
        if remote_id is not None:
            _, held = self._holders.setdefault(node, (incarnation, OrderedDict()))
            held[remote_id] = None
            held.move_to_end(remote_id)
            while len(held) > CONSUMERS_TRACKED_MAX:
                held.popitem(last=False)
        wanted = args.get("partitions")
        if wanted is not None and (
                not isinstance(wanted, list) or len(wanted) > PARTITIONS_MAX
                or not all(type(index) is int and index >= 0 for index in wanted)):
            raise InvalidRequestError("partitions: a list of partition numbers",
                                      limit=PARTITIONS_MAX)
        deliveries = await self.shared.acquire(topic, group, records_max, lock_ms, wait_ms,
                                               remote_id, local=True, partitions=wanted)
        return [delivery_to_wire(delivery) for delivery in deliveries]

    async def _settle(self, args: dict[str, Any]) -> list[list[Any]]:
        receipts = args.get("receipts")
        if not isinstance(receipts, list) or not all(isinstance(r, str) for r in receipts):
            raise InvalidRequestError("internal settle: receipts must be a list of strings")
        op, arg = _text(args, "op"), _number(args, "arg")
        if op not in (ACK, RELEASE, EXTEND, REJECT):
            raise InvalidRequestError("unknown settle", op=op)
        answers: list[list[Any] | None] = [None] * len(receipts)
        mine: list[int] = []
        owned: dict[tuple[str, str], bool] = {}
        refused: dict[tuple[str, str], OperatingError] = {}
        for index, receipt in enumerate(receipts):
            key = group_of(receipt)
            if key is not None and key not in owned:
                try:
                    owned[key] = await self._owns(*key)
                except (UnknownQueueError, UnknownGroupError) as unknown:
                    refused[key] = unknown
                    owned[key] = False
            if key is not None and key in refused:
                answers[index] = [error_to_wire(refused[key]), None]
            elif key is not None and not owned[key]:
                answers[index] = [error_to_wire(NotOwnerError("not the owner")), None]
            else:
                mine.append(index)
        if mine:
            found: list[Exception | None] = []
            deadlines = iter(await settle_local(
                self.shared, op, [receipts[index] for index in mine], arg,
                bool(args.get("wait_durable", True)), found))
            for index, error in zip(mine, found, strict=True):
                if error is None:
                    answers[index] = [None, next(deadlines, None) if op == EXTEND else None]
                else:
                    assert isinstance(error, OperatingError)
                    answers[index] = [error_to_wire(error), None]
        return [answer if answer is not None else [None, None] for answer in answers]

    async def _owns(self, group: str, topic: str) -> bool:
        """Is this node the owner? A name that is no topic, even after a fresh read of
        the catalog, is refused before an owner row is claimed for it (a peer's junk
        names would otherwise leave rows and entries behind)."""
        if self.shared.host.topics.find(topic) is None:
            await self.refresh_catalog()
            if self.shared.host.topics.find(topic) is None:
                if group == topic:
                    raise UnknownQueueError("unknown queue", queue=topic)
                raise UnknownGroupError("unknown topic for shared group", topic=topic,
                                        group=group)
        return await self.serve(group, topic)

    async def _load(self, group: str, topic: str) -> None:
        """A queue declared on another node after this one read its catalogs."""
        if self.shared.group_state(group, topic) is not None:
            return
        if self.shared.host.topics.find(topic) is None:
            await self.refresh_catalog()
        await self.shared.load_declared(group, topic)

    async def _seen(self, node: int, incarnation: int) -> None:
        """A newer incarnation of a node: what the older one's consumers held goes back."""
        held = self._holders.get(node)
        if held is not None and held[0] < incarnation:
            del self._holders[node]
            await self._release(node, held[1])

    async def sweep(self) -> None:
        """Release what consumers of nodes seen dead hold (called every heartbeat)."""
        dead = {row["node_id"] for row in self.membership.status()["nodes"]
                if not row["live"]}
        for node in [node for node in self._holders if node in dead]:
            _, held = self._holders.pop(node)
            await self._release(node, held)

    async def _release(self, node: int, held: OrderedDict[str, None]) -> None:
        released = 0
        for consumer in held:
            released += await self.shared.release_consumer(consumer)
        if released:
            logger.warning("released %d deliveries held by consumers of node %d (gone)",
                           released, node)

    def orphan(self, op: str, args: dict[str, Any], result: Any) -> None:
        """An acquire's answer could not be sent (the node went away): give them back."""
        if op != "acquire" or not result:
            return
        receipts = [str(item[0]) for item in result]
        self._tasks.start(self.shared.release(receipts, local=True), name="release unsent")
