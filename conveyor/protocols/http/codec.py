"""HTTP API codec, sans-IO: RawRequest -> ApiRequest (routed, validated); results -> JSON.

Owns: route matching, query coercion, JSON and raw-binary body decoding and
validation against the route's schema, the message JSON shapes (in and out),
and the error document ``{"error": {"code", "message", "details"}}`` with the
status from the error class (``conveyor.errors``: ``code``, ``http_status``).
Must not know: sockets, the broker's behaviour (handlers.py calls the broker).

Message values are lossless both ways: on input ``value`` (UTF-8 text) or
``value_base64``; on output ``value`` when the bytes are valid UTF-8, else
``value_base64`` (the same for keys, and headers go to ``headers`` or
``headers_base64``). A raw (non-JSON) publish body is one message whose value is
the body, with metadata in ``X-Conveyor-*`` request headers.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from conveyor.broker.types import Headers, Message
from conveyor.errors import ConveyorError, InvalidRequestError, NotFoundError, OperatingError
from conveyor.protocols.http.framing import RawRequest
from conveyor.protocols.http.routes import ROUTES, Route
from conveyor.protocols.http.schemas import (
    MESSAGE_IN,
    MESSAGES_PER_REQUEST_MAX,
    PUBLISH_BODY,
    Schema,
    validate,
)

HEADER_REPLY_TO: Final = "conveyor.reply-to"
HEADER_CORRELATION_ID: Final = "conveyor.correlation-id"
RAW_HEADER_PREFIX: Final = "x-conveyor-header-"
JSON_TYPES: Final = ("application/json", "text/json")


class MethodNotAllowedError(InvalidRequestError):
    code = "method_not_allowed"
    http_status = 405


class RouteNotFoundError(NotFoundError):
    code = "route_not_found"


class UnsupportedMediaTypeError(InvalidRequestError):
    code = "unsupported_media_type"
    http_status = 415


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """A routed, validated request: what a handler receives."""

    operation: str
    route: Route
    path: dict[str, str]  # path parameters, percent-decoded
    query: dict[str, Any]  # coerced to the schema's types
    body: dict[str, Any] = field(default_factory=dict)  # validated JSON (or {} for no body)
    messages: tuple[Message, ...] = ()  # decoded messages of a publish
    message_partitions: tuple[int | None, ...] = ()  # per message: explicit partition


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    document: Any = None  # JSON-able; None with 204
    headers: tuple[tuple[str, str], ...] = ()
    raw: bytes | None = None  # a body sent as is (web UI files), instead of ``document``
    content_type: str = "application/json"


class RecordLike(Protocol):
    @property
    def offset(self) -> int: ...
    @property
    def timestamp_ms(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...


# --- requests -------------------------------------------------------------------------
ROUTES_CACHED_MAX: Final = 4096  # (method, path) -> route and parameters; then it starts over
ROUTE_CACHED_PATH_MAX: Final = 256  # longer paths are matched every time (bounded memory)
_route_cache: dict[tuple[str, str], tuple[Route, dict[str, str]]] = {}


def match_route(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route of ``method`` ``path`` and its path parameters (a fresh dict); a
    client repeats the same few paths, so matches are remembered (misses are not)."""
    cached = _route_cache.get((method, path))
    if cached is None:
        cached = _match_route(method, path)
        if len(path) <= ROUTE_CACHED_PATH_MAX:
            if len(_route_cache) >= ROUTES_CACHED_MAX:
                _route_cache.clear()
            _route_cache[(method, path)] = cached
    return cached[0], dict(cached[1])


def _match_route(method: str, path: str) -> tuple[Route, dict[str, str]]:
    parts = path.strip("/").split("/")
    methods_seen = []
    for route in ROUTES:
        if len(route.segments) != len(parts):
            continue
        params = {}
        for template, part in zip(route.segments, parts, strict=True):
            if template.startswith("{"):
                if not part:
                    break
                params[template[1:-1]] = unquote(part, errors="strict")
            elif template != part:
                break
        else:
            if route.method == method:
                return route, params
            methods_seen.append(route.method)
    if methods_seen:
        raise MethodNotAllowedError(
            "method not allowed", method=method, path=path, allowed=sorted(set(methods_seen))
        )
    raise RouteNotFoundError("no such route", path=path)


def decode_request(raw: RawRequest) -> ApiRequest:
    """Route, coerce and validate ``raw``; raises an OperatingError for bad input."""
    try:
        split = urlsplit(raw.target)
        route, params = match_route(raw.method.upper(), split.path)
    except UnicodeDecodeError:
        raise InvalidRequestError("path is not valid UTF-8") from None
    query = _decode_query(route, split.query)
    if route.body is None:
        return ApiRequest(route.operation, route, params, query)
    content_type = raw.headers.get("content-type", "").split(";")[0].strip().lower()
    if route.binary_body and raw.body and content_type not in JSON_TYPES:
        message, partition = message_from_raw(raw.body, raw.header_list)
        return ApiRequest(route.operation, route, params, query, {}, (message,), (partition,))
    body = _decode_json_body(raw.body, route, content_type)
    if "messages" in body:  # each item already checked against MESSAGE_IN with the body
        decoded = [message_from_json(item, checked=True) for item in body["messages"]]
        return ApiRequest(
            route.operation, route, params, query, body,
            tuple(message for message, _ in decoded),
            tuple(partition for _, partition in decoded),
        )
    return ApiRequest(route.operation, route, params, query, body)


def _decode_query(route: Route, text: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if not text:
        return values
    for name, value in parse_qsl(text, keep_blank_values=True):
        schema = route.query.get(name)
        if schema is None:
            raise InvalidRequestError(f"unknown query parameter {name!r}")
        values[name] = _coerce(name, value, schema)
    return values


def _coerce(name: str, text: str, schema: Schema) -> Any:
    value: Any = text
    if schema.get("type") == "integer":
        try:
            value = int(text)
        except ValueError:
            raise InvalidRequestError(f"query parameter {name} must be an integer") from None
    elif schema.get("type") == "boolean":
        if text not in ("true", "false"):
            raise InvalidRequestError(f"query parameter {name} must be true or false")
        value = text == "true"
    validate(value, schema, f"query.{name}")
    return value


def _decode_json_body(body: bytes, route: Route, content_type: str) -> dict[str, Any]:
    if not body.strip():
        if route.body_required:
            raise InvalidRequestError("a JSON body is required")
        return {}
    if content_type and content_type not in JSON_TYPES:
        raise UnsupportedMediaTypeError("send application/json", content_type=content_type)
    try:
        # orjson: ~13x json.loads on a publish of one 1 KiB message, ~5x on an ack of
        # 1,000 receipts; stricter (UTF-8 only, no NaN, nesting under 1,024 levels), and
        # an integer past 64 bits reads as a float, which every integer field refuses
        document = orjson.loads(body)
    except (ValueError, RecursionError) as error:
        if "surrogate" in str(error) or "UTF-8" in str(error):
            raise InvalidRequestError("the JSON body is not valid Unicode text",
                                      reason=str(error)[:200]) from None
        raise InvalidRequestError("malformed JSON body", reason=str(error)[:200]) from None
    assert route.body is not None
    if route.body is not PUBLISH_BODY or not _text_messages_only(document):
        validate(document, route.body, "body")
    assert isinstance(document, dict)
    return document


def _text_messages_only(document: Any) -> bool:
    """A publish body of the common shape, ``{"messages": [{"value": text}, ...]}``
    within the item limits: valid as it is, without the schema walk (~4 µs of a publish
    of one message). Anything else, valid or not, goes through ``validate``, which names
    the first bad field."""
    if type(document) is not dict or len(document) != 1:
        return False
    messages = document.get("messages")
    return (type(messages) is list and 0 < len(messages) <= MESSAGES_PER_REQUEST_MAX
            and all(type(item) is dict and len(item) == 1
                    and type(item.get("value")) is str for item in messages))


def _bytes_field(item: Mapping[str, Any], name: str) -> bytes | None:
    text_value = item.get(name)
    encoded = item.get(f"{name}_base64")
    if text_value is not None and encoded is not None:
        raise InvalidRequestError(f"give {name} or {name}_base64, not both")
    if encoded is not None:
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"{name}_base64 is not valid base64") from None
    if text_value is None:
        return None
    return _utf8(str(text_value), name)


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{where} is not valid Unicode text") from None


def message_from_json(item: Mapping[str, Any], checked: bool = False
                      ) -> tuple[Message, int | None]:
    """One JSON message -> (Message, explicit partition or None); ``checked``: the
    caller has validated it against MESSAGE_IN already (a publish body's items)."""
    if not checked:
        validate(item, MESSAGE_IN, "message")
    elif len(item) == 1 and type(text := item.get("value")) is str:
        return Message(_utf8(text, "value")), None  # the common message: a text value
    headers: list[tuple[str, bytes | None]] = []
    for name, value in item.get("headers", {}).items():
        _utf8(name, "header name")
        headers.append((name, None if value is None else _utf8(value, f"header {name}")))
    for text_field in ("dedup_id", "message_group"):
        if text_field in item:
            _utf8(item[text_field], text_field)
    if "reply_to" in item:
        headers.append((HEADER_REPLY_TO, _utf8(item["reply_to"], "reply_to")))
    if "correlation_id" in item:
        headers.append((HEADER_CORRELATION_ID, _utf8(item["correlation_id"], "correlation_id")))
    timestamp_ms = item.get("timestamp_ms")
    message = Message(
        value=_bytes_field(item, "value"),
        key=_bytes_field(item, "key"),
        headers=tuple(headers),
        timestamp_ms=timestamp_ms,
        priority=item.get("priority"),
        dedup_id=item.get("dedup_id"),
        message_group=item.get("message_group"),
    )
    return _with_relative_times(message, item.get("delay_ms"), item.get("ttl_ms")), item.get(
        "partition"
    )


def _with_relative_times(message: Message, delay_ms: int | None, ttl_ms: int | None) -> Message:
    """Delays and TTLs travel as relative ms; handlers make them absolute (needs a clock)."""
    if delay_ms is None and ttl_ms is None:
        return message
    extra: list[tuple[str, bytes | None]] = []
    if delay_ms is not None:
        extra.append((RELATIVE_DELAY, str(delay_ms).encode()))
    if ttl_ms is not None:
        extra.append((RELATIVE_TTL, str(ttl_ms).encode()))
    return Message(
        message.value, message.key, message.headers + tuple(extra), message.timestamp_ms,
        message.priority, None, None, message.dedup_id, message.message_group,
    )


# Internal markers, resolved (and removed) by handlers.resolve_times before publishing.
RELATIVE_DELAY: Final = "\x00delay-ms"
RELATIVE_TTL: Final = "\x00ttl-ms"


def message_from_raw(
    body: bytes, header_list: Iterable[tuple[str, str]]
) -> tuple[Message, int | None]:
    """A raw body publish: value = body; X-Conveyor-* headers carry the rest."""
    fields: dict[str, Any] = {"value_base64": base64.b64encode(body).decode("ascii")}
    headers: dict[str, str] = {}
    integer_fields = {"partition", "priority", "delay-ms", "ttl-ms", "timestamp-ms"}
    text_fields = {"key", "dedup-id", "message-group", "reply-to", "correlation-id"}
    for name, value in header_list:
        if name.startswith(RAW_HEADER_PREFIX):
            headers[name[len(RAW_HEADER_PREFIX):]] = value
        elif name.startswith("x-conveyor-"):
            short = name[len("x-conveyor-"):]
            if short in integer_fields:
                try:
                    fields[short.replace("-", "_")] = int(value)
                except ValueError:
                    raise InvalidRequestError(f"header {name} must be an integer") from None
            elif short in text_fields:
                fields[short.replace("-", "_")] = value
            else:
                raise InvalidRequestError(f"unknown header {name}")
    if headers:
        fields["headers"] = headers
    return message_from_json(fields)


# --- responses ------------------------------------------------------------------------
def _put_bytes(document: dict[str, Any], name: str, data: bytes | None) -> None:
    if data is None:
        document[name] = None
        return
    try:
        document[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        document[f"{name}_base64"] = base64.b64encode(data).decode("ascii")


def record_document(topic: str, partition: int, record: RecordLike) -> dict[str, Any]:
    key, value, headers = record.key, record.value, record.headers
    if key is None and value is not None and not headers:
        try:  # the common message: a text value, no key, no headers (same document)
            return {"topic": topic, "partition": partition, "offset": record.offset,
                    "timestamp_ms": record.timestamp_ms, "key": None,
                    "value": value.decode("utf-8"), "headers": {}}
        except UnicodeDecodeError:
            pass
    document: dict[str, Any] = {
        "topic": topic, "partition": partition, "offset": record.offset,
        "timestamp_ms": record.timestamp_ms,
    }
    _put_bytes(document, "key", key)
    _put_bytes(document, "value", value)
    text_headers: dict[str, str | None] = {}
    binary_headers: dict[str, str | None] = {}
    for name, header in headers:
        if header is None:
            text_headers[name] = None
            continue
        try:
            text_headers[name] = header.decode("utf-8")
        except UnicodeDecodeError:
            binary_headers[name] = base64.b64encode(header).decode("ascii")
    document["headers"] = text_headers
    if binary_headers:
        document["headers_base64"] = binary_headers
    return document


def error_response(error: ConveyorError) -> ApiResponse:
    status = error.http_status if isinstance(error, OperatingError) else 500
    details = {key: _jsonable(value) for key, value in error.details.items()}
    document = {"error": {"code": error.code, "message": error.message, "details": details}}
    headers: tuple[tuple[str, str], ...] = ()
    if status in (429, 503):
        headers = (("Retry-After", "1"),)
    return ApiResponse(status, document, headers)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return str(value)


# orjson (pinned exactly in pyproject.toml) encodes a 1 KiB message document in ~0.7 us
# against ~12 us for the standard library's encoder (bench/README.md, issue 17): at
# acquire batches of 1,000 the stdlib encoder was 15 % of the broker's CPU. Output is
# compact UTF-8 (non-ASCII text as is, not \u-escaped: both are the same JSON). It only
# encodes here: request bodies (hostile input) are still parsed by the standard library.
_ORJSON_OPTIONS: Final = orjson.OPT_NON_STR_KEYS


def encode_document(document: Any) -> bytes:
    try:
        return orjson.dumps(document, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        # what orjson refuses and the standard library writes: integers beyond 64 bits
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
