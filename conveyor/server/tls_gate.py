"""Binding a listener's ports, plain and TLS, and refusing clients on the wrong one.

Owns: ``open_endpoints`` (what every listener calls instead of ``loop.create_server``):
the plain port through the loop's own server, and the TLS port through an accept
loop of ours that looks at the client's first bytes before the handshake.

Rules:
- A TLS port peeks (``MSG_PEEK``, nothing consumed) at the first bytes. A TLS record
  starts with 0x16 0x03 (handshake, version 3.x); anything else is a plaintext client
  on a TLS port: logged (rate-limited, with the peer address), answered with nginx's
  400 "plain HTTP request was sent to HTTPS port" on HTTP ports, and closed. Then the
  handshake runs in the loop's SSL transport (uvloop's, in C) with the context current
  at that moment, so a reload affects new handshakes only; a failed or timed-out
  handshake is logged the same way. The protocol sees ``connection_made`` after a
  finished handshake, as with ``create_server(ssl=...)``.
- A plain port hands the connection to the protocol at once (its connection limits
  and timeouts start as before) behind a sniffer that looks at the first bytes only:
  0x16 0x03 there is a TLS client on a plaintext port, refused the same way. After the
  first bytes the sniffer steps out (``transport.set_protocol``): no cost per read.
- Every wait is bounded: the first bytes and the handshake within the listener's
  ``handshake_timeout_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

from conveyor.connections import peer_text
from conveyor.server.counters import ListenerCounters
from conveyor.server.tls import RefusalLog, ServerTls
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.tls")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

PEEK_BYTES: Final = 3  # record type + protocol version: enough to tell TLS from the rest
TLS_HANDSHAKE_RECORD: Final = 0x16
BACKLOG: Final = 1024  # somaxconn's default since Linux 5.4 (asyncio's create_server: 100)
# Connections accepted on a TLS port whose handshake has not finished: each holds a socket
# and a task for at most the handshake timeout. Past this, new ones are closed at once
# (nginx bounds them with worker_connections, 512 per worker by default).
PENDING_HANDSHAKES_MAX: Final = 1024
# nginx's answer to a plain request on an HTTPS port (its error 497), so curl and
# browsers show the reason instead of a reset.
PLAIN_HTTP_ON_TLS: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: 55\r\n\r\nThe plain HTTP request was sent to an HTTPS port (TLS).\n")


# Each kind of refusal as the error code the listener's counters export on /metrics
# (conveyor_listener_errors_total{listener, code}).
REFUSAL_CODES: Final = {
    "TLS handshake on a plaintext port": "tls_on_plaintext_port",
    "plaintext on a TLS port": "plaintext_on_tls_port",
    "TLS handshake failed": "tls_handshake_failed",
    "too many unfinished TLS handshakes": "tls_handshakes_pending_max",
}


class ListenerRefusals:
    """One listener's refusals: the server's rate-limited log, and its error counters."""

    def __init__(self, listener: str, log: RefusalLog, counters: ListenerCounters | None
                 ) -> None:
        self.listener = listener
        self._log = log
        self._counters = counters

    def refused(self, reason: str, peer: str, detail: str = "") -> None:
        self._log.refused(self.listener, reason, peer, detail)
        if self._counters is not None:
            self._counters.error(REFUSAL_CODES.get(reason, "refused"))


def looks_like_tls(first: bytes) -> bool:
    """True when the first bytes of a connection are a TLS ClientHello record."""
    if not first or first[0] != TLS_HANDSHAKE_RECORD:
        return False
    return len(first) < 2 or first[1] == 0x03


class _PlainSniffer(asyncio.Protocol):
    """Stands in front of a plaintext protocol until the first bytes arrive."""

    def __init__(self, inner: asyncio.Protocol, refusals: ListenerRefusals) -> None:
        self._inner = inner
        self._refusals = refusals
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if looks_like_tls(data[:PEEK_BYTES]):
            self._refusals.refused("TLS handshake on a plaintext port",
                                   peer_text(transport.get_extra_info("peername")))
            transport.close()
            return
        transport.set_protocol(self._inner)  # from here the protocol reads directly
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class TlsServer:
    """A TLS port: our accept loop, a peek, then the loop's SSL transport."""

    def __init__(self, sockets: list[socket.socket], factory: ProtocolFactory, tls: ServerTls,
                 refusals: ListenerRefusals, handshake_timeout_s: float,
                 http: bool) -> None:
        self.sockets = sockets
        self._factory = factory
        self._tls = tls
        self._listener = refusals.listener
        self._refusals = refusals
        self._handshake_timeout_s = handshake_timeout_s
        self._http = http
        self._tasks = Supervisor(f"{self._listener}-tls-accept")
        self._closed = False

    def start(self) -> None:
        for listening in self.sockets:
            self._tasks.start(self._accept(listening), name=f"{self._listener}-tls-accept")

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                connection, address = await loop.sock_accept(listening)
            except OSError as error:  # EMFILE and kin: keep accepting, as asyncio does
                if self._closed:
                    return
                logger.warning("%s TLS accept failed: %s", self._listener, error)
                await asyncio.sleep(0.1)
                continue
            connection.setblocking(False)
            if len(self._tasks) > PENDING_HANDSHAKES_MAX:
                self._refusals.refused("too many unfinished TLS handshakes",
                                       peer_text(address))
                connection.close()
                continue
            self._tasks.start(self._admit(connection, peer_text(address)),
                              name=f"{self._listener}-tls-handshake")

    async def _admit(self, connection: socket.socket, peer: str) -> None:
        try:
            await self._handshake(connection, peer)
        except BaseException:  # cancelled by close(): the socket goes with the task
            connection.close()
            raise

    async def _handshake(self, connection: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            first = await asyncio.wait_for(_peek(loop, connection), self._handshake_timeout_s)
        except (TimeoutError, OSError):
            connection.close()  # silent client or reset: nothing was said to refuse
            return
        if not first:
            connection.close()
            return
        if not looks_like_tls(first):
            self._refuse_plaintext(connection, peer, first)
            return
        try:
            await loop.connect_accepted_socket(
                self._factory, connection, ssl=self._tls.context,
                ssl_handshake_timeout=self._handshake_timeout_s)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", None) or type(error).__name__
            self._refusals.refused("TLS handshake failed", peer, str(reason))
            connection.close()

    def _refuse_plaintext(self, connection: socket.socket, peer: str, first: bytes) -> None:
        self._refusals.refused("plaintext on a TLS port", peer,
                               repr(first[:PEEK_BYTES]))
        with contextlib.suppress(OSError):
            # read what is there (so close sends FIN, not RST, where it can), then answer
            connection.recv(65536)
            if self._http:
                connection.send(PLAIN_HTTP_ON_TLS)
            connection.shutdown(socket.SHUT_WR)
        connection.close()

    def close(self) -> None:
        self._closed = True
        loop = asyncio.get_running_loop()
        for listening in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(listening.fileno())
            listening.close()

    async def wait_closed(self) -> None:
        await self._tasks.close(cancel=True)


async def _peek(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> bytes:
    """The first bytes the client sent, left in the socket for the handshake."""
    while True:
        try:
            return connection.recv(PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        readable = loop.create_future()
        loop.add_reader(connection.fileno(), _set_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(connection.fileno())


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _bind(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (as ``create_server`` binds)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            listening = socket.socket(family, kind, proto)
            sockets.append(listening)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # several processes share the port; the kernel spreads accepts
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                listening.bind((address[0], port, *address[2:]))
            except OSError as error:
                if family != socket.AF_INET6 or error.errno != errno.EADDRNOTAVAIL:
                    raise
                sockets.pop().close()  # IPv6 off on this host: skipped, as create_server does
                continue
            listening.listen(BACKLOG)
            listening.setblocking(False)
            port = port or listening.getsockname()[1]  # one free port for every address
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, f"no address to listen on for {host!r}")
    except OSError:
        for listening in sockets:
            listening.close()
        raise
    return sockets


class Endpoints:
    """A listener's bound ports: the plain server, the TLS server, or both."""

    def __init__(self, plain: asyncio.Server | None, secure: TlsServer | None) -> None:
        self._plain = plain
        self._secure = secure
        self.port: int = _port_of(plain.sockets if plain is not None else None) or (
            _port_of(secure.sockets if secure is not None else None))
        self.tls_port: int | None = _port_of(secure.sockets) if secure is not None else None

    def close(self) -> None:
        if self._plain is not None:
            self._plain.close()
        if self._secure is not None:
            self._secure.close()

    async def wait_closed(self) -> None:
        if self._secure is not None:
            await self._secure.wait_closed()
        if self._plain is not None:
            await self._plain.wait_closed()


def _port_of(sockets: Any) -> int:
    return int(sockets[0].getsockname()[1]) if sockets else 0


async def open_endpoints(factory: ProtocolFactory, listener: str, host: str, port: int, *,
                         tls: ServerTls | None = None, tls_port: int | None = None,
                         plaintext: bool = True, refusals: RefusalLog | None = None,
                         counters: ListenerCounters | None = None,
                         handshake_timeout_ms: int = 60_000, http: bool = False,
                         reuse_port: bool = False) -> Endpoints:
    """Bind the ports of one listener. Without ``tls``: plain on ``port``. With ``tls``
    and no ``tls_port``: TLS on ``port``. With both: plain on ``port`` (unless
    ``plaintext`` is False) and TLS on ``tls_port``. ``reuse_port``: SO_REUSEPORT, so
    several processes bind the same port (``conveyor serve --workers N``)."""
    loop = asyncio.get_running_loop()
    listener_refusals = ListenerRefusals(
        listener, refusals if refusals is not None else RefusalLog(), counters)
    plain: asyncio.Server | None = None
    secure: TlsServer | None = None
    timeout_s = (handshake_timeout_ms or 60_000) / 1000
    if tls is None or (tls_port is not None and plaintext):

        def sniffing() -> asyncio.BaseProtocol:
            inner = factory()
            assert isinstance(inner, asyncio.Protocol)
            return _PlainSniffer(inner, listener_refusals)

        plain = await loop.create_server(sniffing, host, port, reuse_address=True,
                                         reuse_port=reuse_port or None)
    if tls is not None:
        try:
            sockets = _bind(host, port if tls_port is None else tls_port, reuse_port)
        except OSError:
            if plain is not None:
                plain.close()
            raise
        secure = TlsServer(sockets, factory, tls, listener_refusals, timeout_s, http)
        secure.start()
    return Endpoints(plain, secure)
