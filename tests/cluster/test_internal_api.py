"""The node-to-node channel (conveyor/cluster/internal_api.py) in one process: the
cluster secret, the MAC handshake, errors that keep their class, and answers nobody
waits for any more handed to the orphan callbacks (so deliveries are given back)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.cluster.internal_api import (
    InternalClient,
    InternalServer,
    NotOwnerError,
    cluster_secret,
)
from conveyor.errors import LockExpiredError

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
