"""Exchanges and bindings: where a published message goes.

Owns: the matching rules of the four exchange types as pure functions, and the
``RoutingTable`` (exchanges, bindings, exchange-to-exchange routing, alternate
exchanges). The broker persists what the table holds; the table does no I/O.

Rules:
- direct: binding key == routing key. fanout: every binding.
- topic: dot-separated words; ``*`` matches exactly one word, ``#`` zero or more.
- headers: ``x-match`` = all (default) | any | all-with-x | any-with-x. all/any
  ignore arguments and headers whose name starts with ``x-``; the -with-x forms
  include them. A binding with no match arguments and x-match all matches
  everything (nothing to contradict); with any it matches nothing.
- Exchange-to-exchange bindings are followed with a visited set, so a cycle
  routes each message at most once through each exchange.
- A destination reached twice (two bindings, two paths) gets the message once.
- When the exchange a message was published to routes it nowhere, its
  alternate exchange (and that one's, loop-safe) is tried.
- The default exchange "" routes to the queue named by the routing key, if it
  exists; it cannot be bound, unbound or deleted. Each vhost has its own: ``v~``
  (``qualify(v, "")``, conveyor/security/api.py) routes to the queue ``v~KEY`` of
  that vhost only. A routing key holding the vhost separator never reaches a
  qualified queue through the default exchange of ``/`` (its alias is tried), so
  no publish or dead letter crosses from one vhost into another.

Must not know: protocols, storage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from conveyor.errors import (
    InvalidRequestError,
    PreconditionFailedError,
    UnknownExchangeError,
)
from conveyor.security.api import VHOST_SEPARATOR, unqualify

from .types import Binding, DestinationKind, ExchangeInfo, ExchangeType, Headers

DEFAULT_EXCHANGE = ""
EXCHANGE_TYPES: tuple[ExchangeType, ...] = ("direct", "topic", "fanout", "headers")
PREDECLARED: tuple[tuple[str, ExchangeType], ...] = (
    ("amq.direct", "direct"),
    ("amq.fanout", "fanout"),
    ("amq.topic", "topic"),
    ("amq.headers", "headers"),
    ("amq.match", "headers"),
)
_X_MATCH_MODES = ("all", "any", "all-with-x", "any-with-x")


@dataclass(frozen=True, slots=True)
class Destination:
    kind: DestinationKind
    name: str


# --- pure matching ---------------------------------------------------------------------
def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching of ``routing_key`` against a binding ``pattern``."""
    pattern_words = pattern.split(".")
    key_words = routing_key.split(".") if routing_key else []
    if pattern == "":
        return routing_key == ""
    # reachable[j]: pattern prefix matched key prefix of length j
    reachable = [True] + [False] * len(key_words)
    for word in pattern_words:
        if word == "#":
            following = [False] * (len(key_words) + 1)
            seen = False
            for index in range(len(key_words) + 1):
                seen = seen or reachable[index]
                following[index] = seen
        else:
            following = [False] * (len(key_words) + 1)
            for index in range(len(key_words)):
                if reachable[index] and (word == "*" or word == key_words[index]):
                    following[index + 1] = True
        reachable = following
    return reachable[len(key_words)]


def _header_value(headers: Headers, name: str) -> tuple[bool, bytes | None]:
    for header_name, value in headers:
        if header_name == name:
            return True, value
    return False, None


def headers_match(arguments: Iterable[tuple[str, str]], headers: Headers) -> bool:
    """The headers-exchange rule for one binding's arguments against message headers."""
    pairs = list(arguments)
    mode = "all"
    for name, value in pairs:
        if name == "x-match":
            mode = value
    if mode not in _X_MATCH_MODES:
        raise InvalidRequestError("unsupported x-match", x_match=mode, allowed=_X_MATCH_MODES)
    with_x = mode.endswith("-with-x")
    wanted = [
        (name, value) for name, value in pairs
        if name != "x-match" and (with_x or not name.startswith("x-"))
    ]
    results = []
    for name, value in wanted:
        present, header_value = _header_value(headers, name)
        results.append(present and header_value == value.encode())
    if mode.startswith("all"):
        return all(results)
    return any(results)


def binding_matches(
    exchange_type: ExchangeType, binding: Binding, routing_key: str, headers: Headers
) -> bool:
    if exchange_type == "fanout":
        return True
    if exchange_type == "direct":
        return binding.routing_key == routing_key
    if exchange_type == "topic":
        return topic_matches(binding.routing_key, routing_key)
    return headers_match(binding.arguments, headers)


def _binding_order(binding: Binding) -> tuple[str, str, str, str, tuple[tuple[str, str], ...]]:
    return (binding.source, binding.destination_kind, binding.destination,
            binding.routing_key, binding.arguments)


def _same_name(name: str) -> str:
    return name


def is_default_exchange(name: str) -> bool:
    """The default exchange of ``/`` (``""``) or of another vhost (``v~``)."""
    return name == DEFAULT_EXCHANGE or name.endswith(VHOST_SEPARATOR)


def is_reserved_exchange(name: str) -> bool:
    """A default or built-in (``amq.*``) exchange, in any vhost: never deleted."""
    return is_default_exchange(name) or unqualify(name)[1].startswith("amq.")


# --- the table ---------------------------------------------------------------------------
class RoutingTable:
    """Exchanges and bindings in memory; ``route`` resolves a publish to destinations."""

    def __init__(self, queue_exists: Callable[[str], bool],
                 queue_alias: Callable[[str], str] | None = None) -> None:
        self._queue_exists = queue_exists
        # routing key -> the queue the default exchange tries when no queue has that
        # name (a protocol's escaping of names the broker cannot hold; identity here)
        self._queue_alias = queue_alias or _same_name
        # name -> exchange ("" is implicit, never stored)
        self._exchanges: dict[str, ExchangeInfo] = {}
        # source exchange -> bindings in declaration order (dict as an ordered set)
        self._bindings: dict[str, dict[Binding, None]] = {}

    # --- exchanges ------------------------------------------------------------------

    def queue_alias(self, name: str) -> str:
        """The queue the default exchange tries for ``name`` when no queue has it."""
        return self._queue_alias(name)
    def declare(self, info: ExchangeInfo) -> tuple[ExchangeInfo, bool]:
        """Add ``info``; an equal redeclaration is fine. Returns (exchange, created)."""
        if is_default_exchange(info.name):
            raise PreconditionFailedError("the default exchange cannot be redeclared")
        if info.type not in EXCHANGE_TYPES:
            raise InvalidRequestError(
                "unknown exchange type", exchange=info.name, type=info.type,
                allowed=EXCHANGE_TYPES,
            )
        existing = self._exchanges.get(info.name)
        if existing is not None:
            if existing.type != info.type:
                raise PreconditionFailedError(
                    "exchange exists with another type", exchange=info.name,
                    existing_type=existing.type, requested_type=info.type,
                )
            return existing, False
        self._exchanges[info.name] = info
        self._bindings.setdefault(info.name, {})
        return info, True

    def get(self, name: str) -> ExchangeInfo:
        if is_default_exchange(name):
            return ExchangeInfo(name=name, type="direct")
        info = self._exchanges.get(name)
        if info is None:
            raise UnknownExchangeError("unknown exchange", exchange=name)
        return info

    def exists(self, name: str) -> bool:
        return is_default_exchange(name) or name in self._exchanges

    def list_exchanges(self) -> list[ExchangeInfo]:
        return [self.get(DEFAULT_EXCHANGE)] + [
            self._exchanges[name] for name in sorted(self._exchanges)
        ]

    def delete(self, name: str, if_unused: bool = False) -> list[Binding]:
        """Remove the exchange and every binding from or to it; returns those bindings."""
        if is_reserved_exchange(name):
            raise PreconditionFailedError("this exchange cannot be deleted", exchange=name)
        self.get(name)
        if if_unused and self._bindings.get(name):
            raise PreconditionFailedError("exchange in use", exchange=name)
        removed = list(self._bindings.pop(name, {}))
        removed += self.remove_destination("exchange", name)
        del self._exchanges[name]
        return removed

    def replace_stored(self, stored: Mapping[str, ExchangeInfo], bindings: Iterable[Binding],
                       stored_here: Callable[[Binding], bool]) -> int:
        """Make the durable part of the table what the state store holds (another cluster
        node changed it): durable exchanges missing from ``stored`` go with their
        bindings, stored ones missing here come (one whose type changed is replaced),
        and among the bindings ``stored_here`` says are kept in the store, those not in
        ``bindings`` go and the stored ones come. Transient exchanges and bindings (never
        stored) stay as they are. Returns how many entries changed."""
        changed = 0
        for name, info in list(self._exchanges.items()):
            kept = stored.get(name)
            if is_reserved_exchange(name) or not info.durable or kept == info:
                continue
            if kept is None or kept.type != info.type:
                self._bindings.pop(name, None)
                self.remove_destination("exchange", name)
                del self._exchanges[name]
            else:  # same type, other flags (deleted and declared again elsewhere)
                self._exchanges[name] = kept
            changed += 1
        for name, info in stored.items():
            if name not in self._exchanges and not is_default_exchange(name):
                self._exchanges[name] = info
                self._bindings.setdefault(name, {})
                changed += 1
        wanted = {binding for binding in bindings if binding.source in self._exchanges and (
            binding.destination_kind != "exchange" or self.exists(binding.destination))}
        for table in self._bindings.values():
            for binding in list(table):
                if binding not in wanted and stored_here(binding):
                    del table[binding]
                    changed += 1
        for binding in sorted(wanted - set(self.bindings()), key=_binding_order):
            self._bindings.setdefault(binding.source, {})[binding] = None
            changed += 1
        return changed

    # --- bindings -------------------------------------------------------------------
    def bind(self, binding: Binding) -> bool:
        """Add a binding; True when it is new."""
        if is_default_exchange(binding.source) or (
                binding.destination_kind == "exchange"
                and is_default_exchange(binding.destination)):
            raise PreconditionFailedError("the default exchange cannot be bound")
        source = self.get(binding.source)
        if binding.destination_kind == "exchange":
            self.get(binding.destination)
        if source.type == "headers":
            headers_match(binding.arguments, ())  # validates x-match now, not at publish
        bindings = self._bindings.setdefault(binding.source, {})
        if binding in bindings:
            return False
        bindings[binding] = None
        return True

    def unbind(self, binding: Binding) -> tuple[bool, ExchangeInfo | None]:
        """Remove a binding. Returns (removed, auto-deleted source exchange or None)."""
        if is_default_exchange(binding.source):
            raise PreconditionFailedError("the default exchange cannot be unbound")
        bindings = self._bindings.get(binding.source)
        if bindings is None or binding not in bindings:
            return False, None
        del bindings[binding]
        return True, self._auto_delete(binding.source)

    def _auto_delete(self, name: str) -> ExchangeInfo | None:
        info = self._exchanges.get(name)
        if info is not None and info.auto_delete and not self._bindings.get(name):
            del self._exchanges[name]
            self._bindings.pop(name, None)
            return info
        return None

    def remove_destination(self, kind: DestinationKind, name: str) -> list[Binding]:
        """Drop every binding to a deleted queue/topic/exchange; returns them."""
        removed: list[Binding] = []
        for bindings in self._bindings.values():
            for binding in list(bindings):
                if binding.destination_kind == kind and binding.destination == name:
                    del bindings[binding]
                    removed.append(binding)
        return removed

    def auto_delete_unused(self) -> list[ExchangeInfo]:
        deleted = []
        for name in list(self._exchanges):
            info = self._auto_delete(name)
            if info is not None:
                deleted.append(info)
        return deleted

    def bindings(
        self, source: str | None = None, destination: tuple[DestinationKind, str] | None = None
    ) -> list[Binding]:
        result = []
        for source_name, bindings in self._bindings.items():
            if source is not None and source_name != source:
                continue
            for binding in bindings:
                if destination is not None and (
                    (binding.destination_kind, binding.destination) != destination
                ):
                    continue
                result.append(binding)
        return result

    def has_bindings_to(self, kind: DestinationKind, name: str) -> bool:
        return bool(self.bindings(destination=(kind, name)))

    # --- routing --------------------------------------------------------------------
    def route(self, exchange: str, routing_key: str, headers: Headers = ()) -> list[Destination]:
        """Every queue/topic the message reaches, each once, in first-reached order."""
        self.get(exchange)
        tried: set[str] = set()
        current: str | None = exchange
        while current is not None and current not in tried:
            tried.add(current)
            found = self._route_from(current, routing_key, headers)
            if found:
                return list(found)
            info = self._exchanges.get(current)
            alternate = info.alternate_exchange if info is not None else None
            current = alternate if alternate is not None and self.exists(alternate) else None
        return []

    def routes_by_key_only(self, exchange: str) -> bool:
        """True when ``route(exchange, key, headers)`` ignores the headers: no headers
        exchange is reachable from it (through exchange bindings or alternates), so
        messages with one routing key all go the same way."""
        seen: set[str] = set()
        pending = [exchange]
        while pending:
            name = pending.pop()
            if name in seen or is_default_exchange(name):
                continue
            seen.add(name)
            info = self._exchanges.get(name)
            if info is None:
                continue
            if info.type not in ("direct", "fanout", "topic"):
                return False
            if info.alternate_exchange is not None:
                pending.append(info.alternate_exchange)
            pending.extend(binding.destination for binding in self._bindings.get(name, {})
                           if binding.destination_kind == "exchange")
        return True

    def _route_from(self, exchange: str, routing_key: str, headers: Headers) -> dict[
        Destination, None
    ]:
        found: dict[Destination, None] = {}
        visited: set[str] = set()
        pending = [exchange]
        while pending:
            name = pending.pop(0)
            if name in visited:
                continue
            visited.add(name)
            if is_default_exchange(name):
                queue = self._default_destination(name, routing_key)
                if queue is not None:
                    found.setdefault(Destination("queue", queue), None)
                continue
            info = self._exchanges.get(name)
            if info is None:
                continue
            for binding in self._bindings.get(name, {}):
                if not binding_matches(info.type, binding, routing_key, headers):
                    continue
                if binding.destination_kind == "exchange":
                    pending.append(binding.destination)
                else:
                    found.setdefault(Destination(binding.destination_kind, binding.destination),
                                     None)
        return found


    def _default_destination(self, exchange: str, routing_key: str) -> str | None:
        """The queue a vhost's default exchange names: ``prefix + KEY`` or the alias of
        KEY under the prefix (``exchange`` is the prefix: "" or ``v~``). A key with the
        separator in it is never looked up as it is: it would name another vhost's queue."""
        if VHOST_SEPARATOR not in routing_key and self._queue_exists(exchange + routing_key):
            return exchange + routing_key
        alias = self._queue_alias(routing_key)
        if VHOST_SEPARATOR in alias:
            return None
        queue = exchange + alias
        return queue if self._queue_exists(queue) else None


def exchange_info(
    name: str,
    type: ExchangeType,
    durable: bool = True,
    auto_delete: bool = False,
    internal: bool = False,
    alternate_exchange: str | None = None,
    arguments: Mapping[str, str] | None = None,
) -> ExchangeInfo:
    if alternate_exchange is None and arguments:
        # AMQP clients pass the alternate exchange as a declare argument
        alternate_exchange = arguments.get("alternate-exchange")
    return ExchangeInfo(
        name=name, type=type, durable=durable, auto_delete=auto_delete, internal=internal,
        alternate_exchange=alternate_exchange,
        arguments=tuple(sorted((str(k), str(v)) for k, v in (arguments or {}).items())),
    )
