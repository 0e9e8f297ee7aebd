"""The AMQP listener's shared state and its consumers.

Owns: ``AmqpServer``, the registries every connection of the listener shares
(exclusive owners and consumers per queue, direct reply-to channels, flow-control
totals), and the consumers: a ``Consumer`` of a queue takes records from the broker
as its prefetch credit (``credit.py``) allows and hands them to its channel; a
``StreamConsumer`` reads a topic from an offset (RabbitMQ stream semantics). A
consumer sees its channel only through ``ConsumerChannel``; the connection and the
channel modules sit above this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from conveyor.config import LISTENER_LIMITS_DEFAULT, ListenerLimits
from conveyor.errors import (
    NotFoundError,
    OffsetOutOfRangeError,
    OperatingError,
    UnknownQueueError,
    UnknownTopicError,
)
from conveyor.limits import ServerLimits
from conveyor.server.listeners import ListenerCounters
from conveyor.tasks import Supervisor

from . import credit as credit_rules
from .frames import DeliverEncoder
from .settings import AmqpSettings

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.broker.types import Delivery
    from conveyor.security.api import SecurityModel

log = logging.getLogger("conveyor.amqp")

ACQUIRE_WAIT_MS = 30_000


class ConsumerChannel(Protocol):
    """What a consumer (and a direct reply-to publisher) needs of a channel."""

    server: AmqpServer
    holder_id: str
    flow_active: bool
    prefetch_global: int
    closed: bool
    consumers: dict[str, Consumer]

    def unacked_count(self) -> int: ...

    def writing_paused(self) -> bool: ...

    async def deliver(self, consumer: Consumer, deliveries: list[Delivery]) -> None: ...

    def deliver_stream(self, consumer: Consumer, records: Sequence[Any]) -> None: ...

    def deliver_direct(self, consumer: Consumer, exchange: str, routing_key: str,
                       properties: bytes, body: bytes) -> None: ...

    def cancel_from_server(self, consumer: Consumer) -> None: ...


class Closable(Protocol):
    async def close(self) -> None: ...


# --- listener-wide state ---------------------------------------------------------------
@dataclass
class QueueUse:
    """What the listener knows of one queue beyond the broker: owner and consumers."""

    exclusive_owner: object | None = None  # the connection that declared it exclusive
    auto_delete: bool = False
    single_active: bool = False
    had_consumer: bool = False
    consumers: list[Consumer] = field(default_factory=list)


class AmqpServer:
    def __init__(self, broker: Broker, settings: AmqpSettings,
                 limits: ListenerLimits | None = None, shared: ServerLimits | None = None,
                 counters: ListenerCounters | None = None,
                 security: SecurityModel | None = None) -> None:
        self.counters = counters or ListenerCounters("amqp")
        # users, vhosts, permissions (None: the listener's configured users, no checks)
        self.security = security
        self.broker = broker
        self.settings = settings
        self.limits = limits or LISTENER_LIMITS_DEFAULT["amqp"]
        self.shared = shared or ServerLimits()
        self.gate = self.shared.gate("amqp", self.limits)
        self.connections: set[Closable] = set()
        # every connection's tasks: channel workers, consumers, channel and connection closes
        self.tasks = Supervisor("amqp-listener")
        self.queues: dict[str, QueueUse] = {}  # topic -> use
        self.reply_channels: dict[str, ConsumerChannel] = {}  # direct reply-to name -> channel
        # vhosts (other than "/") whose built-in exchanges exist in the broker
        self.vhosts_ready: set[str] = set()
        self.next_connection_id = 0
        self.inbox_bytes = 0  # unprocessed publishes over all connections
        self.reading_pauses = 0  # times a connection stopped reading (flow control)
        self.next_holder_id = 0

    def use(self, topic: str) -> QueueUse:
        use = self.queues.get(topic)
        if use is None:
            use = self.queues[topic] = QueueUse()
        return use

    def active_consumer(self, topic: str) -> Consumer | None:
        use = self.queues.get(topic)
        if use is None or not use.consumers:
            return None
        return use.consumers[0]

    async def queue_gone(self, topic: str) -> None:
        """Cancel consumers of a deleted queue (consumer_cancel_notify)."""
        use = self.queues.pop(topic, None)
        if use is None:
            return
        for consumer in list(use.consumers):
            consumer.channel.cancel_from_server(consumer)

    async def consumer_removed(self, consumer: Consumer) -> None:
        use = self.queues.get(consumer.topic)
        if use is None:
            return
        with contextlib.suppress(ValueError):
            use.consumers.remove(consumer)
        if use.single_active and use.consumers:
            use.consumers[0].wake()
        if use.auto_delete and use.had_consumer and not use.consumers:
            with contextlib.suppress(OperatingError):
                await self.broker.delete_queue(consumer.topic)
            await self.queue_gone(consumer.topic)


# --- consumers -------------------------------------------------------------------------
class Consumer:
    def __init__(self, channel: ConsumerChannel, tag: str, topic: str, queue: str,
                 no_ack: bool, prefetch: int, exclusive: bool) -> None:
        self.channel = channel
        self.tag = tag
        self.topic = topic
        self.queue = queue
        self.no_ack = no_ack
        self.prefetch = prefetch  # 0: unlimited
        self.exclusive = exclusive
        self.unacked = 0
        self.encoder: DeliverEncoder | None = None  # made by the channel's first delivery
        self.task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    def window(self) -> credit_rules.Window:
        channel = self.channel
        return credit_rules.Window(self.prefetch, self.unacked, self.no_ack,
                                   channel.prefetch_global, channel.unacked_count())

    def blocked(self) -> bool:
        channel = self.channel
        server = channel.server
        use = server.queues.get(self.topic)
        return (not channel.flow_active or channel.writing_paused()
                or (use is not None and use.single_active
                    and server.active_consumer(self.topic) is not self))

    async def wait_for_credit(self) -> int:
        """How many records to take next, once flow, the socket and prefetch allow."""
        while True:
            window = self.window()
            credit = 0 if self.blocked() else credit_rules.credit(window)
            if credit >= credit_rules.threshold(window):
                return credit
            self._wakeup.clear()
            await self._wakeup.wait()

    async def run(self) -> None:
        channel = self.channel
        server = channel.server
        broker = server.broker
        while True:
            credit = await self.wait_for_credit()
            try:
                deliveries = await broker.acquire(
                    self.topic, self.topic, records_max=credit,
                    lock_ms=server.settings.consumer_timeout_ms, wait_ms=ACQUIRE_WAIT_MS,
                    consumer_id=channel.holder_id)
            except OperatingError as error:
                if not isinstance(error, UnknownQueueError | NotFoundError):
                    log.warning("amqp consumer %s stopped: %s", self.tag, error)
                channel.cancel_from_server(self)
                return
            if deliveries:
                await channel.deliver(self, deliveries)
class StreamConsumer(Consumer):
    """A consumer of a topic (RabbitMQ stream semantics): reads from an offset per
    partition; acks only return credit, nothing is removed from the log."""

    def __init__(self, channel: ConsumerChannel, tag: str, topic: str, queue: str, no_ack: bool,
                 prefetch: int, offsets: dict[int, int]) -> None:
        super().__init__(channel, tag, topic, queue, no_ack, prefetch, False)
        self.offsets = offsets

    async def run(self) -> None:
        channel = self.channel
        broker = channel.server.broker
        while True:
            credit = await self.wait_for_credit()
            try:
                partitions = broker.get_topic(self.topic).partitions
                delivered = False
                for partition in range(partitions):
                    offset = self.offsets.setdefault(
                        partition, broker.offsets(self.topic, partition).log_start_offset)
                    try:
                        records = await broker.read_records(self.topic, partition, offset,
                                                            credit)
                    except OffsetOutOfRangeError:
                        self.offsets[partition] = broker.offsets(
                            self.topic, partition).log_start_offset
                        continue
                    if records:
                        self.offsets[partition] = records[-1].offset + 1
                        channel.deliver_stream(self, records)
                        delivered = True
                        break
                if not delivered:
                    await broker.wait_for_append(
                        [(self.topic, partition) for partition in range(partitions)],
                        ACQUIRE_WAIT_MS)
            except OperatingError as error:
                if not isinstance(error, UnknownTopicError | NotFoundError):
                    log.warning("amqp stream consumer %s stopped: %s", self.tag, error)
                channel.cancel_from_server(self)
                return



__all__ = ["AmqpServer", "Consumer", "ConsumerChannel", "QueueUse", "StreamConsumer"]
