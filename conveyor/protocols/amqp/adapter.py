"""The AMQP connection: asyncio glue between the state machine and the broker.

Owns: one ``AmqpConnection`` (an ``asyncio.Protocol``) per client socket — negotiation,
heartbeats, batched writes, flow control — and its ``Channel``s: the ordered inbox
each channel works through (consecutive publishes and acks are handled as one batch:
one broker call, one fsync), publisher confirms, transactions, consumers with
prefetch credit, basic.get, acks/nacks/rejects, recover, and channel errors.
The listener-wide registries (exclusive owners, consumers per queue, direct reply-to)
live in ``AmqpServer``.

Rules that hold here:
- A confirm (basic.ack to the publisher) is sent only after ``Broker.publish``
  returned, i.e. the message is on disk under the queue's fsync policy.
- Methods of one channel take effect in the order they arrived.
- A record delivered to a channel is locked to that channel; closing the channel
  (or the connection, or losing the socket) releases every record it holds.
- A connection only stops reading its own socket when it has too much unprocessed
  input (``inbox_bytes_max``): one fast producer never blocks the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pamqp import base as pamqp_base
from pamqp import commands
from pamqp import constants as pamqp_constants
from pamqp import decode as pamqp_decode

from conveyor.broker.types import Message, PublishResult, QueueConfig, QueueInfo
from conveyor.config import LISTENER_LIMITS_DEFAULT, ListenerLimits
from conveyor.errors import (
    InvalidRequestError,
    LockExpiredError,
    NotFoundError,
    OffsetOutOfRangeError,
    OperatingError,
    PreconditionFailedError,
    RecordTooLargeError,
    UnknownDeliveryError,
    UnknownExchangeError,
    UnknownQueueError,
    UnknownTopicError,
)
from conveyor.limits import RequestWatch, ServerLimits
from conveyor.protocols.amqp.names import topic_name_for
from conveyor.server.listeners import ListenerCounters

from . import frames as f
from .arguments import (
    ArgumentError,
    binding_arguments,
    generated_name,
    queue_options,
)
from .machine import (
    ChannelFault,
    ConnectionFault,
    ConnectionMachine,
    ConnectionState,
    HeaderAccepted,
    HeaderRejected,
    HeartbeatReceived,
    MethodReceived,
    PublishReceived,
)
from .messages import (
    Properties,
    PropertiesError,
    decode_properties,
    encode_properties,
    outgoing,
    publish_message,
)
from .settings import AmqpSettings

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.broker.types import Delivery

log = logging.getLogger("conveyor.amqp")

REPLY_TO_QUEUE = "amq.rabbitmq.reply-to"
ACQUIRE_BATCH_MAX = 500
ACQUIRE_WAIT_MS = 30_000
# Reply code -> its name in the spec: the label of errors_total{listener="amqp"}.
REPLY_NAMES = {code: name for name, code in (
    ("CONTENT_TOO_LARGE", f.CONTENT_TOO_LARGE), ("CONNECTION_FORCED", f.CONNECTION_FORCED),
    ("INVALID_PATH", f.INVALID_PATH), ("ACCESS_REFUSED", f.ACCESS_REFUSED),
    ("NOT_FOUND", f.NOT_FOUND), ("RESOURCE_LOCKED", f.RESOURCE_LOCKED),
    ("PRECONDITION_FAILED", f.PRECONDITION_FAILED), ("FRAME_ERROR", f.FRAME_ERROR),
    ("SYNTAX_ERROR", f.SYNTAX_ERROR), ("COMMAND_INVALID", f.COMMAND_INVALID),
    ("CHANNEL_ERROR", f.CHANNEL_ERROR), ("UNEXPECTED_FRAME", f.UNEXPECTED_FRAME),
    ("RESOURCE_ERROR", f.RESOURCE_ERROR), ("NOT_ALLOWED", f.NOT_ALLOWED),
    ("NOT_IMPLEMENTED", f.NOT_IMPLEMENTED), ("INTERNAL_ERROR", f.INTERNAL_ERROR))}
CAPABILITIES = {
    "publisher_confirms": True,
    "exchange_exchange_bindings": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "consumer_priorities": False,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
    "direct_reply_to": True,
}


class ChannelError(Exception):
    """Close the channel with ``reply_code`` (a soft error)."""

    def __init__(self, reply_code: int, text: str, class_id: int = 0, method_id: int = 0):
        super().__init__(text)
        self.reply_code, self.text = reply_code, text
        self.class_id, self.method_id = class_id, method_id


class ConnectionError_(Exception):
    """Close the connection with ``reply_code`` (a hard error)."""

    def __init__(self, reply_code: int, text: str, class_id: int = 0, method_id: int = 0):
        super().__init__(text)
        self.reply_code, self.text = reply_code, text
        self.class_id, self.method_id = class_id, method_id


def _ids(method: pamqp_base.Frame) -> tuple[int, int]:
    index = method.index
    return index >> 16, index & 0xFFFF


# --- listener-wide state ---------------------------------------------------------------
@dataclass
class QueueUse:
    """What the listener knows of one queue beyond the broker: owner and consumers."""

    exclusive_owner: AmqpConnection | None = None
    auto_delete: bool = False
    single_active: bool = False
    had_consumer: bool = False
    consumers: list[Consumer] = field(default_factory=list)


class AmqpServer:
    def __init__(self, broker: Broker, settings: AmqpSettings,
                 limits: ListenerLimits | None = None, shared: ServerLimits | None = None,
                 counters: ListenerCounters | None = None) -> None:
        self.counters = counters or ListenerCounters("amqp")
        self.broker = broker
        self.settings = settings
        self.limits = limits or LISTENER_LIMITS_DEFAULT["amqp"]
        self.shared = shared or ServerLimits()
        self.gate = self.shared.gate("amqp", self.limits)
        self.connections: set[AmqpConnection] = set()
        self.queues: dict[str, QueueUse] = {}  # topic -> use
        self.reply_channels: dict[str, Channel] = {}  # direct reply-to name -> channel
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
    def __init__(self, channel: Channel, tag: str, topic: str, queue: str, no_ack: bool,
                 prefetch: int, exclusive: bool) -> None:
        self.channel = channel
        self.tag = tag
        self.topic = topic
        self.queue = queue
        self.no_ack = no_ack
        self.prefetch = prefetch  # 0: unlimited
        self.exclusive = exclusive
        self.unacked = 0
        self.task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    def credit(self) -> int:
        limit = ACQUIRE_BATCH_MAX
        if self.prefetch and not self.no_ack:
            limit = min(limit, self.prefetch - self.unacked)
        channel = self.channel
        if channel.prefetch_global and not self.no_ack:
            limit = min(limit, channel.prefetch_global - channel.unacked_count())
        return limit

    def credit_threshold(self) -> int:
        """Acquire again only when a quarter of the window is free (at least 1): acks
        one by one then cost one acquire per ~window/4 messages, not one per message."""
        if self.no_ack:
            return 1
        window = self.prefetch or ACQUIRE_BATCH_MAX
        if self.channel.prefetch_global:
            window = min(window, self.channel.prefetch_global)
        if self.unacked == 0 and self.channel.unacked_count() == 0:
            return 1
        return max(1, min(window // 4, 100))

    def blocked(self) -> bool:
        channel = self.channel
        server = channel.connection.server
        use = server.queues.get(self.topic)
        return (not channel.flow_active or channel.connection.writing_paused
                or (use is not None and use.single_active
                    and server.active_consumer(self.topic) is not self))

    async def wait_for_credit(self) -> int:
        """How many records to take next, once flow, the socket and prefetch allow."""
        while True:
            credit = 0 if self.blocked() else self.credit()
            if credit >= self.credit_threshold():
                return credit
            self._wakeup.clear()
            await self._wakeup.wait()

    async def run(self) -> None:
        channel = self.channel
        server = channel.connection.server
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

    def __init__(self, channel: Channel, tag: str, topic: str, queue: str, no_ack: bool,
                 prefetch: int, offsets: dict[int, int]) -> None:
        super().__init__(channel, tag, topic, queue, no_ack, prefetch, False)
        self.offsets = offsets

    async def run(self) -> None:
        channel = self.channel
        broker = channel.connection.server.broker
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


@dataclass
class Unacked:
    receipt: str | None  # None: a direct reply-to delivery (nothing to settle)
    consumer: Consumer | None


# --- channels --------------------------------------------------------------------------
class Channel:
    def __init__(self, connection: AmqpConnection, number: int) -> None:
        self.connection = connection
        self.number = number
        server = connection.server
        server.next_holder_id += 1
        self.holder_id = f"amqp/{connection.connection_id}/{number}/{server.next_holder_id}"
        self.inbox: collections.deque[Any] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.consumers: dict[str, Consumer] = {}
        self.unacked: dict[int, Unacked] = {}
        self.delivery_tag = 0
        self.prefetch_consumer = 0  # basic.qos global=false: for consumers created later
        self.prefetch_global = 0  # basic.qos global=true: shared by the channel
        self.flow_active = True
        self.confirm = False
        self.publish_tag = 0
        self.transactional = False
        self.tx_publishes: list[PublishReceived] = []
        self.tx_settlements: list[MethodReceived] = []
        self.last_queue = ""  # "" in queue.bind/consume/get means the last declared
        self.reply_to_name: str | None = None
        self.closed = False

    def unacked_count(self) -> int:
        return len(self.unacked)

    # --- inbox -----------------------------------------------------------------------
    def push(self, event: Any) -> None:
        self.inbox.append(event)
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        inbox = self.inbox
        while inbox and not self.closed:
            event = inbox.popleft()
            try:
                if isinstance(event, PublishReceived):
                    batch = [event]
                    while inbox and isinstance(inbox[0], PublishReceived):
                        batch.append(inbox.popleft())
                    self.connection.inbox_drained(batch)
                    if self.transactional:
                        self.tx_publishes.extend(batch)
                    else:
                        await self.publish_batch(batch)
                elif isinstance(event.method, commands.Basic.Ack) and not self.transactional:
                    batch_acks = [event]
                    while (inbox and isinstance(inbox[0], MethodReceived)
                           and isinstance(inbox[0].method, commands.Basic.Ack)):
                        batch_acks.append(inbox.popleft())
                    await self.ack_batch([item.method for item in batch_acks])
                else:
                    await self.handle(event.method)
            except ChannelError as error:
                await self.fail(error)
                return
            except ConnectionError_ as error:
                self.connection.fail(error.reply_code, error.text, error.class_id,
                                     error.method_id)
                return
            except Exception:
                log.exception("amqp channel %s failed", self.holder_id)
                self.connection.fail(f.INTERNAL_ERROR, "internal error")
                return

    async def fail(self, error: ChannelError) -> None:
        """Send Channel.Close and release what the channel holds (a soft error)."""
        if self.closed:
            return
        self.connection.machine.close_channel(self.number)
        self.connection.send_method(self.number, commands.Channel.Close(
            error.reply_code, error.text[:255], error.class_id, error.method_id))
        await self.close()

    async def close(self) -> None:
        """Stop consumers and release every record this channel holds."""
        if self.closed:
            return
        self.closed = True
        dropped = [event for event in self.inbox if isinstance(event, PublishReceived)]
        self.inbox.clear()
        if dropped:
            self.connection.inbox_drained(dropped)  # keep the flow-control accounting
        server = self.connection.server
        for consumer in list(self.consumers.values()):
            await self._stop_consumer(consumer)
        self.consumers.clear()
        if self.reply_to_name is not None:
            server.reply_channels.pop(self.reply_to_name, None)
        self.unacked.clear()
        with contextlib.suppress(OperatingError):
            await server.broker.release_consumer(self.holder_id)

    async def _stop_consumer(self, consumer: Consumer) -> None:
        if consumer.task is not None:
            consumer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer.task
        await self.connection.server.consumer_removed(consumer)

    def cancel_from_server(self, consumer: Consumer) -> None:
        """The queue went away: tell the client (consumer cancel notification)."""
        if self.consumers.pop(consumer.tag, None) is None:
            return
        if consumer.task is not None and consumer.task is not asyncio.current_task():
            consumer.task.cancel()
        if not self.closed and self.connection.capability("consumer_cancel_notify"):
            self.connection.send_method(self.number, commands.Basic.Cancel(consumer.tag, True))

    def wake_consumers(self) -> None:
        for consumer in self.consumers.values():
            consumer.wake()

    # --- deliveries ------------------------------------------------------------------
    async def deliver(self, consumer: Consumer, deliveries: list[Delivery]) -> None:
        connection = self.connection
        if self.closed or consumer.tag not in self.consumers:
            await connection.server.broker.release([d.receipt for d in deliveries])
            return
        frame_max = connection.frame_bytes_max
        parts: list[bytes] = []
        for delivery in deliveries:
            self.delivery_tag += 1
            if not consumer.no_ack:
                self.unacked[self.delivery_tag] = Unacked(delivery.receipt, consumer)
                consumer.unacked += 1
            out = outgoing(delivery.headers, delivery.key, consumer.queue)
            parts += f.deliver_frames(
                self.number, consumer.tag, self.delivery_tag, delivery.delivery_count > 1,
                out.exchange, out.routing_key, out.properties, delivery.value or b"",
                frame_max)
        connection.write_parts(parts)
        if consumer.no_ack:
            await connection.server.broker.ack([d.receipt for d in deliveries],
                                               wait_durable=False)

    def deliver_stream(self, consumer: Consumer, records: list[Any]) -> None:
        """Stream deliveries carry their offset in the ``x-stream-offset`` header."""
        parts: list[bytes] = []
        for record in records:
            self.delivery_tag += 1
            if not consumer.no_ack:
                self.unacked[self.delivery_tag] = Unacked(None, consumer)
                consumer.unacked += 1
            out = outgoing(record.headers, record.key, consumer.queue)
            try:
                properties = decode_properties(out.properties)
            except PropertiesError:
                properties = Properties()
            table = dict(properties.headers or {})
            table["x-stream-offset"] = record.offset
            raw = encode_properties(replace(properties, headers=table))
            parts += f.deliver_frames(
                self.number, consumer.tag, self.delivery_tag, False, out.exchange,
                out.routing_key, raw, record.value or b"", self.connection.frame_bytes_max)
        self.connection.write_parts(parts)

    def deliver_direct(self, consumer: Consumer, exchange: str, routing_key: str,
                       properties: bytes, body: bytes) -> None:
        """Direct reply-to: straight to the requester's channel, never stored."""
        self.delivery_tag += 1
        self.connection.write_parts(f.deliver_frames(
            self.number, consumer.tag, self.delivery_tag, False, exchange, routing_key,
            properties, body, self.connection.frame_bytes_max))

    # --- publish ---------------------------------------------------------------------
    async def publish_batch(self, batch: list[PublishReceived]) -> None:
        """Route, store (durably), return unroutable mandatory messages, confirm."""
        connection = self.connection
        server = connection.server
        broker = server.broker
        now_ms = broker.clock.wall_ms()
        # (confirm tag or 0, message, destinations)
        plans: list[tuple[int, Message, tuple[str, ...]]] = []
        returns: list[bytes] = []
        failure: ChannelError | None = None
        for event in batch:
            method = event.method
            try:
                message, destinations, direct = self._plan(event, now_ms)
            except ChannelError as error:
                failure = error
                break
            tag = 0
            if self.confirm:
                self.publish_tag += 1
                tag = self.publish_tag
            if direct is not None:
                channel, consumer, properties = direct
                channel.deliver_direct(consumer, method.exchange, method.routing_key,
                                       properties, event.body)
            elif not destinations and method.mandatory:
                returns += f.return_frames(
                    self.number, f.NO_ROUTE, "NO_ROUTE", method.exchange, method.routing_key,
                    event.properties, event.body, connection.frame_bytes_max)
            plans.append((tag, message, destinations))
        if returns:
            connection.write_parts(returns)
        outcomes = await self._store(plans)
        if self.confirm and not self.closed:
            self._confirm(outcomes)
        if failure is not None:
            raise failure

    def _plan(self, event: PublishReceived, now_ms: int) -> tuple[
            Message, tuple[str, ...], tuple[Channel, Consumer, bytes] | None]:
        method = event.method
        connection = self.connection
        broker = connection.server.broker
        exchange = method.exchange
        if method.immediate:
            raise ConnectionError_(f.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true",
                                   60, 40)
        if exchange:
            try:
                info = broker.get_exchange(exchange)
            except (UnknownExchangeError, NotFoundError):
                raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no exchange '{exchange}' in "
                                   f"vhost '{connection.vhost}'", 60, 40) from None
            if info.internal:
                raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - cannot publish to "
                                   f"internal exchange '{exchange}'", 60, 40)
        try:
            properties = decode_properties(event.properties)
        except PropertiesError as error:
            raise ConnectionError_(f.SYNTAX_ERROR, str(error), 60, 40) from None
        if properties.user_id is not None and properties.user_id != connection.user:
            raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - user_id property "
                               f"set to '{properties.user_id}' but authenticated user was "
                               f"'{connection.user}'", 60, 40)
        raw = event.properties
        if properties.reply_to == REPLY_TO_QUEUE:
            if self.reply_to_name is None:
                raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - fast reply "
                                   "consumer does not exist", 60, 40)
            properties = replace(properties, reply_to=self.reply_to_name)
            raw = encode_properties(properties)
        try:
            message = publish_message(exchange, method.routing_key, raw, properties,
                                      event.body, now_ms)
        except ValueError:
            raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - invalid "
                               f"expiration '{properties.expiration}'", 60, 40) from None
        if exchange == "" and method.routing_key.startswith(REPLY_TO_QUEUE + "."):
            channel = connection.server.reply_channels.get(method.routing_key)
            if channel is None or channel.closed:
                return message, (), None
            consumer = next(iter(channel.consumers.values()), None)
            if consumer is None:
                return message, (), None
            return message, (), (channel, consumer, raw)  # delivered, never stored
        if exchange == "":
            topic = topic_name_for(method.routing_key)
            found = broker.route("", topic, message.headers)
            if not found and _is_stream(broker, topic):
                return message, (topic,), None
            return message, tuple(d.name for d in found), None
        return message, tuple(d.name for d in broker.route(
            exchange, method.routing_key, message.headers)), None

    async def _store(self, plans: list[tuple[int, Message, tuple[str, ...]]]
                     ) -> list[tuple[int, bool]]:
        """Publish consecutive messages with the same destinations together; (tag, ok)."""
        broker = self.connection.server.broker
        outcomes: list[tuple[int, bool]] = []
        index = 0
        while index < len(plans):
            destinations = plans[index][2]
            end = index + 1
            while end < len(plans) and plans[end][2] == destinations:
                end += 1
            group = plans[index:end]
            messages = [message for _, message, _ in group]
            ok = [True] * len(group)
            if destinations:
                try:
                    if len(destinations) == 1:  # no task per publish in the common case
                        per_destination = [await broker.publish(destinations[0], messages)]
                    else:
                        per_destination = await asyncio.gather(
                            *(broker.publish(name, messages) for name in destinations))
                except (RecordTooLargeError, InvalidRequestError, OperatingError) as error:
                    # the nack tells the publisher; storage faults are logged once per
                    # condition where they happen (a warning per message flooded the log)
                    log.debug("amqp publish failed: %s", error)
                    ok = [False] * len(group)
                else:
                    for results in per_destination:
                        _mark_dropped(ok, results)
            outcomes += [(tag, good) for (tag, _, _), good in zip(group, ok, strict=True)]
            index = end
        return outcomes

    def _confirm(self, outcomes: list[tuple[int, bool]]) -> None:
        parts: list[bytes] = []
        pending_ack = 0
        for tag, good in outcomes:
            if good:
                pending_ack = tag
                continue
            if pending_ack:
                parts.append(f.ack_frame(self.number, pending_ack, True))
                pending_ack = 0
            parts.append(f.nack_frame(self.number, tag, False))
        if pending_ack:
            parts.append(f.ack_frame(self.number, pending_ack, pending_ack > 1))
        if parts:
            self.connection.write_parts(parts)

    # --- settle ----------------------------------------------------------------------
    def _take(self, delivery_tag: int, multiple: bool, method: pamqp_base.Frame
              ) -> list[Unacked]:
        if multiple:
            tags = [tag for tag in self.unacked if tag <= delivery_tag or delivery_tag == 0]
        elif delivery_tag in self.unacked:
            tags = [delivery_tag]
        else:
            raise ChannelError(f.PRECONDITION_FAILED,
                               f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}",
                               *_ids(method))
        taken = [self.unacked.pop(tag) for tag in tags]
        for item in taken:
            if item.consumer is not None:
                item.consumer.unacked -= 1
                item.consumer.wake()
        if self.prefetch_global:
            self.wake_consumers()
        return taken

    async def ack_batch(self, methods: list[commands.Basic.Ack]) -> None:
        receipts: list[str] = []
        failure: ChannelError | None = None
        for method in methods:
            try:
                taken = self._take(method.delivery_tag, method.multiple, method)
            except ChannelError as error:
                failure = error
                break
            receipts += [item.receipt for item in taken if item.receipt is not None]
        await self._settle(receipts, "ack")
        if failure is not None:
            raise failure

    async def _settle(self, receipts: list[str], action: str) -> None:
        if not receipts:
            return
        broker = self.connection.server.broker
        try:
            if action == "ack":
                # basic.ack gets no answer: committed this loop turn, fsynced within
                # 200 ms (a power cut inside that window redelivers: at least once)
                await broker.ack(receipts, wait_durable=False)
            elif action == "requeue":
                await broker.release(receipts)
            else:
                await broker.reject(receipts, reason="rejected")
        except LockExpiredError:
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - delivery "
                               "acknowledgement timed out (consumer_timeout)") from None
        except UnknownDeliveryError:
            pass  # settled already (the queue was purged or deleted meanwhile)

    # --- methods ---------------------------------------------------------------------
    async def handle(self, method: pamqp_base.Frame) -> None:
        handler = _HANDLERS.get(type(method))
        if handler is None:
            raise ConnectionError_(f.NOT_IMPLEMENTED, f"{method.name} is not implemented",
                                   *_ids(method))
        try:
            await handler(self, method)
        except ArgumentError as error:
            raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - {error}",
                               *_ids(method)) from None
        except PreconditionFailedError as error:
            raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - {error}",
                               *_ids(method)) from None
        except (UnknownQueueError, UnknownExchangeError, NotFoundError) as error:
            raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - {error}", *_ids(method)) from None
        except InvalidRequestError as error:
            raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - {error}",
                               *_ids(method)) from None
        except OperatingError as error:
            raise ChannelError(f.PRECONDITION_FAILED, f"{error.code} - {error}",
                               *_ids(method)) from None

    def reply(self, method: pamqp_base.Frame) -> None:
        self.connection.send_method(self.number, method)

    async def on_channel_open(self, method: commands.Channel.Open) -> None:
        self.reply(commands.Channel.OpenOk())

    async def on_channel_close(self, method: commands.Channel.Close) -> None:
        await self.close()
        self._forget()
        self.reply(commands.Channel.CloseOk())

    async def on_channel_close_ok(self, method: commands.Channel.CloseOk) -> None:
        self._forget()

    def _forget(self) -> None:
        if self.connection.channels.get(self.number) is self:
            del self.connection.channels[self.number]

    async def on_flow(self, method: commands.Channel.Flow) -> None:
        self.flow_active = bool(method.active)
        self.reply(commands.Channel.FlowOk(self.flow_active))
        self.wake_consumers()

    async def on_flow_ok(self, method: commands.Channel.FlowOk) -> None:
        return None

    # exchanges
    async def on_exchange_declare(self, method: commands.Exchange.Declare) -> None:
        broker = self.connection.server.broker
        name = method.exchange
        if method.passive:
            self._exchange(name, method)
        else:
            if name.startswith("amq.") and not _exists(broker.get_exchange, name):
                raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - exchange name '{name}' "
                                   "contains reserved prefix 'amq.*'", 40, 10)
            if method.exchange_type not in ("direct", "fanout", "topic", "headers"):
                # RabbitMQ >= 3.13 closes the channel (406), not the connection (503).
                raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - invalid "
                                   f"exchange type '{method.exchange_type}'", 40, 10)
            if name == "":
                raise ChannelError(f.ACCESS_REFUSED, "ACCESS_REFUSED - the default exchange "
                                   "cannot be declared", 40, 10)
            arguments = dict(method.arguments or {})
            alternate = arguments.pop("alternate-exchange", None)
            await broker.declare_exchange(
                name, method.exchange_type,  # type: ignore[arg-type]  # checked above
                durable=bool(method.durable),
                auto_delete=bool(method.auto_delete), internal=bool(method.internal),
                alternate_exchange=str(alternate) if alternate is not None else None,
                arguments=binding_arguments(arguments) or None)
        if not method.nowait:
            self.reply(commands.Exchange.DeclareOk())

    def _exchange(self, name: str, method: pamqp_base.Frame) -> None:
        if name == "":
            return
        try:
            self.connection.server.broker.get_exchange(name)
        except (UnknownExchangeError, NotFoundError):
            raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no exchange '{name}' in vhost "
                               f"'{self.connection.vhost}'", *_ids(method)) from None

    async def on_exchange_delete(self, method: commands.Exchange.Delete) -> None:
        broker = self.connection.server.broker
        if method.exchange.startswith("amq.") or method.exchange == "":
            raise ChannelError(f.ACCESS_REFUSED, "ACCESS_REFUSED - cannot delete a reserved "
                               "exchange", 40, 20)
        if _exists(broker.get_exchange, method.exchange):
            await broker.delete_exchange(method.exchange, if_unused=bool(method.if_unused))
        if not method.nowait:
            self.reply(commands.Exchange.DeleteOk())

    async def on_exchange_bind(self, method: commands.Exchange.Bind) -> None:
        await self._exchange_binding(method, commands.Exchange.BindOk())

    async def on_exchange_unbind(self, method: commands.Exchange.Unbind) -> None:
        await self._exchange_binding(method, commands.Exchange.UnbindOk())

    async def _exchange_binding(self, method: commands.Exchange.Bind | commands.Exchange.Unbind,
                                reply: pamqp_base.Frame) -> None:
        """Exchange-to-exchange bind or unbind (RabbitMQ's extension)."""
        self._exchange(method.source, method)
        self._exchange(method.destination, method)
        broker = self.connection.server.broker
        change = broker.bind if isinstance(method, commands.Exchange.Bind) else broker.unbind
        await change(method.source, "exchange", method.destination, method.routing_key,
                     binding_arguments(method.arguments))
        if not method.nowait:
            self.reply(reply)

    # queues
    def _queue_name(self, name: str, method: pamqp_base.Frame) -> str:
        if name:
            return name
        if not self.last_queue:
            raise ChannelError(f.NOT_FOUND, "NOT_FOUND - no previously declared queue",
                               *_ids(method))
        return self.last_queue

    def _check_exclusive(self, topic: str, name: str, method: pamqp_base.Frame) -> None:
        use = self.connection.server.queues.get(topic)
        if use is not None and use.exclusive_owner not in (None, self.connection):
            raise ChannelError(f.RESOURCE_LOCKED, f"RESOURCE_LOCKED - cannot obtain exclusive "
                               f"access to locked queue '{name}' in vhost "
                               f"'{self.connection.vhost}'", *_ids(method))

    async def on_queue_declare(self, method: commands.Queue.Declare) -> None:
        connection = self.connection
        server = connection.server
        broker = server.broker
        name = method.queue
        if name == REPLY_TO_QUEUE or name.startswith(REPLY_TO_QUEUE + "."):
            self.reply(commands.Queue.DeclareOk(name, 0, 0))
            return
        if not name:
            if method.passive:
                raise ChannelError(f.NOT_FOUND, "NOT_FOUND - no previously declared queue",
                                   50, 10)
            name = generated_name("amq.gen", os.urandom(16))
        elif name.startswith("amq.") and not method.passive:
            raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - queue name '{name}' "
                               "contains reserved prefix 'amq.*'", 50, 10)
        if len(name.encode()) > 255:
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - queue name too "
                               "long", 50, 10)
        if not pamqp_constants.DOMAIN_REGEX["queue-name"].fullmatch(name):
            # pamqp's Queue.DeclareOk refuses such names: answer here, not with a traceback.
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - queue name "
                               f"{name!r} has characters outside the queue-name domain", 50, 10)
        topic = topic_name_for(name)
        self._check_exclusive(topic, name, method)
        if method.passive:
            if _is_stream(broker, topic):
                await self._declare_stream(topic, name, method)
                return
            try:
                info = await broker.get_queue(topic)
            except (UnknownQueueError, NotFoundError):
                raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no queue '{name}' in vhost "
                                   f"'{connection.vhost}'", 50, 10) from None
        else:
            options = queue_options(method.arguments, bool(method.durable),
                                    server.settings.consumer_timeout_ms)
            if options.queue_type == "stream" or _is_stream(broker, topic):
                await self._declare_stream(topic, name, method)
                return
            try:
                info = await _declare(broker, topic, options.config)
            except PreconditionFailedError:
                raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - inequivalent "
                                   f"arg for queue '{name}' in vhost '{connection.vhost}'",
                                   50, 10) from None
            use = server.use(topic)
            if method.exclusive:
                use.exclusive_owner = connection
                connection.exclusive_queues.add(topic)
            use.auto_delete = use.auto_delete or bool(method.auto_delete)
            use.single_active = options.single_active_consumer
        self.last_queue = name
        use_now = server.queues.get(topic)
        consumers = len(use_now.consumers) if use_now is not None else 0
        if not method.nowait:
            self.reply(commands.Queue.DeclareOk(name, info.ready + info.delayed, consumers))

    async def _declare_stream(self, topic: str, name: str,
                              method: commands.Queue.Declare) -> None:
        """A stream queue is a Conveyor topic (created with one partition if missing)."""
        broker = self.connection.server.broker
        try:
            info = broker.get_topic(topic)
        except (UnknownTopicError, NotFoundError):
            if method.passive:
                raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no queue '{name}' in vhost "
                                   f"'{self.connection.vhost}'", 50, 10) from None
            info = await broker.create_topic(topic, 1)
        if info.kind != "topic":
            raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - inequivalent "
                               f"arg 'x-queue-type' for queue '{name}'", 50, 10)
        self.last_queue = name
        count = 0
        for partition in range(info.partitions):
            offsets = broker.offsets(topic, partition)
            count += offsets.high_watermark - offsets.log_start_offset
        use = self.connection.server.queues.get(topic)
        if not method.nowait:
            self.reply(commands.Queue.DeclareOk(
                name, count, len(use.consumers) if use is not None else 0))

    async def on_queue_bind(self, method: commands.Queue.Bind) -> None:
        name = self._queue_name(method.queue, method)
        self._exchange(method.exchange, method)
        topic = topic_name_for(name)
        self._check_exclusive(topic, name, method)
        if method.exchange == "":
            raise ChannelError(f.ACCESS_REFUSED, "ACCESS_REFUSED - operation not permitted on "
                               "the default exchange", 50, 20)
        broker = self.connection.server.broker
        kind: Any = "topic" if _is_stream(broker, topic) else "queue"
        if kind == "queue":
            await self._require_queue(topic, name, method)
        await broker.bind(method.exchange, kind, topic, method.routing_key,
                          binding_arguments(method.arguments))
        if not method.nowait:
            self.reply(commands.Queue.BindOk())

    async def on_queue_unbind(self, method: commands.Queue.Unbind) -> None:
        name = self._queue_name(method.queue, method)
        self._exchange(method.exchange, method)
        topic = topic_name_for(name)
        broker = self.connection.server.broker
        kind: Any = "topic" if _is_stream(broker, topic) else "queue"
        if kind == "queue":
            await self._require_queue(topic, name, method)
        await broker.unbind(method.exchange, kind, topic, method.routing_key,
                            binding_arguments(method.arguments))
        self.reply(commands.Queue.UnbindOk())

    async def _require_queue(self, topic: str, name: str, method: pamqp_base.Frame) -> None:
        try:
            await self.connection.server.broker.get_queue(topic)
        except (UnknownQueueError, NotFoundError):
            raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no queue '{name}' in vhost "
                               f"'{self.connection.vhost}'", *_ids(method)) from None

    async def on_queue_purge(self, method: commands.Queue.Purge) -> None:
        name = self._queue_name(method.queue, method)
        topic = topic_name_for(name)
        self._check_exclusive(topic, name, method)
        await self._require_queue(topic, name, method)
        count = await self.connection.server.broker.purge_queue(topic)
        if not method.nowait:
            self.reply(commands.Queue.PurgeOk(count))

    async def on_queue_delete(self, method: commands.Queue.Delete) -> None:
        server = self.connection.server
        name = self._queue_name(method.queue, method)
        topic = topic_name_for(name)
        self._check_exclusive(topic, name, method)
        use = server.queues.get(topic)
        if method.if_unused and use is not None and use.consumers:
            raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - queue '{name}' "
                               "in use", 50, 40)
        count = 0
        if _is_stream(server.broker, topic):
            await server.broker.delete_topic(topic)
            await server.queue_gone(topic)
            if not method.nowait:
                self.reply(commands.Queue.DeleteOk(0))
            return
        try:
            count = await server.broker.delete_queue(topic, if_empty=bool(method.if_empty))
        except (UnknownQueueError, NotFoundError):
            count = 0
        except PreconditionFailedError:
            raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - queue '{name}' "
                               "not empty", 50, 40) from None
        self.connection.exclusive_queues.discard(topic)
        await server.queue_gone(topic)
        if not method.nowait:
            self.reply(commands.Queue.DeleteOk(count))

    # basic
    async def on_qos(self, method: commands.Basic.Qos) -> None:
        if method.global_:
            self.prefetch_global = method.prefetch_count
        else:
            self.prefetch_consumer = method.prefetch_count
            for consumer in self.consumers.values():
                consumer.prefetch = method.prefetch_count
        self.wake_consumers()
        self.reply(commands.Basic.QosOk())

    async def on_consume(self, method: commands.Basic.Consume) -> None:
        connection = self.connection
        server = connection.server
        name = self._queue_name(method.queue, method)
        tag = method.consumer_tag or generated_name("amq.ctag", os.urandom(16))
        if tag in self.consumers:
            raise ConnectionError_(f.NOT_ALLOWED, f"NOT_ALLOWED - attempt to reuse consumer "
                                   f"tag '{tag}'", 60, 20)
        if name == REPLY_TO_QUEUE:
            if not method.no_ack:
                raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - reply "
                                   "consumer cannot acknowledge", 60, 20)
            consumer = Consumer(self, tag, "", name, True, 0, False)
            self.reply_to_name = REPLY_TO_QUEUE + "." + generated_name("g", os.urandom(18))
            server.reply_channels[self.reply_to_name] = self
            self.consumers[tag] = consumer
            if not method.nowait:
                self.reply(commands.Basic.ConsumeOk(tag))
            return
        topic = topic_name_for(name)
        self._check_exclusive(topic, name, method)
        if _is_stream(server.broker, topic):
            offsets = _stream_offsets(server.broker, topic, (method.arguments or {}).get(
                "x-stream-offset", "next"))
            stream_consumer = StreamConsumer(self, tag, topic, name, bool(method.no_ack),
                                             self.prefetch_consumer, offsets)
            self.consumers[tag] = stream_consumer
            server.use(topic).consumers.append(stream_consumer)
            if not method.nowait:
                self.reply(commands.Basic.ConsumeOk(tag))
            stream_consumer.task = asyncio.get_running_loop().create_task(stream_consumer.run())
            return
        await self._require_queue(topic, name, method)
        use = server.use(topic)
        if method.exclusive and use.consumers:
            raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - queue '{name}' in vhost "
                               f"'{connection.vhost}' in exclusive use", 60, 20)
        if any(other.exclusive for other in use.consumers):
            raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - queue '{name}' in vhost "
                               f"'{connection.vhost}' in exclusive use", 60, 20)
        consumer = Consumer(self, tag, topic, name, bool(method.no_ack), self.prefetch_consumer,
                            bool(method.exclusive))
        self.consumers[tag] = consumer
        use.consumers.append(consumer)
        use.had_consumer = True
        if not method.nowait:
            self.reply(commands.Basic.ConsumeOk(tag))
        consumer.task = asyncio.get_running_loop().create_task(consumer.run())

    async def on_cancel(self, method: commands.Basic.Cancel) -> None:
        consumer = self.consumers.pop(method.consumer_tag or "", None)
        if consumer is not None:
            if consumer.queue == REPLY_TO_QUEUE and self.reply_to_name is not None:
                self.connection.server.reply_channels.pop(self.reply_to_name, None)
            await self._stop_consumer(consumer)
        if not method.nowait:
            self.reply(commands.Basic.CancelOk(method.consumer_tag))

    async def on_cancel_ok(self, method: commands.Basic.CancelOk) -> None:
        return None

    async def on_get(self, method: commands.Basic.Get) -> None:
        server = self.connection.server
        name = self._queue_name(method.queue, method)
        topic = topic_name_for(name)
        self._check_exclusive(topic, name, method)
        if _is_stream(server.broker, topic):
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - basic.get is "
                               "not supported by stream queues", 60, 70)
        await self._require_queue(topic, name, method)
        deliveries = await server.broker.acquire(
            topic, topic, records_max=1, lock_ms=server.settings.consumer_timeout_ms,
            wait_ms=0, consumer_id=self.holder_id)
        if not deliveries:
            self.reply(commands.Basic.GetEmpty())
            return
        delivery = deliveries[0]
        info = await server.broker.get_queue(topic)
        self.delivery_tag += 1
        if method.no_ack:
            await server.broker.ack([delivery.receipt])
        else:
            self.unacked[self.delivery_tag] = Unacked(delivery.receipt, None)
        out = outgoing(delivery.headers, delivery.key, name)
        self.connection.write_parts(f.get_ok_frames(
            self.number, self.delivery_tag, delivery.delivery_count > 1, out.exchange,
            out.routing_key, info.ready, out.properties, delivery.value or b"",
            self.connection.frame_bytes_max))

    async def on_ack(self, method: commands.Basic.Ack) -> None:
        if self.transactional:
            self.tx_settlements.append(MethodReceived(self.number, method))
            return
        await self.ack_batch([method])

    async def on_nack(self, method: commands.Basic.Nack) -> None:
        await self._negative(method, method.delivery_tag or 0, bool(method.multiple),
                             bool(method.requeue))

    async def on_reject(self, method: commands.Basic.Reject) -> None:
        await self._negative(method, method.delivery_tag or 0, False, bool(method.requeue))

    async def _negative(self, method: pamqp_base.Frame, tag: int, multiple: bool,
                        requeue: bool) -> None:
        if self.transactional:
            self.tx_settlements.append(MethodReceived(self.number, method))
            return
        taken = self._take(tag, multiple, method)
        receipts = [item.receipt for item in taken if item.receipt is not None]
        await self._settle(receipts, "requeue" if requeue else "reject")

    async def on_recover(self, method: commands.Basic.Recover) -> None:
        taken = self._take(0, True, method)
        await self._settle([item.receipt for item in taken if item.receipt is not None],
                           "requeue")
        self.reply(commands.Basic.RecoverOk())

    async def on_recover_async(self, method: commands.Basic.RecoverAsync) -> None:
        taken = self._take(0, True, method)
        await self._settle([item.receipt for item in taken if item.receipt is not None],
                           "requeue")

    # confirms and transactions
    async def on_confirm_select(self, method: commands.Confirm.Select) -> None:
        if self.transactional:
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - cannot switch "
                               "from tx to confirm mode", 85, 10)
        self.confirm = True
        if not method.nowait:
            self.reply(commands.Confirm.SelectOk())

    async def on_tx_select(self, method: commands.Tx.Select) -> None:
        if self.confirm:
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - cannot switch "
                               "from confirm to tx mode", 90, 10)
        self.transactional = True
        self.reply(commands.Tx.SelectOk())

    async def on_tx_commit(self, method: commands.Tx.Commit) -> None:
        if not self.transactional:
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - channel is not "
                               "transactional", 90, 20)
        publishes, self.tx_publishes = self.tx_publishes, []
        settlements, self.tx_settlements = self.tx_settlements, []
        if publishes:
            await self.publish_batch(publishes)
        self.transactional = False  # settle below without re-buffering
        try:
            for event in settlements:
                if isinstance(event.method, commands.Basic.Ack):
                    await self.ack_batch([event.method])
                else:
                    await self.handle(event.method)
        finally:
            self.transactional = True
        self.reply(commands.Tx.CommitOk())

    async def on_tx_rollback(self, method: commands.Tx.Rollback) -> None:
        if not self.transactional:
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - channel is not "
                               "transactional", 90, 30)
        self.tx_publishes.clear()
        self.tx_settlements.clear()
        self.reply(commands.Tx.RollbackOk())


# What an AMQP declaration can express; a queue made over HTTP or SQS with other
# settings (its visibility timeout, FIFO, dedup) is equivalent when these agree.
_DECLARED_FIELDS = ("max_deliveries", "dead_letter_exchange", "dead_letter_routing_key",
                    "message_ttl_ms", "max_length", "overflow", "max_priority", "durable")


async def _declare(broker: Broker, topic: str, config: QueueConfig) -> QueueInfo:
    try:
        existing = await broker.get_queue(topic)
    except (UnknownQueueError, NotFoundError):
        return await broker.declare_queue(topic, config)
    for name in _DECLARED_FIELDS:
        if getattr(existing.config, name) != getattr(config, name):
            raise PreconditionFailedError("inequivalent arg", field=name)
    return existing


def _is_stream(broker: Broker, topic: str) -> bool:
    """A plain topic (not a queue) is served as a RabbitMQ stream."""
    try:
        return broker.get_topic(topic).kind == "topic"
    except (UnknownTopicError, NotFoundError):
        return False


_INTERVAL_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "D": 86_400_000,
                "M": 30 * 86_400_000, "Y": 365 * 86_400_000}


def _stream_offsets(broker: Broker, topic: str, spec: Any) -> dict[int, int]:
    """Start offsets per partition for x-stream-offset: first, last, next, an offset,
    a timestamp, or an interval such as "1h" (RabbitMQ's forms)."""
    partitions = broker.get_topic(topic).partitions
    offsets: dict[int, int] = {}
    now_ms = broker.clock.wall_ms()
    timestamp_ms: int | None = None
    if isinstance(spec, datetime.datetime):
        timestamp_ms = int(spec.timestamp() * 1000)
    elif isinstance(spec, bytes | bytearray):
        spec = spec.decode("utf-8", "replace")
    if isinstance(spec, str) and spec[:-1].isdigit() and spec[-1:] in _INTERVAL_MS:
        timestamp_ms = now_ms - int(spec[:-1]) * _INTERVAL_MS[spec[-1]]
    for partition in range(partitions):
        bounds = broker.offsets(topic, partition)
        if timestamp_ms is not None:
            found = broker.offset_for_timestamp(topic, partition, timestamp_ms)
            offsets[partition] = bounds.high_watermark if found is None else found
        elif spec == "first":
            offsets[partition] = bounds.log_start_offset
        elif spec == "last":
            offsets[partition] = max(bounds.log_start_offset, bounds.high_watermark - 1)
        elif isinstance(spec, int) and not isinstance(spec, bool):
            offsets[partition] = min(max(spec, bounds.log_start_offset), bounds.high_watermark)
        else:
            offsets[partition] = bounds.high_watermark
    return offsets


def _inbox_size(event: PublishReceived) -> int:
    """What an unprocessed publish counts against the flow-control limits."""
    return len(event.body) + 256  # body + a rough size of its frames and objects


def _exists(getter: Callable[[str], Any], name: str) -> bool:
    try:
        getter(name)
    except (NotFoundError, UnknownExchangeError):
        return False
    return True


def _mark_dropped(ok: list[bool], results: Iterable[PublishResult]) -> None:
    """A reject-publish overflow drops a message (offset -1): nack it."""
    for index, result in enumerate(results):
        if index < len(ok) and result.offset < 0:
            ok[index] = False


_HANDLERS: dict[type, Callable[[Channel, Any], Any]] = {
    commands.Channel.Open: Channel.on_channel_open,
    commands.Channel.Close: Channel.on_channel_close,
    commands.Channel.CloseOk: Channel.on_channel_close_ok,
    commands.Channel.Flow: Channel.on_flow,
    commands.Channel.FlowOk: Channel.on_flow_ok,
    commands.Exchange.Declare: Channel.on_exchange_declare,
    commands.Exchange.Delete: Channel.on_exchange_delete,
    commands.Exchange.Bind: Channel.on_exchange_bind,
    commands.Exchange.Unbind: Channel.on_exchange_unbind,
    commands.Queue.Declare: Channel.on_queue_declare,
    commands.Queue.Bind: Channel.on_queue_bind,
    commands.Queue.Unbind: Channel.on_queue_unbind,
    commands.Queue.Purge: Channel.on_queue_purge,
    commands.Queue.Delete: Channel.on_queue_delete,
    commands.Basic.Qos: Channel.on_qos,
    commands.Basic.Consume: Channel.on_consume,
    commands.Basic.Cancel: Channel.on_cancel,
    commands.Basic.CancelOk: Channel.on_cancel_ok,
    commands.Basic.Get: Channel.on_get,
    commands.Basic.Ack: Channel.on_ack,
    commands.Basic.Nack: Channel.on_nack,
    commands.Basic.Reject: Channel.on_reject,
    commands.Basic.Recover: Channel.on_recover,
    commands.Basic.RecoverAsync: Channel.on_recover_async,
    commands.Confirm.Select: Channel.on_confirm_select,
    commands.Tx.Select: Channel.on_tx_select,
    commands.Tx.Commit: Channel.on_tx_commit,
    commands.Tx.Rollback: Channel.on_tx_rollback,
}


# --- the connection --------------------------------------------------------------------
class AmqpConnection(asyncio.Protocol):
    def __init__(self, server: AmqpServer) -> None:
        settings = server.settings
        self.server = server
        server.next_connection_id += 1
        self.connection_id = server.next_connection_id
        self.machine = ConnectionMachine(settings.frame_bytes_max, settings.channel_max,
                                         settings.message_bytes_max)
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, Channel] = {}
        self.exclusive_queues: set[str] = set()
        self.frame_bytes_max = settings.frame_bytes_max
        self.heartbeat_s = 0
        self.user = ""
        self.vhost = "/"
        self.client_properties: dict[str, Any] = {}
        self.writing_paused = False
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._inbox_bytes = 0
        self._reading_paused = False
        self._received = False
        self._sent = False
        self._heartbeat_handle: asyncio.TimerHandle | None = None
        self._missed = 0
        self._closing_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._admitted = False
        self._watch: RequestWatch | None = None
        self._blocked = False  # connection.blocked sent (publisher push-back)
        self._unsubscribe: Callable[[], None] | None = None
        self._abort_handle: asyncio.TimerHandle | None = None  # the close_timeout_ms timer

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=4 << 20)
        if not self.server.gate.admit():
            self.machine.state = ConnectionState.CLOSED
            self.transport.abort()  # over connections_max: refused before reading anything
            return
        self._admitted = True
        self.server.counters.opened()
        self._watch = RequestWatch(self.server.limits, self._expired, self._is_busy)
        self._unsubscribe = self.server.shared.flow.on_change(self._flow_changed)
        self.server.connections.add(self)
        # A client must finish the handshake in time (RabbitMQ's handshake_timeout).
        self._heartbeat_handle = self._loop.call_later(
            self.server.settings.handshake_timeout_ms / 1000, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        self.server.counters.bytes_received += len(data)
        self._received = True
        reader = self.machine.reader
        before = reader.buffered_bytes + len(data)
        for event in self.machine.receive(data):
            self._event(event)
        buffered = reader.buffered_bytes
        if self._watch is not None:
            self._watch.received(buffered > 0, buffered < before)
        if self.machine.state is ConnectionState.OPEN:
            self.server.shared.budget.hold(self, buffered + self._content_bytes())

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        for channel in self.channels.values():
            channel.wake_consumers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._admitted:
            self._admitted = False
            self.server.gate.release()
            self.server.counters.closed()
        if self._watch is not None:
            self._watch.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        shared = self.server.shared
        shared.budget.forget(self)
        shared.flow.forget(self)
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
        if self._abort_handle is not None:  # the socket is gone: release the connection now
            self._abort_handle.cancel()
            self._abort_handle = None
        self.machine.state = ConnectionState.CLOSED
        self._closing_task = self._loop.create_task(self._cleanup())

    # --- events ---------------------------------------------------------------------------
    def _event(self, event: Any) -> None:
        if isinstance(event, PublishReceived):
            self.server.counters.request("Basic.Publish")
            channel = self.channels.get(event.channel)
            if channel is not None:
                size = _inbox_size(event)
                self._inbox_bytes += size
                server = self.server
                server.inbox_bytes += size
                flow = server.shared.flow
                flow.hold(self, self._inbox_bytes)
                pushed_back = flow.should_wait(self)
                if (not self._reading_paused and self.transport is not None and (
                        self._inbox_bytes > server.settings.inbox_bytes_max
                        or server.inbox_bytes > server.settings.memory_high_watermark_bytes
                        or pushed_back)):
                    # this producer is the one filling memory: only it waits
                    server.reading_pauses += 1
                    self._reading_paused = True
                    self.transport.pause_reading()
                if pushed_back:
                    self._block(flow.blocked_reason() or "low on memory")
                channel.push(event)
        elif isinstance(event, MethodReceived):
            self.server.counters.request(event.method.name)
            if event.channel == 0:
                self._connection_method(event.method)
            elif isinstance(event.method, commands.Channel.Open):
                channel = Channel(self, event.channel)
                self.channels[event.channel] = channel
                channel.push(event)
            else:
                channel = self.channels.get(event.channel)
                if channel is not None:
                    channel.push(event)
        elif isinstance(event, HeartbeatReceived):
            return
        elif isinstance(event, HeaderAccepted):
            self._start()
        elif isinstance(event, ChannelFault):
            channel = self.channels.get(event.channel)
            self.send_method(event.channel, commands.Channel.Close(
                event.reply_code, event.text[:255], event.class_id, event.method_id))
            if channel is not None:
                self._loop.create_task(channel.close())
        elif isinstance(event, ConnectionFault):
            self.fail(event.reply_code, event.text, event.class_id, event.method_id,
                      machine_closing=True)
        elif isinstance(event, HeaderRejected):
            if self.transport is not None:
                self.transport.write(f.PROTOCOL_HEADER)
                self.transport.close()

    def inbox_drained(self, batch: list[PublishReceived]) -> None:
        size = sum(_inbox_size(event) for event in batch)
        self._inbox_bytes -= size
        self.server.inbox_bytes -= size
        self.server.shared.flow.hold(self, self._inbox_bytes)
        self._resume_if_allowed()

    def _resume_if_allowed(self) -> None:
        if self.server.shared.flow.should_wait(self):
            return
        if self._blocked:
            self._blocked = False
            if self.capability("connection.blocked"):
                self.send_method(0, commands.Connection.Unblocked())
        if self._reading_paused and self._inbox_bytes <= self.server.settings.inbox_bytes_max // 2:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # --- limits ---------------------------------------------------------------------------
    def _block(self, reason: str) -> None:
        """Publisher push-back: connection.blocked to a client that understands it; its
        reading is paused already."""
        if not self._blocked:
            self._blocked = True
            if self.capability("connection.blocked"):
                self.send_method(0, commands.Connection.Blocked(reason=reason))

    def _flow_changed(self) -> None:
        """The flow may have let go: resume a connection it held. (A connection is blocked
        when it publishes, as RabbitMQ blocks only publishing connections.)"""
        if self._blocked or self._reading_paused:
            self._resume_if_allowed()

    def _content_bytes(self) -> int:
        """Bytes of messages whose content is still arriving, over all channels."""
        return sum(state.body_received for state in self.machine.channels.values())

    def _is_busy(self) -> bool:
        return bool(self._inbox_bytes) or any(
            channel.worker is not None and not channel.worker.done()
            for channel in self.channels.values())

    def _expired(self, reason: str) -> None:
        log.info("amqp connection %s closed: %s timeout", self.connection_id, reason)
        self.server.shared.budget.forget(self)
        self.fail(f.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason} timeout")
        self._drop()

    def shed_memory(self) -> None:
        """Over the server's partial-request budget and holding the most: 506, close."""
        for state in self.machine.channels.values():
            state.body_parts = []
            state.body_received = 0
        self.fail(f.RESOURCE_ERROR, "RESOURCE_ERROR - unfinished messages over the "
                  "server's memory budget (partial_request_bytes_max)")
        self._drop()

    def _drop(self) -> None:
        """Write what is pending (the Close) and drop the socket without waiting for a
        peer that may not be reading."""
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.abort()

    def capability(self, name: str) -> bool:
        capabilities = self.client_properties.get("capabilities")
        return isinstance(capabilities, dict) and bool(capabilities.get(name))

    # --- negotiation ----------------------------------------------------------------------
    def _start(self) -> None:
        self.send_method(0, commands.Connection.Start(
            version_major=0, version_minor=9,
            server_properties={
                "product": "Conveyor", "version": "0.1.0",
                "platform": f"Python {platform.python_version()}",
                "copyright": "Conveyor developers",
                "information": "https://github.com/conveyor (AMQP 0-9-1)",
                "capabilities": dict(CAPABILITIES),
                "cluster_name": "conveyor",
            },
            mechanisms="PLAIN AMQPLAIN", locales="en_US"))

    def _connection_method(self, method: pamqp_base.Frame) -> None:
        settings = self.server.settings
        if isinstance(method, commands.Connection.StartOk):
            self.client_properties = dict(method.client_properties or {})
            user = _authenticate(method.mechanism, method.response, settings.users)
            if user is None:
                self.fail(f.ACCESS_REFUSED, f"ACCESS_REFUSED - Login was refused using "
                          f"authentication mechanism {method.mechanism}", 10, 11)
                return
            self.user = user
            self.send_method(0, commands.Connection.Tune(
                channel_max=settings.channel_max, frame_max=settings.frame_bytes_max,
                heartbeat=settings.heartbeat_s))
        elif isinstance(method, commands.Connection.TuneOk):
            frame_max = method.frame_max or settings.frame_bytes_max
            if frame_max < f.FRAME_MIN_SIZE:
                self.fail(f.NOT_ALLOWED, f"NOT_ALLOWED - frame_max {frame_max} below "
                          f"{f.FRAME_MIN_SIZE}", 10, 31)
                return
            self.frame_bytes_max = min(frame_max, settings.frame_bytes_max)
            channel_max = method.channel_max or settings.channel_max
            self.machine.tuned(self.frame_bytes_max, min(channel_max, settings.channel_max))
            self.heartbeat_s = method.heartbeat
        elif isinstance(method, commands.Connection.Open):
            if method.virtual_host not in settings.vhosts:
                self.fail(f.NOT_ALLOWED, f"NOT_ALLOWED - vhost {method.virtual_host} not "
                          "found", 10, 40)
                return
            self.vhost = method.virtual_host
            self.send_method(0, commands.Connection.OpenOk())
            if self._heartbeat_handle is not None:
                self._heartbeat_handle.cancel()
                self._heartbeat_handle = None
            if self.heartbeat_s:
                self._heartbeat_handle = self._loop.call_later(self.heartbeat_s / 2,
                                                               self._heartbeat)
        elif isinstance(method, commands.Connection.Close):
            self.machine.state = ConnectionState.CLOSED
            self._closing_task = self._loop.create_task(self._close_requested())
        elif isinstance(method, commands.Connection.CloseOk):
            if self.transport is not None:
                self.transport.close()
        elif isinstance(method, commands.Connection.UpdateSecret):
            self.send_method(0, commands.Connection.UpdateSecretOk())

    def _handshake_timeout(self) -> None:
        self._heartbeat_handle = None
        if self.machine.state is not ConnectionState.OPEN and self.transport is not None:
            self.transport.close()

    def _heartbeat(self) -> None:
        """Every heartbeat/2 s: send one if idle; close after two silent heartbeats."""
        if self.transport is None or self.transport.is_closing():
            return
        interval = self.heartbeat_s / 2
        if self._received:
            self._received = False
            self._missed = 0
        else:
            self._missed += 1
            if self._missed >= 4:  # 2 heartbeat intervals of silence
                log.info("amqp connection %s missed heartbeats", self.connection_id)
                self.transport.close()
                return
        if not self._sent:
            self.write_parts([f.heartbeat_frame()])
        self._sent = False
        self._heartbeat_handle = self._loop.call_later(interval, self._heartbeat)

    # --- output ---------------------------------------------------------------------------
    def send_method(self, channel: int, method: pamqp_base.Frame) -> None:
        if isinstance(method, commands.Channel.Close | commands.Connection.Close):
            code = method.reply_code or 0
            if code != f.REPLY_SUCCESS:
                self.server.counters.error(REPLY_NAMES.get(code, str(code)))
        self.write_parts([f.encode_method(channel, method)])

    def write_parts(self, parts: list[bytes]) -> None:
        self._out += parts
        self._sent = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.server.counters.bytes_sent += sum(map(len, self._out))
            self.transport.writelines(self._out)
        self._out = []

    def fail(self, reply_code: int, text: str, class_id: int = 0, method_id: int = 0,
             machine_closing: bool = False) -> None:
        """A hard error: Connection.Close, then wait for Close-Ok (or time out)."""
        if self.machine.state in (ConnectionState.CLOSING, ConnectionState.CLOSED) \
                and not machine_closing:
            return
        log.info("amqp connection %s closed: %s %s", self.connection_id, reply_code, text)
        self.machine.close_connection()
        self.send_method(0, commands.Connection.Close(reply_code, text[:255], class_id,
                                                      method_id))
        self._abort_handle = self._loop.call_later(
            self.server.settings.close_timeout_ms / 1000, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()

    async def close(self) -> None:
        """Server shutdown: Connection.Close 320, then drop the socket."""
        if self.transport is not None and not self.transport.is_closing():
            self.send_method(0, commands.Connection.Close(
                f.CONNECTION_FORCED, "CONNECTION_FORCED - broker shutdown", 0, 0))
            self._flush()
            self.transport.close()
        if self._closing_task is not None:
            await self._closing_task

    async def _close_requested(self) -> None:
        """Connection.Close from the client: finish what its channels received first
        (publishes sent before the close are stored), then Close-Ok."""
        await self._drain_channels()
        await self._release_all()  # exclusive queues are gone when Close-Ok arrives
        self.send_method(0, commands.Connection.CloseOk())
        self._flush()
        if self.transport is not None:
            self.transport.close()

    async def _drain_channels(self) -> None:
        for channel in list(self.channels.values()):
            worker = channel.worker
            if worker is not None and not worker.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker

    async def _cleanup(self) -> None:
        if self._closing_task is not None and self._closing_task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._closing_task
        await self._drain_channels()
        await self._release_all()

    async def _release_all(self) -> None:
        """Close every channel (releasing what they hold) and delete exclusive queues."""
        for channel in list(self.channels.values()):
            await channel.close()
        self.channels.clear()
        server = self.server
        for topic in list(self.exclusive_queues):
            use = server.queues.get(topic)
            if use is not None and use.exclusive_owner is self:
                with contextlib.suppress(OperatingError):
                    await server.broker.delete_queue(topic)
                await server.queue_gone(topic)
        self.exclusive_queues.clear()


def _authenticate(mechanism: str, response: Any, users: dict[str, str]) -> str | None:
    """The user name if PLAIN / AMQPLAIN credentials match a configured user."""
    raw = response.encode("utf-8") if isinstance(response, str) else bytes(response or b"")
    user = password = None
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) == 3:
            user, password = parts[1].decode("utf-8", "replace"), parts[2].decode(
                "utf-8", "replace")
    elif mechanism == "AMQPLAIN":
        try:
            _, table = pamqp_decode.field_table(len(raw).to_bytes(4, "big") + raw)
        except Exception:
            return None
        login, secret = table.get("LOGIN"), table.get("PASSWORD")
        user = login.decode() if isinstance(login, bytes | bytearray) else str(login)
        password = secret.decode() if isinstance(secret, bytes | bytearray) else str(secret)
        if login is None or secret is None:
            return None
    if user is None or password is None:
        return None
    expected = users.get(str(user))
    if expected is None or expected != password:
        return None
    return str(user)


def make_protocol_factory(server: AmqpServer) -> Callable[[], AmqpConnection]:
    return lambda: AmqpConnection(server)


__all__ = ["AmqpConnection", "AmqpServer", "make_protocol_factory"]
