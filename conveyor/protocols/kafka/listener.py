"""The Kafka listener: binds the port and wires settings, handlers and connections.

Owns: ``start_listener`` (the listener contract in docs/dev/TEAM.md) and the
running listener's ``close`` (stop accepting, then close every connection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from conveyor.config import listener_limits
from conveyor.connections import ConnectionView, peer_text
from conveyor.errors import InvalidConfigError
from conveyor.protocols.kafka.adapter import KafkaConnection, connection_factory
from conveyor.protocols.kafka.admin_handlers import Node
from conveyor.protocols.kafka.handlers import KafkaHandlers
from conveyor.protocols.kafka.settings import load_settings
from conveyor.security.model import security_of
from conveyor.server.listeners import (
    Endpoints,
    bind_endpoints,
    listener_counters,
    shared_connections,
    shared_limits,
)
from conveyor.tasks import Supervisor

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.server.listeners import ListenerContext


class KafkaListener:
    def __init__(self, server: Endpoints, connections: set[KafkaConnection],
                 tasks: Supervisor) -> None:
        self._server = server
        self._connections = connections
        self._tasks = tasks  # the connections' workers, produces and share-session releases
        self.port: int = server.port
        # SSL / SASL_SSL: the port itself speaks TLS (Kafka: one protocol per listener port)
        self.tls_port: int | None = server.tls_port
        self.unregister: Callable[[], None] = lambda: None

    async def close(self) -> None:
        self.unregister()
        self._server.close()
        for connection in list(self._connections):
            await connection.close()
        await self._tasks.close()  # produces and session releases finish; workers are stopped
        await self._server.wait_closed()


async def start_listener(broker: Broker, context: ListenerContext) -> KafkaListener:
    settings = load_settings(context.settings)
    connections: set[KafkaConnection] = set()
    tasks = Supervisor("kafka-listener")
    # The advertised port is only known after binding: handlers read it from the node,
    # which is filled in right after create_server returns.
    cluster = context.cluster  # several nodes: the node id is the cluster's
    node_id = cluster.node_id if cluster is not None else settings.node_id
    node = Node(node_id, context.advertised_host, context.port, settings.cluster_id)
    counters = listener_counters(context, "kafka")
    handlers = KafkaHandlers(broker, settings, node, counters, security_of(context), cluster)
    limits = listener_limits("kafka", context.settings)
    if settings.security_protocol.endswith("SSL") and context.tls is None:
        raise InvalidConfigError(f"kafka.security_protocol = {settings.security_protocol}"
                                 " needs a TLS certificate")
    server = await bind_endpoints(
        context if settings.security_protocol.endswith("SSL") else replace(context, tls=None),
        "kafka",
        connection_factory(handlers.handle, settings.frame_bytes_max, connections, limits,
                           shared_limits(context), counters, tasks, settings.security_protocol),
        limits.handshake_timeout_ms)
    listener = KafkaListener(server, connections, tasks)
    listener.unregister = shared_connections(context).add_source("kafka", listener.port, lambda: (
        ConnectionView("kafka", peer_text(connection.transport_peer()), listener.port,
                       connection.state.authenticated_user or "", identifier=connection.state.peer)
        for connection in list(connections)))
    handlers.node = Node(node_id, context.advertised_host, listener.port,
                         settings.cluster_id)
    return listener
