"""The SQS listener: an asyncio.Protocol per connection over the sans-IO framing/codec.

Owns: accepting connections, feeding bytes to ``RequestFramer``, answering one
request at a time per connection in arrival order, keep-alive, telling a long
poll that its client went away, and answering every failure in the protocol the
request spoke (an unexpected exception is logged and answered as InternalError,
never a dropped connection).
Must not know: actions (handlers.py), JSON/XML (codec.py).

Signatures: SigV4-signed requests are accepted from any credentials; nothing is
verified until Conveyor has a security model (ARCHITECTURE §6).

Settings (``[listeners.sqs]``): ``account_id`` ("000000000000"), ``region``
("us-east-1"), ``body_bytes_max`` (16 MiB), ``idle_timeout_ms`` (75 s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import ConveyorError, OperatingError
from conveyor.protocols.sqs.base import ACCOUNT_ID_DEFAULT, REGION_DEFAULT, RequestContext
from conveyor.protocols.sqs.codec import (
    SqsResponse,
    decode_request,
    encode_error,
    encode_result,
    protocol_of,
)
from conveyor.protocols.sqs.errors import InternalError, InvalidParameterValue, from_conveyor
from conveyor.protocols.sqs.framing import (
    BODY_BYTES_MAX,
    HttpRequest,
    RequestFramer,
    encode_response,
)
from conveyor.protocols.sqs.handlers import SqsHandlers

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.server.listeners import ListenerContext

logger = logging.getLogger("conveyor.sqs")

REQUESTS_QUEUED_MAX: Final = 64  # per connection (pipelined) before reading pauses
IDLE_TIMEOUT_MS: Final = 75_000  # nginx's keepalive_timeout default, as the HTTP API


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.listener.connections.add(self)
        self.worker = asyncio.get_running_loop().create_task(self._run())

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected.set()
        self.wakeup.set()
        self.listener.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.close_after is not None:
            return
        try:
            requests, immediate = self.framer.receive_data(data)
        except OperatingError as error:
            status = 413 if error.http_status == 413 else 400
            sqs_error = InvalidParameterValue(str(error))
            sqs_error.http_status = status
            response = encode_error("json" if self.framer.speaks_json() else "query",
                                    sqs_error, "-")
            self.close_after = encode_response(response.status, response.body,
                                               response.headers, keep_alive=False)
            self.wakeup.set()
            return
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
            response = await self.listener.respond(request, self.disconnected)
            keep_alive = request.keep_alive and not self.listener.closing
            if self.transport is None or self.disconnected.is_set():
                return
            self.transport.write(encode_response(response.status, response.body,
                                                 response.headers, keep_alive))
            if not keep_alive:
                self.transport.close()
                return


class SqsListener:
    """A RunningListener: ``port`` and ``close()``."""

    def __init__(self, broker: Broker, settings: dict[str, Any], advertised_host: str) -> None:
        self.body_bytes_max = int(settings.get("body_bytes_max", BODY_BYTES_MAX))
        self.idle_timeout_ms = int(settings.get("idle_timeout_ms", IDLE_TIMEOUT_MS))
        self.account_id = str(settings.get("account_id", ACCOUNT_ID_DEFAULT))
        self.region = str(settings.get("region", REGION_DEFAULT))
        self.advertised_host = advertised_host
        self.broker = broker
        self.port = 0
        self.closing = False
        self.connections: set[SqsConnection] = set()
        self.handlers: SqsHandlers | None = None
        self._server: asyncio.AbstractServer | None = None

    async def respond(self, raw: HttpRequest, disconnected: asyncio.Event) -> SqsResponse:
        assert self.handlers is not None
        protocol = protocol_of(raw)
        request_id = "-"
        try:
            request = decode_request(raw)
            request_id = request.request_id
            context = RequestContext(raw.headers.get("host", ""), disconnected,
                                     request.path)
            result = await self.handlers.handle(request.action, request.params, context)
            return encode_result(request, result)
        except ConveyorError as error:
            return encode_error(protocol, from_conveyor(error), request_id)
        except Exception:
            logger.exception("sqs action failed", extra={"target": raw.target[:200]})
            return encode_error(protocol, InternalError("internal error"), request_id)

    async def start(self, host: str, port: int) -> None:
        self.handlers = SqsHandlers(self.broker, self.account_id, self.region)
        await self.handlers.open()  # the catalog is read before the first request
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SqsConnection(self), host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self.handlers.default_host = f"{self.advertised_host}:{self.port}"

    async def close(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self.handlers is not None:
            await self.handlers.move_tasks.close()  # a running move stops between chunks
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
            if connection.worker is not None:
                connection.worker.cancel()
        for connection in list(self.connections):
            if connection.worker is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await connection.worker
        if self._server is not None:
            await self._server.wait_closed()


async def start_listener(broker: Broker, context: ListenerContext) -> SqsListener:
    listener = SqsListener(broker, dict(context.settings), context.advertised_host)
    await listener.start(context.host, context.port)
    return listener
