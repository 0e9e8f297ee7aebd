"""KeepAliveTransport: the blocking client's plain-HTTP transport (httpx.BaseTransport).

Owns: keep-alive TCP connections (TCP_NODELAY) to ``http://`` servers, one request at
a time on each, a pool of idle ones per host that several threads share; writing a
request as one buffer in one ``sendall`` (request line, headers and body: the server
wakes once per request) and reading the answer with httptools' C parser
(Content-Length, chunked, or until close).
``PlainSender`` is the blocking client's own path for its common call (plain HTTP,
no query string): the request's bytes built from a header block captured once from
httpx (the same headers httpx would send), the answer read by the same connection
code, and no ``httpx.Request``/``httpx.Response`` on the way: those cost the client
~190 µs of CPU per publish of batch 1 (bench/README.md, "Fifth pass (httpreq)").
Must not know: the API's calls, retries or JSON (sync.py, core.py).

Why not httpx's default transport: httpcore and h11 cost ~0.4 ms of CPU per request
on the reference machine (a publish of one 1 KiB message took 0.78 ms of client CPU,
the same request through ``http.client`` 0.23 ms) and write headers and body in two
sends, so the server reads each request in two wake-ups (bench/README.md, "HTTP
latency and acquire + ack"). Everything else — ``https://`` URLs (TLS, verification),
HEAD, streamed request bodies — goes to httpx's own transport, unchanged.

A pooled connection is checked before reuse (readable while idle means the server
closed it or sent something unasked: it is dropped), as httpcore does; a connection
that fails or ends mid-answer is closed, never reused. Errors are httpx's own
(ConnectError, ReadTimeout, RemoteProtocolError, ...), so callers see no difference.
"""

from __future__ import annotations

import re
import select
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import httptools
import httpx

if TYPE_CHECKING:
    from conveyor.client.core import Call

IDLE_CONNECTIONS_MAX: Final = 32  # per host; more idle ones are closed
RECEIVE_BYTES: Final = 256 * 1024


class _Answer:
    """httptools callbacks: the response's status, headers and body."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # neither Content-Length nor chunked: the body ends at EOF
        self.parser: Any = None

    def on_headers_complete(self) -> None:
        # asked here: once the message is complete the parser has reset and says no
        self.keep_alive = bool(self.parser.should_keep_alive())
        names = {name.lower() for name, _ in self.headers}
        self.until_close = not names & {b"content-length", b"transfer-encoding"}

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def open(cls, request: httpx.Request | None, host: str, port: int,
             timeout: float | None) -> _Connection:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as error:
            raise httpx.ConnectTimeout(str(error), request=request) from error
        except OSError as error:
            raise httpx.ConnectError(str(error), request=request) from error
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def is_stale(self) -> bool:
        """Idle and readable: the server closed it (or broke the protocol)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def exchange(self, request: httpx.Request | None, data: bytes, timeouts: dict[str, Any]
                 ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Send ``data``, read one answer: status, headers, body, keep-alive."""
        try:
            self.sock.settimeout(timeouts.get("write"))
            self.sock.sendall(data)
        except TimeoutError as error:
            raise httpx.WriteTimeout(str(error), request=request) from error
        except OSError as error:
            raise httpx.WriteError(str(error), request=request) from error
        answer = _Answer()
        parser = answer.parser = httptools.HttpResponseParser(answer)
        self.sock.settimeout(timeouts.get("read"))
        while not answer.complete:
            try:
                chunk = self.sock.recv(RECEIVE_BYTES)
            except TimeoutError as error:
                raise httpx.ReadTimeout(str(error), request=request) from error
            except OSError as error:
                raise httpx.ReadError(str(error), request=request) from error
            if not chunk:  # the server closed: the end of a body read until close, or cut
                if answer.until_close:
                    answer.complete, answer.keep_alive = True, False
                    break
                raise httpx.RemoteProtocolError("server closed the connection mid-answer",
                                                request=request)
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError as error:
                raise httpx.RemoteProtocolError(f"malformed response: {error}",
                                                request=request) from error
        return (parser.get_status_code(), answer.headers, b"".join(answer.body),
                answer.keep_alive)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class KeepAliveTransport(httpx.BaseTransport):
    def __init__(self, fallback: httpx.BaseTransport | None = None) -> None:
        self._fallback = fallback
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _other(self) -> httpx.BaseTransport:
        with self._lock:
            if self._fallback is None:
                self._fallback = httpx.HTTPTransport()
            return self._fallback

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if (url.scheme != "http" or request.method == "HEAD"
                or "transfer-encoding" in request.headers):
            return self._other().handle_request(request)
        data = _encode(request)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        status, headers, body = self.send((url.host, url.port or 80), data, timeouts, request)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body),
                              extensions={"http_version": b"HTTP/1.1"})

    def send(self, address: tuple[str, int], data: bytes, timeouts: dict[str, Any],
             request: httpx.Request | None = None
             ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """``data`` (one whole request) over a pooled connection to ``address``: the
        answer's status, headers and body. ``request`` only names the call in errors."""
        connection = self._take(address)
        if connection is None:
            connection = _Connection.open(request, *address, timeouts.get("connect"))
        try:
            status, headers, body, keep_alive = connection.exchange(request, data, timeouts)
        except BaseException:
            connection.close()
            raise
        if keep_alive:
            self._give(address, connection)
        else:
            connection.close()
        return status, headers, body

    def _take(self, address: tuple[str, int]) -> _Connection | None:
        while True:
            with self._lock:
                idle = self._idle.get(address)
                if not idle:
                    return None
                connection = idle.pop()
            if not connection.is_stale():
                return connection
            connection.close()

    def _give(self, address: tuple[str, int], connection: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if not self._closed and len(idle) < IDLE_CONNECTIONS_MAX:
                idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
            fallback = self._fallback
        for connection in connections:
            connection.close()
        if fallback is not None:
            fallback.close()


def _encode(request: httpx.Request) -> bytes:
    """The whole request in one buffer (httpx has set Host and Content-Length)."""
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    parts.append(request.read())
    return b"".join(parts)


# what a path may hold to go out as written (core quotes every name it puts in one)
_PLAIN_PATH: Final = re.compile(r"/[A-Za-z0-9\-._~%!$&'()*+,;=:@/]*")
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})  # httpx sends Content-Length: 0


class PlainSender:
    """A blocking client's calls without a query string over its KeepAliveTransport.

    The header block is what httpx itself sends for the client (Host, Accept,
    Accept-Encoding, Connection, User-Agent and the client's own headers, in httpx's
    order), taken once from ``httpx.Client.build_request``; a call adds its own headers
    and Content-Length. Anything else (a query string, a path to quote, a header that
    would replace one of the block's, cookies, a closed client) is left to httpx.
    """

    def __init__(self, transport: KeepAliveTransport, client: httpx.Client) -> None:
        self.transport = transport
        self.client = client
        base = client.base_url
        self.address = (base.host, base.port or 80)
        self.prefix = base.raw_path.rstrip(b"/")
        template = client.build_request("GET", "/")
        self.header_block = b"".join(name + b": " + value + b"\r\n"
                                     for name, value in template.headers.raw)
        self.header_names = frozenset(name.lower() for name in template.headers)

    def exchange(self, call: Call, content: bytes | None, headers: Mapping[str, str] | None,
                 timeout: httpx.Timeout) -> tuple[int, str | None, bytes] | None:
        """Status, Retry-After and body; None: this call is httpx's to send."""
        method, path = call.method, call.path
        if (call.params or method == "HEAD" or self.client.is_closed or self.client.cookies
                or _PLAIN_PATH.fullmatch(path) is None):
            return None
        parts = [method.encode("ascii"), b" ", self.prefix, path.encode("ascii"),
                 b" HTTP/1.1\r\n", self.header_block]
        if headers:
            for name, value in headers.items():
                if name.lower() in self.header_names or not (name + value).isascii():
                    return None
                parts += (name.encode("ascii"), b": ", value.encode("ascii"), b"\r\n")
        if content is not None:
            parts += (b"Content-Length: ", str(len(content)).encode("ascii"), b"\r\n\r\n",
                      content)
        elif method in _BODY_METHODS:
            parts.append(b"Content-Length: 0\r\n\r\n")
        else:
            parts.append(b"\r\n")
        status, answer_headers, body = self.transport.send(
            self.address, b"".join(parts), timeout.as_dict())
        retry_after = None
        for header_name, header_value in answer_headers:
            lowered = header_name.lower()
            if lowered == b"retry-after":
                retry_after = header_value.decode("latin-1")
            elif lowered == b"content-encoding" and header_value.lower() != b"identity":
                # never sent by Conveyor; decoded the way httpx would
                body = httpx.Response(status, headers=answer_headers,
                                      stream=httpx.ByteStream(body)).read()
        return status, retry_after, body


def plain_sender(client: httpx.Client) -> PlainSender | None:
    """The plain path of ``client`` when a KeepAliveTransport serves its base URL (not
    a proxy from the environment, not TLS, not a transport the caller chose otherwise)."""
    base = client.base_url
    if base.scheme != "http" or base.query:
        return None
    # the mount httpx itself would use (private, so looked up: without it, httpx sends all)
    transport_for_url = getattr(client, "_transport_for_url", None)
    transport = transport_for_url(base) if transport_for_url is not None else None
    return PlainSender(transport, client) if isinstance(transport, KeepAliveTransport) else None


def default_transport(url: str) -> httpx.BaseTransport | None:
    """The blocking client's transport for ``url``: KeepAliveTransport for ``http://``
    (None: httpx's default, which does TLS and verification)."""
    return KeepAliveTransport() if url.startswith("http://") else None


def default_async_transport(url: str) -> httpx.AsyncBaseTransport | None:
    """The asyncio client keeps httpx's default transport."""
    return None


__all__ = ["KeepAliveTransport", "PlainSender", "default_async_transport",
           "default_transport", "plain_sender"]
