"""The connection registry: which client connections, channels and consumers are live.

Owns: a protocol-neutral view of live connections for the management API
(``/api/connections``, ``/api/channels``, ``/api/consumers``) and of the running
listeners (``/api/overview``'s ``listeners``).
Must not know: any protocol's classes. Each listener registers one *source* at
start (a function that describes its live connections when asked) and removes it
when it closes; nothing runs per message or per connection, so the registry costs
the hot paths nothing. Snapshots are built only when the API asks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

SNAPSHOT_CONNECTIONS_MAX = 10_000  # per source: the listeners' own connections_max default


@dataclass(frozen=True, slots=True)
class ConsumerView:
    tag: str
    queue: str  # the broker's queue (or topic) name
    channel: int
    ack_required: bool = True
    prefetch: int = 0  # 0: unlimited
    exclusive: bool = False
    unacked: int = 0


@dataclass(frozen=True, slots=True)
class ChannelView:
    number: int
    consumers: int = 0
    unacked: int = 0
    prefetch: int = 0
    confirm: bool = False
    transactional: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionView:
    protocol: str  # "amqp", "kafka", "http", "sqs"
    peer: str  # "host:port" of the client
    local_port: int = 0
    user: str = ""
    vhost: str = "/"
    identifier: str = ""  # unique within the protocol (a connection id or the peer)
    client_properties: dict[str, Any] = field(default_factory=dict)
    channels: tuple[ChannelView, ...] = ()
    consumers: tuple[ConsumerView, ...] = ()


Snapshot = Callable[[], Iterable[ConnectionView]]


@dataclass(frozen=True, slots=True)
class ListenerView:
    protocol: str
    port: int


class ConnectionRegistry:
    """Sources of live connections, one per running listener."""

    def __init__(self) -> None:
        # registration id -> (listener, its snapshot function)
        self._sources: dict[int, tuple[ListenerView, Snapshot]] = {}
        self._next_id = 0

    def add_source(self, protocol: str, port: int, snapshot: Snapshot) -> Callable[[], None]:
        """Register a listener; returns the function that removes it (call it on close)."""
        self._next_id += 1
        registration = self._next_id
        self._sources[registration] = (ListenerView(protocol, port), snapshot)
        return lambda: self._sources.pop(registration, None) and None

    def listeners(self) -> list[ListenerView]:
        return [listener for listener, _ in self._sources.values()]

    def snapshot(self) -> list[ConnectionView]:
        connections: list[ConnectionView] = []
        for _, describe in self._sources.values():
            for count, view in enumerate(describe()):
                if count >= SNAPSHOT_CONNECTIONS_MAX:
                    break
                connections.append(view)
        return connections


def peer_text(peername: object) -> str:
    """A transport's ``peername`` extra as ``host:port``."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername or "")
