"""The node-to-node channel: a small internal listener per cluster node (issue 12).

Owns: the cluster secret (made once, at the first start, in the shared database), the
internal listener (its own port, advertised as ``internal`` in ``conveyor_nodes``: the
public ports may be shared by several processes with SO_REUSEPORT, so they cannot name
one node), the client connections to other nodes, and the frames between them.

Wire: every frame is a 4-byte big-endian length and a JSON object. On connect the
server sends ``{"nonce": hex}``; the client answers ``{"node": id, "incarnation": n,
"mac": hex}`` with ``mac = HMAC-SHA256(secret, "conveyor-internal" + nonce)``,
compared in constant time; a wrong MAC closes the connection. Then the client sends
requests ``{"id", "op", "args"}`` and the server answers each ``{"id", "ok": result}``
or ``{"id", "error": {"type", "message"}}``, in any order (requests run concurrently:
a long-poll does not hold up an ack behind it). The channel authenticates peers but
does not encrypt: keep the internal port on the nodes' private network (docs/cluster.md).
Must not know: the broker, protocols (requests go to a handler callback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg

from conveyor import errors
from conveyor.errors import OperatingError, UnavailableError
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.cluster.internal")

HANDSHAKE_BYTES_MAX: Final = 4096  # the hello frames: a nonce, or a node id and a MAC
FRAME_BYTES_MAX: Final = 512 << 20  # a batch of deliveries of large AMQP bodies, base64
HANDSHAKE_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 3.0
MAC_LABEL: Final = b"conveyor-internal"
SECRET_SCHEMA: Final = """CREATE TABLE IF NOT EXISTS conveyor_cluster_secret (
    id INTEGER PRIMARY KEY CHECK (id = 1), secret TEXT NOT NULL)"""

# op, args, peer node id, its incarnation -> result (JSON-able); an OperatingError
# travels back as itself
Handler = Callable[[str, dict[str, Any], int, int], Awaitable[Any]]
# a call whose answer came after its caller stopped waiting: (op, args, result)
Orphan = Callable[[str, dict[str, Any], Any], None]


class NotOwnerError(UnavailableError):
    """The node asked does not (or no longer) own the item: ask the owner again."""

    code = "not_owner"


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


def _mac(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, MAC_LABEL + nonce, hashlib.sha256).digest()


async def _read_frame(reader: asyncio.StreamReader,
                      size_max: int = FRAME_BYTES_MAX) -> dict[str, Any]:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    if size > size_max:
        raise ConnectionError(f"internal frame of {size} bytes")
    frame = json.loads(await reader.readexactly(size))
    if not isinstance(frame, dict):
        raise ConnectionError("internal frame is not an object")
    return frame


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def error_to_wire(error: OperatingError) -> dict[str, Any]:
    return {"type": type(error).__name__, "message": error.message,
            "details": {key: str(value) for key, value in error.details.items()}}


def error_from_wire(wire: dict[str, Any]) -> OperatingError:
    """The same error class when it is one of conveyor.errors' operating errors."""
    name = str(wire.get("type", ""))
    found = NotOwnerError if name == "NotOwnerError" else getattr(errors, name, None)
    message = str(wire.get("message", "error at another node"))
    details = wire.get("details") or {}
    if isinstance(found, type) and issubclass(found, OperatingError):
        return found(message, **details)
    return UnavailableError(message, **details)


class InternalServer:
    """Accepts other nodes, checks their MAC, runs each request through ``handler``."""

    def __init__(self, secret: bytes, handler: Handler, orphan: Orphan | None = None) -> None:
        self.secret = secret
        self.handler = handler
        self.orphan = orphan  # an answer that could not be written (the peer went away)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks = Supervisor("conveyor.cluster.internal-server")
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._tasks.close(cancel=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            nonce = secrets.token_bytes(32)
            writer.write(_frame({"nonce": nonce.hex()}))
            # before the peer is authenticated, a frame is a few hundred bytes at most
            hello = await asyncio.wait_for(_read_frame(reader, HANDSHAKE_BYTES_MAX),
                                           HANDSHAKE_TIMEOUT_S)
            given = bytes.fromhex(str(hello.get("mac", "")))
            if not hmac.compare_digest(given, _mac(self.secret, nonce)):
                logger.warning("internal connection refused: wrong cluster secret",
                               extra={"peer": str(writer.get_extra_info("peername"))})
                return
            node, incarnation = int(hello.get("node", -1)), int(hello.get("incarnation", 0))
            while True:
                request = await _read_frame(reader)
                self._tasks.start(self._answer(writer, node, incarnation, request),
                                  name="internal request")
        except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError,
                ValueError, json.JSONDecodeError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, node: int, incarnation: int,
                      request: dict[str, Any]) -> None:
        op = str(request.get("op", ""))
        args = request.get("args") or {}
        answer: dict[str, Any] = {"id": request.get("id")}
        result: Any = None
        try:
            result = await self.handler(op, args, node, incarnation)
            answer["ok"] = result
        except OperatingError as error:
            answer["error"] = error_to_wire(error)
        except Exception as error:  # a bug: answered, logged, the channel stays up
            logger.exception("internal request %s failed", op)
            answer["error"] = error_to_wire(UnavailableError("internal error", reason=str(error)))
        if writer.is_closing():
            if "ok" in answer and self.orphan is not None:
                self.orphan(op, args, result)
            return
        writer.write(_frame(answer))
        try:
            await writer.drain()
        except (OSError, ConnectionError):
            if "ok" in answer and self.orphan is not None:
                self.orphan(op, args, result)


class _Pending:
    __slots__ = ("args", "future", "op")

    def __init__(self, op: str, args: dict[str, Any], future: asyncio.Future[Any]) -> None:
        self.op = op
        self.args = args
        self.future = future


class InternalClient:
    """One connection to one other node's internal listener, reconnected on demand."""

    def __init__(self, address: str, secret: bytes, node_id: int, incarnation: int,
                 orphan: Orphan | None = None) -> None:
        self.address = address
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
            writer.write(_frame({"id": request_id, "op": op, "args": args}))
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
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT_S)
                hello = await asyncio.wait_for(_read_frame(reader), HANDSHAKE_TIMEOUT_S)
                nonce = bytes.fromhex(str(hello.get("nonce", "")))
                writer.write(_frame({"node": self.node_id, "incarnation": self.incarnation,
                                     "mac": _mac(self.secret, nonce).hex()}))
                await writer.drain()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
                raise ConnectionError(f"cannot reach node at {self.address}: {error!r}") \
                    from error
            self._writer = writer
            self._readers.start(self._read(reader, writer),
                                name=f"internal reader {self.address}")
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                answer = await _read_frame(reader)
                pending = self._pending.pop(int(answer.get("id", -1)), None)
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
