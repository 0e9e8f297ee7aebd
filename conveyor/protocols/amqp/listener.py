"""The AMQP 0-9-1 listener: binds the port and wires settings, server state and connections.

Owns: ``start_listener`` (the listener contract in docs/dev/TEAM.md) and the running
listener's ``close`` (stop accepting, send Connection.Close 320 to every client, release
what their channels hold). At start it deletes the queues declared non-durable, which
RabbitMQ too forgets on a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from conveyor.config import listener_limits
from conveyor.errors import OperatingError
from conveyor.protocols.amqp.adapter import AmqpServer, make_protocol_factory
from conveyor.protocols.amqp.settings import load_settings
from conveyor.server.listeners import listener_counters, shared_limits

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.server.listeners import ListenerContext


class AmqpListener:
    def __init__(self, server: asyncio.Server, state: AmqpServer) -> None:
        self._server = server
        self.state = state
        sockets = server.sockets
        self.port: int = sockets[0].getsockname()[1] if sockets else 0

    async def close(self) -> None:
        self._server.close()
        for connection in list(self.state.connections):
            await connection.close()
        await self._server.wait_closed()


async def start_listener(broker: Broker, context: ListenerContext) -> AmqpListener:
    settings = load_settings(context.settings)
    for queue in await broker.list_queues():
        if not queue.config.durable:
            with contextlib.suppress(OperatingError):
                await broker.delete_queue(queue.name)
    state = AmqpServer(broker, settings, listener_limits("amqp", context.settings),
                       shared_limits(context), listener_counters(context, "amqp"))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        make_protocol_factory(state), context.host, context.port, reuse_address=True)
    return AmqpListener(server, state)
