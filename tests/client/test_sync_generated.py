"""The blocking client is generated from the asyncio one: sync.py must match aio.py."""

from __future__ import annotations

from conveyor.client import generate_sync


def test_sync_client_is_generated_from_the_async_client() -> None:
    expected = generate_sync.generate(generate_sync.SOURCE.read_text())
    assert generate_sync.TARGET.read_text() == expected, (
        "conveyor/client/sync.py is stale: run python -m conveyor.client.generate_sync")


def test_generation_removes_every_async_word() -> None:
    generated = generate_sync.generate(generate_sync.SOURCE.read_text())
    for word in ("async ", "await ", "asyncio", "AsyncClient", "AsyncMessage", "aclose"):
        assert word not in generated, word
