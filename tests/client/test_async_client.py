"""AsyncClient against a server in the same loop (run_broker), plus the client core.

Goal: the asyncio client offers the same calls as the blocking one; a long-poll
client that vanishes releases nothing it did not ack; retries cover 429/503 and
refused connections but never resend a non-idempotent request that may have
been processed. Method: real server for the round trips; httpx.MockTransport
for the retry rules (exact control of each response).
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest

from conveyor import AsyncClient, Client
from conveyor.client import ConnectionFailedError, RetryPolicy
from conveyor.client.core import error_from_response
from conveyor.errors import LimitExceededError, LockExpiredError, UnknownQueueError
from conveyor.testing.server import run_broker

FAST_RETRY = RetryPolicy(attempts=3, backoff_initial_s=0.001, backoff_max_s=0.002,
                         rng=random.Random(0))


async def test_async_publish_consume_ack_and_replay(tmp_path: Path) -> None:
    async with run_broker(tmp_path, listeners=("http",)) as server, AsyncClient(
        f"http://127.0.0.1:{server.ports['http']}"
    ) as client:
        await client.create_queue("tasks")
        await client.publish_batch("tasks", ["one", "two"])
        texts = []
        async for message in client.consume("tasks", group="tasks", wait_s=0.1):
            texts.append(message.text)
            await message.ack()
        assert texts == ["one", "two"]
        assert (await client.describe_queue("tasks"))["ready"] == 0
        await client.publish_batch("audit", ["a", "b", "c"])
        replay = [m.text async for m in client.consume("audit", from_beginning=True,
                                                       wait_s=0)]
        assert replay == ["a", "b", "c"]


async def test_async_acquire_carries_the_last_batchs_acks(tmp_path: Path) -> None:
    """``AsyncClient.acquire(ack=)``: one request per cycle; a stale receipt is named with
    its typed error and the next messages come anyway."""
    async with run_broker(tmp_path, listeners=("http",)) as server, AsyncClient(
        f"http://127.0.0.1:{server.ports['http']}"
    ) as client:
        await client.create_queue("cycle")
        await client.publish_batch("cycle", ["one", "two", "three"])
        first = await client.acquire("cycle", limit=1)
        await first[0].release()  # its receipt is stale from now on
        again = await client.acquire("cycle", limit=2, ack=[first[0].receipt or ""])
        assert [m.text for m in again] == ["one", "two"] and again.acked == 0
        [failure] = again.ack_failures
        assert isinstance(failure.error, LockExpiredError)
        last = await client.acquire("cycle", limit=2, ack=[m.receipt or "" for m in again])
        assert [m.text for m in last] == ["three"] and last.acked == 2
        await client.acquire("cycle", ack=[last[0].receipt or ""])
        assert (await client.describe_queue("cycle"))["in_flight"] == 0


async def test_async_request_response(tmp_path: Path) -> None:
    async with run_broker(tmp_path, listeners=("http",)) as server:
        url = f"http://127.0.0.1:{server.ports['http']}"
        async with AsyncClient(url) as caller, AsyncClient(url) as worker:
            await caller.create_queue("rpc")

            async def double(message: object) -> str:
                return str(2 * int(getattr(message, "text", "0")))

            serving = asyncio.ensure_future(
                worker.serve_requests("rpc", double, max_messages=1, wait_s=0.5)
            )
            response = await caller.call("rpc", "21", timeout_s=10)
            assert response.text == "42"
            assert await serving == 1


async def test_vanished_long_poll_client_releases_what_it_acquired(tmp_path: Path) -> None:
    """A raw connection long-polls, then disconnects; the message published afterwards
    must be available at once to another consumer (not locked for 60 s)."""
    async with run_broker(tmp_path, listeners=("http",)) as server, AsyncClient(
        f"http://127.0.0.1:{server.ports['http']}"
    ) as client:
        await client.create_queue("mail", visibility_timeout_ms=60_000)
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["http"])
        body = json.dumps({"limit": 1, "wait_ms": 20_000}).encode()
        writer.write(b"POST /topics/mail/groups/mail/acquire HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await client.publish("mail", "hello")
        [message] = await client.acquire("mail", wait_s=5)
        assert message.text == "hello"
        await message.ack()


def _mock_client(responses: list[httpx.Response | Exception], seen: list[str]) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        item = responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return Client("http://conveyor.test", retry=FAST_RETRY,
                  transport=httpx.MockTransport(handler))


def test_retries_429_and_503_then_succeeds() -> None:
    seen: list[str] = []
    busy = httpx.Response(429, json={"error": {"code": "too_many_requests", "message": "x"}})
    down = httpx.Response(503, json={"error": {"code": "unavailable", "message": "x"}})
    ok = httpx.Response(200, json={"results": [
        {"topic": "t", "partition": 0, "offset": 7, "duplicate": False}]})
    with _mock_client([busy, down, ok], seen) as client:
        assert client.publish("t", "v").offset == 7
    assert len(seen) == 3


def test_connect_errors_are_retried_then_reported() -> None:
    seen: list[str] = []
    refused = httpx.ConnectError("refused")
    with _mock_client([refused, refused, refused], seen) as client, pytest.raises(
        ConnectionFailedError
    ):
        client.publish("t", "v")
    assert len(seen) == 3


def test_a_publish_that_may_have_been_processed_is_not_resent() -> None:
    seen: list[str] = []
    with _mock_client([httpx.ReadError("reset")], seen) as client, pytest.raises(
        ConnectionFailedError
    ):
        client.publish("t", "v")
    assert len(seen) == 1  # no dedup id: resending could duplicate the message


def test_error_codes_map_to_typed_exceptions() -> None:
    error = error_from_response(404, b'{"error":{"code":"unknown_queue","message":"m",'
                                     b'"details":{"queue":"q"}}}')
    assert isinstance(error, UnknownQueueError) and error.details == {"queue": "q"}
    too_big = error_from_response(413, b'{"error":{"code":"limit_exceeded","message":"m"}}')
    assert isinstance(too_big, LimitExceededError) and too_big.http_status == 413
    garbage = error_from_response(502, b"<html>")
    assert garbage.code == "server_error"
