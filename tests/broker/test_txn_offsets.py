"""Goal: a transaction's offsets as the group's coordinator keeps them (broker/txn_offsets.py):
invisible to OffsetFetch while the transaction is open (and reported for KIP-447's
require_stable), committed offsets when it commits, gone when it aborts; kept across a
restart while pending; an older epoch of the producer fenced by a newer one; an end told
twice changes nothing.

Method: a Broker on MemoryFileSystem + SQLite with a SimClock; a read-process-write
transaction driven through the broker API (AddOffsetsToTxn, TxnOffsetCommit, EndTxn), and
the group side's ``finish`` called directly where a cluster's transaction coordinator
would call it over the internal channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.errors import ProducerFencedError
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.memory_fs import MemoryFileSystem


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    fs = MemoryFileSystem()
    fs.make_dirs(str(tmp_path))
    result = BrokerHarness(tmp_path, fs)
    await result.start()
    try:
        yield result
    finally:
        await result.stop()


async def input_topic(broker: Broker, partitions: int = 2) -> None:
    """The topic the group reads: 40 records in each partition (committed offsets past
    a log's end would be clamped at a restart)."""
    await broker.create_topic("in", partitions=partitions)
    for partition in range(partitions):
        await broker.append_batch("in", partition, build_batch(
            [RecordData(None, b"v%d" % index, (), 1000) for index in range(40)]))


def committed(broker: Broker, group: str) -> dict[tuple[str, int], int]:
    return {key: value.offset for key, value in broker.fetch_offsets(group).items()
            if value is not None}


async def offsets_in_transaction(broker: Broker, transactional_id: str, group: str,
                                 offsets: dict[int, int]) -> tuple[int, int]:
    producer = await broker.init_producer_id(transactional_id, 60_000)
    await broker.add_offsets_to_txn(transactional_id, *producer, group)
    written = await broker.txn_offset_commit(
        transactional_id, group, *producer,
        [("in", partition, offset, f"m{offset}") for partition, offset in offsets.items()])
    assert set(written.values()) == {None}
    return producer


async def test_offsets_visible_only_when_their_transaction_commits(
        harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await input_topic(broker)
    await broker.commit_offsets("g", {("in", 0): 1})
    producer = await offsets_in_transaction(broker, "rpw", "g", {0: 5, 1: 7})
    assert committed(broker, "g") == {("in", 0): 1}  # the transaction is open
    assert broker.pending_txn_offsets("g") == {("in", 0), ("in", 1)}
    await broker.end_txn("rpw", *producer, commit=True)
    assert committed(broker, "g") == {("in", 0): 5, ("in", 1): 7}
    assert broker.pending_txn_offsets("g") == set()
    fetched = broker.fetch_offsets("g")[("in", 1)]
    assert fetched is not None and fetched.metadata == "m7"
    broker = await harness.restart()  # committed durably, nothing left pending
    assert committed(broker, "g") == {("in", 0): 5, ("in", 1): 7}
    assert broker.pending_txn_offsets("g") == set()


async def test_offsets_of_an_aborted_transaction_are_dropped(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await input_topic(broker)
    await broker.commit_offsets("g", {("in", 0): 1})
    producer = await offsets_in_transaction(broker, "rpw", "g", {0: 5})
    await broker.end_txn("rpw", *producer, commit=False)
    assert committed(broker, "g") == {("in", 0): 1}
    assert broker.pending_txn_offsets("g") == set()
    broker = await harness.restart()
    assert committed(broker, "g") == {("in", 0): 1}
    assert broker.pending_txn_offsets("g") == set()
    assert await broker.state_store.txn_offsets.load() == []


async def test_pending_offsets_survive_a_restart_and_commit_after_it(
        harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await input_topic(broker, 1)
    producer = await offsets_in_transaction(broker, "rpw", "g", {0: 9})
    broker = await harness.restart()
    assert broker.pending_txn_offsets("g") == {("in", 0)}
    assert committed(broker, "g") == {}
    await broker.end_txn("rpw", *producer, commit=True)
    assert committed(broker, "g") == {("in", 0): 9}


async def test_an_older_epoch_is_fenced_and_an_end_told_twice_changes_nothing(
        harness: BrokerHarness) -> None:
    """The group side alone, as a cluster's group coordinator (no transaction row there):
    a producer's older epoch is refused once a newer one wrote or ended; the end of a
    transaction repeated (a retried WriteTxnMarkers) commits nothing more."""
    broker = harness.broker
    assert broker is not None
    await input_topic(broker, 1)
    side = broker.txn_offsets
    assert await side.commit("g", "tx", 42, 3, [("in", 0, 10, None)]) == {("in", 0): None}
    with pytest.raises(ProducerFencedError):
        await side.commit("g", "tx", 42, 2, [("in", 0, 99, None)])
    await side.finish("g", "tx", 42, 4, commit=True)  # TV2: the marker's epoch is bumped
    assert committed(broker, "g") == {("in", 0): 10}
    with pytest.raises(ProducerFencedError):  # a zombie of the ended epoch
        await side.commit("g", "tx", 42, 3, [("in", 0, 11, None)])
    await broker.commit_offsets("g", {("in", 0): 20})  # the group moves on
    await side.finish("g", "tx", 42, 4, commit=True)  # the same end again
    assert committed(broker, "g") == {("in", 0): 20}
    # the next transaction (epoch 4) is kept, and an end of an older marker leaves it
    await side.commit("g", "tx", 42, 4, [("in", 0, 30, None)])
    await side.finish("g", "tx", 42, 3, commit=True)
    assert broker.pending_txn_offsets("g") == {("in", 0)}
    await side.finish("g", "tx", 42, 5, commit=False)
    assert broker.pending_txn_offsets("g") == set()
    assert committed(broker, "g") == {("in", 0): 20}
