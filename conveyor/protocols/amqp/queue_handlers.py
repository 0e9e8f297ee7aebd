"""Handlers of the AMQP channel, exchange and queue methods: actions -> broker calls.

Owns: what Channel.Open/Close/Flow, Exchange.* and Queue.* do against the broker,
with the spec's (and RabbitMQ's) checks and channel errors; the listener's notion of
exclusive and auto-delete queues. Each handler takes the channel and the decoded
method; ``basic_handlers.dispatch`` picks it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from pamqp import base as pamqp_base
from pamqp import commands
from pamqp import constants as pamqp_constants

from conveyor.broker.routing import PREDECLARED
from conveyor.broker.types import QueueConfig, QueueInfo
from conveyor.errors import (
    NotFoundError,
    PreconditionFailedError,
    UnknownExchangeError,
    UnknownQueueError,
    UnknownTopicError,
)
from conveyor.protocols.amqp.names import broker_exchange, queue_topic
from conveyor.security.api import DEFAULT_VHOST

from . import frames as f
from .arguments import binding_arguments, generated_name, queue_options
from .channel import REPLY_TO_QUEUE, Channel, ChannelError, is_stream, method_ids

if TYPE_CHECKING:
    from collections.abc import Callable

    from conveyor.broker.broker import Broker


async def on_channel_open(channel: Channel, method: commands.Channel.Open) -> None:
    vhost = channel.connection.vhost
    server = channel.server
    if vhost != DEFAULT_VHOST and vhost not in server.vhosts_ready:
        # a vhost's built-in exchanges are its own (RabbitMQ): made on first use
        for name, exchange_type in PREDECLARED:
            await server.broker.declare_exchange(broker_exchange(vhost, name), exchange_type)
        server.vhosts_ready.add(vhost)
    channel.reply(commands.Channel.OpenOk())


async def on_channel_close(channel: Channel, method: commands.Channel.Close) -> None:
    await channel.close()
    channel.forget()
    channel.reply(commands.Channel.CloseOk())


async def on_channel_close_ok(channel: Channel, method: commands.Channel.CloseOk) -> None:
    channel.forget()


async def on_flow(channel: Channel, method: commands.Channel.Flow) -> None:
    channel.flow_active = bool(method.active)
    channel.reply(commands.Channel.FlowOk(channel.flow_active))
    channel.wake_consumers()


async def on_flow_ok(channel: Channel, method: commands.Channel.FlowOk) -> None:
    return None

# exchanges


async def on_exchange_declare(channel: Channel, method: commands.Exchange.Declare) -> None:
    broker = channel.server.broker
    name = method.exchange
    vhost = channel.connection.vhost
    if method.passive:
        await _exchange(channel, name, method)
    else:
        if name.startswith("amq.") and not _exists(broker.get_exchange,
                                                   broker_exchange(vhost, name)):
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
            broker_exchange(vhost, name),
            method.exchange_type,  # type: ignore[arg-type]  # checked above
            durable=bool(method.durable),
            auto_delete=bool(method.auto_delete), internal=bool(method.internal),
            alternate_exchange=(broker_exchange(vhost, str(alternate))
                                if alternate is not None else None),
            arguments=binding_arguments(arguments) or None)
    if not method.nowait:
        channel.reply(commands.Exchange.DeclareOk())


async def _exchange(channel: Channel, name: str, method: pamqp_base.Frame) -> None:
    if name == "":
        return
    try:  # another cluster node may have declared it just now: looked up after a re-read
        await channel.server.broker.look_up_exchange(
            broker_exchange(channel.connection.vhost, name))
    except (UnknownExchangeError, NotFoundError):
        raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no exchange '{name}' in vhost "
                           f"'{channel.connection.vhost}'", *method_ids(method)) from None


async def on_exchange_delete(channel: Channel, method: commands.Exchange.Delete) -> None:
    broker = channel.server.broker
    if method.exchange.startswith("amq.") or method.exchange == "":
        raise ChannelError(f.ACCESS_REFUSED, "ACCESS_REFUSED - cannot delete a reserved "
                           "exchange", 40, 20)
    name = broker_exchange(channel.connection.vhost, method.exchange)
    try:  # known after a re-read when another cluster node declared it just now
        await broker.look_up_exchange(name)
    except (UnknownExchangeError, NotFoundError):
        pass  # deleting what does not exist is fine (RabbitMQ >= 3.2)
    else:
        await broker.delete_exchange(name, if_unused=bool(method.if_unused))
    if not method.nowait:
        channel.reply(commands.Exchange.DeleteOk())


async def on_exchange_bind(channel: Channel, method: commands.Exchange.Bind) -> None:
    await _exchange_binding(channel, method, commands.Exchange.BindOk())


async def on_exchange_unbind(channel: Channel, method: commands.Exchange.Unbind) -> None:
    await _exchange_binding(channel, method, commands.Exchange.UnbindOk())


async def _exchange_binding(
        channel: Channel, method: commands.Exchange.Bind | commands.Exchange.Unbind,
        reply: pamqp_base.Frame) -> None:
    """Exchange-to-exchange bind or unbind (RabbitMQ's extension)."""
    await _exchange(channel, method.source, method)
    await _exchange(channel, method.destination, method)
    broker = channel.server.broker
    change = broker.bind if isinstance(method, commands.Exchange.Bind) else broker.unbind
    vhost = channel.connection.vhost
    await change(broker_exchange(vhost, method.source), "exchange",
                 broker_exchange(vhost, method.destination), method.routing_key,
                 binding_arguments(method.arguments))
    if not method.nowait:
        channel.reply(reply)

# queues


def queue_name(channel: Channel, name: str, method: pamqp_base.Frame) -> str:
    if name:
        return name
    if not channel.last_queue:
        raise ChannelError(f.NOT_FOUND, "NOT_FOUND - no previously declared queue",
                           *method_ids(method))
    return channel.last_queue


def check_exclusive(channel: Channel, topic: str, name: str, method: pamqp_base.Frame) -> None:
    use = channel.server.queues.get(topic)
    if use is not None and use.exclusive_owner not in (None, channel.connection):
        raise ChannelError(f.RESOURCE_LOCKED, f"RESOURCE_LOCKED - cannot obtain exclusive "
                           f"access to locked queue '{name}' in vhost "
                           f"'{channel.connection.vhost}'", *method_ids(method))


async def on_queue_declare(channel: Channel, method: commands.Queue.Declare) -> None:
    connection = channel.connection
    server = connection.server
    broker = server.broker
    name = method.queue
    if name == REPLY_TO_QUEUE or name.startswith(REPLY_TO_QUEUE + "."):
        channel.reply(commands.Queue.DeclareOk(name, 0, 0))
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
    topic = queue_topic(connection.vhost, name)
    check_exclusive(channel, topic, name, method)
    if method.passive:
        if is_stream(broker, topic):
            await _declare_stream(channel, topic, name, method)
            return
        try:
            info = await broker.get_queue(topic)
        except (UnknownQueueError, NotFoundError):
            raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no queue '{name}' in vhost "
                               f"'{connection.vhost}'", 50, 10) from None
    else:
        options = queue_options(method.arguments, bool(method.durable),
                                server.settings.consumer_timeout_ms)
        config = options.config
        if config.dead_letter_exchange is not None:
            # dead letters stay in the vhost ("" of a vhost is its own default exchange)
            config = dataclasses.replace(config, dead_letter_exchange=broker_exchange(
                connection.vhost, config.dead_letter_exchange))
        if options.queue_type == "stream" or is_stream(broker, topic):
            await _declare_stream(channel, topic, name, method)
            return
        try:
            info = await _declare(broker, topic, config)
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
    channel.last_queue = name
    use_now = server.queues.get(topic)
    consumers = len(use_now.consumers) if use_now is not None else 0
    if not method.nowait:
        channel.reply(commands.Queue.DeclareOk(name, info.ready + info.delayed, consumers))


async def _declare_stream(channel: Channel, topic: str, name: str,
                          method: commands.Queue.Declare) -> None:
    """A stream queue is a Conveyor topic (created with one partition if missing)."""
    broker = channel.server.broker
    try:
        info = broker.get_topic(topic)
    except (UnknownTopicError, NotFoundError):
        if method.passive:
            raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no queue '{name}' in vhost "
                               f"'{channel.connection.vhost}'", 50, 10) from None
        info = await broker.create_topic(topic, 1)
    if info.kind != "topic":
        raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - inequivalent "
                           f"arg 'x-queue-type' for queue '{name}'", 50, 10)
    channel.last_queue = name
    count = 0
    for partition in range(info.partitions):
        offsets = broker.offsets(topic, partition)
        count += offsets.high_watermark - offsets.log_start_offset
    use = channel.server.queues.get(topic)
    if not method.nowait:
        channel.reply(commands.Queue.DeclareOk(
            name, count, len(use.consumers) if use is not None else 0))


async def on_queue_bind(channel: Channel, method: commands.Queue.Bind) -> None:
    name = queue_name(channel, method.queue, method)
    await _exchange(channel, method.exchange, method)
    topic = queue_topic(channel.connection.vhost, name)
    check_exclusive(channel, topic, name, method)
    if method.exchange == "":
        raise ChannelError(f.ACCESS_REFUSED, "ACCESS_REFUSED - operation not permitted on "
                           "the default exchange", 50, 20)
    broker = channel.server.broker
    kind: Any = "topic" if is_stream(broker, topic) else "queue"
    if kind == "queue":
        await require_queue(channel, topic, name, method)
    await broker.bind(broker_exchange(channel.connection.vhost, method.exchange), kind, topic,
                      method.routing_key,
                      binding_arguments(method.arguments))
    if not method.nowait:
        channel.reply(commands.Queue.BindOk())


async def on_queue_unbind(channel: Channel, method: commands.Queue.Unbind) -> None:
    name = queue_name(channel, method.queue, method)
    await _exchange(channel, method.exchange, method)
    topic = queue_topic(channel.connection.vhost, name)
    broker = channel.server.broker
    kind: Any = "topic" if is_stream(broker, topic) else "queue"
    if kind == "queue":
        await require_queue(channel, topic, name, method)
    await broker.unbind(broker_exchange(channel.connection.vhost, method.exchange), kind,
                        topic, method.routing_key,
                        binding_arguments(method.arguments))
    channel.reply(commands.Queue.UnbindOk())


async def require_queue(channel: Channel, topic: str, name: str, method: pamqp_base.Frame) -> None:
    try:
        await channel.server.broker.get_queue(topic)
    except (UnknownQueueError, NotFoundError):
        raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no queue '{name}' in vhost "
                           f"'{channel.connection.vhost}'", *method_ids(method)) from None


async def on_queue_purge(channel: Channel, method: commands.Queue.Purge) -> None:
    name = queue_name(channel, method.queue, method)
    topic = queue_topic(channel.connection.vhost, name)
    check_exclusive(channel, topic, name, method)
    await require_queue(channel, topic, name, method)
    count = await channel.server.broker.purge_queue(topic)
    if not method.nowait:
        channel.reply(commands.Queue.PurgeOk(count))


async def on_queue_delete(channel: Channel, method: commands.Queue.Delete) -> None:
    server = channel.server
    name = queue_name(channel, method.queue, method)
    topic = queue_topic(channel.connection.vhost, name)
    check_exclusive(channel, topic, name, method)
    use = server.queues.get(topic)
    if method.if_unused and use is not None and use.consumers:
        raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - queue '{name}' "
                           "in use", 50, 40)
    count = 0
    if is_stream(server.broker, topic):
        await server.broker.delete_topic(topic)
        await server.queue_gone(topic)
        if not method.nowait:
            channel.reply(commands.Queue.DeleteOk(0))
        return
    try:
        count = await server.broker.delete_queue(topic, if_empty=bool(method.if_empty))
    except (UnknownQueueError, NotFoundError):
        count = 0
    except PreconditionFailedError:
        raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - queue '{name}' "
                           "not empty", 50, 40) from None
    channel.connection.exclusive_queues.discard(topic)
    await server.queue_gone(topic)
    if not method.nowait:
        channel.reply(commands.Queue.DeleteOk(count))

# basic


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


def _exists(getter: Callable[[str], Any], name: str) -> bool:
    try:
        getter(name)
    except (NotFoundError, UnknownExchangeError):
        return False
    return True
