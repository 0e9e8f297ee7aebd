"""Names no state store can keep (NUL, a lone surrogate) are refused at the broker's door.

Goal: an exchange, a routing key or a shared group named with text PostgreSQL's ``text``
cannot hold gets InvalidNameError on every backend, before anything changes in memory, so
nothing half-declared is left behind and no other write of the loop turn fails with it
(schemathesis found a 503 for ``POST /exchanges`` with a NUL in the name on PostgreSQL).
Method: the BrokerHarness (real storage: files + SQLite, or PostgreSQL in that pass).
"""

from __future__ import annotations

import pytest

from conveyor.broker.broker import Broker
from conveyor.errors import InvalidNameError

BAD = ["a\x00b", "lone \udc80"]


@pytest.mark.parametrize("bad", BAD)
async def test_an_exchange_name_no_store_can_keep_is_refused(broker: Broker, bad: str) -> None:
    before = {info.name for info in broker.list_exchanges()}
    with pytest.raises(InvalidNameError):
        await broker.declare_exchange(bad, "direct")
    with pytest.raises(InvalidNameError):
        await broker.declare_exchange("fine", "direct", alternate_exchange=bad)
    assert {info.name for info in broker.list_exchanges()} == before


@pytest.mark.parametrize("bad", BAD)
async def test_a_routing_key_or_group_no_store_can_keep_is_refused(
        broker: Broker, bad: str) -> None:
    await broker.declare_exchange("x", "direct")
    assert broker.shared_groups is not None
    await broker.shared_groups.declare_queue("q")
    with pytest.raises(InvalidNameError):
        await broker.bind("x", "queue", "q", bad)
    assert broker.list_bindings("x") == []
    await broker.create_topic("events", partitions=1)
    with pytest.raises(InvalidNameError):
        await broker.shared_groups.create_shared_group("events", bad)
    await broker.bind("x", "queue", "q", "fine")  # the store still takes good writes
    assert [b.routing_key for b in broker.list_bindings("x")] == ["fine"]
