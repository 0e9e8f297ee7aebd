"""The fault tests' proxy (conveyor/testing/tcp_proxy.py) on its own, over an echo
server: bytes pass; drop resets open connections and refuses new ones; stall holds
bytes (nothing arrives) until heal, then they arrive in order."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from conveyor.testing.tcp_proxy import FaultyProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[FaultyProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    faulty = FaultyProxy("127.0.0.1", server.server_address[1])
    faulty.start()
    try:
        yield faulty
    finally:
        faulty.close()
        server.shutdown()
        server.server_close()


def _connect(proxy: FaultyProxy) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=5)


def _closed(link: socket.socket) -> bool:
    """The proxy closed or reset the connection: EOF, or a reset."""
    try:
        return link.recv(100) == b""
    except ConnectionResetError:
        return True


def test_bytes_pass_then_drop_resets_and_refuses(proxy: FaultyProxy) -> None:
    with _connect(proxy) as link:
        link.sendall(b"hello")
        assert link.recv(100) == b"hello"
        proxy.drop()
        assert _closed(link)
    with _connect(proxy) as late:
        assert _closed(late)  # accepted and closed at once
    proxy.heal()
    with _connect(proxy) as healed:
        healed.sendall(b"again")
        assert healed.recv(100) == b"again"


def test_stall_holds_bytes_until_heal(proxy: FaultyProxy) -> None:
    with _connect(proxy) as link:
        link.sendall(b"one")
        assert link.recv(100) == b"one"
        proxy.stall()
        link.sendall(b"two")
        link.settimeout(0.5)
        with pytest.raises(TimeoutError):
            link.recv(100)  # held: the stall is the absence of an answer
        proxy.heal()
        link.settimeout(5)
        assert link.recv(100) == b"two"


def test_dsn_for_replaces_the_host() -> None:
    faulty = FaultyProxy("127.0.0.1", 1)
    faulty.port = 4242
    assert faulty.dsn_for("postgresql://u@db.example:5432/conveyor") == \
        "postgresql://u@127.0.0.1:4242/conveyor"
