"""The node-to-node channel: a small internal listener per cluster node (issue 12).

Owns: the cluster secret (made once, at the first start, in the shared database), the
internal listener (its own port, advertised as ``internal`` in ``conveyor_nodes``: the
public ports may be shared by several processes with SO_REUSEPORT, so they cannot name
one node), the client connections to other nodes, and what a node answers to a peer
that breaks the rules.

Wire (internal_wire.py): the client sends a 4-byte preamble; the server sends
``{"nonce": hex}``; the client answers ``{"node": id, "incarnation": n, "mac": hex}``
with ``mac = HMAC-SHA256(secret, "conveyor-internal" + nonce)``, compared in constant
time. Then the client sends requests ``{"id", "op", "args"}`` and the server answers
each ``{"id", "ok": result}`` or ``{"id", "error": {"type", "message"}}``, in any order
(requests run concurrently: a long-poll does not hold up an ack behind it).

Rules for a peer that breaks them: before authentication (a wrong preamble, a frame
over 4 KiB or not JSON, a wrong MAC, a silent peer past ``HANDSHAKE_TIMEOUT_S``) the
connection is closed without an answer and the refusal logged (rate-limited, with the
address); after it, a frame that is not a JSON object (or is over ``FRAME_BYTES_MAX``)
is answered with an error frame (id null) and the connection closed, and a request of
the wrong shape (op, args, id) is answered with ``InvalidRequestError`` and the
connection kept. Other connections and the public listeners are not touched.

TLS: with a ``TlsConfig`` the listener speaks TLS only (tls_gate.py: a plaintext peer
is refused at its first bytes; a peer whose certificate does not chain to ``ca_file``
fails the handshake) and clients connect with TLS, verifying the peer's certificate and
host name; the MAC stays the proof of cluster membership. Without it the channel is
authenticated but not encrypted: keep the internal port on the nodes' private network
(docs/cluster.md).
Must not know: the broker, protocols (requests go to a handler callback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg

from conveyor.cluster.internal_wire import (
    HANDSHAKE_BYTES_MAX,
    PREAMBLE,
    FrameError,
    NotOwnerError,
    error_from_wire,
    error_to_wire,
    frame,
    mac,
    read_frame,
)
from conveyor.config import TlsConfig
from conveyor.connections import peer_text
from conveyor.errors import (
    InvalidConfigError,
    InvalidRequestError,
    OperatingError,
    UnavailableError,
)
from conveyor.server.tls import RefusalLog, ServerTls, build_client_context
from conveyor.server.tls_gate import Endpoints, open_endpoints
from conveyor.tasks import Supervisor

__all__ = ["InternalClient", "InternalServer", "NotOwnerError", "cluster_secret",
           "error_from_wire", "error_to_wire"]

logger = logging.getLogger("conveyor.cluster.internal")

HANDSHAKE_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 3.0
LISTENER: Final = "internal"  # the name in refusal logs and on /metrics
# Requests of one connection being answered at once; past it the next frame is not read
# until one is answered (backpressure through TCP, never an error). Each is a task that
# may wait up to a long poll (30 s): nodes forward one per consumer's acquire, so this
# bounds what one peer's bytes make the node hold (a task per 6-byte frame otherwise).
REQUESTS_IN_FLIGHT_MAX: Final = 4096
NODE_ID_MAX: Final = 2**31 - 1
INCARNATION_MAX: Final = 2**63 - 1
SECRET_SCHEMA: Final = """CREATE TABLE IF NOT EXISTS conveyor_cluster_secret (
    id INTEGER PRIMARY KEY CHECK (id = 1), secret TEXT NOT NULL)"""

# op, args, peer node id, its incarnation -> result (JSON-able); an OperatingError
# travels back as itself
Handler = Callable[[str, dict[str, Any], int, int], Awaitable[Any]]
# a call whose answer came after its caller stopped waiting: (op, args, result)
Orphan = Callable[[str, dict[str, Any], Any], None]


async def cluster_secret(dsn: str) -> bytes:
    """The shared secret of every node on this database, made at the first start."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(7140013)")
            await connection.execute(SECRET_SCHEMA)
            await connection.execute(
                "INSERT INTO conveyor_cluster_secret (id, secret) VALUES (1, $1) "
                "ON CONFLICT (id) DO NOTHING", secrets.token_hex(32))
            secret = await connection.fetchval(
                "SELECT secret FROM conveyor_cluster_secret WHERE id = 1")
    finally:
        await connection.close()
    return bytes.fromhex(str(secret))


def _bounded_int(value: Any, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        return None
    return value


def _peer_of(hello: dict[str, Any], secret: bytes, nonce: bytes) -> tuple[int, int] | None:
    """(node id, incarnation) of a hello whose MAC is right; None for any other hello."""
    given = hello.get("mac")
    if not isinstance(given, str) or len(given) != 64:
        return None
    try:
        given_bytes = bytes.fromhex(given)
    except ValueError:
        return None
    if not hmac.compare_digest(given_bytes, mac(secret, nonce)):
        return None
    node = _bounded_int(hello.get("node"), NODE_ID_MAX)
    incarnation = _bounded_int(hello.get("incarnation", 0), INCARNATION_MAX)
    if node is None or incarnation is None:
        return None
    return node, incarnation


class InternalServer:
    """Accepts other nodes, checks their MAC, runs each request through ``handler``."""

    def __init__(self, secret: bytes, handler: Handler, orphan: Orphan | None = None, *,
                 tls: ServerTls | None = None, refusals: RefusalLog | None = None,
                 requests_in_flight_max: int = REQUESTS_IN_FLIGHT_MAX) -> None:
        self.secret = secret
        self.requests_in_flight_max = requests_in_flight_max
        self.handler = handler
        self.orphan = orphan  # an answer that could not be written (the peer went away)
        self.tls = tls  # None: plain (authenticated, not encrypted)
        self.refusals = refusals if refusals is not None else RefusalLog()
        self.port = 0
        self._endpoints: Endpoints | None = None
        self._tasks = Supervisor("conveyor.cluster.internal-server")
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int = 0) -> int:
        def protocol() -> asyncio.BaseProtocol:
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(), self._serve)

        self._endpoints = await open_endpoints(
            protocol, LISTENER, host, port, tls=self.tls, refusals=self.refusals,
            handshake_timeout_ms=int(HANDSHAKE_TIMEOUT_S * 1000))
        self.port = self._endpoints.port
        return self.port

    async def close(self) -> None:
        if self._endpoints is not None:
            self._endpoints.close()
        for writer in list(self._writers):
            writer.close()
        await self._tasks.close(cancel=True)
        if self._endpoints is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._endpoints.wait_closed(), 5)

    def _refused(self, writer: asyncio.StreamWriter, reason: str, detail: str = "") -> None:
        self.refusals.refused(LISTENER, reason, peer_text(writer.get_extra_info("peername")),
                              detail)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            peer = await self._authenticate(reader, writer)
            if peer is None:
                return
            node, incarnation = peer
            in_flight = asyncio.Semaphore(self.requests_in_flight_max)
            while True:
                await in_flight.acquire()
                try:
                    request = await read_frame(reader)
                except FrameError as error:  # answered, then closed: no resync after it
                    writer.write(frame({"id": None, "error": error_to_wire(
                        InvalidRequestError(str(error)))}))
                    with contextlib.suppress(OSError, ConnectionError):
                        await asyncio.wait_for(writer.drain(), HANDSHAKE_TIMEOUT_S)
                    return
                self._tasks.start(self._answer(writer, node, incarnation, request, in_flight),
                                  name="internal request")
        except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                            ) -> tuple[int, int] | None:
        """The peer's (node id, incarnation), or None once it is refused."""
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                preamble = await reader.readexactly(len(PREAMBLE))
                if preamble != PREAMBLE:
                    self._refused(writer, "not a Conveyor node", repr(preamble))
                    return None
                nonce = secrets.token_bytes(32)
                writer.write(frame({"nonce": nonce.hex()}))
                # before the peer is authenticated, a frame is a few hundred bytes at most
                hello = await read_frame(reader, HANDSHAKE_BYTES_MAX)
        except FrameError as error:
            self._refused(writer, "malformed hello", str(error))
            return None
        except TimeoutError:
            self._refused(writer, "no hello within the handshake timeout")
            return None
        peer = _peer_of(hello, self.secret, nonce)
        if peer is None:
            self._refused(writer, "wrong cluster secret")
        return peer

    async def _answer(self, writer: asyncio.StreamWriter, node: int, incarnation: int,
                      request: dict[str, Any], in_flight: asyncio.Semaphore) -> None:
        try:
            await self._answer_one(writer, node, incarnation, request)
        finally:
            in_flight.release()

    async def _answer_one(self, writer: asyncio.StreamWriter, node: int, incarnation: int,
                          request: dict[str, Any]) -> None:
        request_id = request.get("id")
        op, args = request.get("op"), request.get("args", {})
        answer: dict[str, Any] = {"id": request_id if _bounded_int(request_id, 2**63) is not None
                                  else None}
        result: Any = None
        try:
            if answer["id"] is None or not isinstance(op, str) or not isinstance(args, dict):
                raise InvalidRequestError("an internal request needs an id (integer), an op "
                                          "(string) and args (object)")
            result = await self.handler(op, args, node, incarnation)
            answer["ok"] = result
        except OperatingError as error:
            answer["error"] = error_to_wire(error)
        except Exception as error:  # a bug: answered, logged, the channel stays up
            logger.exception("internal request %s failed", op)
            answer["error"] = error_to_wire(UnavailableError("internal error", reason=str(error)))
        if writer.is_closing():
            if "ok" in answer and self.orphan is not None:
                self.orphan(str(op), args, result)
            return
        writer.write(frame(answer))
        try:
            await writer.drain()
        except (OSError, ConnectionError):
            if "ok" in answer and self.orphan is not None:
                self.orphan(str(op), args, result)


class _Pending:
    __slots__ = ("args", "future", "op")

    def __init__(self, op: str, args: dict[str, Any], future: asyncio.Future[Any]) -> None:
        self.op = op
        self.args = args
        self.future = future


class InternalClient:
    """One connection to one other node's internal listener, reconnected on demand."""

    def __init__(self, address: str, secret: bytes, node_id: int, incarnation: int,
                 orphan: Orphan | None = None, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.tls = tls  # this node's certificate and the CA of its peers; None: plain
        self.secret = secret
        self.node_id = node_id  # this node, named in the handshake
        self.incarnation = incarnation
        self.orphan = orphan  # an answer that came after its caller stopped waiting
        self._writer: asyncio.StreamWriter | None = None
        self._readers = Supervisor("conveyor.cluster.internal-client")
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._connecting = asyncio.Lock()
        self.closed = False

    async def call(self, op: str, args: dict[str, Any], timeout_s: float) -> Any:
        """The answer, the owner's OperatingError, or ConnectionError (could not ask, or
        the connection dropped before the answer: the request may have been applied)."""
        writer = await self._connection()
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(op, args, future)
        try:
            writer.write(frame({"id": request_id, "op": op, "args": args}))
            await writer.drain()
            # a timeout or the caller's cancellation cancels ``future``: its answer, if
            # one comes, is then an orphan (``_read``)
            return await asyncio.wait_for(future, timeout_s)
        except (OSError, TimeoutError) as error:
            raise ConnectionError(f"internal call {op} to {self.address}: {error!r}") from error
        finally:
            pending = self._pending.get(request_id)
            if pending is not None and pending.future.done() and not pending.future.cancelled():
                del self._pending[request_id]

    async def _connection(self) -> asyncio.StreamWriter:
        if self.closed:
            raise ConnectionError("internal client closed")
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            host, _, port = self.address.rpartition(":")
            try:
                reader, writer = await asyncio.wait_for(self._open(host, int(port)),
                                                        CONNECT_TIMEOUT_S)
                writer.write(PREAMBLE)
                hello = await asyncio.wait_for(read_frame(reader, HANDSHAKE_BYTES_MAX),
                                               HANDSHAKE_TIMEOUT_S)
                nonce = bytes.fromhex(str(hello.get("nonce", "")))
                writer.write(frame({"node": self.node_id, "incarnation": self.incarnation,
                                    "mac": mac(self.secret, nonce).hex()}))
                await writer.drain()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError,
                    InvalidConfigError) as error:
                raise ConnectionError(f"cannot reach node at {self.address}: {error!r}") \
                    from error
            self._writer = writer
            self._readers.start(self._read(reader, writer),
                                name=f"internal reader {self.address}")
            return writer

    async def _open(self, host: str, port: int
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.tls is None:
            return await asyncio.open_connection(host, port)
        # built per connection: a certificate replaced on disk is used from the next one
        context = build_client_context(self.tls)
        return await asyncio.open_connection(host, port, ssl=context, server_hostname=host,
                                             ssl_handshake_timeout=CONNECT_TIMEOUT_S)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                answer = await read_frame(reader)
                answer_id = answer.get("id")
                if not isinstance(answer_id, int):  # the peer refused this stream
                    raise FrameError(f"refused by {self.address}: {answer.get('error')}")
                pending = self._pending.pop(answer_id, None)
                if pending is None:
                    continue
                if pending.future.done():  # the caller gave up waiting: an orphan
                    if "ok" in answer and self.orphan is not None:
                        self.orphan(pending.op, pending.args, answer["ok"])
                    continue
                if "error" in answer:
                    pending.future.set_exception(error_from_wire(answer["error"]))
                else:
                    pending.future.set_result(answer.get("ok"))
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            lost, self._pending = self._pending, {}
            for pending in lost.values():
                if not pending.future.done():
                    pending.future.set_exception(
                        ConnectionError(f"connection to {self.address} lost"))

    async def close(self) -> None:
        self.closed = True
        if self._writer is not None:
            self._writer.close()
        await self._readers.close(cancel=True)
