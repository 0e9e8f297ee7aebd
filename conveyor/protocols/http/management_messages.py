"""Reading and publishing messages through the management API (RabbitMQ's shapes).

Owns: ``POST /api/queues/{vhost}/{name}/get`` (``count``, ``ackmode``, ``encoding``,
``truncate``) and the message of ``POST /api/exchanges/{vhost}/{name}/publish``
(``payload``, ``payload_encoding``, ``properties``: headers, priority, expiration,
content type, correlation id, reply-to, message id).
Must not know: sockets, routing of requests (management_objects.py).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.types import Message
from conveyor.errors import InvalidRequestError

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

GET_COUNT_MAX: Final = 1_000
GET_LOCK_MS: Final = 60_000  # a message read by POST .../get is held this long at most
TRUNCATE_DEFAULT: Final = 50_000
GET_CONSUMER: Final = "management-get"


def flag(fields: Mapping[str, Any], name: str, default: bool) -> bool:
    """A boolean field; scripts send ``true`` or the text ``"true"``/``"false"``."""
    value = fields.get(name, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false")
    return value


async def get_messages(broker: Broker, topic: str, fields: Mapping[str, Any]) -> list[Any]:
    """Read up to ``count`` messages of a queue, then settle them as ``ackmode`` says."""
    await broker.get_queue(topic)
    count = fields.get("count", 1)
    ackmode = fields.get("ackmode")
    if ackmode is None:  # RabbitMQ before 3.7 (and old rabbitmqadmin) sent "requeue"
        ackmode = "ack_requeue_true" if flag(fields, "requeue", True) else "ack_requeue_false"
    encoding = fields.get("encoding", "auto")
    truncate = fields.get("truncate", TRUNCATE_DEFAULT)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= \
            GET_COUNT_MAX:
        raise InvalidRequestError(f"count must be an integer 1..{GET_COUNT_MAX}")
    if ackmode not in ("ack_requeue_true", "ack_requeue_false", "reject_requeue_true",
                       "reject_requeue_false"):
        raise InvalidRequestError(f"unknown ackmode {ackmode!r}")
    if encoding not in ("auto", "base64"):
        raise InvalidRequestError(f"unknown encoding {encoding!r}")
    if not isinstance(truncate, int) or isinstance(truncate, bool) or truncate < 0:
        raise InvalidRequestError("truncate must be a non-negative integer")
    deliveries = await broker.acquire(topic, topic, count, GET_LOCK_MS, 0, GET_CONSUMER)
    receipts = [delivery.receipt for delivery in deliveries]
    if receipts:
        if ackmode.endswith("requeue_true"):
            await broker.release(receipts)
        elif ackmode == "ack_requeue_false":
            await broker.ack(receipts)
        else:
            await broker.reject(receipts)
    remaining = (await broker.get_queue(topic)).ready
    return [_got_message(delivery, topic, remaining, encoding, truncate)
            for delivery in deliveries]


def argument_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def message_from_fields(fields: Mapping[str, Any], now_ms: int) -> Message:
    payload = fields.get("payload", "")
    encoding = fields.get("payload_encoding", "string")
    if not isinstance(payload, str):
        raise InvalidRequestError("payload must be a string")
    if encoding == "string":
        value = payload.encode("utf-8")
    elif encoding == "base64":
        try:
            value = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise InvalidRequestError("payload is not valid base64") from None
    else:
        raise InvalidRequestError(f"unknown payload_encoding {encoding!r}")
    properties = fields.get("properties") or {}
    if not isinstance(properties, dict):
        raise InvalidRequestError("properties must be an object")
    headers_in = properties.get("headers") or {}
    if not isinstance(headers_in, dict):
        raise InvalidRequestError("properties.headers must be an object")
    headers = tuple((str(k), argument_text(v).encode()) for k, v in headers_in.items())
    for name in ("content_type", "correlation_id", "reply_to", "message_id"):
        if isinstance(properties.get(name), str):
            headers += ((f"conveyor.{name.replace('_', '-')}", properties[name].encode()),)
    priority = properties.get("priority")
    expiration = properties.get("expiration")
    expires_at_ms = None
    if expiration is not None:
        if not str(expiration).isdigit():
            raise InvalidRequestError("properties.expiration must be milliseconds as text")
        expires_at_ms = now_ms + int(expiration)
    if priority is not None and (not isinstance(priority, int) or not 0 <= priority <= 255):
        raise InvalidRequestError("properties.priority must be an integer 0..255")
    return Message(value, headers=headers, expires_at_ms=expires_at_ms,
                   priority=None if priority is None else min(priority, 9))


def _got_message(delivery: Any, queue: str, remaining: int, encoding: str,
                 truncate: int) -> dict[str, Any]:
    value: bytes = delivery.value or b""
    headers = {name: (raw or b"").decode("utf-8", "replace") for name, raw in delivery.headers}
    payload_bytes = len(value)
    value = value[:truncate]
    payload_encoding = "string"
    try:
        if encoding == "base64":
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "base64 asked")
        payload = value.decode("utf-8")
    except UnicodeDecodeError:
        payload, payload_encoding = base64.b64encode(value).decode("ascii"), "base64"
    return {
        "payload_bytes": payload_bytes, "redelivered": delivery.delivery_count > 1,
        "exchange": headers.pop("conveyor.exchange", ""),
        "routing_key": headers.pop("conveyor.routing-key", queue),
        "message_count": remaining, "properties": {"headers": headers},
        "payload": payload, "payload_encoding": payload_encoding,
    }
