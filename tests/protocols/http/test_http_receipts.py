"""Receipts over the HTTP API (issue 9: a wrong-token receipt for a live lock).

Goal: docs/http.md's promise holds on the wire: a receipt never issued for a record
answers ``unknown_delivery`` (not ``409 lock_expired``) and leaves the live lock alone;
a receipt of an earlier lock on the record answers ``lock_expired``. Method: a real
HTTP listener, httpx, a queue with one message acquired, released and acquired again.
"""

from __future__ import annotations

from pathlib import Path

import httpx

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
