"""The AMQP 0-9-1 listener: binds the port and wires settings, server state and connections.

Owns: ``start_listener`` (the listener contract in docs/dev/TEAM.md) and the running
listener's ``close`` (stop accepting, send Connection.Close 320 to every client, release
what their channels hold). At start it deletes the queues declared non-durable, which
RabbitMQ too forgets on a restart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from conveyor.config import listener_limits
from conveyor.connections import ChannelView, ConnectionView, ConsumerView, peer_text
from conveyor.errors import OperatingError
from conveyor.protocols.amqp.adapter import AmqpConnection, AmqpServer, make_protocol_factory
from conveyor.protocols.amqp.settings import load_settings
from conveyor.security.model import security_of
from conveyor.server.listeners import (
    Endpoints,
    bind_endpoints,
    listener_counters,
    shared_connections,
    shared_limits,
)

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.server.listeners import ListenerContext


class AmqpListener:
    def __init__(self, server: Endpoints, state: AmqpServer) -> None:
        self._server = server
        self.state = state
        self.port: int = server.port  # plain AMQP (the amqps port when plain is off)
        self.tls_port: int | None = server.tls_port  # amqps (RabbitMQ's 5671)
        self.unregister: Callable[[], None] = lambda: None

    async def close(self) -> None:
        self.unregister()
        self._server.close()
        for connection in list(self.state.connections):
            await connection.close()
        await self.state.tasks.close()  # what closed connections left (their cleanup) ends
        await self._server.wait_closed()


async def start_listener(broker: Broker, context: ListenerContext) -> AmqpListener:
    settings = load_settings(context.settings)
    for queue in await broker.list_queues():
        if not queue.config.durable:
            with contextlib.suppress(OperatingError):
                await broker.delete_queue(queue.name)
    state = AmqpServer(broker, settings, listener_limits("amqp", context.settings),
                       shared_limits(context), listener_counters(context, "amqp"),
                       security_of(context))
    server = await bind_endpoints(context, "amqp", make_protocol_factory(state),
                                  state.limits.handshake_timeout_ms)
    listener = AmqpListener(server, state)
    listener.unregister = shared_connections(context).add_source(
        "amqp", listener.port, lambda: describe_connections(state, listener.port))
    return listener


def describe_connections(state: AmqpServer, port: int) -> Iterator[ConnectionView]:
    """The registry's view of live AMQP connections (built only when the API asks)."""
    for connection in list(state.connections):
        if not isinstance(connection, AmqpConnection):
            continue
        channels: list[ChannelView] = []
        consumers: list[ConsumerView] = []
        for number, channel in list(connection.session.channels.items()):
            channels.append(ChannelView(
                number, len(channel.consumers), len(channel.unacked),
                channel.prefetch_global or channel.prefetch_consumer, channel.confirm,
                channel.transactional))
            consumers.extend(
                ConsumerView(consumer.tag, consumer.topic, number, not consumer.no_ack,
                             consumer.prefetch, consumer.exclusive, consumer.unacked)
                for consumer in list(channel.consumers.values()))
        transport = connection.transport
        peer = peer_text(transport.get_extra_info("peername")) if transport else ""
        yield ConnectionView(
            "amqp", peer, port, connection.user, connection.vhost,
            str(connection.connection_id), dict(connection.client_properties),
            tuple(channels), tuple(consumers))
