"""AMQP message properties and how an AMQP message maps onto a Conveyor record.

Owns: decoding and encoding the 14 Basic properties, the record headers written for
a published message, and the (exchange, routing key, properties) of a record handed
back to an AMQP consumer, whichever protocol wrote it.

A published message becomes one record:
- value = body; key = none;
- ``conveyor.amqp-properties`` = the property bytes exactly as the client sent them, so
  a delivery writes them back without re-encoding (the hot path);
- ``conveyor.exchange`` / ``conveyor.routing-key`` = where it was published;
- for readers over Kafka and HTTP: ``conveyor.content-type``, ``conveyor.content-encoding``,
  ``conveyor.correlation-id``, ``conveyor.reply-to``, ``conveyor.message-id``,
  ``conveyor.type``, ``conveyor.user-id``, ``conveyor.app-id``, ``conveyor.timestamp``
  (seconds), ``conveyor.delivery-mode``, ``conveyor.expiration`` (ms, as sent), and every
  entry of the headers table whose name does not start with ``conveyor.`` as a plain
  record header (strings as UTF-8, bytes as is, numbers and booleans as decimal text,
  other values as JSON text);
- ``priority`` → ``conveyor.priority`` (capped at 9) and ``expiration`` →
  ``conveyor.expires-at`` (the broker's queue rules read both).

A record without ``conveyor.amqp-properties`` (written over Kafka or HTTP) is delivered
with properties rebuilt from those headers; plain headers become string entries of the
headers table. A dead-lettered record (``conveyor.deaths``) gets RabbitMQ's ``x-death``
and ``x-first-death-*`` headers and loses its ``expiration``. Exchange and queue names
the broker wrote (dead letters, other protocols' publishes) lose their vhost prefix
(``names.local_name``); an AMQP publish records the client's own names, so the hot
path (raw properties, no deaths) changes nothing.

Sans-IO: no sockets, no event loop, no broker.
"""

from __future__ import annotations

import datetime
import decimal
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode

from conveyor.broker.types import HEADER_PRIORITY, Headers, Message

from .names import local_name

HEADER_PROPERTIES: Final = "conveyor.amqp-properties"
HEADER_EXCHANGE: Final = "conveyor.exchange"
HEADER_ROUTING_KEY: Final = "conveyor.routing-key"
HEADER_DEATHS: Final = "conveyor.deaths"
PRIORITY_MAX: Final = 9

# (attribute, flag bit, type, interop header); the order is the spec's.
_FIELDS: Final = (
    ("content_type", 0x8000, "shortstr", "conveyor.content-type"),
    ("content_encoding", 0x4000, "shortstr", "conveyor.content-encoding"),
    ("headers", 0x2000, "table", None),
    ("delivery_mode", 0x1000, "octet", "conveyor.delivery-mode"),
    ("priority", 0x0800, "octet", None),
    ("correlation_id", 0x0400, "shortstr", "conveyor.correlation-id"),
    ("reply_to", 0x0200, "shortstr", "conveyor.reply-to"),
    ("expiration", 0x0100, "shortstr", "conveyor.expiration"),
    ("message_id", 0x0080, "shortstr", "conveyor.message-id"),
    ("timestamp", 0x0040, "timestamp", "conveyor.timestamp"),
    ("type", 0x0020, "shortstr", "conveyor.type"),
    ("user_id", 0x0010, "shortstr", "conveyor.user-id"),
    ("app_id", 0x0008, "shortstr", "conveyor.app-id"),
    ("cluster_id", 0x0004, "shortstr", None),
)
_INTEROP_FIELDS: Final = tuple((name, header) for name, _, _, header in _FIELDS if header)
_INTEROP_TO_FIELD: Final = {header: (name, kind) for name, _, kind, header in _FIELDS if header}
_U64 = struct.Struct(">Q")


class PropertiesError(ValueError):
    """Malformed properties (the connection answers 502 SYNTAX_ERROR)."""


@dataclass(slots=True)
class Properties:
    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: int | None = None  # seconds since the epoch
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    cluster_id: str | None = None


def decode_properties(data: bytes) -> Properties:
    """Property flags (with continuation words) + property list."""
    try:
        flags = (data[0] << 8) | data[1]
        position = 2
        word = flags
        while word & 1:  # continuation flag words carry no properties we know
            word = (data[position] << 8) | data[position + 1]
            position += 2
        values: dict[str, Any] = {}
        for name, bit, kind, _ in _FIELDS:
            if not flags & bit:
                continue
            if kind == "shortstr":
                length = data[position]
                raw = data[position + 1 : position + 1 + length]
                if len(raw) != length:
                    raise PropertiesError(f"{name} truncated")
                values[name] = raw.decode("utf-8")
                position += 1 + length
            elif kind == "octet":
                values[name] = data[position]
                position += 1
            elif kind == "timestamp":
                values[name] = _U64.unpack_from(data, position)[0]
                position += 8
            else:
                consumed, table = pamqp_decode.field_table(bytes(data[position:]))
                values[name] = table
                position += consumed
        if position != len(data):
            raise PropertiesError("trailing bytes after the property list")
        return Properties(**values)
    except PropertiesError:
        raise
    except Exception as error:  # IndexError, struct.error, UnicodeDecodeError, ValueError,
        # RecursionError from a hostile nesting depth
        raise PropertiesError(f"malformed properties: {type(error).__name__}") from None


def encode_properties(properties: Properties) -> bytes:
    flags = 0
    parts: list[bytes] = []
    for name, bit, kind, _ in _FIELDS:
        value = getattr(properties, name)
        if value is None:
            continue
        flags |= bit
        if kind == "shortstr":
            raw = str(value).encode("utf-8")
            if len(raw) > 255:  # cut on a character boundary
                raw = raw[:255].decode("utf-8", "ignore").encode("utf-8")
            parts.append(bytes((len(raw),)) + raw)
        elif kind == "octet":
            parts.append(bytes((int(value) & 0xFF,)))
        elif kind == "timestamp":
            parts.append(_U64.pack(int(value) & 0xFFFFFFFFFFFFFFFF))
        else:
            parts.append(pamqp_encode.field_table(_encodable(value)))
    return struct.pack(">H", flags) + b"".join(parts)


def _encodable(value: Any) -> Any:
    """pamqp decodes a long string that is not UTF-8 as ``bytes`` but encodes only
    ``bytearray`` (field type 'x'): convert, recursively."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: _encodable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    return value


# --- publish -------------------------------------------------------------------------
def _header_text(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int | float | decimal.Decimal):
        return str(value).encode()
    if isinstance(value, datetime.datetime):
        return str(int(value.timestamp())).encode()
    return json.dumps(value, default=str, separators=(",", ":")).encode()


def expiration_ms(properties: Properties) -> int | None:
    """The expiration property in ms, or None; ValueError when it is not a number >= 0."""
    if properties.expiration is None:
        return None
    value = int(properties.expiration)
    if value < 0 or not properties.expiration.strip().isdigit():
        raise ValueError("expiration must be a non-negative integer of milliseconds")
    return value


# what a publish's record carries besides the raw properties, exchange and routing key:
# (interop and table headers, priority, TTL ms), a function of the properties alone
Derived = tuple[tuple[tuple[str, bytes | None], ...], int | None, int | None]


def derive(properties: Properties) -> Derived:
    """The headers, priority and TTL a publish with ``properties`` records (ValueError:
    an invalid expiration)."""
    headers: list[tuple[str, bytes | None]] = []
    for name, interop in _INTEROP_FIELDS:
        value = getattr(properties, name)
        if value is not None:
            headers.append((interop, value.encode() if isinstance(value, str)
                            else str(value).encode()))
    if properties.headers:
        for key, value in properties.headers.items():
            if not key.startswith("conveyor."):
                headers.append((key, _header_text(value)))
    priority = None
    if properties.priority is not None:
        priority = min(properties.priority, PRIORITY_MAX)
    return tuple(headers), priority, expiration_ms(properties)


# (property bytes, exchange, routing key) -> a message's whole headers tuple: what it
# holds is a function of these three, and one shared tuple per publisher lets the
# deliver path reuse what it derived from the previous record (Channel.deliver).
# Bounded like the decoded properties (publishing.py): short keys, a bounded number.
HEADERS_CACHED_MAX: Final = 256
HEADERS_CACHED_BYTES_MAX: Final = 512
_headers_cached: dict[tuple[bytes, str, str], Headers] = {}


def publish_message(exchange: str, routing_key: str, raw_properties: bytes,
                    properties: Properties, body: bytes, now_ms: int,
                    derived: Derived | None = None) -> Message:
    """The Message for ``Broker.publish``; ``properties`` = decode_properties(raw),
    ``derived`` = derive(properties) when the caller has it already."""
    derived_headers, priority, ttl_ms = derive(properties) if derived is None else derived
    key = (raw_properties, exchange, routing_key)
    headers = _headers_cached.get(key)
    if headers is None:
        headers = ((HEADER_PROPERTIES, raw_properties), (HEADER_EXCHANGE, exchange.encode()),
                   (HEADER_ROUTING_KEY, routing_key.encode()), *derived_headers)
        if len(raw_properties) + len(exchange) + len(routing_key) <= HEADERS_CACHED_BYTES_MAX:
            if len(_headers_cached) >= HEADERS_CACHED_MAX:
                _headers_cached.clear()
            _headers_cached[key] = headers
    return Message(
        body, None, headers,
        priority=priority, expires_at_ms=None if ttl_ms is None else now_ms + ttl_ms,
    )


# --- deliver -------------------------------------------------------------------------
@dataclass(slots=True)
class Outgoing:
    exchange: str
    routing_key: str
    properties: bytes


# the headers ``outgoing`` reads, and which of its variables each one sets
_DELIVERY_HEADER_SLOTS: Final = {HEADER_PROPERTIES: 0, HEADER_EXCHANGE: 1,
                                 HEADER_ROUTING_KEY: 2, HEADER_DEATHS: 3}


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


def outgoing(headers: Headers, key: bytes | None, source: str) -> Outgoing:
    """Exchange, routing key and property bytes for delivering a record."""
    raw: bytes | None = None
    exchange = routing_key = None
    deaths: bytes | None = None
    slot_of = _DELIVERY_HEADER_SLOTS.get
    for name, value in headers:  # one dict lookup per header: the per-message hot path
        slot = slot_of(name)
        if slot is None:
            continue
        if slot == 0:
            raw = value
        elif slot == 1:
            exchange = _text(value)
        elif slot == 2:
            routing_key = _text(value)
        else:
            deaths = value
    if routing_key is None:
        routing_key = _text(key) if key is not None else source
    if raw is not None and deaths is None:
        return Outgoing(exchange or "", routing_key, raw)
    properties: Properties | None = None
    if raw is not None:
        try:
            properties = decode_properties(raw)
        except PropertiesError:
            properties = None
    if properties is None:
        properties = _properties_from_headers(headers)
    if deaths is not None:
        properties = _with_deaths(properties, deaths)
    # written by the broker (a dead letter, an HTTP publish): in a vhost other than "/"
    # the exchange is the broker's qualified name; the client sees its own
    return Outgoing(local_name(exchange or ""), routing_key, encode_properties(properties))


def _properties_from_headers(headers: Headers) -> Properties:
    values: dict[str, Any] = {}
    table: dict[str, Any] = {}
    for name, value in headers:
        field = _INTEROP_TO_FIELD.get(name)
        if field is not None:
            attribute, kind = field
            text = _text(value)
            if kind in ("octet", "timestamp"):
                try:
                    values[attribute] = int(text)
                except ValueError:
                    continue
            else:
                values[attribute] = text
        elif name == HEADER_PRIORITY:
            try:
                values["priority"] = int(_text(value))
            except ValueError:
                continue
        elif not name.startswith("conveyor."):
            table[name] = _text(value) if value is not None else None
    if table:
        values["headers"] = table
    return Properties(**values)


_REASONS: Final = {"max-deliveries": "delivery_limit"}


def _with_deaths(properties: Properties, deaths_json: bytes) -> Properties:
    """RabbitMQ's dead-letter headers from the broker's ``conveyor.deaths`` JSON:
    ``{"deaths": [most recent first], "first": {queue, reason, exchange}}``."""
    try:
        document = json.loads(deaths_json)
        deaths = document["deaths"]
        first = document.get("first") or {}
        assert isinstance(deaths, list) and isinstance(first, Mapping)
    except (ValueError, KeyError, TypeError, AssertionError):
        return properties
    table = dict(properties.headers or {})
    entries: list[dict[str, Any]] = []
    for death in deaths:
        if not isinstance(death, Mapping):
            continue
        entry: dict[str, Any] = {
            "count": int(death.get("count", 1)),
            "reason": _reason(death.get("reason")),
            "queue": local_name(str(death.get("queue", ""))),
            "time": datetime.datetime.fromtimestamp(
                int(death.get("time", 0)), tz=datetime.UTC),
            "exchange": local_name(str(death.get("exchange", ""))),
            "routing-keys": [str(key) for key in death.get("routing-keys", [])],
        }
        if death.get("original-expiration") is not None:
            entry["original-expiration"] = str(death["original-expiration"])
        entries.append(entry)
    if entries:
        table["x-death"] = entries
        table["x-first-death-queue"] = local_name(str(first.get("queue",
                                                               entries[-1]["queue"])))
        table["x-first-death-reason"] = _reason(first.get("reason", entries[-1]["reason"]))
        table["x-first-death-exchange"] = local_name(str(first.get(
            "exchange", entries[-1]["exchange"])))
        table["x-last-death-queue"] = entries[0]["queue"]
        table["x-last-death-reason"] = entries[0]["reason"]
        table["x-last-death-exchange"] = entries[0]["exchange"]
    return replace(properties, headers=table, expiration=None)


def _reason(value: Any) -> str:
    return _REASONS.get(str(value), str(value))
