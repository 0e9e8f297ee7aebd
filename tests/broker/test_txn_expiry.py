"""Goal: idle transactional ids (transactional.id.expiration.ms) and idle producer ids
(producer.id.expiration.ms) are forgotten, in memory and in the state store, exactly
when their idle period has passed, never while in use; an expired idempotent producer
is then taken as a new one (Kafka's unknown producer), a never-allocated id is not.

Method: a Broker on MemoryFileSystem + SQLite (PostgreSQL on a PostgreSQL pass) with a
SimClock and short expiration periods; time moved by ``advance``; the expiry passes
called directly (the broker's timer calls the same methods, so either may run them:
the assertions look at the state, not at who removed it); a restart shows what the
state store kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import BrokerConfig
from conveyor.errors import InvalidProducerIdMappingError, UnknownProducerIdError
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.memory_fs import MemoryFileSystem

IDLE_MS = 10_000
CONFIG = BrokerConfig(transactional_id_expiration_ms=IDLE_MS, producer_id_expiration_ms=IDLE_MS)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    fs = MemoryFileSystem()
    fs.make_dirs(str(tmp_path))
    result = BrokerHarness(tmp_path, fs, CONFIG)
    await result.start()
    try:
        yield result
    finally:
        await result.stop()


def batch(producer: tuple[int, int], sequence: int, transactional: bool = False) -> bytes:
    return build_batch([RecordData(None, b"v%d" % sequence, (), 1000)],
                       producer_id=producer[0], producer_epoch=producer[1],
                       base_sequence=sequence, is_transactional=transactional)


async def test_idle_transactional_id_expires_and_starts_over(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("t")
    producer = await broker.init_producer_id("idle", 60_000)
    await broker.add_partitions_to_txn("idle", *producer, [("t", 0)])
    await broker.append_batch("t", 0, batch(producer, 0, transactional=True))
    # an open transaction is in use: never expired, however long it stays open
    harness.clock.advance(IDLE_MS * 3)
    await broker.transactions.expire_idle()
    described = broker.describe_transaction("idle")
    assert described is not None and described.state == "Ongoing"
    await broker.end_txn("idle", *producer, commit=True)
    harness.clock.advance(IDLE_MS - 1)
    await broker.transactions.expire_idle()
    assert broker.describe_transaction("idle") is not None  # 1 ms short of idle
    harness.clock.advance(1)
    await broker.transactions.expire_idle()
    assert broker.describe_transaction("idle") is None
    assert broker.transactions.idle.expired == 1
    # its old producer is refused, and is gone from the state store too
    with pytest.raises(InvalidProducerIdMappingError):
        await broker.add_partitions_to_txn("idle", *producer, [("t", 0)])
    broker = await harness.restart()
    assert broker.describe_transaction("idle") is None
    renewed = await broker.init_producer_id("idle", 60_000)
    assert renewed[0] != producer[0] and renewed[1] == 0


async def test_each_use_postpones_expiry(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("t")
    producer = await broker.init_producer_id("busy", 60_000)
    for _ in range(3):
        harness.clock.advance(IDLE_MS // 2)
        await broker.add_offsets_to_txn("busy", *producer, "g")
        await broker.end_txn("busy", *producer, commit=False)
        await broker.transactions.expire_idle()
    assert broker.describe_transaction("busy") is not None
    assert len(broker.transactions.idle) == 1  # one heap entry per id, not per use


async def test_idle_producer_id_expires(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("t")
    producer = await broker.init_producer_id()
    await broker.append_batch("t", 0, batch(producer, 0))
    harness.clock.advance(IDLE_MS // 2)
    await broker.append_batch("t", 0, batch(producer, 1))  # used: counts from here
    harness.clock.advance(IDLE_MS // 2 + 1)
    broker.producers.expire_idle()
    assert [state[0] for state in broker.producer_states("t", 0)] == [producer[0]]
    harness.clock.advance(IDLE_MS // 2)
    broker.producers.expire_idle()
    assert broker.producer_states("t", 0) == []
    assert broker.producers.expired == 1
    # a transactional id's producer lives as long as the id
    transactional = await broker.init_producer_id("keeper", 60_000)
    harness.clock.advance(IDLE_MS // 2)
    await broker.add_offsets_to_txn("keeper", *transactional, "g")
    harness.clock.advance(IDLE_MS + 1)
    broker.producers.expire_idle()
    assert broker.producers.current_epoch(transactional[0]) == transactional[1]
    await broker.state_store.commit()
    broker = await harness.restart()
    assert broker.producer_states("t", 0) == []
    # the expired producer comes back: Kafka takes it as new, from any sequence
    appended = await broker.append_batch("t", 0, batch(producer, 7))
    again = await broker.append_batch("t", 0, batch(producer, 7))
    assert again.duplicate and again.base_offset == appended.base_offset
    with pytest.raises(UnknownProducerIdError):  # never handed out
        await broker.append_batch("t", 0, batch((transactional[0] + 100, 0), 0))
