"""Goal: a 5,000-message HTTP read does not hold the event loop for its whole length.

Method: a real server in this loop (run_broker), 5,000 records appended, one raw HTTP
read of all of them while a probe task notes, at every loop turn it gets, how many
message documents were built so far; the most built between two turns is one slice.
The response's JSON is the same as encoding the whole document at once. Before the
work was sliced, all 5,000 were built (and encoded) in one turn.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from limits_support import closed_by_peer

from conveyor.protocols.http import handlers
from conveyor.protocols.http.chunks import RECORDS_PER_TURN, encode_body
from conveyor.protocols.http.codec import encode_document, record_document
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.server import run_broker


async def test_encoded_in_slices_is_the_same_json() -> None:
    document = {"messages": [{"offset": i, "value": "v" * (i % 7)} for i in range(1234)],
                "next_offsets": {"0": 1234}}
    assert await encode_body(document) == encode_document(document)


async def test_large_read_lets_other_work_run(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    built = 0

    def counting(*args: Any) -> dict[str, Any]:
        nonlocal built
        built += 1
        return record_document(*args)

    monkeypatch.setattr(handlers, "record_document", counting)
    async with run_broker(tmp_path / "data", listeners=("http",)) as server:
        await server.broker.create_topic("big", 1)
        for _ in range(50):
            await server.broker.append_batch("big", 0, build_batch(
                [RecordData(None, os.urandom(700), (), 1) for _ in range(100)]))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["http"])
        seen: list[int] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                await asyncio.sleep(0)
                seen.append(built)

        writer.write(b"GET /topics/big/messages?partition=0&offset=0&limit=5000 HTTP/1.1\r\n"
                     b"Host: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        task = asyncio.ensure_future(probe())
        answer = await closed_by_peer(reader)
        stop.set()
        await task
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert len(json.loads(body)["messages"]) == 5000
        assert built == 5000
        most_in_one_turn = max(b - a for a, b in itertools.pairwise(seen))
        assert most_in_one_turn <= RECORDS_PER_TURN
