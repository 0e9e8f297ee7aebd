"""Receipts over the HTTP API (issue 9: a wrong-token receipt for a live lock).

Goal: docs/http.md's promise holds on the wire: a receipt never issued for a record
answers ``unknown_delivery`` (not ``409 lock_expired``) and leaves the live lock alone;
a receipt of an earlier lock on the record answers ``lock_expired``. Method: a real
HTTP listener, httpx, a queue with one message acquired, released and acquired again.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from conveyor.protocols.http.receipts import OWNER_KEYS_MAX, ReceiptSeal
from conveyor.testing.server import run_broker


def forged(receipt: str, token_delta: int) -> str:
    topic, partition, offset, token, group = receipt.split(":", 4)
    return f"{topic}:{partition}:{offset}:{int(token) + token_delta}:{group}"


async def test_receipt_never_issued_is_unknown_and_the_lock_stays(tmp_path: Path) -> None:
    async with run_broker(tmp_path / "data", listeners=("http",)) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports['http']}") as http:
            assert (await http.post("/queues", json={"name": "jobs"})).status_code < 300
            published = await http.post("/topics/jobs/messages",
                                        json={"messages": [{"value": "one"}]})
            assert published.status_code < 300, published.text
            path = "/topics/jobs/groups/jobs"
            first = (await http.post(f"{path}/acquire", json={"limit": 1})).json()
            [message] = first["messages"]
            release = await http.post(f"{path}/release", json={"receipts": [message["receipt"]]})
            assert release.status_code < 300, release.text
            [again] = (await http.post(f"{path}/acquire", json={"limit": 1})).json()["messages"]
            assert again["offset"] == message["offset"]

            wrong = await http.post(f"{path}/ack", json={"receipts": [forged(again["receipt"],
                                                                              1000)]})
            assert wrong.status_code >= 400 and wrong.json()["error"]["code"] == \
                "unknown_delivery", wrong.text
            earlier = await http.post(f"{path}/ack", json={"receipts": [message["receipt"]]})
            assert earlier.status_code == 409 and earlier.json()["error"]["code"] == \
                "lock_expired", earlier.text
            acked = await http.post(f"{path}/ack", json={"receipts": [again["receipt"]]})
            assert acked.status_code < 300, acked.text  # the live lock was left alone


RECEIPT = "jobs:0:17:123456789:jobs"


def test_a_seal_opens_for_its_owner_only_and_refuses_any_change() -> None:
    seal = ReceiptSeal()
    sealed = seal.seal("alice", RECEIPT)
    assert sealed.startswith(RECEIPT + "|") and seal.open("alice", sealed) == RECEIPT
    assert seal.open("bob", sealed) is None
    flipped = sealed[:-1] + ("0" if sealed[-1] != "0" else "1")
    assert seal.open("alice", flipped) is None
    assert seal.open("alice", sealed[:-1]) is None  # a short tag
    assert seal.open("alice", RECEIPT) is None  # no tag at all
    assert seal.open("alice", f"{RECEIPT}|{sealed[-32:]}x") is None
    # wire input: non-ASCII and lone surrogates are refused, never raised
    assert seal.open("alice", "jobs\ud800|" + "\u00e9" * 32) is None
    assert seal.open("alice", "jobs|" + "\ud800" * 32) is None
    assert ReceiptSeal().open("alice", sealed) is None  # another key (a restart)


def test_seals_under_one_key_agree_across_listeners_and_a_full_owner_cache() -> None:
    key = bytes(range(32)) * 3  # longer than BLAKE2b's key: hashed down alike
    one, other = ReceiptSeal(key), ReceiptSeal(key)
    sealed = one.seal("alice", RECEIPT)
    assert other.open("alice", sealed) == RECEIPT  # a cluster: any node opens it
    for index in range(OWNER_KEYS_MAX + 1):  # the owner cache starts over
        one.seal(f"user-{index}", RECEIPT)
    assert one.open("alice", sealed) == RECEIPT
