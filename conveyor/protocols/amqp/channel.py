"""One AMQP channel: its inbox, deliveries and settlements, and what it holds.

Owns: the ordered inbox a channel works through (consecutive publishes and acks are
handled as one batch: one broker call, one fsync); carrying out the actions of its
mode machine (``channel_machine.py``: confirms, transactions, delivery tags) —
publishes go to ``publishing.py``, settlements to the broker from here; deliveries
to consumers; channel errors and the release of everything a channel holds when it
closes. Other methods go to the handlers (``basic_handlers.dispatch``) through the
``dispatch`` it is given. The channel sees its connection only through
``ChannelLink`` (``link.py``).

Rules that hold here:
- A confirm (basic.ack to the publisher) is sent only after ``Broker.publish``
  returned, i.e. the message is on disk under the queue's fsync policy.
- Methods of one channel take effect in the order they arrived.
- A record delivered to a channel is locked to that channel; closing the channel
  (or the connection, or losing the socket) releases every record it holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pamqp import base as pamqp_base
from pamqp import commands

from conveyor.errors import LockExpiredError, OperatingError, UnknownDeliveryError

from . import frames as f
from .channel_machine import (
    MODE_METHODS,
    SETTLE_METHODS,
    Action,
    ChannelMachine,
    Commit,
    DeliveryTags,
    Refuse,
    Reply,
    Settle,
    SettleMethod,
    Store,
    Unacked,
    UnknownTag,
    settle_kind,
)
from .link import (
    REPLY_TO_QUEUE,
    ChannelError,
    ChannelLink,
    ConnectionError_,
    is_stream,
    method_ids,
)
from .machine import AcksReceived, MethodReceived, PublishReceived
from .messages import Properties, PropertiesError, decode_properties, encode_properties, outgoing
from .publishing import publish_batch
from .server import Consumer

if TYPE_CHECKING:
    from conveyor.broker.types import Delivery

log = logging.getLogger("conveyor.amqp")


Dispatch = Callable[["Channel", pamqp_base.Frame], Awaitable[None]]
Event = PublishReceived | MethodReceived | AcksReceived


class Channel:
    def __init__(self, connection: ChannelLink, number: int, dispatch: Dispatch) -> None:
        self.connection = connection
        self.number = number
        self.dispatch = dispatch
        server = self.server = connection.server
        server.next_holder_id += 1
        self.holder_id = f"amqp/{connection.connection_id}/{number}/{server.next_holder_id}"
        self.inbox: collections.deque[Event] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.consumers: dict[str, Consumer] = {}
        self.machine = ChannelMachine()
        self.tags: DeliveryTags[Consumer] = DeliveryTags()
        self.prefetch_consumer = 0  # basic.qos global=false: for consumers created later
        self.prefetch_global = 0  # basic.qos global=true: shared by the channel
        self.flow_active = True
        self.last_queue = ""  # "" in queue.bind/consume/get means the last declared
        self.reply_to_name: str | None = None
        self.closed = False

    @property
    def unacked(self) -> DeliveryTags[Consumer]:
        return self.tags

    @property
    def confirm(self) -> bool:
        return self.machine.confirming

    @property
    def transactional(self) -> bool:
        return self.machine.transactional

    def unacked_count(self) -> int:
        return len(self.tags)

    def writing_paused(self) -> bool:
        return self.connection.writing_paused

    def reply(self, method: pamqp_base.Frame) -> None:
        self.connection.send_method(self.number, method)

    # --- inbox -----------------------------------------------------------------------
    def push(self, event: Event) -> None:
        self.inbox.append(event)
        if self.worker is None or self.worker.done():
            self.worker = self.server.tasks.start(self._work(), name="amqp-channel")

    async def _work(self) -> None:
        while self.inbox and not self.closed:
            try:
                await self._next()
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

    async def _next(self) -> None:
        """Take the next event (or run of publishes / acks) and carry it out."""
        inbox = self.inbox
        event = inbox.popleft()
        machine = self.machine
        if isinstance(event, PublishReceived):
            batch = [event]
            while inbox and isinstance(following := inbox[0], PublishReceived):
                batch.append(following)
                inbox.popleft()
            self.connection.inbox_drained(batch)
            await self.perform(machine.publish(batch))
            return
        if isinstance(event, AcksReceived):
            if machine.transactional:  # buffered until tx.commit, as methods
                await self.perform(machine.settle(
                    [commands.Basic.Ack(tag, multiple) for tag, multiple in event.acks]))
                return
            acks = event.acks
            while inbox and isinstance(following := inbox[0], AcksReceived):
                acks += following.acks  # acks of later reads: one settlement
                inbox.popleft()
            await self.settle_acks(acks)
            return
        method = event.method
        if isinstance(method, commands.Basic.Ack) and not machine.transactional:
            methods: list[SettleMethod] = [method]
            while inbox:
                following = inbox[0]
                if not (isinstance(following, MethodReceived)
                        and isinstance(following.method, commands.Basic.Ack)):
                    break
                methods.append(following.method)
                inbox.popleft()
            await self.perform(machine.settle(methods))
        elif isinstance(method, SETTLE_METHODS):
            await self.perform(machine.settle([method]))
        elif isinstance(method, MODE_METHODS):
            await self.perform(machine.mode_method(method))
        else:
            await self.dispatch(self, method)

    async def perform(self, actions: Iterable[Action]) -> None:
        """Carry out the mode machine's actions, in order."""
        for action in actions:
            if isinstance(action, Store):
                await publish_batch(self, action)
            elif isinstance(action, Settle):
                await self.settle(action.methods)
            elif isinstance(action, Reply):
                self.reply(action.method)
            elif isinstance(action, Commit):
                if action.store.publishes:
                    await publish_batch(self, action.store)
                for method in action.settlements:
                    await self.settle([method])
            elif isinstance(action, Refuse):
                refusal = action.refusal
                raise ChannelError(refusal.reply_code, refusal.text, refusal.class_id,
                                   refusal.method_id)

    async def fail(self, error: ChannelError) -> None:
        """Send Channel.Close and release what the channel holds (a soft error)."""
        if self.closed:
            return
        self.connection.channel_closing(self.number)
        self.reply(commands.Channel.Close(error.reply_code, error.text[:255], error.class_id,
                                          error.method_id))
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
        server = self.server
        for consumer in list(self.consumers.values()):
            await self.stop_consumer(consumer)
        self.consumers.clear()
        if self.reply_to_name is not None:
            server.reply_channels.pop(self.reply_to_name, None)
        self.tags.clear()
        with contextlib.suppress(OperatingError):
            await server.broker.release_consumer(self.holder_id)

    def forget(self) -> None:
        self.connection.forget_channel(self.number, self)

    async def stop_consumer(self, consumer: Consumer) -> None:
        if consumer.task is not None:
            consumer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer.task
        await self.server.consumer_removed(consumer)

    def cancel_from_server(self, consumer: Consumer) -> None:
        """The queue went away: tell the client (consumer cancel notification)."""
        if self.consumers.pop(consumer.tag, None) is None:
            return
        if consumer.task is not None and consumer.task is not asyncio.current_task():
            consumer.task.cancel()
        if not self.closed and self.connection.capability("consumer_cancel_notify"):
            self.reply(commands.Basic.Cancel(consumer.tag, True))

    def wake_consumers(self) -> None:
        for consumer in self.consumers.values():
            consumer.wake()

    # --- deliveries ------------------------------------------------------------------
    async def deliver(self, consumer: Consumer, deliveries: list[Delivery]) -> None:
        connection = self.connection
        if self.closed or consumer.tag not in self.consumers:
            await self.server.broker.release([d.receipt for d in deliveries])
            return
        frame_max = connection.frame_bytes_max
        encoder = consumer.encoder
        if encoder is None:
            encoder = consumer.encoder = f.DeliverEncoder(self.number, consumer.tag)
        add = encoder.add
        tags, queue, no_ack = self.tags, consumer.queue, consumer.no_ack
        parts: list[bytes] = []
        # records published alike share one headers tuple (record_batch decodes a header
        # section once): what ``outgoing`` made of the previous record is reused
        headers_before: object = None
        key_before: bytes | None = None
        out = None
        for delivery in deliveries:
            tag = tags.next() if no_ack else tags.hold(delivery.receipt, consumer)
            headers, key = delivery.headers, delivery.key
            if out is None or headers is not headers_before or key != key_before:
                out = outgoing(headers, key, queue)
                headers_before, key_before = headers, key
            add(parts, tag, delivery.delivery_count > 1, out.exchange, out.routing_key,
                out.properties, delivery.value or b"", frame_max)
        if not no_ack:
            consumer.unacked += len(deliveries)
        connection.write_parts(parts)
        if consumer.no_ack:
            await self.server.broker.ack([d.receipt for d in deliveries], wait_durable=False)

    def deliver_stream(self, consumer: Consumer, records: Sequence[Any]) -> None:
        """Stream deliveries carry their offset in the ``x-stream-offset`` header."""
        parts: list[bytes] = []
        for record in records:
            if consumer.no_ack:
                tag = self.tags.next()
            else:
                tag = self.tags.hold(None, consumer)
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
                self.number, consumer.tag, tag, False, out.exchange,
                out.routing_key, raw, record.value or b"", self.connection.frame_bytes_max)
        self.connection.write_parts(parts)

    def deliver_direct(self, consumer: Consumer, exchange: str, routing_key: str,
                       properties: bytes, body: bytes) -> None:
        """Direct reply-to: straight to the requester's channel, never stored."""
        self.connection.write_parts(f.deliver_frames(
            self.number, consumer.tag, self.tags.next(), False, exchange, routing_key,
            properties, body, self.connection.frame_bytes_max))

    # --- publish ---------------------------------------------------------------------

    # --- settle ----------------------------------------------------------------------
    def take(self, delivery_tag: int, multiple: bool, method: pamqp_base.Frame
             ) -> list[Unacked[Consumer]]:
        try:
            taken = self.tags.take(delivery_tag, multiple)
        except UnknownTag as error:
            raise ChannelError(f.PRECONDITION_FAILED, str(error),
                               *method_ids(method)) from None
        self.credit_returned(taken)
        return taken

    def credit_returned(self, taken: list[Unacked[Consumer]]) -> None:
        """Settled deliveries free their consumers' prefetch: wake each consumer once
        per run of its deliveries, not once per delivery."""
        woken: Consumer | None = None
        for item in taken:
            holder = item.holder
            if holder is not None:
                holder.unacked -= 1
                if holder is not woken:
                    holder.wake()
                    woken = holder
        if self.prefetch_global:
            self.wake_consumers()

    async def settle(self, methods: list[SettleMethod]) -> None:
        """Basic.Ack (one or a run of them), Basic.Nack or Basic.Reject."""
        taken, unknown = self.tags.take_each(
            (method.delivery_tag or 0,
             not isinstance(method, commands.Basic.Reject) and bool(method.multiple))
            for method in methods)
        self.credit_returned(taken)
        await self.settle_receipts(
            [item.receipt for item in taken if item.receipt is not None],
            settle_kind(methods[0]))
        if unknown is not None:
            raise ChannelError(f.PRECONDITION_FAILED, str(unknown),
                               *method_ids(methods[unknown.index]))

    async def settle_acks(self, acks: list[tuple[int, bool]]) -> None:
        """A run of Basic.Acks as (delivery tag, multiple): what ``settle`` does with
        as many Basic.Ack methods, in one pass and one broker call."""
        taken, unknown = self.tags.take_each(acks)
        self.credit_returned(taken)
        await self.settle_receipts(
            [item.receipt for item in taken if item.receipt is not None], "ack")
        if unknown is not None:
            raise ChannelError(f.PRECONDITION_FAILED, str(unknown), f.BASIC_CLASS, 80)

    async def settle_receipts(self, receipts: list[str], action: str) -> None:
        if not receipts:
            return
        broker = self.server.broker
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


__all__ = [
    "REPLY_TO_QUEUE",
    "Channel",
    "ChannelError",
    "ChannelLink",
    "ConnectionError_",
    "is_stream",
    "method_ids",
]
