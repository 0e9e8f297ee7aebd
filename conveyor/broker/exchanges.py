"""Exchanges: exchanges, bindings and routing, persisted through the StateStore.

Owns: the in-memory ``RoutingTable`` (routing.py: the pure matching rules), loading
it at open (predeclared exchanges; a binding whose exchange was not durable goes),
declare/delete/bind/unbind with their state-store rows, and ``plan``: where each
message of a publish goes. It never publishes: the facade turns a plan into
appends, so routing depends on nothing that appends.
May call: the routing table, the state store, the topic registry (does a topic
exist) and the queue-existence predicate it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from conveyor.errors import (
    InvalidRequestError,
    UnknownExchangeError,
    UnknownQueueError,
    UnknownTopicError,
)
from conveyor.storage.state_store import BindingRow, ExchangeRow, StateStore
from conveyor.storage.text import check_storable

from .routing import PREDECLARED, Destination, RoutingTable, exchange_info
from .topics import TopicRegistry
from .types import (
    HEADER_EXCHANGE,
    HEADER_ROUTING_KEY,
    Binding,
    DestinationKind,
    ExchangeInfo,
    ExchangeType,
    Headers,
    Message,
)


class Exchanges:
    def __init__(self, state_store: StateStore, topics: TopicRegistry,
                 queue_exists: Callable[[str], bool],
                 queue_alias: Callable[[str], str] | None = None) -> None:
        self.state_store = state_store
        self.topics = topics
        self.queue_exists = queue_exists
        self.routing = RoutingTable(queue_exists, queue_alias)
        # told after a committed change of durable exchanges or bindings (a cluster node
        # tells the others: conveyor/cluster/catalog.py)
        self.on_change: Callable[[], None] = _nothing
        # a re-read (``reload``) is applied only when no change of this node ran while it
        # read: changes in progress, and a count of changes begun
        self._changing = 0
        self._changes = 0

    @contextlib.asynccontextmanager
    async def _change(self) -> AsyncIterator[None]:
        self._changing += 1
        self._changes += 1
        try:
            yield
        finally:
            self._changing -= 1

    async def load(self) -> None:
        for exchange in await self.state_store.load_exchanges():
            self.routing.declare(_exchange_from_row(exchange))
        for name, exchange_type in PREDECLARED:
            if not self.routing.exists(name):
                self.routing.declare(exchange_info(name, exchange_type))
                self.state_store.save_exchange(_exchange_row(self.routing.get(name)))
        for row in await self.state_store.load_bindings():
            binding = Binding(
                row.source, row.destination_kind,  # type: ignore[arg-type]
                row.destination, row.routing_key, row.arguments,
            )
            if not self.routing.exists(row.source) or (
                row.destination_kind == "exchange" and not self.routing.exists(row.destination)
            ):
                # an exchange of the binding was not durable: the binding went with it
                self.state_store.delete_binding(row)
                continue
            self.routing.bind(binding)

    async def reload(self, attempts: int = 3) -> bool:
        """Re-read durable exchanges and bindings that another cluster node may have
        changed and apply them to the routing table (transient ones stay). A read that
        overlapped a change made here is thrown away and read again; False when every
        attempt overlapped one (the next re-read catches up)."""
        for _ in range(attempts):
            changes = self._changes
            if self._changing:
                return False  # the change in progress re-reads nothing; retried later
            exchanges = await self.state_store.load_exchanges()
            bindings = await self.state_store.load_bindings()
            if self._changing or changes != self._changes:
                continue
            stored = {row.name: _exchange_from_row(row) for row in exchanges}
            self.routing.replace_stored(stored, [_binding_from_row(row) for row in bindings],
                                        self._stored_binding)
            return True
        return False

    def _stored_binding(self, binding: Binding) -> bool:
        try:
            return self._durable_binding(binding)
        except UnknownExchangeError:
            return True

    async def declare(
        self,
        name: str,
        type: ExchangeType,
        durable: bool = True,
        auto_delete: bool = False,
        internal: bool = False,
        alternate_exchange: str | None = None,
        arguments: Mapping[str, str] | None = None,
    ) -> ExchangeInfo:
        """Declare; redeclaring with another type is PreconditionFailedError."""
        check_storable("exchange name", (name, alternate_exchange))
        async with self._change():
            info, created = self.routing.declare(exchange_info(
                name, type, durable, auto_delete, internal, alternate_exchange, arguments
            ))
            if created and durable:
                self.state_store.save_exchange(_exchange_row(info))
                await self.state_store.commit()
        if created and durable:
            self.on_change()
        return info

    async def delete(self, name: str, if_unused: bool = False) -> None:
        async with self._change():
            info = self.routing.get(name)
            removed = self.routing.delete(name, if_unused)
            for binding in removed:
                self.state_store.delete_binding(_binding_row(binding))
            if info.durable:
                self.state_store.delete_exchange(name)
            await self.state_store.commit()
        self.on_change()

    def get(self, name: str) -> ExchangeInfo:
        return self.routing.get(name)

    def list_exchanges(self) -> list[ExchangeInfo]:
        return self.routing.list_exchanges()

    async def bind(
        self,
        source: str,
        destination_kind: DestinationKind,
        destination: str,
        routing_key: str = "",
        arguments: Mapping[str, str] | None = None,
    ) -> Binding:
        check_storable("routing key", (routing_key,))
        binding = _binding(source, destination_kind, destination, routing_key, arguments)
        self._check_destination(destination_kind, destination)
        async with self._change():
            stored = self.routing.bind(binding) and self._durable_binding(binding)
            if stored:
                self.state_store.save_binding(_binding_row(binding))
                await self.state_store.commit()
        if stored:
            self.on_change()
        return binding

    def _durable_binding(self, binding: Binding) -> bool:
        """Persist a binding only when the exchanges it joins outlive a restart."""
        if not self.routing.get(binding.source).durable:
            return False
        if binding.destination_kind == "exchange":
            return self.routing.get(binding.destination).durable
        return True

    async def unbind(
        self,
        source: str,
        destination_kind: DestinationKind,
        destination: str,
        routing_key: str = "",
        arguments: Mapping[str, str] | None = None,
    ) -> bool:
        binding = _binding(source, destination_kind, destination, routing_key, arguments)
        async with self._change():
            removed, auto_deleted = self.routing.unbind(binding)
            if removed:
                self.state_store.delete_binding(_binding_row(binding))
            if auto_deleted is not None:
                self.state_store.delete_exchange(auto_deleted.name)
            await self.state_store.commit()
        if removed:
            self.on_change()
        return removed

    def list_bindings(
        self,
        source: str | None = None,
        destination_kind: DestinationKind | None = None,
        destination: str | None = None,
    ) -> list[Binding]:
        target = None
        if destination_kind is not None and destination is not None:
            target = (destination_kind, destination)
        return self.routing.bindings(source, target)

    def _check_destination(self, kind: DestinationKind, name: str) -> None:
        if kind == "exchange":
            if not self.routing.exists(name):
                raise UnknownExchangeError("unknown exchange", exchange=name)
        elif kind == "queue":
            if not self.queue_exists(name):
                raise UnknownQueueError("unknown queue", queue=name)
        elif self.topics.find(name) is None:
            raise UnknownTopicError("unknown topic", topic=name)

    def route(self, exchange: str, routing_key: str, headers: Headers = ()) -> list[Destination]:
        """Where a message would go (no publish)."""
        return self.routing.route(exchange, routing_key, headers)

    def remove_destination(self, kind: DestinationKind, name: str) -> None:
        """Drop every binding to a deleted queue or topic (the caller commits, then calls
        ``on_change``)."""
        self._changes += 1  # a re-read in flight may still hold these bindings
        for binding in self.routing.remove_destination(kind, name):
            self.state_store.delete_binding(_binding_row(binding))

    def plan(self, exchange: str, routing_key: str, messages: Sequence[Message]
             ) -> tuple[bool, dict[tuple[Destination, ...], list[Message]]]:
        """Route each message by routing key (+ its headers): (every message routed,
        destinations -> the messages going there, in order). Publishes nothing: the
        facade publishes the plan through the producer and the share coordinator."""
        if self.routing.get(exchange).internal:
            raise InvalidRequestError(
                "internal exchanges take messages only from other exchanges", exchange=exchange
            )
        plans: dict[tuple[Destination, ...], list[Message]] = {}
        routed = True
        for message in messages:
            if not any(name == HEADER_ROUTING_KEY for name, _ in message.headers):
                # where it was published travels with it (AMQP consumers see it; a
                # dead-letter exchange routes by it)
                message = dataclasses.replace(message, headers=(
                    *message.headers, (HEADER_EXCHANGE, exchange.encode()),
                    (HEADER_ROUTING_KEY, routing_key.encode())))
            destinations = tuple(self.routing.route(exchange, routing_key, message.headers))
            if not destinations:
                routed = False
                continue
            plans.setdefault(destinations, []).append(message)
        return routed and bool(messages), plans


def _binding(
    source: str,
    destination_kind: DestinationKind,
    destination: str,
    routing_key: str,
    arguments: Mapping[str, str] | None,
) -> Binding:
    return Binding(
        source, destination_kind, destination, routing_key,
        tuple(sorted((str(k), str(v)) for k, v in (arguments or {}).items())),
    )


def _nothing() -> None:
    pass


def _exchange_from_row(row: ExchangeRow) -> ExchangeInfo:
    return ExchangeInfo(row.name, row.type,  # type: ignore[arg-type]
                        row.durable, row.auto_delete, row.internal,
                        row.alternate_exchange, row.arguments)


def _binding_from_row(row: BindingRow) -> Binding:
    return Binding(row.source, row.destination_kind,  # type: ignore[arg-type]
                   row.destination, row.routing_key, row.arguments)


def _binding_row(binding: Binding) -> BindingRow:
    return BindingRow(binding.source, binding.destination_kind, binding.destination,
                      binding.routing_key, binding.arguments)


def _exchange_row(info: ExchangeInfo) -> ExchangeRow:
    return ExchangeRow(info.name, info.type, info.durable, info.auto_delete, info.internal,
                       info.alternate_exchange, info.arguments)

