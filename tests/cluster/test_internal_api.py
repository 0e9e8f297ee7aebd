"""The node-to-node channel (conveyor/cluster/internal_api.py) in one process: the
cluster secret, the MAC handshake, errors that keep their class, answers nobody
waits for any more handed to the orphan callbacks (so deliveries are given back),
TLS (peers verified against the CA; plain and TLS peers on the wrong port refused at
once), and peers that break the rules (closed before authentication, answered with an
error after it)."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor.cluster.internal_api import (
    InternalClient,
    InternalServer,
    NotOwnerError,
    cluster_secret,
)
from conveyor.cluster.internal_wire import HANDSHAKE_BYTES_MAX, PREAMBLE, frame, mac, read_frame
from conveyor.config import TlsConfig
from conveyor.errors import LockExpiredError
from conveyor.server.tls import RefusalLog, ServerTls
from conveyor.testing.tls import TestPki, served_serial

SECRET = bytes(range(32))


class Handler:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()  # a "slow" request reached the handler
        self.seen: list[tuple[str, int, int]] = []

    async def __call__(self, op: str, args: dict[str, Any], node: int, incarnation: int) -> Any:
        self.seen.append((op, node, incarnation))
        if op == "echo":
            return args
        if op == "expired":
            raise LockExpiredError("lock expired", receipt="r")
        if op == "moved":
            raise NotOwnerError("not the owner")
        if op == "slow":
            self.entered.set()
            await self.release.wait()
            return ["late"]
        raise AssertionError(op)


async def test_the_secret_is_made_once(postgres_dsn: str) -> None:
    first, second = await cluster_secret(postgres_dsn), await cluster_secret(postgres_dsn)
    assert first == second and len(first) == 32


async def test_calls_answers_and_errors() -> None:
    handler = Handler()
    server = InternalServer(SECRET, handler)
    port = await server.start("127.0.0.1")
    client = InternalClient(f"127.0.0.1:{port}", SECRET, 7, 3)
    try:
        assert await client.call("echo", {"a": [1, "b"]}, 5) == {"a": [1, "b"]}
        with pytest.raises(LockExpiredError):
            await client.call("expired", {}, 5)
        with pytest.raises(NotOwnerError):
            await client.call("moved", {}, 5)
        assert handler.seen[0] == ("echo", 7, 3)  # the peer named in the handshake
    finally:
        await client.close()
        await server.close()


async def test_a_wrong_secret_is_refused() -> None:
    handler = Handler()
    server = InternalServer(SECRET, handler)
    port = await server.start("127.0.0.1")
    client = InternalClient(f"127.0.0.1:{port}", bytes(32), 7, 1)
    try:
        with pytest.raises(ConnectionError):
            await client.call("echo", {}, 5)
        assert handler.seen == []
    finally:
        await client.close()
        await server.close()


async def test_an_answer_after_the_caller_gave_up_is_an_orphan() -> None:
    handler = Handler()
    server = InternalServer(SECRET, handler)
    port = await server.start("127.0.0.1")
    orphans: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    client = InternalClient(f"127.0.0.1:{port}", SECRET, 7, 1,
                            orphan=lambda op, args, result: orphans.put_nowait((op, result)))
    try:
        with pytest.raises(ConnectionError):  # timed out waiting
            await client.call("slow", {}, 0.05)
        handler.release.set()
        assert await asyncio.wait_for(orphans.get(), 5) == ("slow", ["late"])
    finally:
        await client.close()
        await server.close()


async def test_an_answer_that_cannot_be_sent_is_an_orphan_at_the_server() -> None:
    handler = Handler()
    orphans: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    server = InternalServer(SECRET, handler,
                            orphan=lambda op, args, result: orphans.put_nowait((op, result)))
    port = await server.start("127.0.0.1")
    client = InternalClient(f"127.0.0.1:{port}", SECRET, 7, 1)
    call = asyncio.ensure_future(client.call("slow", {}, 30))
    await asyncio.wait_for(handler.entered.wait(), 5)
    await client.close()  # the peer goes away before the answer
    with pytest.raises((ConnectionError, asyncio.CancelledError)):
        await call
    handler.release.set()
    assert await asyncio.wait_for(orphans.get(), 5) == ("slow", ["late"])
    await server.close()


# --- TLS ---------------------------------------------------------------------------------
def node_tls(pki: TestPki, stem: str) -> TlsConfig:
    issued = pki.node(stem)
    return TlsConfig(issued.cert_file, issued.key_file, pki.ca_file, "required")


async def tls_server(tls: TlsConfig, handler: Handler) -> tuple[InternalServer, RefusalLog]:
    refusals = RefusalLog()
    server = InternalServer(SECRET, handler, tls=ServerTls(tls), refusals=refusals)
    await server.start("127.0.0.1")
    return server, refusals


async def test_calls_over_tls(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    server, _ = await tls_server(node_tls(pki, "node1"), Handler())
    client = InternalClient(f"127.0.0.1:{server.port}", SECRET, 7, 1,
                            tls=node_tls(pki, "node2"))
    try:
        assert await client.call("echo", {"over": "tls"}, 5) == {"over": "tls"}
        writer = client._writer
        assert writer is not None and writer.get_extra_info("ssl_object") is not None
    finally:
        await client.close()
        await server.close()


async def test_a_node_with_a_certificate_of_another_ca_is_refused(tmp_path: Path) -> None:
    ours, theirs = TestPki(tmp_path / "ours"), TestPki(tmp_path / "theirs")
    handler = Handler()
    server, refusals = await tls_server(node_tls(ours, "node1"), handler)
    # its own CA trusts ours: only its certificate is foreign (the server refuses it)
    foreign = theirs.node("node2")
    stranger = InternalClient(f"127.0.0.1:{server.port}", SECRET, 7, 1, tls=TlsConfig(
        foreign.cert_file, foreign.key_file, ours.ca_file, "required"))
    # and a node that trusts only the other CA refuses the server's certificate
    doubter = InternalClient(f"127.0.0.1:{server.port}", SECRET, 8, 1,
                             tls=node_tls(theirs, "node3"))
    try:
        for client in (stranger, doubter):
            with pytest.raises(ConnectionError):
                await client.call("echo", {}, 5)
        assert handler.seen == []  # nothing reached the handler, secret or not
        assert refusals.counts.get("TLS handshake failed", 0) >= 1
    finally:
        await stranger.close()
        await doubter.close()
        await server.close()


async def test_plain_and_tls_peers_on_the_wrong_port_are_refused_at_once(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    handler = Handler()
    secure, secure_refusals = await tls_server(node_tls(pki, "node1"), handler)
    plain_refusals = RefusalLog()
    plain = InternalServer(SECRET, handler, refusals=plain_refusals)
    await plain.start("127.0.0.1")
    plain_client = InternalClient(f"127.0.0.1:{secure.port}", SECRET, 7, 1)
    tls_client = InternalClient(f"127.0.0.1:{plain.port}", SECRET, 7, 1,
                                tls=node_tls(pki, "node2"))
    try:
        for client in (plain_client, tls_client):
            started = time.monotonic()
            with pytest.raises(ConnectionError):
                await client.call("echo", {}, 5)
            # refused at the first bytes, not after the 5 s handshake timeout
            assert time.monotonic() - started < 2
        assert secure_refusals.counts == {"plaintext on a TLS port": 1}
        assert plain_refusals.counts == {"TLS handshake on a plaintext port": 1}
        assert handler.seen == []
    finally:
        await plain_client.close()
        await tls_client.close()
        await secure.close()
        await plain.close()


# --- a peer that breaks the rules ----------------------------------------------------------
async def raw_peer(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection that sent the preamble; returns the server's nonce."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PREAMBLE)
    hello = await asyncio.wait_for(read_frame(reader, HANDSHAKE_BYTES_MAX), 5)
    return reader, writer, bytes.fromhex(hello["nonce"])


async def authenticated_peer(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer, nonce = await raw_peer(port)
    writer.write(frame({"node": 7, "incarnation": 1, "mac": mac(SECRET, nonce).hex()}))
    return reader, writer


async def closed_without_answer(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


@pytest.mark.parametrize("hello", [
    struct.pack(">I", 1 << 30),  # a length of 1 GiB: refused from the 4 bytes alone
    struct.pack(">I", 4000) + b"[" * 4000,  # nested past the JSON decoder's recursion limit
    struct.pack(">I", 2) + b"\xff\xfe",  # not UTF-8
    frame({"node": 7, "mac": "zz" * 32}),  # not hex
    frame({"node": "seven", "incarnation": 1, "mac": "00" * 32}),
    frame({"node": [1], "mac": None}),
])
async def test_malformed_hellos_close_the_connection(hello: bytes) -> None:
    handler = Handler()
    refusals = RefusalLog()
    server = InternalServer(SECRET, handler, refusals=refusals)
    port = await server.start("127.0.0.1")
    try:
        reader, writer, _ = await raw_peer(port)
        writer.write(hello)
        assert await closed_without_answer(reader)
        writer.close()
        assert sum(refusals.counts.values()) == 1 and handler.seen == []
        client = InternalClient(f"127.0.0.1:{port}", SECRET, 7, 1)  # others still served
        assert await client.call("echo", {"still": 1}, 5) == {"still": 1}
        await client.close()
    finally:
        await server.close()


async def test_a_stranger_is_refused_before_anything_is_answered() -> None:
    refusals = RefusalLog()
    server = InternalServer(SECRET, Handler(), refusals=refusals)
    port = await server.start("127.0.0.1")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await closed_without_answer(reader)  # not even a nonce
        writer.close()
        assert refusals.counts == {"not a Conveyor node": 1}
    finally:
        await server.close()


@pytest.mark.parametrize("request_frame", [
    frame({"id": 1, "op": 5, "args": {}}),
    frame({"id": 1, "op": "echo", "args": [1, 2]}),
    frame({"id": "x", "op": "echo", "args": {}}),
    frame({"id": True, "op": "echo", "args": {}}),
])
async def test_a_request_of_the_wrong_shape_is_answered_and_the_connection_kept(
        request_frame: bytes) -> None:
    server = InternalServer(SECRET, Handler())
    port = await server.start("127.0.0.1")
    try:
        reader, writer = await authenticated_peer(port)
        writer.write(request_frame)
        answer = await asyncio.wait_for(read_frame(reader), 5)
        assert answer["error"]["type"] == "InvalidRequestError", answer
        writer.write(frame({"id": 2, "op": "echo", "args": {"next": 1}}))
        assert await asyncio.wait_for(read_frame(reader), 5) == {"id": 2, "ok": {"next": 1}}
        writer.close()
    finally:
        await server.close()


@pytest.mark.parametrize("garbage", [
    struct.pack(">I", 3) + b"{{{",
    struct.pack(">I", 2) + b"[]",
    struct.pack(">I", 100_000) + b"[" * 100_000,
    struct.pack(">I", (512 << 20) + 1),  # over the frame bound: nothing allocated for it
])
async def test_post_auth_garbage_is_answered_with_an_error_and_closed(garbage: bytes) -> None:
    server = InternalServer(SECRET, Handler())
    port = await server.start("127.0.0.1")
    try:
        reader, writer = await authenticated_peer(port)
        writer.write(garbage)
        answer = await asyncio.wait_for(read_frame(reader), 5)
        assert answer["id"] is None and answer["error"]["type"] == "InvalidRequestError"
        assert await closed_without_answer(reader)
        writer.close()
    finally:
        await server.close()


async def test_without_a_ca_nodes_sharing_one_certificate_trust_each_other(
        tmp_path: Path) -> None:
    """No ca_file: this node's own certificate file is a trust anchor (a CA-issued leaf
    too, as a partial chain), so nodes given the same certificate talk over TLS."""
    pki = TestPki(tmp_path / "pki")
    issued = pki.node("shared")
    shared = TlsConfig(issued.cert_file, issued.key_file)
    server, _ = await tls_server(shared, Handler())
    client = InternalClient(f"127.0.0.1:{server.port}", SECRET, 7, 1, tls=shared)
    other = TestPki(tmp_path / "other").node("other")  # not in that file: refused
    stranger = InternalClient(f"127.0.0.1:{server.port}", SECRET, 8, 1,
                              tls=TlsConfig(other.cert_file, other.key_file))
    try:
        assert await client.call("echo", {"n": 1}, 5) == {"n": 1}
        with pytest.raises(ConnectionError):
            await stranger.call("echo", {}, 5)
    finally:
        await client.close()
        await stranger.close()
        await server.close()


async def test_a_reload_gives_new_handshakes_the_new_certificate(tmp_path: Path) -> None:
    """SIGHUP reloads the internal listener's context with the others (TlsRegistry)."""
    pki = TestPki(tmp_path / "pki")
    tls = node_tls(pki, "node1")
    server_tls = ServerTls(tls)
    server = InternalServer(SECRET, Handler(), tls=server_tls)
    port = await server.start("127.0.0.1")
    try:
        first = await asyncio.to_thread(served_serial, port, pki.ca_file)
        renewed = pki.issue("localhost", "node1", server=True, client_too=True)
        assert renewed.serial != first
        assert server_tls.reload()
        assert await asyncio.to_thread(served_serial, port, pki.ca_file) == renewed.serial
        client = InternalClient(f"127.0.0.1:{port}", SECRET, 7, 1, tls=node_tls(pki, "node2"))
        assert await client.call("echo", {"after": "reload"}, 5) == {"after": "reload"}
        await client.close()
    finally:
        await server.close()


async def test_requests_in_flight_are_bounded_per_connection() -> None:
    """Past the bound the next frame waits in the socket until an answer is sent."""
    handler = Handler()
    server = InternalServer(SECRET, handler, requests_in_flight_max=2)
    port = await server.start("127.0.0.1")
    try:
        reader, writer = await authenticated_peer(port)
        writer.write(frame({"id": 1, "op": "slow", "args": {}})
                     + frame({"id": 2, "op": "slow", "args": {}})
                     + frame({"id": 3, "op": "echo", "args": {"third": 1}}))
        await asyncio.wait_for(handler.entered.wait(), 5)
        with pytest.raises(TimeoutError):  # the third is not read while two are held
            await asyncio.wait_for(read_frame(reader), 0.3)
        assert [op for op, _, _ in handler.seen] == ["slow", "slow"]
        handler.release.set()
        answers = {(await asyncio.wait_for(read_frame(reader), 5))["id"] for _ in range(3)}
        assert answers == {1, 2, 3}
        writer.close()
    finally:
        await server.close()
