"""``conveyor.Client``: the blocking client over the HTTP API (httpx.Client).

Owns: sending ``core.Call``s with connection reuse and retries, the consume
iterators, and the request/response helpers (``call`` and ``serve_requests``).
Requests and responses are built and read by core.py.
GENERATED from aio.py by generate_sync.py: edit aio.py, then run
``python -m conveyor.client.generate_sync``; a test fails while this file is stale.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from os import environ
from ssl import SSLContext, create_default_context
from typing import Any, Literal

import httpx

from conveyor.client import core
from conveyor.client import transport as transports
from conveyor.client.core import (
    Call,
    ConnectionFailedError,
    FetchResult,
    MessageData,
    PublishResult,
    RetryPolicy,
)
from conveyor.errors import AlreadyExistsError, PreconditionFailedError, UnknownQueueError

Value = bytes | bytearray | memoryview | str | None
ConsumeMode = Literal["shared", "ordered"]


@dataclass(slots=True)
class Message(MessageData):
    """A consumed message: ``ack()``, ``release(delay_s=)``, ``extend(s)``."""

    settler: Any = field(default=None, repr=False, compare=False)

    def ack(self) -> None:
        """Shared group: acknowledge (never redelivered). Ordered: commit past it."""
        self.settler.ack(self)

    def release(self, delay_s: float = 0.0) -> None:
        """Shared group: give it back for redelivery (after ``delay_s``)."""
        self.settler.release(self, delay_s)

    def extend(self, seconds: float) -> None:
        """Shared group: keep the lock ``seconds`` from now."""
        self.settler.extend(self, seconds)


class _SharedSettler:
    def __init__(self, client: Client) -> None:
        self.client = client

    def ack(self, message: Message) -> None:
        assert message.receipt is not None and message.group is not None
        self.client.ack(message.topic, message.group, [message.receipt])

    def release(self, message: Message, delay_s: float) -> None:
        assert message.receipt is not None and message.group is not None
        self.client.release(message.topic, message.group, [message.receipt], delay_s)

    def extend(self, message: Message, seconds: float) -> None:
        assert message.receipt is not None and message.group is not None
        self.client.extend(message.topic, message.group, [message.receipt], seconds)


class _OrderedSettler:
    """Ordered mode: ``ack`` marks the position to commit (committed before the next
    fetch and when the iterator ends); release/extend have no meaning."""

    def __init__(self) -> None:
        self.pending: dict[int, int] = {}

    def ack(self, message: Message) -> None:
        current = self.pending.get(message.partition, -1)
        self.pending[message.partition] = max(current, message.offset + 1)

    def release(self, message: Message, delay_s: float) -> None:
        raise core.ClientError("release needs a shared group (ordered reads have no locks)")

    def extend(self, message: Message, seconds: float) -> None:
        raise core.ClientError("extend needs a shared group (ordered reads have no locks)")


class Client:
    """Blocking Conveyor client. Thread-safe for concurrent calls (httpx pools)."""

    def __init__(
        self,
        url: str = "http://localhost:8080",
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        vhost: str | None = None,
        verify: SSLContext | str | bool = True,
    ) -> None:
        # credentials: arguments, else the URL's user:password@, else CONVEYOR_TOKEN /
        # CONVEYOR_USER + CONVEYOR_PASSWORD (docs/security.md)
        url, auth_headers = core.credentials(url, user, password, token, vhost, environ)
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        # verify (https:// URLs): True checks the server against the system CAs, a path
        # against that CA bundle (a private CA: CONVEYOR_CA_FILE), an SSLContext as given.
        if verify is True and environ.get("CONVEYOR_CA_FILE"):
            verify = environ["CONVEYOR_CA_FILE"]
        if isinstance(verify, str):
            verify = create_default_context(cafile=verify)
        self._http = httpx.Client(base_url=self.url,
                                       headers={**auth_headers, **dict(headers or {})},
                                       transport=transport if transport is not None else
                                       transports.default_transport(self.url),
                                       timeout=timeout_s, verify=verify)
        self._plain = transports.plain_sender(self._http)  # None: httpx sends all
        self._reply_queue: str | None = None
        self._reply_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Delete this client's reply queue (if ``call`` made one) and close connections."""
        try:
            if self._reply_queue is not None:
                try:
                    self.delete_queue(self._reply_queue)
                except (UnknownQueueError, ConnectionFailedError):
                    pass
                self._reply_queue = None
        finally:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------
    def request(self, call: Call) -> Any:
        """Send ``call`` with retries; the decoded JSON or a typed exception."""
        attempt = 0
        timeouts = httpx.Timeout(self.timeout_s, read=self.timeout_s + call.wait_s)
        content, headers = core.request_body(call)
        while True:
            try:
                status, retry_after, body = self._send(call, content, headers, timeouts)
            except httpx.TransportError as error:
                connect_failed = isinstance(
                    error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                )
                if (core.transport_failure_retryable(connect_failed, call)
                        and attempt + 1 < self.retry.attempts):
                    time.sleep(self.retry.delay_s(attempt))
                    attempt += 1
                    continue
                raise ConnectionFailedError(
                    f"request failed: {type(error).__name__}", url=self.url, path=call.path,
                    reason=str(error),
                ) from error
            if core.should_retry_status(status, attempt, self.retry):
                time.sleep(self.retry.delay_s(attempt, retry_after))
                attempt += 1
                continue
            return core.decode_body(status, body)

    def _send(self, call: Call, content: bytes | None, headers: Mapping[str, str] | None,
                    timeouts: httpx.Timeout) -> tuple[int, str | None, bytes]:
        """One exchange: the answer's status, Retry-After and body."""
        answer = self._plain.exchange(call, content, headers, timeouts) if self._plain else None
        if answer is not None:  # a plain-HTTP call sent without httpx's objects
            return answer
        response = self._http.request(call.method, call.path, content=content,
                                            params=call.params, headers=headers, timeout=timeouts)
        return response.status_code, response.headers.get("retry-after"), response.content

    # --- publish --------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        value: Value,
        *,
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
    ) -> PublishResult:
        """Publish one message; durable on the server when this returns."""
        message = core.encode_message(
            value, key, headers, partition, priority, delay_s, ttl_s, dedup_id, message_group,
            reply_to, correlation_id,
        )
        return self.publish_batch(topic, [message])[0]

    def publish_batch(
        self, topic: str, messages: Iterable[Mapping[str, Any] | bytes | str]
    ) -> list[PublishResult]:
        """Publish many (raw values, or dicts from ``core.encode_message``) in one request."""
        documents = [
            dict(m) if isinstance(m, Mapping) else core.encode_message(m) for m in messages
        ]
        idempotent = all("dedup_id" in d for d in documents)
        result = self.request(core.publish_call(topic, documents, idempotent))
        return core.publish_results(result)

    def publish_to_exchange(
        self, exchange: str, routing_key: str, value: Value, **options: Any
    ) -> list[PublishResult]:
        document = core.encode_message(value, **options)
        result = self.request(core.publish_exchange_call(exchange, routing_key, [document]))
        return core.publish_results(result)

    # --- consume --------------------------------------------------------------------
    def _message(self, data: MessageData, settler: Any) -> Message:
        fields = {name: getattr(data, name) for name in MessageData.__slots__}
        return Message(**fields, settler=settler)

    def acquire(
        self, topic: str, group: str | None = None, limit: int = 10, wait_s: float = 0.0,
        lock_s: float | None = None, ack: Iterable[str] | None = None,
    ) -> core.Acquired[Message]:
        """Shared group (default: the queue's own group): lock up to ``limit`` messages,
        after acknowledging the receipts ``ack`` in the same request (``core.Acquired``)."""
        group = group or topic
        call = core.acquire_call(topic, group, limit, wait_s, lock_s, ack)
        document = self.request(call)
        settler = _SharedSettler(self)
        return core.Acquired([Message(*core.message_args(m, group), settler=settler)
                              for m in document["messages"]], document.get("acks"))

    def ack(self, topic: str, group: str, receipts: Iterable[str]) -> Any:
        return self.request(core.settle_call(topic, group, "ack", receipts))

    def release(self, topic: str, group: str, receipts: Iterable[str],
                      delay_s: float = 0.0) -> Any:
        return self.request(core.settle_call(topic, group, "release", receipts,
                                                   delay_ms=round(delay_s * 1000)))

    def extend(self, topic: str, group: str, receipts: Iterable[str], seconds: float) -> Any:
        return self.request(core.settle_call(topic, group, "extend", receipts,
                                                   lock_ms=max(1, round(seconds * 1000))))

    def fetch(
        self,
        topic: str,
        *,
        offsets: Mapping[int, int] | None = None,
        group: str | None = None,
        timestamp_ms: int | None = None,
        start: Literal["committed", "earliest", "latest"] | None = None,
        limit: int = 100,
        wait_s: float = 0.0,
    ) -> FetchResult:
        """Ordered read across partitions; pass ``next_offsets`` back to continue."""
        call = core.fetch_call(topic, offsets, group, timestamp_ms, start, limit, wait_s)
        return core.fetch_result(self.request(call), group)

    def commit(self, topic: str, group: str, offsets: Mapping[int, int]) -> dict[int, int]:
        """Commit next-offsets-to-read for an ordered group."""
        document = self.request(core.commit_call(topic, group, offsets))
        return {int(p): int(o) for p, o in document["offsets"].items()}

    def committed(self, topic: str, group: str) -> dict[int, int]:
        path = core.group_path(topic, group) + "/offsets"
        document = self.request(core.admin_call("GET", path))
        return {int(p): int(o) for p, o in document["offsets"].items()}

    def consume(
        self,
        topic: str,
        *,
        group: str | None = None,
        mode: ConsumeMode | None = None,
        wait_s: float = 5.0,
        follow: bool = False,
        limit: int | None = None,
        lock_s: float | None = None,
        from_beginning: bool = False,
        from_timestamp_ms: int | None = None,
        offsets: Mapping[int, int] | None = None,
    ) -> Iterator[Message]:
        """Iterate messages. Ends after ``wait_s`` without a message unless ``follow``.

        mode "shared" (the default with a group, and for a queue, whose group is its
        own name): every message is locked to this consumer until ``ack()`` or
        ``release()``; ``limit`` (default 10) messages are locked per request, so keep
        it small enough to process them within the lock. mode "ordered" (the default
        otherwise): partitions in offset order (``limit`` default 100), from
        the group's commits (``ack()`` commits) or from the beginning, a timestamp or
        explicit ``offsets``.
        """
        return self._consume_auto(topic, group, mode, wait_s, follow, limit, lock_s,
                                  from_beginning, from_timestamp_ms, offsets)

    def _consume_auto(
        self, topic: str, group: str | None, mode: ConsumeMode | None, wait_s: float,
        follow: bool, limit: int | None, lock_s: float | None, from_beginning: bool,
        from_timestamp_ms: int | None, offsets: Mapping[int, int] | None,
    ) -> Iterator[Message]:
        positioned = from_beginning or from_timestamp_ms is not None or bool(offsets)
        if mode is None and group is None and not positioned:
            # A queue is consumed through its own shared group.
            if self.describe_topic(topic).get("kind") == "queue":
                mode, group = "shared", topic
        mode = mode or ("shared" if group is not None else "ordered")
        if mode == "shared":
            inner = self._consume_shared(topic, group or topic, wait_s, follow,
                                         min(limit or 10, 1000), lock_s)
        else:
            inner = self._consume_ordered(topic, group, wait_s, follow, limit or 100,
                                          from_beginning, from_timestamp_ms, offsets)
        try:
            yield from inner
        finally:
            inner.close()

    def _consume_shared(
        self, topic: str, group: str, wait_s: float, follow: bool, limit: int,
        lock_s: float | None,
    ) -> Generator[Message, None, None]:
        while True:
            batch = self.acquire(topic, group, limit, wait_s, lock_s)
            if not batch:
                if follow:
                    continue
                return
            handed = 0
            try:
                for message in batch:
                    handed += 1
                    yield message
            finally:
                unseen = [m.receipt for m in batch[handed:] if m.receipt is not None]
                if unseen:  # the caller stopped early: give back what it never saw
                    self.release(topic, group, unseen)

    def _consume_ordered(
        self, topic: str, group: str | None, wait_s: float, follow: bool, limit: int,
        from_beginning: bool, from_timestamp_ms: int | None,
        offsets: Mapping[int, int] | None,
    ) -> Generator[Message, None, None]:
        settler = _OrderedSettler()
        positions: dict[int, int] | None = dict(offsets) if offsets else None
        start: Literal["committed", "earliest", "latest"] | None = (
            "earliest" if from_beginning else None
        )
        timestamp_ms = from_timestamp_ms
        try:
            while True:
                self._commit_pending(topic, group, settler)
                result = self.fetch(topic, offsets=positions, group=group,
                                          timestamp_ms=timestamp_ms, start=start, limit=limit,
                                          wait_s=wait_s)
                positions, timestamp_ms = result.next_offsets, None
                if not result.messages:
                    if follow:
                        continue
                    return
                for data in result.messages:
                    yield self._message(data, settler)
        finally:
            self._commit_pending(topic, group, settler)

    def _commit_pending(
        self, topic: str, group: str | None, settler: _OrderedSettler
    ) -> None:
        if group is not None and settler.pending:
            self.commit(topic, group, settler.pending)
            settler.pending = {}

    # --- request / response -----------------------------------------------------------
    def _ensure_reply_queue(self) -> str:
        with self._reply_lock:
            if self._reply_queue is None:
                name = f"reply.{uuid.uuid4().hex}"
                self.create_queue(name)
                self._reply_queue = name
            return self._reply_queue

    def call(self, topic: str, value: Value, *, timeout_s: float = 30.0,
                   **options: Any) -> Message:
        """Publish a request with reply_to + correlation_id and wait for its response."""
        reply_queue = self._ensure_reply_queue()
        correlation_id = uuid.uuid4().hex
        self.publish(topic, value, reply_to=reply_queue, correlation_id=correlation_id,
                     **options)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError(f"no response to {correlation_id} within {timeout_s} s")
            for message in self.acquire(reply_queue, reply_queue, 10,
                                              min(remaining_s, 20.0)):
                message.ack()  # a stray late response to an earlier call is dropped too
                if message.correlation_id == correlation_id:
                    return message

    def _ensure_request_queue(self, topic: str, group: str | None) -> None:
        """Create what ``serve_requests`` reads from, as ``call`` creates its reply queue,
        so either side may start first: the queue ``topic`` (or, with a group, the topic)."""
        try:
            if group is None:
                self.create_queue(topic)
            else:
                self.create_topic(topic)
        except (AlreadyExistsError, PreconditionFailedError):
            pass  # there already: a queue with its own config, or a plain topic

    def serve_requests(
        self,
        topic: str,
        handler: Callable[[Message], Value],
        *,
        group: str | None = None,
        wait_s: float = 1.0,
        max_messages: int | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Worker loop: answer each request with ``handler``'s return value, then ack.

        Replies go to the request's reply_to with its correlation_id. A handler
        exception releases the request (redelivered). Returns the count handled.
        """
        self._ensure_request_queue(topic, group)
        handled = 0
        while (stop is None or not stop.is_set()) and (
            max_messages is None or handled < max_messages
        ):
            for message in self.acquire(topic, group or topic, 1, wait_s):
                try:
                    response = handler(message)
                except Exception:
                    message.release()
                    raise
                if message.reply_to is not None:
                    self.publish(message.reply_to, response,
                                       correlation_id=message.correlation_id)
                message.ack()
                handled += 1
        return handled

    # --- admin ----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request(core.admin_call("GET", "/health"))
        return result

    def ready(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request(core.admin_call("GET", "/ready"))
        return result

    def create_topic(self, name: str, partitions: int = 1,
                           config: Mapping[str, str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "partitions": partitions}
        if config:
            body["config"] = dict(config)
        result: dict[str, Any] = self.request(core.admin_call("POST", "/topics", body))
        return result

    def list_topics(self) -> list[dict[str, Any]]:
        document = self.request(core.admin_call("GET", "/topics"))
        result: list[dict[str, Any]] = document["topics"]
        return result

    def describe_topic(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            core.admin_call("GET", f"/topics/{core.segment(name)}"))
        return result

    def alter_topic(self, name: str, *, set: Mapping[str, str] | None = None,
                          delete: Iterable[str] = (), partitions: int | None = None
                    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if set:
            body["set"] = dict(set)
        if delete:
            body["delete"] = list(delete)
        if partitions is not None:
            body["partitions"] = partitions
        result: dict[str, Any] = self.request(
            core.admin_call("PATCH", f"/topics/{core.segment(name)}", body))
        return result

    def delete_topic(self, name: str) -> None:
        self.request(core.admin_call("DELETE", f"/topics/{core.segment(name)}"))

    def create_queue(self, name: str, **config: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            core.admin_call("POST", "/queues", {"name": name, **config}))
        return result

    def list_queues(self) -> list[dict[str, Any]]:
        document = self.request(core.admin_call("GET", "/queues"))
        result: list[dict[str, Any]] = document["queues"]
        return result

    def describe_queue(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            core.admin_call("GET", f"/queues/{core.segment(name)}"))
        return result

    def delete_queue(self, name: str) -> None:
        self.request(core.admin_call("DELETE", f"/queues/{core.segment(name)}"))

    def create_exchange(self, name: str, type: str, **options: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            core.admin_call("POST", "/exchanges", {"name": name, "type": type, **options}))
        return result

    def list_exchanges(self) -> list[dict[str, Any]]:
        document = self.request(core.admin_call("GET", "/exchanges"))
        result: list[dict[str, Any]] = document["exchanges"]
        return result

    def describe_exchange(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            core.admin_call("GET", f"/exchanges/{core.segment(name)}"))
        return result

    def delete_exchange(self, name: str) -> None:
        self.request(core.admin_call("DELETE", f"/exchanges/{core.segment(name)}"))

    def bind(self, exchange: str, destination: str, *, destination_kind: str = "queue",
                   routing_key: str = "", arguments: Mapping[str, str] | None = None
             ) -> dict[str, Any]:
        body = {"destination_kind": destination_kind, "destination": destination,
                "routing_key": routing_key, "arguments": dict(arguments or {})}
        result: dict[str, Any] = self.request(
            core.admin_call("POST", f"/exchanges/{core.segment(exchange)}/bindings", body))
        return result

    def unbind(self, exchange: str, destination: str, *, destination_kind: str = "queue",
                     routing_key: str = "", arguments: Mapping[str, str] | None = None) -> None:
        body = {"destination_kind": destination_kind, "destination": destination,
                "routing_key": routing_key, "arguments": dict(arguments or {})}
        path = f"/exchanges/{core.segment(exchange)}/unbind"
        self.request(core.admin_call("POST", path, body))

    def create_group(
        self, topic: str, group: str, *, kind: ConsumeMode = "shared",
        start: Literal["earliest", "latest"] = "earliest", **config: Any,
    ) -> dict[str, Any]:
        """A shared group (``config``: visibility_timeout_ms, max_deliveries,
        dead_letter_topic) or an ordered group (its offsets committed at ``start``)."""
        if kind == "shared":
            body = {"start": start, **config}
            result: dict[str, Any] = self.request(
                core.admin_call("POST", core.group_path(topic, group), body))
            return result
        described = self.describe_topic(topic)
        field = "log_start_offset" if start == "earliest" else "high_watermark"
        offsets = {p["partition"]: p[field] for p in described["partition_offsets"]}
        committed = self.commit(topic, group, offsets)
        return {"group": group, "topic": topic, "start": start, "offsets": committed}

    def list_groups(self) -> list[dict[str, Any]]:
        document = self.request(core.admin_call("GET", "/groups"))
        result: list[dict[str, Any]] = document["groups"]
        return result

    def describe_group(self, group: str) -> dict[str, Any]:
        """An ordered group's state and per-partition lag."""
        result: dict[str, Any] = self.request(
            core.admin_call("GET", f"/groups/{core.segment(group)}"))
        return result

    def delete_group(self, group: str) -> None:
        self.request(core.admin_call("DELETE", f"/groups/{core.segment(group)}"))

    def dlq(self, topic: str, group: str | None = None, offset: int = 0,
                  limit: int = 100) -> list[MessageData]:
        """Messages in the dead-letter queue of a queue (or of a shared group)."""
        path = core.group_path(topic, group or topic) + "/dlq"
        document = self.request(core.admin_call("GET", path, params={"offset": offset,
                                                                     "limit": limit}))
        return [MessageData(**core.message_fields(m)) for m in document["messages"]]

    def redrive(self, topic: str, group: str | None = None, limit: int = 1000) -> int:
        """Move dead-lettered messages back to where they came from; returns the count."""
        path = core.group_path(topic, group or topic) + "/dlq/redrive"
        document = self.request(core.admin_call("POST", path, {"limit": limit}))
        return int(document["redriven"])
