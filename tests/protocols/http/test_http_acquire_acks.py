"""Acks carried by an acquire (``POST .../acquire`` with ``ack``), as a KIP-932
ShareFetch carries acknowledgements.

Goal: the acks are settled first and reported one by one (how many were acked, each
failed receipt with its code) without losing the acquired messages; a stale, forged,
foreign or unsealed receipt fails alone; the answer leaves only after the acks are
fsynced (the ack endpoint's promise); an acquire that fails after its acks were
settled still reports them. Method: ``Handlers`` against a real broker (run_broker),
no sockets; the WAL fdatasync held by a gate to see what the answer waits for.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from conveyor.broker.types import Delivery, Message
from conveyor.errors import UnavailableError
from conveyor.protocols.http.codec import ApiRequest
from conveyor.protocols.http.handlers import Handlers, RequestContext
from conveyor.protocols.http.openapi import build_document
from conveyor.protocols.http.routes import ROUTES
from conveyor.protocols.http.schemas import ACQUIRE_BODY, validate
from conveyor.testing.server import run_broker

ACQUIRE = next(route for route in ROUTES if route.operation == "acquire")
UNSEALED = "|unsealed"  # what the test's seal refuses, as receipts.py refuses a forgery


def acquire_request(queue: str, body: dict[str, Any]) -> ApiRequest:
    validate(body, ACQUIRE_BODY)
    return ApiRequest("acquire", ACQUIRE, {"topic": queue, "group": queue}, {}, body)


def context() -> RequestContext:
    """A live connection whose seal refuses receipts ending in ``UNSEALED``."""
    return RequestContext(lambda: True, asyncio.Event(), "127.0.0.1:1",
                          open_receipts=lambda receipts: [
                              None if receipt.endswith(UNSEALED) else receipt
                              for receipt in receipts])


def forged(receipt: str) -> str:
    topic, partition, offset, token, group = receipt.split(":", 4)
    return f"{topic}:{partition}:{offset}:{int(token) + 1000}:{group}"


async def test_acks_settle_first_and_the_next_messages_come_with_them(tmp_path: Path) -> None:
    async with run_broker(tmp_path) as server:
        broker = server.broker
        await broker.shared_groups.declare_queue("q")
        await broker.publish("q", [Message(f"m{i}".encode()) for i in range(4)])
        handlers = Handlers(broker, build_document)
        first = await handlers.handle(acquire_request("q", {"limit": 2}), context())
        receipts = [message["receipt"] for message in first.document["messages"]]
        assert "acks" not in first.document  # no ack asked: the answer is as before

        second = await handlers.handle(acquire_request("q", {"limit": 2, "ack": receipts}),
                                       context())

        assert second.status == 200
        assert [m["value"] for m in second.document["messages"]] == ["m2", "m3"]
        assert second.document["acks"] == {"acked": 2, "failed": []}
        info = await broker.shared_groups.get_queue("q")
        assert (info.ready, info.in_flight) == (0, 2)  # m0, m1 gone for good


async def test_each_bad_receipt_fails_alone_and_the_messages_still_come(
        tmp_path: Path) -> None:
    async with run_broker(tmp_path) as server:
        broker = server.broker
        await broker.shared_groups.declare_queue("q")
        await broker.shared_groups.declare_queue("other")
        await broker.publish("q", [Message(b"a"), Message(b"b"), Message(b"c")])
        await broker.publish("other", [Message(b"x")])
        [foreign] = await broker.acquire("other", "other", 1)
        handlers = Handlers(broker, build_document)
        [stale] = (await handlers.handle(acquire_request("q", {"limit": 1}), context())
                   ).document["messages"]
        await broker.release([stale["receipt"]])  # its lock is gone: the receipt is stale
        live = (await handlers.handle(acquire_request("q", {"limit": 2}), context())
                ).document["messages"]
        good, kept = live[0]["receipt"], live[1]["receipt"]
        asked = [stale["receipt"], forged(kept), foreign.receipt, good + UNSEALED, good]

        response = await handlers.handle(
            acquire_request("q", {"limit": 5, "ack": asked}), context())

        assert response.status == 200
        report = response.document["acks"]
        assert report["acked"] == 1
        codes = {item["receipt"]: item["error"]["code"] for item in report["failed"]}
        assert codes == {stale["receipt"]: "lock_expired", forged(kept): "unknown_delivery",
                         foreign.receipt: "unknown_delivery",
                         good + UNSEALED: "unknown_delivery"}
        assert all(item["error"]["message"] for item in report["failed"])
        assert [m["value"] for m in response.document["messages"]] == ["c"]
        info = await broker.shared_groups.get_queue("q")
        assert (info.ready, info.in_flight) == (0, 2)  # the forged one left ``kept`` alone
        # every ack failed: still 200 with the messages (none lost to an error status)
        await broker.release([kept])
        again = await handlers.handle(acquire_request("q", {"ack": [good]}), context())
        assert again.status == 200 and again.document["acks"]["acked"] == 0
        assert [m["value"] for m in again.document["messages"]] == ["b"]


async def test_the_answer_waits_for_the_acks_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_broker(tmp_path) as server:
        broker = server.broker
        await broker.shared_groups.declare_queue("q")
        await broker.publish("q", [Message(b"a"), Message(b"b")])
        [delivery] = await broker.acquire("q", "q", 1)
        handlers = Handlers(broker, build_document)
        entered, gate = threading.Event(), threading.Event()
        fdatasync = os.fdatasync

        def held_fdatasync(descriptor: int) -> None:
            entered.set()
            assert gate.wait(10)
            fdatasync(descriptor)

        monkeypatch.setattr(os, "fdatasync", held_fdatasync)
        answer = asyncio.ensure_future(handlers.handle(
            acquire_request("q", {"limit": 1, "ack": [delivery.receipt]}), context()))
        assert await asyncio.to_thread(entered.wait, 10)
        for _ in range(20):
            await asyncio.sleep(0)  # zero-time yields: everything but the fsync may run
        assert not answer.done()
        gate.set()
        response = await answer
        assert response.document["acks"] == {"acked": 1, "failed": []}
        assert [m["value"] for m in response.document["messages"]] == ["b"]


async def test_a_failed_acquire_still_reports_the_acks_it_settled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with run_broker(tmp_path) as server:
        broker = server.broker
        await broker.shared_groups.declare_queue("q")
        await broker.publish("q", [Message(b"a")])
        [delivery] = await broker.acquire("q", "q", 1)
        handlers = Handlers(broker, build_document)

        async def unavailable(*args: Any, **kwargs: Any) -> list[Delivery]:
            raise UnavailableError("shutting down")

        monkeypatch.setattr(broker, "acquire", unavailable)
        response = await handlers.handle(
            acquire_request("q", {"ack": [delivery.receipt]}), context())

        assert response.status == 503
        error = response.document["error"]
        assert error["code"] == "unavailable"
        assert error["details"]["acks"] == {"acked": 1, "failed": []}
        info = await broker.shared_groups.get_queue("q")
        assert (info.ready, info.in_flight) == (0, 0)


def test_the_ack_list_is_validated_and_may_be_empty() -> None:
    validate({"ack": []}, ACQUIRE_BODY)
    with pytest.raises(Exception, match=r"ack\[1\]"):
        validate({"ack": ["ok", 7]}, ACQUIRE_BODY)
