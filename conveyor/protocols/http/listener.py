"""The HTTP listener: an asyncio.Protocol per connection over the sans-IO framing and codec.

Owns: accepting connections, feeding bytes to ``RequestFramer``, running one
request at a time per connection in arrival order (HTTP/1.1 pipelining keeps
order), writing each response, keep-alive and closing, the in-flight limit
(429 past it) and telling handlers when their client went away.
Must not know: routes or broker semantics (codec.py, handlers.py).

Why asyncio.Protocol + httptools and not aiohttp: measured by
bench/http/stack_choice.py (bench/results/http_stack.json), the lean protocol
serves ~2.7x the requests per second of aiohttp's AppRunner on the same loop
(32.7k vs 12.2k with 1 KiB bodies), and it sees ``connection_lost`` directly,
which the long-poll release rule needs.

Settings (``[listeners.http]``): ``body_bytes_max`` (16 MiB),
``requests_in_flight_max`` (4096; beyond: 429 with Retry-After),
``connections_max`` (10,000; beyond: closed at once, counted and logged),
``idle_timeout_ms`` (75 s without a request closes a keep-alive connection),
``request_timeout_ms`` (60 s from a request's first byte to its last; past it 408 and
close: nginx's client_header_timeout + client_body_timeout).

Server-wide (``ServerLimits``): the bytes of a request still arriving are held against
the partial-request budget (shed: 503 with Retry-After, then close); a publish is
answered 429 with Retry-After while its connection holds a fair share of the broker's
unstored publish bytes over the high-water mark, or while the disk alarm is on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from conveyor.config import listener_limits
from conveyor.connections import ConnectionView
from conveyor.errors import ConveyorError, OperatingError, UnavailableError
from conveyor.limits import RequestWatch, ServerLimits
from conveyor.protocols.http.auth import (
    LISTINGS,
    authenticate,
    authorize,
    filter_listing,
    forbidden_tag,
    qualify_request,
    vhost_of,
)
from conveyor.protocols.http.chunks import encode_body
from conveyor.protocols.http.codec import (
    ApiResponse,
    decode_request,
    encode_document,
    error_response,
)
from conveyor.protocols.http.framing import (
    BODY_BYTES_MAX,
    RawRequest,
    RequestFramer,
    encode_response,
)
from conveyor.protocols.http.handlers import Handlers, RequestContext
from conveyor.protocols.http.management import ManagementApi
from conveyor.protocols.http.openapi import build_document
from conveyor.protocols.http.receipts import ReceiptSeal
from conveyor.protocols.http.security_routes import MANAGEMENT_TAGS, SecurityRoutes
from conveyor.security.api import Principal, SecurityModel
from conveyor.security.model import Security, open_model, security_of
from conveyor.server.listeners import (
    Endpoints,
    ListenerContext,
    ListenerCounters,
    bind_endpoints,
    listener_counters,
    shared_connections,
    shared_limits,
)
from conveyor.tasks import StopSignal, Supervisor

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.server.listeners import Observability

logger = logging.getLogger("conveyor.http")

REQUESTS_IN_FLIGHT_MAX: Final = 4096  # server-wide; past it, 429 (backpressure, not queueing)
REQUESTS_QUEUED_MAX: Final = 64  # per connection (pipelined) before reading pauses
CONNECTIONS_MAX: Final = 10_000  # beyond it new connections are closed at once
IDLE_TIMEOUT_MS: Final = 75_000  # nginx's keepalive_timeout default
# Operations that add messages: pushed back with 429 under memory or disk pressure.
PUBLISH_OPERATIONS: Final = frozenset({"publish", "publish_exchange", "publish_queue"})
RETRY_AFTER_S: Final = 1  # what a pushed-back publisher is told to wait
# Answered without credentials: probes and the API description (docs/security.md).
PUBLIC_PATHS: Final = frozenset({"/health", "/ready", "/openapi.json"})


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpListener) -> None:
        self.server = server
        self.framer = RequestFramer(server.body_bytes_max)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[RawRequest] = collections.deque()
        self.wakeup = asyncio.Event()
        self.disconnected = StopSignal()  # a long poll watches it without a task
        self.worker: asyncio.Task[None] | None = None
        self.peer = ""
        self.peer_ip: str | None = None  # what security sees (loopback guest, back-off)
        self.peer_host = ""  # the publisher the flow counts (one per client host)
        self.close_after: bytes | None = None  # a final error response, then close
        self.watch: RequestWatch | None = None
        self.responding = False
        self.admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.server.gate.admit():
            transport.close()  # over the limit: refuse before reading anything
            return
        self.admitted = True
        self.server.counters.opened()
        self.watch = RequestWatch(self.server.limits, self._expired, self._is_busy)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) else None
        self.peer_host = f"http:{peer[0]}" if isinstance(peer, tuple) else self.peer
        self.server.connections.add(self)
        self.worker = self.server.tasks.start(self._run(), name="http-connection")

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected.set()
        self.wakeup.set()
        self.server.connections.discard(self)
        if self.admitted:
            self.admitted = False
            self.server.gate.release()
            self.server.counters.closed()
        if self.watch is not None:
            self.watch.stop()
        self.server.shared.budget.forget(self)

    def data_received(self, data: bytes) -> None:
        self.server.counters.bytes_received += len(data)
        if self.close_after is not None:
            return
        try:
            requests, immediate = self.framer.receive_data(data)
        except OperatingError as error:
            self.server.counters.error(error.code)  # unparseable or too large: 400/413
            self.close_after = _error_bytes(error)
            self.server.shared.budget.forget(self)
            self.wakeup.set()
            return
        partial = self.framer.partial_bytes
        if self.watch is not None:
            self.watch.received(partial > 0, bool(requests))
        self.server.shared.budget.hold(self, partial)
        if self.close_after is not None:
            return  # shed while holding the most
        if immediate and self.transport is not None:
            self.transport.write(immediate)
        self.queue.extend(requests)
        if len(self.queue) >= REQUESTS_QUEUED_MAX and self.transport is not None:
            self.transport.pause_reading()
        if requests:
            self.wakeup.set()

    def _is_busy(self) -> bool:
        return self.responding or bool(self.queue)

    def _expired(self, reason: str) -> None:
        self.server.shared.budget.forget(self)
        if reason == "idle":
            if self.transport is not None:
                self.transport.abort()  # a close would wait for a peer that is not reading
            return
        logger.info("http request timed out", extra={"peer": self.peer, "reason": reason})
        self.close_after = _response_bytes(ApiResponse(408, {"error": {
            "code": "request_timeout", "message": "the request did not arrive in time"}}),
            keep_alive=False)
        self.wakeup.set()

    def shed_memory(self) -> None:
        """Over the server's partial-request budget and holding the most: 503, close."""
        self.framer = RequestFramer(self.server.body_bytes_max)  # drop what it held
        self.close_after = _error_bytes(ServerBusyError(
            "server is low on memory for unfinished requests", retry_after_s=RETRY_AFTER_S))
        self.wakeup.set()

    def is_connected(self) -> bool:
        return not self.disconnected.is_set()

    async def _run(self) -> None:
        while not self.disconnected.is_set():
            if not self.queue:
                if self.close_after is not None:
                    self._write_and_close(self.close_after)
                    return
                self.wakeup.clear()
                await self.wakeup.wait()  # the watch closes an idle connection
                continue
            request = self.queue.popleft()
            if self.transport is not None and len(self.queue) < REQUESTS_QUEUED_MAX // 2:
                with contextlib.suppress(RuntimeError):
                    self.transport.resume_reading()
            self.responding = True
            try:
                response = await self.server.respond(request, self)
            finally:
                self.responding = False
            if self.watch is not None:
                self.watch.active()
            keep_alive = request.keep_alive and not self.server.closing
            if self.transport is None or self.disconnected.is_set():
                return
            body = response.raw if response.raw is not None else (
                b"" if response.document is None else await encode_body(response.document))
            if self.transport is None or self.disconnected.is_set():
                return
            data = encode_response(response.status, body, response.content_type,
                                   keep_alive=keep_alive, extra_headers=response.headers)
            self.server.counters.bytes_sent += len(data)
            self.transport.write(data)
            if not keep_alive:
                self.transport.close()
                return

    def _write_and_close(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.server.counters.bytes_sent += len(data)
            self.transport.write(data)
            self.transport.close()


def _response_bytes(response: ApiResponse, keep_alive: bool) -> bytes:
    body = b"" if response.document is None else encode_document(response.document)
    return encode_response(response.status, body, keep_alive=keep_alive,
                           extra_headers=response.headers)


def _error_bytes(error: ConveyorError) -> bytes:
    return _response_bytes(error_response(error), keep_alive=False)


class HttpListener:
    """A RunningListener: ``port`` and ``close()``."""

    def __init__(self, broker: Broker, settings: dict[str, Any],
                 shared: ServerLimits | None = None, counters: ListenerCounters | None = None,
                 observability: Observability | None = None,
                 security: SecurityModel | None = None) -> None:
        self.security: SecurityModel = security if security is not None else open_model()
        self.seal = ReceiptSeal()  # receipts bound to the user they were issued to
        self.security_routes = (SecurityRoutes(self.security)
                                if isinstance(self.security, Security) else None)
        self.counters = counters or ListenerCounters("http")
        self.limits = listener_limits("http", settings)
        self.shared = shared or ServerLimits()
        self.gate = self.shared.gate("http", self.limits)
        self.body_bytes_max = int(settings.get("body_bytes_max", BODY_BYTES_MAX))
        self.requests_in_flight_max = int(
            settings.get("requests_in_flight_max", REQUESTS_IN_FLIGHT_MAX)
        )
        self.connections_max = self.limits.connections_max
        self.idle_timeout_ms = self.limits.idle_timeout_ms
        self.in_flight = 0
        self.closing = False
        self.port = 0
        self.connections: set[HttpConnection] = set()
        self.tasks = Supervisor("http-listener")  # the connections' workers
        self._document: dict[str, Any] | None = None
        self.handlers = Handlers(broker, self.openapi, observability)
        # the management API's rate sampler: how often it reads the counters
        self.management = ManagementApi(broker, int(settings.get("stats_interval_ms", 1000)))
        self.unregister: Callable[[], None] = lambda: None  # leaves the connection registry
        self._server: Endpoints | None = None
        self.tls_port: int | None = None  # the HTTPS port (None: no TLS)

    def openapi(self) -> dict[str, Any]:
        if self._document is None:
            self._document = build_document()
        return self._document

    async def respond(self, raw: RawRequest, connection: HttpConnection) -> ApiResponse:
        response = await self._respond(raw, connection)
        if response.status >= 400:  # counted by the error document's stable code
            document = response.document
            error = document.get("error") if isinstance(document, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            self.counters.error(code if isinstance(code, str) else str(response.status))
        return response

    async def _respond(self, raw: RawRequest, connection: HttpConnection) -> ApiResponse:
        if self.in_flight >= self.requests_in_flight_max:
            return error_response(TooManyRequestsError(
                "too many requests in flight", limit=self.requests_in_flight_max
            ))
        self.in_flight += 1
        try:
            path = raw.target.split("?", 1)[0]
            principal = None
            if path not in PUBLIC_PATHS and not self.management.web.serves(path):
                authenticated = await authenticate(self.security, raw, connection.peer_ip)
                if authenticated.principal is None:
                    assert authenticated.response is not None
                    self.counters.request("unauthenticated")
                    return authenticated.response
                principal = authenticated.principal
            # --- management API (/api/...) and web UI (/, /ui/...): management.py ---
            if self.management.handles(raw):
                self.counters.request("management")
                return await self._management(raw, principal)
            try:
                request = decode_request(raw)
            except ConveyorError:
                self.counters.request("unrouted")
                raise
            self.counters.request(request.operation)
            vhost = vhost_of(raw)
            if principal is not None:
                denied = authorize(self.security, principal, request, vhost)
                if denied is not None:
                    return denied
            request = qualify_request(request, vhost)  # vhosts as name prefixes
            if principal is None:
                context = RequestContext(connection.is_connected, connection.disconnected,
                                         connection.peer, raw.headers.get("accept", ""))
            else:
                owner = principal.name
                context = RequestContext(
                    connection.is_connected, connection.disconnected, connection.peer,
                    raw.headers.get("accept", ""),
                    seal_receipts=lambda receipts: self.seal.seal_all(owner, receipts),
                    open_receipts=lambda sealed: self.seal.open_all(owner, sealed))
            if request.operation not in PUBLISH_OPERATIONS:
                response = await self.handlers.handle(request, context)
                if principal is None or request.operation not in LISTINGS:
                    return response
                return dataclasses.replace(response, document=filter_listing(
                    self.security, principal, request.operation, vhost, response.document))
            # A publisher is the client's host: its connections and in-flight publishes
            # add up; the check comes before this request's own bytes count, so one
            # publish larger than the mark still goes through when the broker is idle.
            flow, publisher = self.shared.flow, connection.peer_host
            if flow.should_wait(publisher):
                return error_response(PublishPushedBackError(
                    f"publishers are blocked: {flow.blocked_reason()}",
                    retry_after_s=RETRY_AFTER_S))
            flow.add(publisher, len(raw.body))
            try:
                return await self.handlers.handle(request, context)
            finally:
                flow.add(publisher, -len(raw.body))
        except ConveyorError as error:
            return error_response(error)
        except Exception:
            logger.exception("http handler failed", extra={"target": raw.target[:200]})
            return error_response(ConveyorError("internal error"))
        finally:
            self.in_flight -= 1

    async def _management(self, raw: RawRequest, principal: Principal | None) -> ApiResponse:
        """The security endpoints, else the management API: reading needs a management
        tag, changing needs administrator (docs/security.md)."""
        if principal is None:
            return await self.management.respond(raw)  # the web UI's static files
        matched = self.security_routes.match(raw) if self.security_routes else None
        if matched is not None and self.security_routes is not None:
            return await self.security_routes.respond(*matched, raw, principal)
        tags = MANAGEMENT_TAGS if raw.method.upper() in ("GET", "HEAD") else ("administrator",)
        if not principal.has_tag(*tags):
            return forbidden_tag(principal, tags)
        return await self.management.respond(raw)

    async def start(self, host: str, port: int, context: ListenerContext | None = None) -> None:
        """Bind plain and/or TLS ports as ``context`` says (HTTPS on ``port`` itself when
        TLS is on and no ``tls_port`` is set)."""
        context = context or ListenerContext(host, port)
        self._server = await bind_endpoints(context, "http", lambda: HttpConnection(self),
                                            self.limits.handshake_timeout_ms, http=True)
        self.port = self._server.port
        self.tls_port = self._server.tls_port

    async def close(self) -> None:
        self.closing = True
        self.handlers.closing = True
        self.unregister()
        await self.management.close()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        await self.tasks.close(cancel=True)  # every connection's worker, even a disconnected one's
        if self._server is not None:
            await self._server.wait_closed()


class TooManyRequestsError(OperatingError):
    code = "too_many_requests"
    http_status = 429


class PublishPushedBackError(TooManyRequestsError):
    """Memory high-water mark or disk alarm: this publisher waits (429, Retry-After)."""

    code = "publishers_blocked"


class ServerBusyError(UnavailableError):
    """Unfinished requests over the server's memory budget: 503, Retry-After, close."""

    code = "server_busy"


async def start_listener(broker: Broker, context: ListenerContext) -> HttpListener:
    listener = HttpListener(broker, dict(context.settings), shared_limits(context),
                            listener_counters(context, "http"), context.observability,
                            security_of(context))
    if context.cluster is not None:  # several nodes: a receipt sealed by one opens on all
        listener.seal = ReceiptSeal(context.cluster.derived_key("http-receipts"))
        # an ordered group's commits, reads, describe and delete: run by its owner
        listener.handlers.groups = context.cluster.groups
    await listener.start(context.host, context.port, context)
    # --- management API and web UI (management.py): registry of live connections ---
    registry = shared_connections(context)
    listener.unregister = registry.add_source("http", listener.port, lambda: (
        ConnectionView("http", connection.peer, listener.port)
        for connection in list(listener.connections)))
    listener.management.start(registry)
    return listener
