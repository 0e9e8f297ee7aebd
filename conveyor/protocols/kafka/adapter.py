"""The asyncio adapter: moves bytes between a socket and the Kafka codec and handlers.

Owns: one ``asyncio.Protocol`` per connection, the in-order request queue, the
batched writes, ``os.sendfile`` for record bytes, flow control and closing.
It decides nothing about Kafka semantics (codec.py, handlers.py do).

Rules:
- Responses go out in request order. Requests are handled one at a time in
  arrival order, except consecutive Produce requests, which are pipelined: each
  appends as soon as it is read and its answer waits for those before it, so
  the fsync wait of acks=all does not serialize a producer's in-flight
  requests (Kafka mutes a channel per request, but has no fsync to wait for).
- Responses collect in one output list and are written when the request queue
  is empty or before a request that may wait (Fetch long-poll, JoinGroup,
  SyncGroup): one batched write per read in the pipelined case.
- Record pieces given as (fileno, position, size) go out with ``os.sendfile``
  in the same loop turn the handler produced them in (so a segment cannot be
  closed in between), when the transport's buffer is empty; what does not fit
  the socket is read with ``pread`` and buffered.
- A frame the codec rejects (bad size, truncated header, unparseable body) or
  a request nobody can answer closes the connection after the responses to the
  requests before it; other connections are unaffected.
- A client that stops reading: the transport pauses writing at its high-water
  mark, the worker stops, the queue fills to ``requests_queued_max`` and
  reading pauses; memory stays bounded. The part of a fetch response the socket
  does not take at once is read from the log in ``FILE_CHUNK_BYTES`` pieces only
  while the transport is below its high-water mark (from a duplicated descriptor,
  so the segment may close meanwhile), never copied whole into memory.
- Bounded waits (``ListenerLimits``): a frame must be whole within
  ``request_timeout_ms`` of the read it began in; a connection with no request for
  ``idle_timeout_ms`` (Kafka's connections.max.idle.ms) is closed; past
  ``connections_max`` a new connection is closed at once (counted and logged by the
  listener's ``ConnectionGate``). The bytes of a partial frame are held against the
  server-wide ``MemoryBudget``; when shed, the connection is closed (Kafka has no
  error for a request it has not read) and its buffer dropped.
- Publisher push-back (``PublishFlow``): while this connection holds a fair share of
  the unstored produce bytes over the broker's high-water mark (or the disk alarm
  is on), its next produce waits, and reading pauses once the queue is full: a
  delayed response, as Kafka mutes a throttled channel.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import struct
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

from conveyor.config import LISTENER_LIMITS_DEFAULT, ListenerLimits
from conveyor.errors import OperatingError
from conveyor.limits import PublishFlow, RequestWatch, ServerLimits
from conveyor.protocols.kafka.codec import Request, ServerCodec, UnsupportedRequest
from conveyor.protocols.kafka.encoders import ResponsePiece
from conveyor.protocols.kafka.error_codes import UNSUPPORTED_VERSION, error_code_for, error_name
from conveyor.protocols.kafka.framing import NeedData
from conveyor.protocols.kafka.messages import API_NAMES
from conveyor.server.listeners import ListenerCounters, is_tls, peer_principal_name
from conveyor.tasks import Supervisor

if TYPE_CHECKING:
    from conveyor.protocols.kafka.scram import ScramServer
    from conveyor.security.api import Principal

logger = logging.getLogger("conveyor.kafka")

# Kafka's queued.max.requests is 500 per broker; per connection far fewer suffice
# (librdkafka pipelines at most max.in.flight=5 produce requests).
REQUESTS_QUEUED_MAX: Final = 64
PRODUCE_API_KEY: Final = 0
# librdkafka pipelines max.in.flight (5 with idempotence, up to 1M without) requests.
PRODUCES_IN_FLIGHT_MAX: Final = 32
# APIs whose handling may wait on other clients or on time: flush before them.
WAITING_API_KEYS: Final = frozenset({1, 11, 14, 78})  # Fetch, JoinGroup, SyncGroup, ShareFetch
# Record bytes read from a segment per write once the socket is full: the transport's
# write buffer then holds at most about this much above its high-water mark.
FILE_CHUNK_BYTES: Final = 256 * 1024
_THROTTLE: Final = struct.Struct(">i")

Response = bytes | list[ResponsePiece] | None
Handle = Callable[[Request, "ConnectionState"], Coroutine[Any, Any, Response]]


class ConnectionState:
    """What the handlers keep per connection (SASL progress, the peer's name)."""

    def __init__(self, peer: str, peer_host: str = "", tasks: Supervisor | None = None) -> None:
        self.peer = peer
        # the owner of work that outlives a request (the listener's, for a live connection)
        self.tasks = tasks or Supervisor("kafka-connection")
        self.peer_host = peer_host
        self.sasl_mechanism: str | None = None
        self.authenticated_user: str | None = None
        # security (sasl.py): who this connection acts as, the SCRAM exchange in progress,
        # the user SASL authenticated (a re-authentication must keep it), KIP-368's end
        self.principal: Principal | None = None
        self.anonymous_checked = False
        self.scram: ScramServer | None = None
        self.sasl_user: str | None = None
        self.session_expires_ms: int | None = None
        # The listener's security protocol, and the CN of the client certificate the TLS
        # handshake verified (mTLS): on an SSL listener that is the principal, User:CN.
        self.security_protocol = "PLAINTEXT"
        self.certificate_user: str | None = None
        self.close_after_response = False  # set by a handler: answer, then close
        # called once when the connection is gone (share sessions end with it, KIP-932)
        self.on_close: list[Callable[[], None]] = []


class _Close:
    """Queue marker: close the connection once the requests before it are answered."""


_CLOSE: Final = _Close()


class KafkaConnection(asyncio.Protocol):
    def __init__(
        self,
        handle: Handle,
        frame_bytes_max: int,
        connections: set[KafkaConnection],
        limits: ListenerLimits | None = None,
        shared: ServerLimits | None = None,
        counters: ListenerCounters | None = None,
        tasks: Supervisor | None = None,
        security_protocol: str = "PLAINTEXT",
    ) -> None:
        self._handle = handle
        self._security_protocol = security_protocol
        # the listener's: the worker, the produces in flight, work left when it closed
        self._tasks = tasks or Supervisor("kafka-connection")
        self._counters = counters or ListenerCounters("kafka")
        self._frame_bytes_max = frame_bytes_max
        self._limits = limits or LISTENER_LIMITS_DEFAULT["kafka"]
        self._shared = shared or ServerLimits()
        self._gate = self._shared.gate("kafka", self._limits)
        self._admitted = False
        self._watch: RequestWatch | None = None
        self._handling = False  # a request is being answered (not idle)
        # the rest of a response the socket did not take: bytes, and (dup'd fd, pos, size)
        self._deferred: collections.deque[bytes | tuple[int, int, int]] = collections.deque()
        self._produce_bytes = 0  # produce request bytes not yet stored
        self._codec = ServerCodec(frame_bytes_max)
        self._connections = connections
        self._queue: collections.deque[Request | UnsupportedRequest | _Close] = collections.deque()
        self._wakeup = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._transport: asyncio.Transport | None = None
        self._socket_fd = -1
        self._worker: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._closing = False
        self._output: list[ResponsePiece] = []
        # produce requests in flight, oldest first; answers leave in this order
        self._produces: collections.deque[asyncio.Task[Response]] = collections.deque()
        self._produces_done = asyncio.Event()  # set when no produce is in flight
        self._produces_done.set()
        self._failed = False  # a pipelined request failed: the connection is closing
        self.state = ConnectionState("?")

    # --- asyncio.Protocol -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        if not self._gate.admit():
            self._closing = True
            self._transport.abort()  # over connections_max: refused before reading anything
            return
        self._admitted = True
        self._counters.opened()
        self._watch = RequestWatch(self._limits, self._expired, self._is_busy)
        self._connections.add(self)
        peer = transport.get_extra_info("peername")
        peer_host = peer[0] if isinstance(peer, tuple) and peer else ""
        self.state = ConnectionState(str(peer), str(peer_host), self._tasks)
        self.state.security_protocol = self._security_protocol
        self.state.certificate_user = peer_principal_name(transport)
        if self._security_protocol == "SSL":
            self.state.authenticated_user = self.state.certificate_user  # Kafka: User:CN
        sock = transport.get_extra_info("socket")
        # sendfile writes to the socket itself: only where the transport does not encrypt
        self._socket_fd = sock.fileno() if sock is not None and not is_tls(transport) else -1
        self._worker = self._tasks.start(self._run(), name="kafka-connection")

    def data_received(self, data: bytes) -> None:
        counters = self._counters
        counters.bytes_received += len(data)
        if self._closing:
            return
        self._codec.receive_data(data)
        completed = False
        try:
            while True:
                event = self._codec.next_event()
                if isinstance(event, NeedData):
                    break
                self._queue.append(event)
                counters.request(API_NAMES.get(event.header.api_key, "unsupported")
                                 if isinstance(event, Request) else "unsupported")
                completed = True
        except OperatingError as error:
            # a frame the codec rejects: the connection closes
            counters.error(error_name(error_code_for(error)))
            logger.info("closing kafka connection: %s", error, extra={"peer": self.state.peer})
            self._queue.append(_CLOSE)
            self._closing = True
            self._codec = ServerCodec(self._frame_bytes_max)  # drop the rest unread
        pending = self._codec.buffered_bytes
        if self._watch is not None:
            self._watch.received(pending > 0, completed)
        self._shared.budget.hold(self, pending)
        if self._closing:
            self._wakeup.set()
            return
        if len(self._queue) >= REQUESTS_QUEUED_MAX and not self._reading_paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._reading_paused = True
        self._wakeup.set()

    def eof_received(self) -> bool | None:
        self._queue.append(_CLOSE)
        self._wakeup.set()
        return True  # keep the write side open until the queue is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._connections.discard(self)
        if self._admitted:
            self._admitted = False
            self._gate.release()
            self._counters.closed()
        if self._watch is not None:
            self._watch.stop()
        self._shared.budget.forget(self)
        self._shared.flow.forget(self)
        self._drop_deferred()
        self._can_write.set()
        self._produces_done.set()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        callbacks, self.state.on_close = self.state.on_close, []
        for callback in callbacks:
            callback()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # --- limits -----------------------------------------------------------------------
    def _is_busy(self) -> bool:
        # Deferred output is not busy: a peer that stops reading for idle_timeout_ms is
        # idle (each piece the socket takes counts as activity).
        return self._handling or bool(self._queue) or bool(self._produces)

    def _expired(self, reason: str) -> None:
        logger.info("closing kafka connection: %s timeout", reason,
                    extra={"peer": self.state.peer, "reason": reason})
        self._codec = ServerCodec(self._frame_bytes_max)
        self._shared.budget.forget(self)
        self._closing = True
        if self._transport is not None:
            self._transport.abort()  # a close would wait for a peer that is not reading

    def shed_memory(self) -> None:
        """Over the server's partial-request budget and holding the most: close now."""
        logger.info("closing kafka connection: partial request over the memory budget",
                    extra={"peer": self.state.peer})
        self._closing = True
        self._codec = ServerCodec(self._frame_bytes_max)
        if self._transport is not None:
            self._transport.abort()

    # --- worker -----------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                if self._failed:
                    return
                if self._deferred:
                    await self._drain_deferred()
                    continue
                if not self._queue:
                    self._flush()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if not self._can_write.is_set():  # the peer is not reading: stop here
                    self._flush()
                    await self._can_write.wait()
                item = self._queue.popleft()
                self._resume_reading_if_drained()
                if isinstance(item, Request) and item.header.api_key == PRODUCE_API_KEY:
                    await self._start_produce(item)
                    continue
                if self._produces:
                    self._flush()
                    await self._produces_done.wait()
                if self._failed:
                    return
                if isinstance(item, _Close):
                    self._flush()
                    await self._drain_deferred()
                    self._close_transport()
                    return
                if item.header.api_key in WAITING_API_KEYS:
                    self._flush()
                self._handling = True
                try:
                    answered = await self._answer(item)
                finally:
                    self._handling = False
                if not answered:
                    self._flush()
                    await self._drain_deferred()
                    self._close_transport()
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("kafka connection failed", extra={"peer": self.state.peer})
            self._close_transport()

    async def _start_produce(self, item: Request) -> None:
        """Pipeline produce requests: each starts now (so appends keep arrival order: a
        handler appends before its first suspension, the fsync wait) and its answer is
        written when it and every request before it are done. One fsync can then cover
        several requests of one connection (group commit)."""
        if len(self._produces) >= PRODUCES_IN_FLIGHT_MAX:
            self._flush()
            await self._produces_done.wait()  # bounded: at most this many in flight
        flow = self._shared.flow
        loop = asyncio.get_running_loop()
        waited_from = loop.time()
        while flow.should_wait(self) and not self._closing:
            self._flush()  # a delayed response: the answers before it go out now
            if self._produces:
                await self._produces_done.wait()
            else:
                await _flow_changed(flow)
        size = _produce_bytes(item)
        self._produce_bytes += size
        flow.hold(self, self._produce_bytes)
        throttle_ms = int((loop.time() - waited_from) * 1000)
        task = self._tasks.start(self._produce(item, throttle_ms), name="kafka-produce")
        task.add_done_callback(lambda _: self._produce_stored(size))
        self._produces.append(task)
        self._produces_done.clear()
        task.add_done_callback(self._collect_produces)

    def _collect_produces(self, _: asyncio.Future[Response]) -> None:
        collected = False
        while self._produces and self._produces[0].done():
            task = self._produces.popleft()
            if task.cancelled() or self._failed:
                continue
            error = task.exception()
            if error is not None:
                if not isinstance(error, OperatingError):
                    logger.error("kafka produce failed", exc_info=error,
                                 extra={"peer": self.state.peer})
                else:
                    logger.info("closing kafka connection: %s", error,
                                extra={"peer": self.state.peer})
                self._failed = True
                self._flush()
                self._close_transport()
                continue
            response = task.result()
            if isinstance(response, bytes):
                self._output.append(response)
                collected = True
        if collected and not self._queue:
            self._flush()
        if not self._produces:
            self._produces_done.set()

    async def _answer(self, item: Request | UnsupportedRequest) -> bool:
        """Handle one request; False when the connection must close."""
        if isinstance(item, UnsupportedRequest):
            self._counters.error(error_name(UNSUPPORTED_VERSION))
            try:
                self._output.append(self._codec.send_unsupported(item.header))
            except OperatingError as error:
                logger.info("closing kafka connection: %s", error, extra={"peer": self.state.peer})
                return False
            return True
        try:
            response = await self._handle(item, self.state)
        except OperatingError as error:
            # e.g. a request before SASL authentication: the connection closes
            self._counters.error(error_name(error_code_for(error)))
            logger.info("closing kafka connection: %s", error, extra={"peer": self.state.peer})
            return False
        if response is None:
            return not self.state.close_after_response
        if isinstance(response, bytes):
            self._output.append(response)
        else:
            # Record pieces refer to open segment files: send them in this turn.
            self._output.extend(response)
            self._flush()
        return not self.state.close_after_response

    async def _produce(self, item: Request, throttle_ms: int) -> Response:
        response = await self._handle(item, self.state)
        if throttle_ms and isinstance(response, bytes):
            response = _with_throttle(response, item, throttle_ms)
        return response

    def _produce_stored(self, size: int) -> None:
        self._produce_bytes -= size
        self._shared.flow.hold(self, self._produce_bytes)

    def _resume_reading_if_drained(self) -> None:
        if self._reading_paused and len(self._queue) < REQUESTS_QUEUED_MAX // 2:
            assert self._transport is not None
            if not self._closing:
                self._transport.resume_reading()
            self._reading_paused = False

    def _flush(self) -> None:
        transport = self._transport
        if transport is None or not self._output or transport.is_closing():
            self._output.clear()
            return
        if self._watch is not None:
            self._watch.active()
        pending = bytearray()
        counters = self._counters
        for piece in self._output:
            if self._deferred:  # keep order behind what the socket has not taken yet
                self._defer(piece)
            elif isinstance(piece, tuple):
                if pending:
                    counters.bytes_sent += len(pending)
                    transport.write(bytes(pending))
                    pending = bytearray()
                self._send_file_range(transport, piece)
            else:
                pending += piece
        if pending:
            counters.bytes_sent += len(pending)
            transport.write(bytes(pending))
        self._output.clear()
        if self._deferred:
            self._wakeup.set()  # the worker sends the rest as the socket drains

    def _send_file_range(self, transport: asyncio.Transport, piece: tuple[int, int, int]) -> None:
        fileno, position, size = piece
        if self._socket_fd >= 0 and transport.get_write_buffer_size() == 0:
            while size > 0:
                try:
                    sent = os.sendfile(self._socket_fd, fileno, position, size)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # e.g. sendfile unsupported for this pair: copy below
                if sent == 0:
                    break
                self._counters.bytes_sent += sent
                position += sent
                size -= sent
        if size > 0:
            self._defer((fileno, position, size))

    def _defer(self, piece: ResponsePiece) -> None:
        """Keep what the socket did not take; a file range through its own descriptor, so
        the segment may be closed before the range is sent."""
        if isinstance(piece, tuple):
            fileno, position, size = piece
            self._deferred.append((os.dup(fileno), position, size))
        else:
            self._deferred.append(bytes(piece))

    async def _drain_deferred(self) -> None:
        """Send the deferred rest, reading the log only while the socket takes it."""
        while self._deferred and not self._closing:
            await self._can_write.wait()
            transport = self._transport
            if transport is None or transport.is_closing():
                break
            piece = self._deferred[0]
            if isinstance(piece, bytes):
                self._deferred.popleft()
                self._counters.bytes_sent += len(piece)
                transport.write(piece)
                continue
            if self._watch is not None:
                self._watch.active()  # the socket took the piece before this one
            fileno, position, size = piece
            data = os.pread(fileno, min(size, FILE_CHUNK_BYTES), position)
            if not data:
                raise OSError(f"short read from segment file at {position}: {size} bytes left")
            self._counters.bytes_sent += len(data)
            transport.write(data)
            if len(data) == size:
                self._deferred.popleft()
                os.close(fileno)
            else:
                self._deferred[0] = (fileno, position + len(data), size - len(data))
            await asyncio.sleep(0)  # one chunk per turn: other connections go in between
        self._drop_deferred()

    def _drop_deferred(self) -> None:
        while self._deferred:
            piece = self._deferred.popleft()
            if isinstance(piece, tuple):
                os.close(piece[0])

    def _close_transport(self) -> None:
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def transport_peer(self) -> object:
        """The client's address (the management API's connection list)."""
        return self._transport.get_extra_info("peername") if self._transport else None

    async def close(self) -> None:
        """Shutdown: drop the connection now, unsent bytes included (a peer that stopped
        reading must not hold the server's shutdown)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass


def _with_throttle(response: bytes, request: Request, throttle_ms: int) -> bytes:
    """Report how long a produce was held back: a ProduceResponse (v3-v11, the encoder's
    layout) ends with throttle_time_ms (int32), then an empty tag section if flexible."""
    if request.header.api_version < 3:
        return response
    end = len(response) - (1 if request.header.flexible else 0)
    return b"".join((response[:end - 4], _THROTTLE.pack(min(throttle_ms, 1 << 30)),
                     response[end:]))


def _produce_bytes(request: Request) -> int:
    """The record bytes a Produce request carries (what it holds until stored)."""
    total = 0
    for topic in getattr(request.body, "topic_data", None) or ():
        for partition in getattr(topic, "partition_data", None) or ():
            records = getattr(partition, "records", None)
            if isinstance(records, bytes | bytearray | memoryview):
                total += len(records)
    return total


async def _flow_changed(flow: PublishFlow) -> None:
    """Until the flow may have let go (the mark fell back, the disk alarm cleared)."""
    changed = asyncio.Event()
    unsubscribe = flow.on_change(changed.set)
    try:
        await changed.wait()
    finally:
        unsubscribe()


def connection_factory(
    handle: Handle, frame_bytes_max: int, connections: set[KafkaConnection],
    limits: ListenerLimits | None = None, shared: ServerLimits | None = None,
    counters: ListenerCounters | None = None, tasks: Supervisor | None = None,
    security_protocol: str = "PLAINTEXT",
) -> Callable[[], KafkaConnection]:
    def factory() -> KafkaConnection:
        return KafkaConnection(handle, frame_bytes_max, connections, limits, shared, counters,
                               tasks, security_protocol)

    return factory


