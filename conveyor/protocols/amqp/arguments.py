"""AMQP names and arguments mapped onto Conveyor's model (pure functions).

Owns: queue-declare arguments → ``QueueConfig``, binding arguments → the broker's
string arguments, and server-generated names. The topic behind a queue name is the
AMQP's ``names.topic_name_for`` (the server gives the broker's default exchange the
same mapping as its queue alias).
"""

from __future__ import annotations

import base64
import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from conveyor.broker.types import QueueConfig
from conveyor.protocols.amqp.names import topic_name_for

NAME_BYTES_MAX: Final = 255
PRIORITY_MAX: Final = 9
QUEUE_TYPES: Final = frozenset({"classic", "quorum", "stream"})
OVERFLOWS: Final = {"drop-head": "drop-head", "reject-publish": "reject-publish",
                    "reject-publish-dlx": "reject-publish"}


class ArgumentError(ValueError):
    """An argument RabbitMQ would refuse (406 PRECONDITION_FAILED)."""


def generated_name(prefix: str, random_bytes: bytes) -> str:
    """``amq.gen-…`` / ``amq.ctag-…`` names, as RabbitMQ makes them."""
    token = base64.urlsafe_b64encode(random_bytes).decode().rstrip("=")
    return f"{prefix}-{token}"


@dataclass(frozen=True, slots=True)
class QueueOptions:
    config: QueueConfig
    queue_type: str
    single_active_consumer: bool


def _integer(arguments: Mapping[str, Any], name: str, minimum: int = 0) -> int | None:
    if name not in arguments:
        return None
    value = arguments[name]
    if isinstance(value, bool) or not isinstance(value, int | decimal.Decimal):
        raise ArgumentError(f"invalid arg '{name}': expected an integer, got {value!r}")
    number = int(value)
    if number < minimum:
        raise ArgumentError(f"invalid arg '{name}': {number} is below {minimum}")
    return number


def _text(arguments: Mapping[str, Any], name: str) -> str | None:
    if name not in arguments:
        return None
    value = arguments[name]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise ArgumentError(f"invalid arg '{name}': expected a string, got {value!r}")
    return value


def queue_options(arguments: Mapping[str, Any] | None, durable: bool,
                  visibility_timeout_ms: int) -> QueueOptions:
    """RabbitMQ's queue arguments on a Conveyor queue (docs/amqp.md has the table)."""
    arguments = arguments or {}
    queue_type = _text(arguments, "x-queue-type") or "classic"
    if queue_type not in QUEUE_TYPES:
        raise ArgumentError(f"invalid arg 'x-queue-type': unknown type {queue_type!r}")
    ttl_ms = _integer(arguments, "x-message-ttl")
    max_length = _integer(arguments, "x-max-length")
    overflow_name = _text(arguments, "x-overflow") or "drop-head"
    if overflow_name not in OVERFLOWS:
        raise ArgumentError(f"invalid arg 'x-overflow': {overflow_name!r}")
    max_priority = _integer(arguments, "x-max-priority")
    if max_priority is not None and max_priority > 255:
        raise ArgumentError("invalid arg 'x-max-priority': above 255")
    delivery_limit = _integer(arguments, "x-delivery-limit")
    dead_letter_exchange = _text(arguments, "x-dead-letter-exchange")
    dead_letter_routing_key = _text(arguments, "x-dead-letter-routing-key")
    if dead_letter_routing_key is not None and dead_letter_exchange is None:
        raise ArgumentError("invalid arg 'x-dead-letter-routing-key': needs "
                            "x-dead-letter-exchange")
    if dead_letter_exchange == "" and dead_letter_routing_key is not None:
        dead_letter_routing_key = topic_name_for(dead_letter_routing_key)
    single_active = bool(arguments.get("x-single-active-consumer", False))
    config = QueueConfig(
        visibility_timeout_ms=visibility_timeout_ms,
        max_deliveries=0 if delivery_limit is None else delivery_limit + 1,
        dead_letter_topic="",
        dead_letter_exchange=dead_letter_exchange,
        dead_letter_routing_key=dead_letter_routing_key,
        message_ttl_ms=ttl_ms,
        max_length=max_length,
        overflow="reject-publish" if OVERFLOWS[overflow_name] == "reject-publish"
        else "drop-head",
        max_priority=None if not max_priority else min(max_priority, PRIORITY_MAX),
        durable=durable or queue_type in ("quorum", "stream"),
    )
    return QueueOptions(config, queue_type, single_active)


def binding_arguments(arguments: Mapping[str, Any] | None) -> dict[str, str]:
    """Binding arguments as the broker's strings (headers exchange: x-match + values;
    values compare as the text a message header of that value becomes)."""
    result: dict[str, str] = {}
    for key, value in (arguments or {}).items():
        if isinstance(value, bool):
            result[key] = "true" if value else "false"
        elif isinstance(value, bytes):
            result[key] = value.decode("utf-8", "replace")
        else:
            result[key] = str(value)
    return result
