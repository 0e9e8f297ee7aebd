"""Publishing on an AMQP channel: checks, the broker's routing, storing, confirms.

Owns: what a batch of Basic.Publish does: each publish is checked (exchange,
user-id, direct reply-to, expiration) and turned into a message; the broker's
exchanges (``Broker.route``: bindings, alternate exchanges, the default exchange
with its queue alias) say where it goes; unroutable mandatory messages return; runs
that go the same way are appended together to the destinations the broker named
(one call and one fsync per destination, a fan-out's destinations concurrently);
the confirms the mode machine numbered are answered once stored. The one AMQP
addition to the broker's routing: the default exchange also reaches a stream queue
(a topic) by its name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from conveyor.broker.types import Message, PublishResult
from conveyor.errors import (
    InvalidRequestError,
    NotFoundError,
    OperatingError,
    RecordTooLargeError,
    UnknownExchangeError,
)
from conveyor.protocols.amqp.names import QualifiedNameError, broker_exchange, queue_topic

from . import frames as f
from .channel_machine import Store, confirm_replies
from .link import REPLY_TO_QUEUE, ChannelError, ChannelLink, ConnectionError_, is_stream
from .machine import PublishReceived
from .messages import (
    Derived,
    Properties,
    PropertiesError,
    decode_properties,
    derive,
    encode_properties,
    publish_message,
)
from .permissions import authorize_publish
from .server import AmqpServer, Consumer, ConsumerChannel

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.broker.types import ExchangeInfo

log = logging.getLogger("conveyor.amqp")


class PublishingChannel(Protocol):
    """What publishing needs of a channel."""

    number: int
    connection: ChannelLink
    server: AmqpServer
    reply_to_name: str | None
    closed: bool

    @property
    def confirm(self) -> bool: ...


@dataclass(slots=True)
class Planned:
    """One checked publish: its confirm tag (0: none), message and where it goes."""

    tag: int
    message: Message
    destinations: tuple[str, ...]  # the broker's routing (empty: unroutable)


# (exchange, routing key) -> destinations; (exchange, None) -> (routes by key only,)
RouteMemo = dict[tuple[str, str | None], tuple[Any, ...]]

# Property bytes -> their decoded properties and what a record of them carries
# (messages.derive): publishers send the same few property byte strings over and over,
# so a publish is neither decoded nor walked field by field again (publish_message and
# its properties were ~12 % of the broker in the publish profile). Only valid property
# bytes are kept (a failure raises before), short ones, a bounded number. The shared
# Properties are never changed in place (a reply-to is a ``replace``).
DECODED_CACHED_MAX = 256
DECODED_CACHED_BYTES_MAX = 256
_decoded: dict[bytes, tuple[Properties, Derived]] = {}


def _remember(raw: bytes, properties: Properties, derived: Derived) -> None:
    if len(raw) > DECODED_CACHED_BYTES_MAX:
        return
    if len(_decoded) >= DECODED_CACHED_MAX:
        _decoded.clear()
    _decoded[raw] = (properties, derived)


async def publish_batch(channel: PublishingChannel, store: Store) -> None:
    """Route, store (durably), return unroutable mandatory messages, confirm."""
    await _look_up_missing(channel, store)
    connection = channel.connection
    now_ms = channel.server.broker.clock.wall_ms()
    plans: list[Planned] = []
    returns: list[bytes] = []
    failure: ChannelError | None = None
    routes: RouteMemo = {}  # the batch is planned without an await: one routing table
    for event, tag in zip(store.publishes, store.tags, strict=True):
        method = event.method
        try:
            plan, direct = _plan(channel, event, now_ms, routes)
        except ChannelError as error:
            failure = error
            break
        if direct is not None:
            target, consumer, properties = direct
            target.deliver_direct(consumer, method.exchange, method.routing_key,
                                   properties, event.body)
        elif not plan.destinations and method.mandatory:
            returns += f.return_frames(
                channel.number, f.NO_ROUTE, "NO_ROUTE", method.exchange, method.routing_key,
                event.properties, event.body, connection.frame_bytes_max)
        plan.tag = tag
        plans.append(plan)
    if returns:
        connection.write_parts(returns)
    outcomes = await _store(channel, plans)
    if channel.confirm and not channel.closed:
        _confirm(channel, outcomes)
    if failure is not None:
        raise failure


async def _look_up_missing(channel: PublishingChannel, store: Store) -> None:
    """On a cluster node, a batch with a publish to an exchange this node does not know,
    or that routes nowhere here, waits for one re-read of the catalog (rate-limited:
    conveyor/cluster/catalog.py) before it is planned, so a bind or declare made on
    another node moments ago routes the message instead of dropping it. A headers
    exchange is not looked at (its route needs the decoded properties)."""
    broker = channel.server.broker
    if not broker.catalog_shared:
        return
    vhost = channel.connection.vhost
    seen: set[tuple[str, str]] = set()
    for event in store.publishes:
        method = event.method
        key = (method.exchange, method.routing_key)
        if key in seen or method.routing_key.startswith(REPLY_TO_QUEUE + "."):
            continue
        seen.add(key)
        try:
            name = broker_exchange(vhost, method.exchange)
        except QualifiedNameError:
            continue  # refused when planned
        if not broker.routing.exists(name) or (
                broker.routes_by_key_only(name)
                and not broker.route(name, method.routing_key)
                and not (method.exchange == ""
                         and is_stream(broker, queue_topic(vhost, method.routing_key)))):
            await broker.catalog_miss()
            return


def _exchange_info(broker: Broker, broker_name: str, exchange: str, vhost: str
                   ) -> ExchangeInfo:
    """The broker's exchange ``broker_name``; NOT_FOUND names the client's ``exchange``."""
    try:
        return broker.get_exchange(broker_name)
    except (UnknownExchangeError, NotFoundError):
        raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - no exchange '{exchange}' in "
                           f"vhost '{vhost}'", 60, 40) from None


def _plan(channel: PublishingChannel, event: PublishReceived, now_ms: int, routes: RouteMemo
          ) -> tuple[Planned, tuple[ConsumerChannel, Consumer, bytes] | None]:
    """Check a publish and build its message; where it goes, or the direct reply-to
    channel it is handed to (never stored)."""
    method = event.method
    connection = channel.connection
    broker = connection.server.broker
    exchange = method.exchange  # the client's name: permissions, headers, returns
    vhost = connection.vhost
    try:
        broker_name = broker_exchange(vhost, exchange)  # the broker's, in the vhost
    except QualifiedNameError as error:
        raise ChannelError(f.ACCESS_REFUSED, str(error), 60, 40) from None
    if method.immediate:
        raise ConnectionError_(f.NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true",
                               60, 40)
    info = None
    if exchange and (broker_name, None) not in routes:  # checked once per batch
        info = _exchange_info(broker, broker_name, exchange, vhost)
        if info.internal:
            raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - cannot publish to "
                               f"internal exchange '{exchange}'", 60, 40)
    security = connection.server.security
    if security is not None:
        if exchange and info is None:  # routes memoised this batch: its type is needed
            info = _exchange_info(broker, broker_name, exchange, vhost)
        authorize_publish(security, connection.principal, vhost, exchange,
                          method.routing_key, info is not None and info.type == "topic")
    raw, properties, derived = _properties(channel, event.properties)
    try:
        message = publish_message(exchange, method.routing_key, raw, properties,
                                  event.body, now_ms, derived)
    except ValueError:
        raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - invalid "
                           f"expiration '{properties.expiration}'", 60, 40) from None
    if exchange == "" and method.routing_key.startswith(REPLY_TO_QUEUE + "."):
        target = connection.server.reply_channels.get(method.routing_key)
        unrouted = Planned(0, message, ())
        if target is None or target.closed:
            return unrouted, None
        consumer = next(iter(target.consumers.values()), None)
        if consumer is None:
            return unrouted, None
        return unrouted, (target, consumer, raw)  # delivered, never stored
    destinations = _route(channel, broker_name, method.routing_key, message, routes)
    return Planned(0, message, destinations), None


def _properties(channel: PublishingChannel, raw: bytes
                ) -> tuple[bytes, Properties, Derived | None]:
    """A publish's property bytes (a direct reply-to's rewritten), their properties and
    what its record carries (None: publish_message derives it, or finds the expiration
    invalid); checks user-id and the reply-to consumer."""
    connection = channel.connection
    known = _decoded.get(raw)
    derived: Derived | None = None
    if known is not None:
        properties, derived = known
    else:
        try:
            properties = decode_properties(raw)
        except PropertiesError as error:
            raise ConnectionError_(f.SYNTAX_ERROR, str(error), 60, 40) from None
    if properties.user_id is not None and properties.user_id != connection.user:
        raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - user_id property "
                           f"set to '{properties.user_id}' but authenticated user was "
                           f"'{connection.user}'", 60, 40)
    if properties.reply_to == REPLY_TO_QUEUE:
        if channel.reply_to_name is None:
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - fast reply "
                               "consumer does not exist", 60, 40)
        properties = replace(properties, reply_to=channel.reply_to_name)
        return encode_properties(properties), properties, None
    if derived is None:
        try:
            derived = derive(properties)
        except ValueError:
            return raw, properties, None  # publish_message raises it again: answered there
        _remember(raw, properties, derived)
    return raw, properties, derived


def _route(channel: PublishingChannel, exchange: str, routing_key: str, message: Message,
           routes: RouteMemo) -> tuple[str, ...]:
    """Where the broker's exchanges send a message (``exchange``: the broker's name, in
    the connection's vhost). The one AMQP addition: the default exchange also reaches
    a stream queue (a topic) by its name, which the broker's
    default exchange (queues only) does not. Within one batch a routing key is routed
    once when the exchange ignores headers (``routes``: (exchange, key) -> where,
    (exchange, None) -> whether it routes by key only)."""
    found = routes.get((exchange, routing_key))
    if found is not None:
        return found
    broker = channel.server.broker
    found = tuple(d.name for d in broker.route(exchange, routing_key, message.headers))
    if not found and exchange == broker_exchange(channel.connection.vhost, ""):
        topic = queue_topic(channel.connection.vhost, routing_key)
        if is_stream(broker, topic):
            found = (topic,)
    by_key = routes.get((exchange, None))
    if by_key is None:
        by_key = routes[(exchange, None)] = (broker.routes_by_key_only(exchange),)
    if by_key[0]:
        routes[(exchange, routing_key)] = found
    return found


async def _store(channel: PublishingChannel, plans: list[Planned]) -> list[tuple[int, bool]]:
    """Publish runs of messages that go the same way together to the destinations the
    broker's exchanges named; (confirm tag, stored)."""
    broker = channel.server.broker
    outcomes: list[tuple[int, bool]] = []
    index = 0
    while index < len(plans):
        destinations = plans[index].destinations
        end = index + 1
        while end < len(plans) and plans[end].destinations == destinations:
            end += 1
        group = plans[index:end]
        messages = [plan.message for plan in group]
        ok = [True] * len(group)
        if destinations:  # an unroutable message is confirmed (spec: no route)
            try:
                if len(destinations) == 1:  # no task per publish in the common case
                    per_destination = [await broker.publish(destinations[0], messages)]
                else:  # a fan-out: the destinations' appends (and fsyncs) overlap
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
        outcomes += [(plan.tag, good) for plan, good in zip(group, ok, strict=True)]
        index = end
    return outcomes


def _confirm(channel: PublishingChannel, outcomes: list[tuple[int, bool]]) -> None:
    parts = [f.ack_frame(channel.number, tag, multiple) if ack
             else f.nack_frame(channel.number, tag, multiple)
             for ack, tag, multiple in confirm_replies(outcomes)]
    if parts:
        channel.connection.write_parts(parts)


def _mark_dropped(ok: list[bool], results: Sequence[PublishResult]) -> None:
    """A reject-publish overflow drops a message (offset -1): nack it."""
    for index, result in enumerate(results):
        if index < len(ok) and result.offset < 0:
            ok[index] = False
