"""The listener contract: how a protocol plugs into the server.

A protocol package exposes ``conveyor.protocols.<name>.listener.start_listener``;
the server finds it by name in ``LISTENER_MODULES``. Adding a protocol is adding
one line there.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from conveyor.server.counters import ListenerCounters  # part of the contract: re-exported
from conveyor.server.tls import RefusalLog, ServerTls, is_tls, peer_principal_name
from conveyor.server.tls_gate import Endpoints, open_endpoints

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.connections import ConnectionRegistry
    from conveyor.limits import ServerLimits
    from conveyor.security.api import SecurityModel

__all__ = ["Endpoints", "ListenerContext", "ListenerCounters", "Observability", "RefusalLog",
           "RunningListener", "ServerTls", "available_listeners", "bind_endpoints",
           "find_listener", "is_tls", "listener_counters", "peer_principal_name",
           "shared_connections", "shared_limits"]

LISTENER_MODULES: dict[str, str] = {
    "kafka": "conveyor.protocols.kafka.listener",
    "amqp": "conveyor.protocols.amqp.listener",
    "http": "conveyor.protocols.http.listener",
    "sqs": "conveyor.protocols.sqs.listener",
}


@dataclass(frozen=True, slots=True)
class ListenerContext:
    host: str
    port: int  # 0: any free port
    settings: Mapping[str, Any] = field(default_factory=dict)
    advertised_host: str = "127.0.0.1"
    # The server-wide budget, publisher flow and connection gates (None: a listener
    # started alone gets its own, see ``shared_limits``).
    limits: ServerLimits | None = None
    # This listener's traffic counters, read by /metrics (None: a listener started alone
    # counts into its own, see ``listener_counters``).
    counters: ListenerCounters | None = None
    # What the server offers the HTTP listener for /metrics and /ready (None: alone).
    observability: Observability | None = None
    # Live connections, for the management API (None: a listener started alone gets its own).
    connections: ConnectionRegistry | None = None
    # Users, permissions, ACLs (None: a listener started alone gets an open model with
    # auth off and the loopback-only guest, see ``conveyor.security.model.security_of``).
    security: SecurityModel | None = None
    # TLS (config.ListenerConfig): the context holder (None: plaintext only), a separate
    # TLS port (None: TLS on ``port``), whether a plain port stays open beside it.
    tls: ServerTls | None = None
    tls_port: int | None = None
    plaintext: bool = True
    # Refused connections (wrong protocol on a port, failed handshakes), rate-limited.
    refusals: RefusalLog | None = None
    # Several nodes on one PostgreSQL: this node's conveyor.cluster.node.ClusterNode
    # (None: a single node, which leads and coordinates everything).
    cluster: Any = None
    # Bind with SO_REUSEPORT: several node processes on one machine share this port.
    reuse_port: bool = False


class Observability(Protocol):
    """The server's side of /metrics and /ready, handed to the HTTP listener."""

    async def render_metrics(self, accept: str) -> tuple[bytes, str]:
        """The exposition (text format, or OpenMetrics when ``accept`` asks) and its type."""
        ...

    def readiness(self) -> dict[str, str]:
        """Check name -> "ok" or what is wrong; ready when every value is "ok"."""
        ...

    def cluster_status(self) -> dict[str, Any] | None:
        """Nodes, leases and owners when several nodes share PostgreSQL; None: one node."""
        ...

    async def cluster_lag(self) -> dict[str, Any] | None:
        """Per consumer group its lag, per queue its backlog (read where current); None:
        one node."""
        ...


def listener_counters(context: ListenerContext, name: str) -> ListenerCounters:
    return context.counters if context.counters is not None else ListenerCounters(name)


def shared_connections(context: ListenerContext) -> ConnectionRegistry:
    from conveyor.connections import ConnectionRegistry

    return context.connections if context.connections is not None else ConnectionRegistry()


def shared_limits(context: ListenerContext) -> ServerLimits:
    from conveyor.limits import ServerLimits

    return context.limits if context.limits is not None else ServerLimits()


async def bind_endpoints(context: ListenerContext, name: str, factory: Any,
                         handshake_timeout_ms: int, http: bool = False) -> Endpoints:
    """Bind a listener's ports as its context says (plain, TLS, or both); see
    server/tls_gate.py for how each refuses a client speaking the other."""
    return await open_endpoints(
        factory, name, context.host, context.port, tls=context.tls, tls_port=context.tls_port,
        plaintext=context.plaintext, refusals=context.refusals,
        counters=listener_counters(context, name), handshake_timeout_ms=handshake_timeout_ms,
        http=http, reuse_port=context.reuse_port)


class RunningListener(Protocol):
    port: int

    async def close(self) -> None:
        """Stop accepting, then close every connection."""
        ...


StartListener = Callable[["Broker", ListenerContext], Awaitable[RunningListener]]


def find_listener(name: str) -> StartListener:
    """Return the protocol's ``start_listener``; unknown names are a config error."""
    from conveyor.errors import InvalidConfigError

    module_name = LISTENER_MODULES.get(name)
    if module_name is None:
        raise InvalidConfigError("unknown listener", name=name, known=sorted(LISTENER_MODULES))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise InvalidConfigError("listener not available in this build", name=name) from None
        raise
    start: StartListener = module.start_listener
    return start


def available_listeners() -> list[str]:
    """Names whose protocol module is present in this build."""
    import importlib.util

    return [
        name
        for name, module_name in LISTENER_MODULES.items()
        if importlib.util.find_spec(module_name) is not None
    ]
