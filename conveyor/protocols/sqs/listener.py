"""The SQS listener: an asyncio.Protocol per connection over the sans-IO framing/codec.

Owns: accepting connections, feeding bytes to ``RequestFramer``, answering one
request at a time per connection in arrival order, keep-alive, telling a long
poll that its client went away, and answering every failure in the protocol the
request spoke (an unexpected exception is logged and answered as InternalError,
never a dropped connection).
Must not know: actions (handlers.py), JSON/XML (codec.py).

Signatures: every request's SigV4 signature is verified against the security model's
access keys and each action is checked against the principal's permissions (access.py);
without ``--auth required`` an unsigned request, or one signed with a key Conveyor does
not know, acts as the loopback-only guest.

Settings (``[listeners.sqs]``): ``account_id`` ("000000000000"), ``region``
("us-east-1"), ``body_bytes_max`` (16 MiB), ``idle_timeout_ms`` (75 s), and the
listener limits every protocol shares (conveyor/limits.py, docs/limits.md):
``connections_max`` (past it a connection is closed at once), ``request_timeout_ms``
(a request whose first byte arrived must be whole within it: else 408 and close), the
server-wide budget of unfinished requests (the connection holding the most gets 503
ServiceUnavailable and is closed), and publisher push-back: under the memory
high-water mark or the disk alarm a heavy publisher's SendMessage(Batch) answers
RequestThrottled, which SDKs retry with backoff.
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
from conveyor.connections import ConnectionView, peer_text
from conveyor.errors import ConveyorError, OperatingError
from conveyor.limits import RequestWatch, ServerLimits
from conveyor.protocols.sqs.access import SqsAccess
from conveyor.protocols.sqs.base import ACCOUNT_ID_DEFAULT, REGION_DEFAULT, RequestContext
from conveyor.protocols.sqs.codec import (
    SqsResponse,
    decode_request,
    encode_error,
    encode_result,
    protocol_of,
)
from conveyor.protocols.sqs.errors import (
    InternalError,
    InvalidParameterValue,
    RequestThrottled,
    ServiceUnavailable,
    from_conveyor,
)
from conveyor.protocols.sqs.framing import (
    BODY_BYTES_MAX,
    HttpRequest,
    RequestFramer,
    encode_response,
)
from conveyor.protocols.sqs.handlers import SqsHandlers
from conveyor.security.model import security_of
from conveyor.server.listeners import (
    Endpoints,
    ListenerContext,
    ListenerCounters,
    bind_endpoints,
    is_tls,
    listener_counters,
    shared_connections,
    shared_limits,
)
from conveyor.tasks import Supervisor

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.security.api import SecurityModel
    from conveyor.server.listeners import ListenerContext

logger = logging.getLogger("conveyor.sqs")

REQUESTS_QUEUED_MAX: Final = 64  # per connection (pipelined) before reading pauses
IDLE_TIMEOUT_MS: Final = 75_000  # nginx's keepalive_timeout default, as the HTTP API
# Actions that add messages: pushed back under memory or disk pressure.
PUBLISH_ACTIONS: Final = frozenset({"SendMessage", "SendMessageBatch"})


class SqsConnection(asyncio.Protocol):
    def __init__(self, listener: SqsListener) -> None:
        self.listener = listener
        self.framer = RequestFramer(listener.body_bytes_max)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[HttpRequest] = collections.deque()
        self.wakeup = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None
        self.close_after: bytes | None = None
        self.watch: RequestWatch | None = None  # request deadline (idle: see _run)
        self.admitted = False
        self.peer_host = ""  # the publisher the flow counts (one per client host)
        self.peer_address = ""  # the client's IP (the security model's loopback rule)
        self.scheme = "http"  # "https" over TLS: queue URLs point back the same way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.listener.gate.admit():
            transport.close()  # over connections_max: refused before reading anything
            return
        self.admitted = True
        self.watch = RequestWatch(self.listener.request_limits, self._expired, lambda: True)
        peer = transport.get_extra_info("peername")
        self.peer_host = f"sqs:{peer[0]}" if isinstance(peer, tuple) else f"sqs:{peer}"
        self.peer_address = str(peer[0]) if isinstance(peer, tuple) else ""
        self.scheme = "https" if is_tls(transport) else "http"
        self.listener.connections.add(self)
        self.listener.counters.opened()
        self.worker = self.listener.tasks.start(self._run(), name="sqs-connection")

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected.set()
        self.wakeup.set()
        if self in self.listener.connections:
            self.listener.counters.closed()
        self.listener.connections.discard(self)
        if self.admitted:
            self.admitted = False
            self.listener.gate.release()
        if self.watch is not None:
            self.watch.stop()
        self.listener.shared.budget.forget(self)

    def _expired(self, reason: str) -> None:
        """A request started and did not finish within request_timeout_ms: 408, close."""
        self.listener.shared.budget.forget(self)
        logger.info("sqs request timed out", extra={"reason": reason})
        self._close_with(408, "RequestTimeout", "the request did not arrive in time", False)

    def shed_memory(self) -> None:
        """Over the server's budget of unfinished requests and holding the most."""
        self.framer = RequestFramer(self.listener.body_bytes_max)  # drop what it held
        self._close_with(503, ServiceUnavailable.code,
                         "server is low on memory for unfinished requests", True)

    def _close_with(self, status: int, code: str, message: str, server_fault: bool) -> None:
        error = (ServiceUnavailable if server_fault else InvalidParameterValue)(message)
        error.http_status = status
        error.code = error.query_code = code  # type: ignore[misc]
        response = encode_error("query", error, "-")
        self.close_after = encode_response(response.status, response.body, response.headers,
                                           keep_alive=False)
        self.wakeup.set()

    def data_received(self, data: bytes) -> None:
        self.listener.counters.bytes_received += len(data)
        if self.close_after is not None:
            return
        try:
            requests, immediate = self.framer.receive_data(data)
        except OperatingError as error:
            self.listener.counters.error(InvalidParameterValue.code)
            status = 413 if error.http_status == 413 else 400
            sqs_error = InvalidParameterValue(str(error))
            sqs_error.http_status = status
            response = encode_error("json" if self.framer.speaks_json() else "query",
                                    sqs_error, "-")
            self.close_after = encode_response(response.status, response.body,
                                               response.headers, keep_alive=False)
            self.listener.shared.budget.forget(self)
            self.wakeup.set()
            return
        partial = self.framer.partial_bytes
        if self.watch is not None:
            self.watch.received(partial > 0, bool(requests))
        self.listener.shared.budget.hold(self, partial)
        if self.close_after is not None:
            return  # shed while holding the most
        if immediate and self.transport is not None:
            self.transport.write(immediate)
        self.queue.extend(requests)
        if len(self.queue) >= REQUESTS_QUEUED_MAX and self.transport is not None:
            self.transport.pause_reading()
        if requests:
            self.wakeup.set()

    async def _run(self) -> None:
        idle_s = self.listener.idle_timeout_ms / 1000
        while not self.disconnected.is_set():
            if not self.queue:
                if self.close_after is not None:
                    if self.transport is not None and not self.transport.is_closing():
                        self.transport.write(self.close_after)
                        self.transport.close()
                    return
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), idle_s)
                except TimeoutError:
                    if not self.queue and self.transport is not None:
                        self.transport.close()
                        return
                continue
            request = self.queue.popleft()
            if self.transport is not None and len(self.queue) < REQUESTS_QUEUED_MAX // 2:
                with contextlib.suppress(RuntimeError):
                    self.transport.resume_reading()
            response = await self.listener.respond(request, self.disconnected, self.peer_host,
                                                   self.peer_address, self.scheme)
            keep_alive = request.keep_alive and not self.listener.closing
            if self.transport is None or self.disconnected.is_set():
                return
            data = encode_response(response.status, response.body, response.headers,
                                   keep_alive)
            self.listener.counters.bytes_sent += len(data)
            self.transport.write(data)
            if not keep_alive:
                self.transport.close()
                return


class SqsListener:
    """A RunningListener: ``port`` and ``close()``."""

    def __init__(self, broker: Broker, settings: dict[str, Any], advertised_host: str,
                 shared: ServerLimits | None = None,
                 counters: ListenerCounters | None = None,
                 security: SecurityModel | None = None) -> None:
        self.limits = listener_limits("sqs", settings)
        # the watch keeps the request deadline; _run keeps the idle close (long polls)
        self.request_limits = dataclasses.replace(self.limits, idle_timeout_ms=0,
                                                  handshake_timeout_ms=0)
        self.shared = shared or ServerLimits()
        self.gate = self.shared.gate("sqs", self.limits)
        self.counters = counters or ListenerCounters("sqs")
        self.body_bytes_max = int(settings.get("body_bytes_max", BODY_BYTES_MAX))
        self.idle_timeout_ms = int(settings.get("idle_timeout_ms", IDLE_TIMEOUT_MS))
        self.account_id = str(settings.get("account_id", ACCOUNT_ID_DEFAULT))
        self.region = str(settings.get("region", REGION_DEFAULT))
        if security is None:  # started alone: auth off, loopback guest
            from conveyor.security.model import open_model
            security = open_model()
        self.access = SqsAccess(security, self.region, self.account_id)
        self.advertised_host = advertised_host
        self.broker = broker
        self.port = 0
        self.closing = False
        self.connections: set[SqsConnection] = set()
        self.tasks = Supervisor("sqs-listener")  # the connections' workers
        self.handlers: SqsHandlers | None = None
        self._server: Endpoints | None = None
        self.tls_port: int | None = None  # the HTTPS port (None: no TLS)
        self.unregister: Callable[[], None] = lambda: None  # leaves the connection registry

    async def respond(self, raw: HttpRequest, disconnected: asyncio.Event,
                      publisher: str = "", peer_address: str = "",
                      scheme: str = "http") -> SqsResponse:
        assert self.handlers is not None
        protocol = protocol_of(raw)
        request_id = "-"
        try:
            principal = await self.access.principal(raw, peer_address)
            request = decode_request(raw)
            request_id = request.request_id
            self.counters.request(request.action)
            context = RequestContext(raw.headers.get("host", ""), disconnected,
                                     request.path, scheme)
            self.access.authorize(principal, request.action, request.params, request.path)
            if request.action not in PUBLISH_ACTIONS:
                result = await self.handlers.handle(request.action, request.params, context)
                if request.action == "ListQueues":
                    result = self.access.visible_urls(principal, result)
                return encode_result(request, result)
            flow = self.shared.flow  # a publisher is the client's host, as over HTTP
            if flow.should_wait(publisher):
                raise RequestThrottled(f"publishers are blocked: {flow.blocked_reason()}")
            flow.add(publisher, len(raw.body))
            try:
                result = await self.handlers.handle(request.action, request.params, context)
            finally:
                flow.add(publisher, -len(raw.body))
            return encode_result(request, result)
        except ConveyorError as error:
            sqs_error = from_conveyor(error)
            self.counters.error(sqs_error.code)
            return encode_error(protocol, sqs_error, request_id)
        except Exception:
            logger.exception("sqs action failed", extra={"target": raw.target[:200]})
            return encode_error(protocol, InternalError("internal error"), request_id)

    async def start(self, host: str, port: int, context: ListenerContext | None = None) -> None:
        """Bind plain and/or TLS ports as ``context`` says (HTTPS on ``port`` itself when
        TLS is on and no ``tls_port`` is set)."""
        self.handlers = SqsHandlers(self.broker, self.account_id, self.region)
        await self.handlers.open()  # the catalog is read before the first request
        context = context or ListenerContext(host, port)
        if context.cluster is not None:  # receipt handles valid on every node
            self.handlers.use_receipt_key(context.cluster.derived_key("sqs-receipts"))
        self._server = await bind_endpoints(context, "sqs", lambda: SqsConnection(self),
                                            self.limits.handshake_timeout_ms, http=True)
        self.port = self._server.port
        self.tls_port = self._server.tls_port
        self.handlers.default_host = f"{self.advertised_host}:{self.port}"

    async def close(self) -> None:
        self.closing = True
        self.unregister()
        if self._server is not None:
            self._server.close()
        if self.handlers is not None:
            await self.handlers.move_tasks.close()  # a running move stops between chunks
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        await self.tasks.close(cancel=True)  # every connection's worker, even a disconnected one's
        if self._server is not None:
            await self._server.wait_closed()


async def start_listener(broker: Broker, context: ListenerContext) -> SqsListener:
    listener = SqsListener(broker, dict(context.settings), context.advertised_host,
                           shared_limits(context), listener_counters(context, "sqs"),
                           security_of(context))
    await listener.start(context.host, context.port, context)
    listener.unregister = shared_connections(context).add_source("sqs", listener.port, lambda: (
        ConnectionView("sqs", peer_text(connection.transport.get_extra_info("peername")),
                       listener.port)
        for connection in list(listener.connections) if connection.transport is not None))
    return listener
