"""JSON shapes of the RabbitMQ-compatible management API, built from broker values.

Owns: queue, exchange, binding, connection, channel and consumer documents in the
field names RabbitMQ's management API uses (what KEDA, rabbitmqadmin and scripts
read), the mapping between a queue's RabbitMQ ``arguments`` and ``QueueConfig``
both ways, and the listing features (``columns``, ``sort``, paging with ``page`` /
``page_size`` / ``name`` / ``use_regex``).
Must not know: sockets, the broker's behaviour (management.py calls the broker).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from conveyor.broker.types import Binding, ExchangeInfo, QueueConfig, QueueInfo
from conveyor.connections import ChannelView, ConnectionView, ConsumerView
from conveyor.errors import InvalidRequestError

VHOST: Final = "/"  # one vhost until a security model brings more (docs/management.md)
PAGE_SIZE_MAX: Final = 500  # RabbitMQ's page_size limit
NAME_FILTER_CHARS_MAX: Final = 256  # a regex filter longer than this is refused
PROTOCOL_NAMES: Final = {"amqp": "AMQP 0-9-1", "kafka": "Kafka", "http": "HTTP", "sqs": "SQS"}
PRIORITY_MAX: Final = 9
OVERFLOWS: Final = {"drop-head": "drop-head", "reject-publish": "reject-publish",
                    "reject-publish-dlx": "reject-publish"}


class ArgumentError(InvalidRequestError):
    """A queue argument RabbitMQ would refuse too."""


# --- queue arguments <-> QueueConfig ----------------------------------------------------
def _integer_argument(arguments: Mapping[str, Any], name: str) -> int | None:
    value = arguments.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArgumentError(f"invalid arg '{name}': expected a non-negative integer",
                            argument=name)
    return value


def _text_argument(arguments: Mapping[str, Any], name: str) -> str | None:
    value = arguments.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ArgumentError(f"invalid arg '{name}': expected a string", argument=name)
    return value


def queue_config(arguments: Mapping[str, Any] | None, durable: bool,
                 visibility_timeout_ms: int = 30_000) -> QueueConfig:
    """RabbitMQ queue arguments on a Conveyor queue, as the AMQP listener reads them
    (docs/amqp.md has the table), so a queue declared here and there is the same."""
    arguments = arguments or {}
    if not isinstance(arguments, Mapping):
        raise ArgumentError("arguments must be an object")
    queue_type = _text_argument(arguments, "x-queue-type") or "classic"
    if queue_type not in ("classic", "quorum", "stream"):
        raise ArgumentError(f"invalid arg 'x-queue-type': unknown type {queue_type!r}")
    overflow = _text_argument(arguments, "x-overflow") or "drop-head"
    if overflow not in OVERFLOWS:
        raise ArgumentError(f"invalid arg 'x-overflow': {overflow!r}")
    max_priority = _integer_argument(arguments, "x-max-priority")
    if max_priority is not None and max_priority > 255:
        raise ArgumentError("invalid arg 'x-max-priority': above 255")
    delivery_limit = _integer_argument(arguments, "x-delivery-limit")
    dead_letter_exchange = _text_argument(arguments, "x-dead-letter-exchange")
    dead_letter_routing_key = _text_argument(arguments, "x-dead-letter-routing-key")
    if dead_letter_routing_key is not None and dead_letter_exchange is None:
        raise ArgumentError("invalid arg 'x-dead-letter-routing-key': needs "
                            "x-dead-letter-exchange")
    return QueueConfig(
        visibility_timeout_ms=visibility_timeout_ms,
        max_deliveries=0 if delivery_limit is None else delivery_limit + 1,
        dead_letter_topic="",
        dead_letter_exchange=dead_letter_exchange,
        dead_letter_routing_key=dead_letter_routing_key,
        message_ttl_ms=_integer_argument(arguments, "x-message-ttl"),
        max_length=_integer_argument(arguments, "x-max-length"),
        overflow="reject-publish" if OVERFLOWS[overflow] == "reject-publish" else "drop-head",
        max_priority=None if not max_priority else min(max_priority, PRIORITY_MAX),
        durable=durable or queue_type in ("quorum", "stream"),
    )


def queue_arguments(config: QueueConfig) -> dict[str, Any]:
    """A queue's config as RabbitMQ arguments (what the definitions export writes)."""
    arguments: dict[str, Any] = {}
    if config.message_ttl_ms is not None:
        arguments["x-message-ttl"] = config.message_ttl_ms
    if config.max_length is not None:
        arguments["x-max-length"] = config.max_length
        arguments["x-overflow"] = config.overflow
    if config.max_priority is not None:
        arguments["x-max-priority"] = config.max_priority
    if config.max_deliveries:
        arguments["x-delivery-limit"] = config.max_deliveries - 1
    if config.dead_letter_exchange is not None:
        arguments["x-dead-letter-exchange"] = config.dead_letter_exchange
    if config.dead_letter_routing_key is not None:
        arguments["x-dead-letter-routing-key"] = config.dead_letter_routing_key
    return arguments


# --- documents --------------------------------------------------------------------------
def _rate(value: float) -> dict[str, float]:
    return {"rate": value}


def queue_document(info: QueueInfo, node: str, consumers: int, totals: tuple[int, int],
                   rates: tuple[float, float]) -> dict[str, Any]:
    config = info.config
    unacknowledged = info.in_flight
    return {
        "name": info.name, "vhost": VHOST, "durable": config.durable, "auto_delete": False,
        "exclusive": False, "arguments": queue_arguments(config), "node": node,
        "state": "running", "type": "classic", "policy": None,
        "messages": info.ready + unacknowledged,
        "messages_ready": info.ready,
        "messages_unacknowledged": unacknowledged,
        "consumers": consumers,
        "message_stats": {
            "publish": totals[0], "publish_details": _rate(rates[0]),
            "deliver_get": totals[1], "deliver_get_details": _rate(rates[1]),
        },
        # Conveyor's own fields, beside RabbitMQ's
        "messages_delayed": info.delayed,
        "partitions": config.partitions,
        "config": {"visibility_timeout_ms": config.visibility_timeout_ms,
                   "max_deliveries": config.max_deliveries,
                   "dead_letter_topic": config.dead_letter_topic,
                   "fifo": config.fifo, "delay_ms": config.delay_ms},
    }


def exchange_document(info: ExchangeInfo) -> dict[str, Any]:
    arguments: dict[str, Any] = dict(info.arguments)
    if info.alternate_exchange is not None:
        arguments["alternate-exchange"] = info.alternate_exchange
    return {"name": info.name, "vhost": VHOST, "type": info.type, "durable": info.durable,
            "auto_delete": info.auto_delete, "internal": info.internal,
            "arguments": arguments, "user_who_performed_action": ""}


def properties_key(routing_key: str, arguments: Sequence[tuple[str, str]]) -> str:
    """The binding's name in URLs: its routing key ("~" when empty), plus a short hash of
    its arguments when it has any (RabbitMQ's ``properties_key`` plays the same role)."""
    key = routing_key or "~"
    if arguments:
        digest = hashlib.sha1(repr(sorted(arguments)).encode()).hexdigest()[:10]
        key = f"{key}~{digest}"
    return key


def binding_document(binding: Binding) -> dict[str, Any]:
    return {
        "source": binding.source, "vhost": VHOST, "destination": binding.destination,
        # Conveyor topics are what AMQP clients see as stream queues
        "destination_type": "exchange" if binding.destination_kind == "exchange" else "queue",
        "routing_key": binding.routing_key, "arguments": dict(binding.arguments),
        "properties_key": properties_key(binding.routing_key, binding.arguments),
    }


def default_binding_document(queue: str) -> dict[str, Any]:
    """The implicit binding of every queue to the default exchange (RabbitMQ lists it)."""
    return {"source": "", "vhost": VHOST, "destination": queue, "destination_type": "queue",
            "routing_key": queue, "arguments": {}, "properties_key": queue}


def _split_peer(peer: str) -> tuple[str, int]:
    host, _, port = peer.rpartition(":")
    return (host, int(port)) if port.isdigit() else (peer, 0)


def connection_name(view: ConnectionView) -> str:
    return f"{view.peer} -> {view.local_port} ({view.protocol})"


def connection_document(view: ConnectionView, node: str) -> dict[str, Any]:
    peer_host, peer_port = _split_peer(view.peer)
    properties = {key: value if isinstance(value, str | int | float | bool | None) else str(value)
                  for key, value in view.client_properties.items()}
    return {
        "name": connection_name(view), "node": node, "type": "network", "state": "running",
        "protocol": PROTOCOL_NAMES.get(view.protocol, view.protocol),
        "user": view.user, "vhost": view.vhost, "peer_host": peer_host, "peer_port": peer_port,
        "port": view.local_port, "channels": len(view.channels),
        "client_properties": properties,
    }


def _channel_name(view: ConnectionView, number: int) -> str:
    return f"{connection_name(view)} ({number})"


def _connection_details(view: ConnectionView) -> dict[str, Any]:
    peer_host, peer_port = _split_peer(view.peer)
    return {"name": connection_name(view), "peer_host": peer_host, "peer_port": peer_port}


def channel_document(view: ConnectionView, channel: ChannelView, node: str) -> dict[str, Any]:
    return {
        "name": _channel_name(view, channel.number), "number": channel.number, "node": node,
        "connection_details": _connection_details(view), "vhost": view.vhost,
        "user": view.user, "state": "running", "consumer_count": channel.consumers,
        "messages_unacknowledged": channel.unacked, "prefetch_count": channel.prefetch,
        "confirm": channel.confirm, "transactional": channel.transactional,
        "protocol": PROTOCOL_NAMES.get(view.protocol, view.protocol),
    }


def consumer_document(view: ConnectionView, consumer: ConsumerView) -> dict[str, Any]:
    return {
        "consumer_tag": consumer.tag, "queue": {"name": consumer.queue, "vhost": VHOST},
        "channel_details": {**_connection_details(view), "number": consumer.channel,
                            "name": _channel_name(view, consumer.channel),
                            "connection_name": connection_name(view), "user": view.user},
        "ack_required": consumer.ack_required, "prefetch_count": consumer.prefetch,
        "exclusive": consumer.exclusive, "arguments": {}, "active": True,
        "activity_status": "up", "messages_unacknowledged": consumer.unacked,
    }


# --- listing features --------------------------------------------------------------------
def _pick(document: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def select_columns(item: dict[str, Any], columns: str) -> dict[str, Any]:
    """Keep only the comma-separated (dotted) ``columns``, nested as in the item."""
    selected: dict[str, Any] = {}
    for column in (c.strip() for c in columns.split(",")):
        found, value = _pick(item, column)
        if not column or not found:
            continue
        target = selected
        parts = column.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return selected


def _sort_key(item: Mapping[str, Any], column: str) -> tuple[int, str, float]:
    _, value = _pick(item, column)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, "", float(value))
    return (1, str(value), 0.0)


def _page_number(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name, str(default))
    if not text.isdigit() or int(text) < 1:
        raise InvalidRequestError(f"{name} must be a positive integer")
    return int(text)


def _filtered(items: list[dict[str, Any]], query: Mapping[str, str]) -> list[dict[str, Any]]:
    """``name`` (substring, any case) or, with ``use_regex=true``, a regex on the name."""
    name = query.get("name", "")
    if not name:
        return items
    if len(name) > NAME_FILTER_CHARS_MAX:
        raise InvalidRequestError("name filter too long", limit=NAME_FILTER_CHARS_MAX)
    if query.get("use_regex", "false") == "true":
        try:
            pattern = re.compile(name)
        except re.error as error:
            raise InvalidRequestError(f"bad regex: {error}") from None
        return [item for item in items if pattern.search(str(item.get("name", "")))]
    lowered = name.lower()
    return [item for item in items if lowered in str(item.get("name", "")).lower()]


def listing(items: list[dict[str, Any]], query: Mapping[str, str]) -> Any:
    """Apply the ``name`` filter, ``sort``/``sort_reverse``, paging (with ``page``:
    RabbitMQ's paged object) and ``columns``. The filter applies without ``page`` too
    (older KEDA versions ask ``?use_regex=true&name=...`` and read a plain list)."""
    if query.get("sort"):
        items = sorted(items, key=lambda item: _sort_key(item, query["sort"]),
                       reverse=query.get("sort_reverse", "false") == "true")
    filtered = _filtered(items, query)
    if "page" not in query:
        if "columns" in query:
            filtered = [select_columns(item, query["columns"]) for item in filtered]
        return filtered
    page = _page_number(query, "page", 1)
    page_size = min(_page_number(query, "page_size", 100), PAGE_SIZE_MAX)
    page_count = max(1, -(-len(filtered) // page_size))
    chosen = filtered[(page - 1) * page_size: page * page_size]
    if "columns" in query:
        chosen = [select_columns(item, query["columns"]) for item in chosen]
    return {"items": chosen, "page": page, "page_size": page_size, "page_count": page_count,
            "item_count": len(chosen), "filtered_count": len(filtered),
            "total_count": len(items)}
