"""The request/response core both clients share, sans-IO.

Owns: how each client call becomes an HTTP request (``Call``), how a response
becomes a result or a typed exception (the server's ``error.code`` mapped back to
the ``conveyor.errors`` class of that code), the retry decision (429/503 and
connection failures, with capped exponential backoff and jitter; other transport
failures only for idempotent calls), and the JSON shapes of messages.
Must not know: which HTTP library sends the bytes (sync.py and aio.py do).
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import orjson

from conveyor import errors
from conveyor.errors import ConveyorError, OperatingError

HEADER_REPLY_TO: Final = "conveyor.reply-to"
HEADER_CORRELATION_ID: Final = "conveyor.correlation-id"
RETRY_STATUSES: Final = frozenset({429, 503})


class ClientError(ConveyorError):
    """Base of errors raised by the client itself (not reported by the server)."""

    code = "client_error"


class ConnectionFailedError(ClientError):
    """The server could not be reached (after retries)."""

    code = "connection_failed"
    http_status = 503


class ServerError(OperatingError):
    """A response the client could not map to a known error code."""

    code = "server_error"
    http_status = 500


def _error_classes() -> dict[str, type[ConveyorError]]:
    found: dict[str, type[ConveyorError]] = {}
    pending: list[type[ConveyorError]] = [errors.ConveyorError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


_ERRORS_BY_CODE: Final = _error_classes()


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request the client wants to make."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    idempotent: bool = False
    wait_s: float = 0.0  # server-side long-poll time: added to the read timeout


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter."""

    attempts: int = 5  # total tries, the first included
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay_s(self, attempt: int, retry_after: str | None = None) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * (2 ** attempt))
        delay = self.rng.uniform(0, ceiling)
        if retry_after is not None:
            try:
                delay = max(delay, min(float(retry_after), self.backoff_max_s))
            except ValueError:
                pass
        return delay


def transport_failure_retryable(connect_failed: bool, call: Call) -> bool:
    """A request that never reached the server is always safe to repeat; one that may
    have been processed only when the call is idempotent."""
    return connect_failed or call.idempotent


def should_retry_status(status: int, attempt: int, policy: RetryPolicy) -> bool:
    return status in RETRY_STATUSES and attempt + 1 < policy.attempts


def error_from_response(status: int, body: bytes) -> ConveyorError:
    """The typed exception for an error response."""
    try:
        document = json.loads(body)
        error = document["error"]
        code, message = str(error["code"]), str(error["message"])
        details = error.get("details") or {}
    except (ValueError, KeyError, TypeError):
        return ServerError(f"HTTP {status}", status=status, body=body[:200].decode("latin-1"))
    return _typed_error(status, code, message, details)


def _typed_error(status: int | None, code: str, message: str, details: Mapping[str, Any]
                 ) -> ConveyorError:
    """The ``conveyor.errors`` class of ``code``; ``status`` None: an error reported
    inside a 200 answer (an ack an acquire carried), which keeps its class's status."""
    cls = _ERRORS_BY_CODE.get(code)
    if cls is None:
        cls = ServerError if status is not None and status >= 500 else OperatingError
    result = cls(message, **{str(key): value for key, value in details.items()})
    if cls.code != code:
        result.code = code  # keep the server's code even for an unknown subclass
    if status is not None:
        result.http_status = status
    return result


def decode_body(status: int, body: bytes) -> Any:
    """Success: the JSON document (None for 204). Error: raise the typed exception."""
    if status >= 400:
        raise error_from_response(status, body)
    if status == 204 or not body:
        return None
    # orjson: ~4x json.loads on an acquire of 1,000 messages (its JSONDecodeError is
    # json's); the server sends no integer past 64 bits, which orjson would read as a float
    return orjson.loads(body)


def request_body(call: Call) -> tuple[bytes | None, Mapping[str, str] | None]:
    """The body bytes and headers of ``call`` (its JSON encoded with orjson, compact)."""
    if call.json is None:
        return call.content, call.headers
    try:
        content = orjson.dumps(call.json)
    except TypeError:  # what orjson refuses (integers past 64 bits): the standard library
        content = json.dumps(call.json, separators=(",", ":"), ensure_ascii=False).encode()
    return content, {**(call.headers or {}), "Content-Type": "application/json"}


# --- message shapes -------------------------------------------------------------------
def _as_bytes(value: bytes | bytearray | memoryview | str | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def _put(document: dict[str, Any], name: str, data: bytes | None) -> None:
    if data is None:
        return
    try:
        document[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        document[f"{name}_base64"] = base64.b64encode(data).decode("ascii")


def encode_message(
    value: bytes | bytearray | memoryview | str | None,
    key: bytes | str | None = None,
    headers: Mapping[str, str | None] | None = None,
    partition: int | None = None,
    priority: int | None = None,
    delay_s: float | None = None,
    ttl_s: float | None = None,
    dedup_id: str | None = None,
    message_group: str | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """A publish message as the API's JSON (text where possible, else base64)."""
    document: dict[str, Any] = {}
    data = _as_bytes(value)
    if data is None:
        document["value"] = None
    else:
        _put(document, "value", data)
    _put(document, "key", _as_bytes(key))
    optional = {
        "headers": dict(headers) if headers else None,
        "partition": partition,
        "priority": priority,
        "delay_ms": None if delay_s is None else round(delay_s * 1000),
        "ttl_ms": None if ttl_s is None else max(1, round(ttl_s * 1000)),
        "dedup_id": dedup_id,
        "message_group": message_group,
        "reply_to": reply_to,
        "correlation_id": correlation_id,
        "timestamp_ms": timestamp_ms,
    }
    document.update({name: item for name, item in optional.items() if item is not None})
    return document


def _take_bytes(document: Mapping[str, Any], name: str) -> bytes | None:
    encoded = document.get(f"{name}_base64")
    if encoded is not None:
        return base64.b64decode(encoded)
    text = document.get(name)
    return None if text is None else str(text).encode("utf-8")


@dataclass(slots=True)
class MessageData:
    """A consumed message; shared-group deliveries also carry ``receipt`` and a lock."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]
    receipt: str | None = None
    delivery_count: int = 0
    lock_deadline_ms: int = 0
    group: str | None = None

    @property
    def text(self) -> str | None:
        return None if self.value is None else self.value.decode("utf-8")

    def json(self) -> Any:
        if self.value is None:
            return None
        return json.loads(self.value)

    @property
    def reply_to(self) -> str | None:
        raw = self.headers.get(HEADER_REPLY_TO)
        return None if raw is None else raw.decode("utf-8")

    @property
    def correlation_id(self) -> str | None:
        raw = self.headers.get(HEADER_CORRELATION_ID)
        return None if raw is None else raw.decode("utf-8")

    def to_document(self) -> dict[str, Any]:
        """JSON-able form (for ``conveyor consume --json``)."""
        document: dict[str, Any] = {
            "topic": self.topic, "partition": self.partition, "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
        }
        _put(document, "key", self.key)
        if self.value is None:
            document["value"] = None
        else:
            _put(document, "value", self.value)
        headers: dict[str, str | None] = {}
        for name, raw in self.headers.items():
            headers[name] = None if raw is None else raw.decode("utf-8", "replace")
        document["headers"] = headers
        if self.receipt is not None:
            document["receipt"] = self.receipt
            document["delivery_count"] = self.delivery_count
        return document


# MessageData's fields in order: topic, partition, offset, timestamp_ms, key, value,
# headers, receipt, delivery_count, lock_deadline_ms, group
MessageArgs = tuple[str, int, int, int, bytes | None, bytes | None, dict[str, bytes | None],
                    str | None, int, int, str | None]


def message_args(document: Mapping[str, Any], group: str | None = None) -> MessageArgs:
    """Positional constructor arguments of MessageData (its field order) from the API's
    message JSON: an acquire of 1,000 builds each message in ~1.2 us this way, ~2.1 through
    a keyword dict (bench/README.md, "Fourth pass (httpfast)")."""
    headers: dict[str, bytes | None] = {}
    text_headers = document.get("headers")
    if text_headers:
        for name, text in text_headers.items():
            headers[name] = None if text is None else str(text).encode("utf-8")
    binary_headers = document.get("headers_base64")
    if binary_headers:
        for name, encoded in binary_headers.items():
            headers[name] = None if encoded is None else base64.b64decode(encoded)
    return (document["topic"], int(document["partition"]), int(document["offset"]),
            int(document["timestamp_ms"]), _take_bytes(document, "key"),
            _take_bytes(document, "value"), headers, document.get("receipt"),
            int(document.get("delivery_count", 0)), int(document.get("lock_deadline_ms", 0)),
            group)


MESSAGE_FIELDS: Final = ("topic", "partition", "offset", "timestamp_ms", "key", "value",
                         "headers", "receipt", "delivery_count", "lock_deadline_ms", "group")


def message_fields(document: Mapping[str, Any], group: str | None = None) -> dict[str, Any]:
    """Constructor arguments of MessageData from the API's message JSON, by name."""
    return dict(zip(MESSAGE_FIELDS, message_args(document, group), strict=True))


@dataclass(frozen=True, slots=True)
class PublishResult:
    topic: str
    partition: int
    offset: int  # -1: dropped (duplicate dedup id, or overflow)
    duplicate: bool = False


def publish_results(document: Mapping[str, Any]) -> list[PublishResult]:
    return [
        PublishResult(r["topic"], int(r["partition"]), int(r["offset"]), bool(r["duplicate"]))
        for r in document["results"]
    ]


@dataclass(frozen=True, slots=True)
class FetchResult:
    messages: list[MessageData]
    next_offsets: dict[int, int]


# --- calls ----------------------------------------------------------------------------
def _segment(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def publish_call(topic: str, messages: Iterable[Mapping[str, Any]], idempotent: bool) -> Call:
    return Call("POST", f"/topics/{_segment(topic)}/messages",
                json={"messages": list(messages)}, idempotent=idempotent)


def publish_exchange_call(
    exchange: str, routing_key: str, messages: Iterable[Mapping[str, Any]]
) -> Call:
    return Call("POST", f"/exchanges/{_segment(exchange)}/messages",
                json={"routing_key": routing_key, "messages": list(messages)})


def fetch_call(
    topic: str,
    offsets: Mapping[int, int] | None,
    group: str | None,
    timestamp_ms: int | None,
    start: str | None,
    limit: int,
    wait_s: float,
) -> Call:
    body: dict[str, Any] = {"limit": limit, "wait_ms": round(wait_s * 1000)}
    if offsets:
        body["offsets"] = {str(p): o for p, o in offsets.items()}
    if group is not None:
        body["group"] = group
    if timestamp_ms is not None:
        body["timestamp_ms"] = timestamp_ms
    if start is not None:
        body["start"] = start
    return Call("POST", f"/topics/{_segment(topic)}/fetch", json=body, idempotent=True,
                wait_s=wait_s)


def fetch_result(document: Mapping[str, Any], group: str | None) -> FetchResult:
    return FetchResult(
        [MessageData(*message_args(m, group)) for m in document["messages"]],
        {int(p): int(o) for p, o in document.get("next_offsets", {}).items()},
    )


def group_path(topic: str, group: str) -> str:
    return f"/topics/{_segment(topic)}/groups/{_segment(group)}"


def acquire_call(
    topic: str, group: str, limit: int, wait_s: float, lock_s: float | None,
    ack: Iterable[str] | None = None,
) -> Call:
    body: dict[str, Any] = {"limit": limit, "wait_ms": round(wait_s * 1000)}
    if lock_s is not None:
        body["lock_ms"] = max(1, round(lock_s * 1000))
    if ack is not None:
        body["ack"] = list(ack)  # settled first, in the same request (docs/http.md)
    # Not idempotent: a retried acquire would lock more records than the caller sees.
    return Call("POST", group_path(topic, group) + "/acquire", json=body, wait_s=wait_s)


@dataclass(frozen=True, slots=True)
class AckFailure:
    """A receipt an acquire carried (``ack=``) that was not acknowledged, and why."""

    receipt: str
    error: ConveyorError


MessageT = TypeVar("MessageT")


class Acquired(list[MessageT]):
    """An acquire's messages (a list); with acks carried (``ack=``), ``acked`` counts
    those acknowledged (saved and fsynced before the answer, as ``ack()`` promises)
    and ``ack_failures`` lists the others. The messages are there either way."""

    def __init__(self, messages: Iterable[MessageT], report: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__(messages)
        self.acked: int = int(report["acked"]) if report else 0
        self.ack_failures: list[AckFailure] = [
            AckFailure(str(item["receipt"]), _typed_error(
                None, str(item["error"]["code"]), str(item["error"]["message"]), {}))
            for item in (report["failed"] if report else ())]


def settle_call(topic: str, group: str, action: str, receipts: Iterable[str],
                **extra: Any) -> Call:
    body: dict[str, Any] = {"receipts": list(receipts)}
    body.update({name: value for name, value in extra.items() if value is not None})
    return Call("POST", group_path(topic, group) + f"/{action}", json=body)


def commit_call(topic: str, group: str, offsets: Mapping[int, int]) -> Call:
    return Call("POST", group_path(topic, group) + "/offsets",
                json={"offsets": {str(p): o for p, o in offsets.items()}}, idempotent=True)


def admin_call(method: str, path: str, body: Any = None,
               params: Mapping[str, Any] | None = None) -> Call:
    return Call(method, path, json=body, params=params, idempotent=method in ("GET", "DELETE"))


def segment(name: str) -> str:
    """A name as one URL path segment."""
    return _segment(name)


# --- credentials ---------------------------------------------------------------------------
def credentials(url: str, user: str | None = None, password: str | None = None,
                token: str | None = None, vhost: str | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """(URL without user info, headers) from, first to last: the arguments, the URL's
    ``user:password@``, and ``CONVEYOR_TOKEN`` / ``CONVEYOR_USER`` / ``CONVEYOR_PASSWORD``.
    A token is sent as ``Authorization: Bearer``, a user as HTTP Basic; ``vhost`` as
    ``X-Conveyor-Vhost``. Nothing: no Authorization (the loopback guest, auth off)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    environ = {} if environ is None else environ
    split = urlsplit(url)
    if split.username is not None and user is None and token is None:
        user, password = unquote(split.username), unquote(split.password or "")
    if split.username is not None or split.password is not None:
        netloc = split.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if split.port is not None:
            netloc = f"{netloc}:{split.port}"
        url = urlunsplit((split.scheme, netloc, split.path, split.query, split.fragment))
    if user is None and token is None:
        token = environ.get("CONVEYOR_TOKEN") or None
        if token is None and environ.get("CONVEYOR_USER"):
            user, password = environ["CONVEYOR_USER"], environ.get("CONVEYOR_PASSWORD", "")
    headers: dict[str, str] = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    elif user is not None:
        basic = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {basic}"
    if vhost is not None:
        headers["X-Conveyor-Vhost"] = vhost
    return url, headers
