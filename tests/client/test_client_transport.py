"""KeepAliveTransport (the blocking client's plain-HTTP transport) against scripted peers.

Goal: the transport behaves as httpx's own would towards any HTTP/1.1 server or proxy —
keep-alive reuse, chunked and close-delimited bodies, a server that closes an idle or
a ``Connection: close`` connection, one that dies mid-answer, timeouts — with httpx's
exception types. Method: a thread serving one scripted answer per request on real
sockets (a stand-in for other servers; Conveyor's own is covered by the round-trip
tests, which now run over this transport), and the request bytes it received.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from conveyor import Client
from conveyor.client.transport import KeepAliveTransport

Answer = Callable[[socket.socket, bytes], bool]  # write the answer; False: close after


def fixed(data: bytes, keep: bool = True) -> Answer:
    def answer(connection: socket.socket, request: bytes) -> bool:
        connection.sendall(data)
        return keep
    return answer


class ScriptedServer:
    """Accepts connections; answers each complete request with the next scripted answer."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                self._converse(connection)

    def _converse(self, connection: socket.socket) -> None:
        buffered = b""
        while self.answers:
            while b"\r\n\r\n" not in buffered:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                buffered += chunk
            head, _, rest = buffered.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                rest += connection.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + rest[:length])
            buffered = rest[length:]
            if not self.answers.pop(0)(connection, self.requests[-1]):
                return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[list[Answer]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(answers: list[Answer]) -> ScriptedServer:
        servers.append(ScriptedServer(answers))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def http_client(server: ScriptedServer, **options: object) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.port}",
                        transport=KeepAliveTransport(), **options)  # type: ignore[arg-type]


OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n" \
          b'{"ok":true}'


def test_requests_reuse_one_connection_and_arrive_whole(scripted: Callable[
        [list[Answer]], ScriptedServer]) -> None:
    server = scripted([fixed(OK_JSON), fixed(OK_JSON)])
    with http_client(server) as client:
        first = client.post("/topics/t/messages?x=1", json={"messages": [{"value": "a"}]})
        second = client.get("/health")
    assert (first.status_code, first.json(), second.json()) == (200, {"ok": True},
                                                                 {"ok": True})
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /topics/t/messages?x=1 HTTP/1.1\r\n")
    assert b"\r\ncontent-length: " in head.lower() and b"\r\nhost: 127.0.0.1:" in head.lower()
    assert body == b'{"messages":[{"value":"a"}]}'


def test_chunked_and_close_delimited_bodies_and_connection_close(scripted: Callable[
        [list[Answer]], ScriptedServer]) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n")
    closing = b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
    until_close = b"HTTP/1.0 200 OK\r\n\r\nthe rest"
    server = scripted([fixed(chunked), fixed(closing, keep=False),
                       fixed(until_close, keep=False), fixed(OK_JSON)])
    with http_client(server) as client:
        assert client.get("/a").content == b"abcdefg"
        answer = client.get("/b")
        assert (answer.status_code, answer.content) == (201, b"hi")
        assert client.get("/c").content == b"the rest"
        assert client.get("/d").json() == {"ok": True}
    assert server.connections == 3  # a new one after each close


def test_an_idle_connection_the_server_closed_is_not_reused(scripted: Callable[
        [list[Answer]], ScriptedServer]) -> None:
    server = scripted([fixed(OK_JSON, keep=False), fixed(OK_JSON)])  # closes, keep-alive said
    with http_client(server) as client:
        assert client.get("/a").status_code == 200
        server.thread.join(0.05)
        assert client.get("/b").status_code == 200
    assert server.connections == 2


def test_a_server_dying_mid_answer_is_a_protocol_error_and_the_connection_goes(scripted:
        Callable[[list[Answer]], ScriptedServer]) -> None:
    cut = fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", keep=False)
    garbage = fixed(b"SMTP ready\r\n\r\n", keep=False)
    server = scripted([cut, garbage, fixed(OK_JSON)])
    with http_client(server) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/a")
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/b")
        assert client.get("/c").json() == {"ok": True}
    assert server.connections == 3


def test_timeouts_and_refused_connections_are_httpx_errors(scripted: Callable[
        [list[Answer]], ScriptedServer]) -> None:
    answered = threading.Event()

    def silent(connection: socket.socket, request: bytes) -> bool:
        answered.wait(5)
        return False
    server = scripted([silent])
    with http_client(server, timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        client.get("/slow")
    answered.set()
    unused = socket.create_server(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}",
                      transport=KeepAliveTransport()) as client, \
            pytest.raises(httpx.ConnectError):
        client.get("/nothing")


def test_the_blocking_client_uses_it_for_http_and_httpx_for_https() -> None:
    plain = Client("http://127.0.0.1:1")
    secure = Client("https://127.0.0.1:1")
    try:
        assert isinstance(plain._http._transport, KeepAliveTransport)
        assert not isinstance(secure._http._transport, KeepAliveTransport)
    finally:
        plain.close()
        secure.close()


# --- the blocking client's plain path (transport.PlainSender) -------------------------
def _head_lines(request: bytes) -> tuple[bytes, set[bytes]]:
    head = request.partition(b"\r\n\r\n")[0].split(b"\r\n")
    return head[0], {line.lower() for line in head[1:]}


PUBLISHED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 72\r\n\r\n"
             b'{"results":[{"topic":"t","partition":0,"offset":7,"duplicate":false}]}  ')


def test_the_plain_path_sends_what_httpx_sends(scripted: Callable[
        [list[Answer]], ScriptedServer]) -> None:
    """Goal: a call the client sends itself carries the same request line, headers and
    body as the same call through httpx. Method: one publish each way to a scripted peer
    (the second through the client's httpx.Client, as a call with a query string goes)."""
    server = scripted([fixed(PUBLISHED), fixed(PUBLISHED)])
    with Client(f"http://127.0.0.1:{server.port}", token="secret") as client:
        assert client._plain is not None
        assert client.publish("t", "hello").offset == 7
        content = server.requests[0].partition(b"\r\n\r\n")[2]
        client._http.post("/topics/t/messages", content=content,
                          headers={"Content-Type": "application/json"})
    assert _head_lines(server.requests[0]) == _head_lines(server.requests[1])
    assert b"authorization: bearer secret" in _head_lines(server.requests[0])[1]
    assert server.requests[0].endswith(b'{"messages":[{"value":"hello"}]}')
    assert server.connections == 1  # both ways share the transport's connections


def test_the_plain_path_keeps_the_base_path_and_honours_retry_after(scripted: Callable[
        [list[Answer]], ScriptedServer]) -> None:
    busy = (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n")
    no_messages = b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"messages":[]}'
    server = scripted([fixed(busy), fixed(PUBLISHED), fixed(no_messages)])
    with Client(f"http://127.0.0.1:{server.port}/prefix/") as client:
        assert client.publish("t", "hello").offset == 7  # retried after the 429
        assert client.dlq("t", limit=5) == []  # a query string: httpx's path
    lines = [_head_lines(request)[0] for request in server.requests]
    assert lines == [b"POST /prefix/topics/t/messages HTTP/1.1"] * 2 + [
        b"GET /prefix/topics/t/groups/t/dlq?offset=0&limit=5 HTTP/1.1"]


def test_the_plain_path_is_off_for_a_transport_of_the_callers_choice() -> None:
    with Client("http://127.0.0.1:1", transport=httpx.MockTransport(
            lambda request: httpx.Response(200))) as client:
        assert client._plain is None
