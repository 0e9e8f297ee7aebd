"""Goal: a transaction's offsets as the group's coordinator keeps them (broker/txn_offsets.py):
invisible to OffsetFetch while the transaction is open (and reported for KIP-447's
require_stable), committed offsets when it commits, gone when it aborts; kept across a
restart while pending; an older epoch of the producer fenced by a newer one, also after a
restart or a reload (a claim) and until the producer's expiry; an end told twice changes
nothing; the pending offsets of a deleted group or topic gone.

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


async def test_an_ended_epoch_fences_after_a_restart_and_a_reload(
        harness: BrokerHarness) -> None:
    """The ended epoch is stored with the end: a zombie of the ended transaction (an
    older epoch) is refused by a restarted broker, and after a reload of the group (what
    a cluster node's claim runs) too; the producer's next transaction goes on."""
    broker = harness.broker
    assert broker is not None
    await input_topic(broker, 1)
    side = broker.txn_offsets
    await side.commit("g", "tx", 42, 3, [("in", 0, 10, None)])
    await side.finish("g", "tx", 42, 4, commit=True)  # TV2: the marker's epoch is bumped
    await side.finish("g", "tx2", 43, 7, commit=False)  # an end with nothing pending
    broker = await harness.restart()
    side = broker.txn_offsets
    with pytest.raises(ProducerFencedError):
        await side.commit("g", "tx", 42, 3, [("in", 0, 11, None)])
    with pytest.raises(ProducerFencedError):
        await side.commit("g", "tx2", 43, 6, [("in", 0, 11, None)])
    await side.reload_group("g")
    with pytest.raises(ProducerFencedError):
        await side.commit("g", "tx", 42, 3, [("in", 0, 11, None)])
    assert broker.pending_txn_offsets("g") == set()
    assert committed(broker, "g") == {("in", 0): 10}
    assert await side.commit("g", "tx", 42, 4, [("in", 0, 12, None)]) == {("in", 0): None}
    assert broker.pending_txn_offsets("g") == {("in", 0)}


async def test_an_ended_epoch_expires_with_its_producer(harness: BrokerHarness) -> None:
    """An ended epoch is kept for ``transactional.id.expiration.ms`` after its last end
    (an expired id's next InitProducerId gets a new producer id), then pruned here and in
    the store; a later end of another producer is kept."""
    broker = harness.broker
    assert broker is not None
    await input_topic(broker, 1)
    side = broker.txn_offsets
    expiration_ms = broker.config.transactional_id_expiration_ms
    await side.finish("g", "old", 42, 4, commit=False)
    harness.clock.step_wall(expiration_ms // 2)
    await side.finish("g", "new", 43, 2, commit=False)
    assert await side.expire_ended() == 0
    harness.clock.step_wall(expiration_ms // 2 + 1)
    assert await side.expire_ended() == 1
    assert [row.producer_id for row in await broker.state_store.txn_offsets.load_ended()] \
        == [43]
    with pytest.raises(ProducerFencedError):
        await side.commit("g", "new", 43, 1, [("in", 0, 11, None)])
    assert await side.commit("g", "old", 42, 3, [("in", 0, 11, None)]) == {("in", 0): None}


async def test_deleting_a_group_drops_its_pending_offsets(harness: BrokerHarness) -> None:
    """DeleteGroups (and the HTTP delete, the same broker call) removes the group's
    pending offsets, in memory and in the store: the transaction's end commits nothing
    to the deleted group; another group's stay."""
    broker = harness.broker
    assert broker is not None
    await input_topic(broker)
    await broker.commit_offsets("g", {("in", 0): 1})
    producer = await offsets_in_transaction(broker, "rpw", "g", {0: 5})
    await offsets_in_transaction(broker, "other", "h", {1: 3})
    assert await broker.delete_groups(["g"]) == {"g": None}
    assert broker.pending_txn_offsets("g") == set()
    assert [row.group_id for row in await broker.state_store.txn_offsets.load()] == ["h"]
    await broker.end_txn("rpw", *producer, commit=True)
    assert committed(broker, "g") == {}
    broker = await harness.restart()
    assert committed(broker, "g") == {}
    assert broker.pending_txn_offsets("g") == set()
    assert broker.pending_txn_offsets("h") == {("in", 1)}


async def test_deleting_a_topic_drops_the_pending_offsets_of_its_partitions(
        harness: BrokerHarness) -> None:
    """A deleted topic's pending offsets go from every group (memory and store), so a
    topic made again under the name never gets the dead transaction's offsets; the
    transaction's other partitions commit."""
    broker = harness.broker
    assert broker is not None
    await input_topic(broker)
    await broker.create_topic("other", partitions=1)
    await broker.append_batch("other", 0, build_batch([RecordData(None, b"x", (), 1000)] * 9))
    producer = await broker.init_producer_id("rpw", 60_000)
    await broker.add_offsets_to_txn("rpw", *producer, "g")
    await broker.txn_offset_commit("rpw", "g", *producer,
                                   [("in", 0, 5, None), ("other", 0, 3, None)])
    await broker.delete_topic("in")
    assert broker.pending_txn_offsets("g") == {("other", 0)}
    assert [(row.topic, row.partition) for row in
            await broker.state_store.txn_offsets.load()] == [("other", 0)]
    await input_topic(broker)  # the name again: a new topic
    await broker.end_txn("rpw", *producer, commit=True)
    assert committed(broker, "g") == {("other", 0): 3}
    broker = await harness.restart()
    assert committed(broker, "g") == {("other", 0): 3}
