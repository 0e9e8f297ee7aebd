"""One StateStore conformance suite, run against every backend (SQLite and PostgreSQL).

Goal: whatever engine sits under ``SqlStateStore``, the broker sees the same store:
every domain operation round-trips, a close/reopen keeps what was committed (and
what was written before close), one event-loop turn's writes form one transaction,
a database of a newer schema is refused, and shared-group state lives beside the
rest. Method: each test gets a ``Backend`` that opens stores on one database
(a temporary SQLite file, or a fresh database on the session's real PostgreSQL);
"restart" is a close and a new store on the same database. The PostgreSQL-only
fault tests at the end crash the server with ``pg_ctl stop -m immediate``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.clock import SystemClock
from conveyor.errors import InvalidNameError, StorageBusyError, StorageError
from conveyor.storage.member_state import CONSUMER, SHARE, MemberChanges, StoredGroup
from conveyor.storage.postgres_engine import PostgresEngine
from conveyor.storage.shared_state import RecordRow, delivered_mark, runs
from conveyor.storage.sql_engine import WriteGuard, upsert_sql
from conveyor.storage.sqlite_engine import SqliteEngine
from conveyor.storage.state_store import (
    BindingRow,
    CommittedOffsetRow,
    ExchangeRow,
    ProducerRow,
    ProducerSequenceRow,
    QueueRow,
    SqlStateStore,
    TopicRow,
)
from conveyor.storage.txn_offsets_state import EndedEpochRow, PendingOffsetRow
from conveyor.testing.postgres import PostgresServer
from conveyor.testing.server import free_port


@dataclass
class Backend:
    name: str
    make: Callable[[], SqlStateStore]
    opened: list[SqlStateStore]

    async def open(self) -> SqlStateStore:
        store = self.make()
        await store.open()
        self.opened.append(store)
        return store

    async def reopen(self, store: SqlStateStore) -> SqlStateStore:
        await store.close()
        return await self.open()


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "state.sqlite3"

        def make() -> SqlStateStore:
            return SqlStateStore(SqliteEngine(path))
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")

        def make() -> SqlStateStore:
            return SqlStateStore(PostgresEngine(dsn, SystemClock()))
    result = Backend(request.param, make, [])
    yield result
    for store in result.opened:
        await store.close()


async def test_metadata_round_trips_and_survives_a_restart(backend: Backend) -> None:
    store = await backend.open()
    store.save_topic(TopicRow("t", 3, "topic", {"retention_ms": 5}, 11))
    store.save_queue(QueueRow("q", {"max_priority": 3}, 12))
    store.save_exchange(ExchangeRow("e", "topic", True, False, False, "ae", (("k", "v"),)))
    store.save_binding(BindingRow("e", "queue", "q", "a.#", (("x-match", "any"),)))
    store.save_binding(BindingRow("e", "queue", "q", "a.#", (("x-match", "any"),)))  # upsert
    store.save_committed_offsets([CommittedOffsetRow("g", "t", 0, 5, None, -1, 1),
                                  CommittedOffsetRow("g", "t", 1, 9, "m", 2, 3)])
    store.save_committed_offsets([CommittedOffsetRow("g", "t", 0, 7, "x", 4, 5)])
    store.save_group("g", {"generation": 4, "protocol": "range"})
    store.save_group_config("g", {"share.auto.offset.reset": "earliest"})
    store.save_producer(ProducerRow(1000, 2, "tx"))
    store.save_producer_sequences(ProducerSequenceRow(1000, "t", 0, 2, ((0, 4, 10, 14),)))
    store.save_producer_checkpoint("t", 0, 15)
    await store.commit()
    await _expect_metadata(store)
    await _expect_metadata(await backend.reopen(store))


async def _expect_metadata(current: SqlStateStore) -> None:
    assert await current.load_topics() == [TopicRow("t", 3, "topic", {"retention_ms": 5}, 11)]
    assert await current.load_queues() == [QueueRow("q", {"max_priority": 3}, 12)]
    assert await current.load_exchanges() == [
        ExchangeRow("e", "topic", True, False, False, "ae", (("k", "v"),))]
    assert await current.load_bindings() == [
        BindingRow("e", "queue", "q", "a.#", (("x-match", "any"),))]
    offsets = sorted(await current.load_committed_offsets("g"), key=lambda r: r.partition)
    assert offsets == [CommittedOffsetRow("g", "t", 0, 7, "x", 4, 5),
                       CommittedOffsetRow("g", "t", 1, 9, "m", 2, 3)]
    assert await current.load_groups() == {"g": {"generation": 4, "protocol": "range"}}
    assert await current.load_group_configs() == {
        "g": {"share.auto.offset.reset": "earliest"}}
    assert await current.load_producers() == [ProducerRow(1000, 2, "tx")]
    assert await current.load_producer_sequences() == [
        ProducerSequenceRow(1000, "t", 0, 2, ((0, 4, 10, 14),))]
    assert await current.load_producer_checkpoints() == {("t", 0): 15}


async def test_deletes_cascade_as_the_broker_expects(backend: Backend) -> None:
    store = await backend.open()
    store.save_exchange(ExchangeRow("e", "direct", True, False, False, None, ()))
    store.save_exchange(ExchangeRow("f", "direct", True, False, False, None, ()))
    store.save_binding(BindingRow("e", "queue", "q", "k", ()))
    store.save_binding(BindingRow("f", "exchange", "e", "k", ()))
    store.save_binding(BindingRow("f", "queue", "q", "k", ()))
    store.save_committed_offsets([CommittedOffsetRow("g", "t", 0, 5, None, -1, 1)])
    store.save_group("g", {})
    store.save_producer_sequences(ProducerSequenceRow(7, "t", 0, 0, ((0, 0, 0, 0),)))
    store.save_producer_checkpoint("t", 0, 1)
    store.save_group_config("g", {"a": "b"})
    await store.commit()
    store.delete_exchange("e")
    store.delete_group("g")
    store.delete_producer_sequences_for_topic("t")
    store.delete_group_config("g")
    await store.commit()
    store = await backend.reopen(store)
    assert [row.name for row in await store.load_exchanges()] == ["f"]
    assert await store.load_bindings() == [BindingRow("f", "queue", "q", "k", ())]
    assert await store.load_committed_offsets() == []
    assert await store.load_groups() == {}
    assert await store.load_producer_sequences() == []
    assert await store.load_producer_checkpoints() == {}
    assert await store.load_group_configs() == {}


async def test_counters_continue_after_a_restart(backend: Backend) -> None:
    store = await backend.open()
    assert [store.next_counter("ids", start=1000) for _ in range(3)] == [1000, 1001, 1002]
    await store.commit()
    store = await backend.reopen(store)
    assert store.next_counter("ids", start=1000) == 1003
    assert store.next_counter("other") == 0


async def test_writes_made_before_close_are_kept(backend: Backend) -> None:
    store = await backend.open()
    store.save_topic(TopicRow("unawaited", 1, "topic", {}, 0))  # nobody awaits commit()
    store = await backend.reopen(store)
    assert [row.name for row in await store.load_topics()] == ["unawaited"]


async def test_one_transaction_per_loop_turn(backend: Backend) -> None:
    store = await backend.open()
    sequence_before = await _commit_count(backend, store)

    async def writer(index: int) -> None:
        store.save_topic(TopicRow(f"t{index}", 1, "topic", {}, 0))
        await store.commit()

    await asyncio.gather(*(writer(index) for index in range(50)))
    assert len(await store.load_topics()) == 50
    if backend.name == "postgresql":
        assert await _commit_count(backend, store) == sequence_before + 1


@pytest.mark.parametrize("bad", ["nul\x00inside", "lone \udc80 surrogate"])
async def test_text_no_engine_can_keep_is_refused_alone(backend: Backend, bad: str) -> None:
    """PostgreSQL's text refuses NUL and lone surrogates: the write carrying one is
    refused at once, on every engine, and the other writes of its turn still commit."""
    store = await backend.open()
    store.save_topic(TopicRow("kept-before", 1, "topic", {}, 0))
    with pytest.raises(InvalidNameError):
        store.save_exchange(ExchangeRow(bad, "direct", True, False, False, None, ()))
    store.save_topic(TopicRow("kept-after", 1, "topic", {}, 0))
    await store.commit()
    store = await backend.reopen(store)
    assert sorted(row.name for row in await store.load_topics()) == ["kept-after",
                                                                     "kept-before"]
    assert [row.name for row in await store.load_exchanges()] == []


async def _commit_count(backend: Backend, store: SqlStateStore) -> int:
    if backend.name != "postgresql":
        return 0
    rows = await store.engine.query("SELECT sequence FROM conveyor_commit")
    return int(rows[0][0])


async def test_reads_see_the_writes_made_before_them(backend: Backend) -> None:
    store = await backend.open()
    store.save_topic(TopicRow("t", 1, "topic", {}, 0))
    assert [row.name for row in await store.load_topics()] == ["t"]  # no commit() first
    store.delete_topic("t")
    assert await store.load_topics() == []


async def test_shared_group_state_round_trips(backend: Backend) -> None:
    """A partition is saved whole (start offset + runs of states + the delivered mark)
    and reads back the same on every backend, across a reopen."""
    store = await backend.open()
    shared = store.shared
    shared.create_schema()
    shared.save_group("g", "t", '{"max_deliveries": 3}')
    rows = [RecordRow(10, "acked", 1, 0), RecordRow(11, "acked", 1, 0),
            RecordRow(12, "available", 2, 777)]
    shared.save_partition("g", "t", 0, 10, [*runs(rows), delivered_mark(13)])
    shared.save_dedup("q", "id-1", 5_000)
    shared.save_dedup("q", "id-2", 9_000)
    await shared.commit()
    store = await backend.reopen(store)
    shared = store.shared
    assert await shared.load_groups() == [("g", "t", '{"max_deliveries": 3}')]
    assert await shared.load_start_offsets("g", "t") == {0: 10}
    assert await shared.load_records("g", "t", 0) == (rows, False, 13)
    # a save replaces the partition's runs: what is below the new start is gone
    shared.save_partition("g", "t", 0, 12, [*runs(rows[2:]), delivered_mark(13)])
    shared.delete_dedup_before("q", 5_000)
    await shared.commit()
    assert await shared.load_records("g", "t", 0) == ([rows[2]], False, 13)
    assert await shared.load_dedup("q") == {"id-2": 9_000}
    shared.delete_group("g", "t")
    await shared.commit()
    assert await shared.load_groups() == []
    assert await shared.load_records("g", "t", 0) == ([], False, 0)


async def test_group_members_round_trip_as_changes(backend: Backend) -> None:
    """KIP-848 / KIP-932 members (member_state.py): a group row and member rows written
    as changes read back the same across a reopen; a change touches only what it names;
    a deleted member and a deleted group are gone; protocols do not mix."""
    store = await backend.open()
    members = store.members
    group = {"epoch": 3, "assignment_epoch": 3, "target": {"a": {"t": [0, 1]}}}
    member_a = {"epoch": 3, "assigned": {"t": [0, 1]}, "topic_names": ["t"]}
    member_b = {"epoch": 2, "assigned": {}, "topic_names": ["t"]}
    members.save(MemberChanges(CONSUMER, "g", group, {"a": member_a, "b": member_b}))
    members.save(MemberChanges(SHARE, "g", {"epoch": 1}, {"s": {"epoch": 1}}))
    await store.commit()
    store = await backend.reopen(store)
    members = store.members
    assert await members.load(CONSUMER) == [
        StoredGroup(CONSUMER, "g", group, {"a": member_a, "b": member_b})]
    assert await members.load(SHARE, "g") == [StoredGroup(SHARE, "g", {"epoch": 1},
                                                          {"s": {"epoch": 1}})]
    moved = {**member_b, "epoch": 4}
    members.save(MemberChanges(CONSUMER, "g", None, {"b": moved}, ("a",)))
    await store.commit()
    assert await members.load(CONSUMER, "g") == [StoredGroup(CONSUMER, "g", group,
                                                             {"b": moved})]
    members.save(MemberChanges(CONSUMER, "g", deleted_group=True))
    await store.commit()
    store = await backend.reopen(store)
    assert await store.members.load(CONSUMER) == []
    assert await store.members.load(CONSUMER, "g") == []
    assert len(await store.members.load(SHARE)) == 1


def pending(group: str, producer_id: int, epoch: int, partition: int,
            offset: int) -> PendingOffsetRow:
    return PendingOffsetRow(group, f"tx-{producer_id}", producer_id, epoch, "t", partition,
                            offset, f"m{offset}", 1_000 + offset)


async def test_pending_txn_offsets_round_trip_and_end(backend: Backend) -> None:
    """A transaction's pending offsets at the group's coordinator (txn_offsets_state.py):
    kept across a reopen, loaded whole or by group; an end of one producer up to an epoch
    commits (or drops) only that producer's rows up to that epoch, in one write with the
    committed offsets; ending it again changes nothing."""
    store = await backend.open()
    rows = [pending("g", 7, 1, 0, 10), pending("g", 7, 1, 1, 11), pending("g", 8, 0, 0, 20),
            pending("h", 7, 1, 0, 30)]
    assert await store.txn_offsets.save(rows)
    # a later epoch of producer 7 replaces its row of partition 1 (the key has no epoch)
    assert await store.txn_offsets.save([pending("g", 7, 2, 1, 12)])
    store = await backend.reopen(store)
    loaded = await store.txn_offsets.load()
    assert sorted(loaded, key=str) == sorted([*rows[:1], pending("g", 7, 2, 1, 12), *rows[2:]],
                                             key=str)
    assert sorted(await store.txn_offsets.load("h"), key=str) == [rows[3]]
    # producer 7 ends with a marker of epoch 1: its epoch-1 row in g is committed, the
    # epoch-2 row stays pending, group h and producer 8 are not touched
    assert await store.txn_offsets.finish("g", 7, 1, [rows[0]], ended_ms=5_000)
    await store.commit()
    store = await backend.reopen(store)
    assert sorted(await store.txn_offsets.load("g"), key=str) == sorted(
        [pending("g", 7, 2, 1, 12), rows[2]], key=str)
    assert await store.load_committed_offsets("g") == [
        CommittedOffsetRow("g", "t", 0, 10, "m10", -1, 1_010)]
    # producer 8 aborts: dropped, nothing committed
    assert await store.txn_offsets.finish("g", 8, 0, [], ended_ms=5_001)
    await store.commit()
    assert [row.producer_id for row in await store.txn_offsets.load("g")] == [7]
    assert len(await store.load_committed_offsets("g")) == 1
    # the same end again: nothing changes
    assert await store.txn_offsets.finish("g", 7, 1, [rows[0]], ended_ms=5_000)
    await store.commit()
    store = await backend.reopen(store)
    assert await store.txn_offsets.load("g") == [pending("g", 7, 2, 1, 12)]
    assert await store.txn_offsets.load("h") == [rows[3]]
    assert await store.load_committed_offsets("g") == [
        CommittedOffsetRow("g", "t", 0, 10, "m10", -1, 1_010)]


async def test_ended_epochs_are_kept_raised_only_and_pruned(backend: Backend) -> None:
    """The epoch fence of an ended transaction (``txn_group_ended``): one row per group
    and producer, written by the end, kept across a reopen, never lowered by the end of
    an older marker (a retried one), its time refreshed by a repeated end, loaded whole
    (oldest end first) or by group, pruned by age."""
    store = await backend.open()
    assert await store.txn_offsets.load_ended() == []
    assert await store.txn_offsets.finish("g", 7, 3, [], ended_ms=1_000)
    assert await store.txn_offsets.finish("g", 7, 2, [], ended_ms=2_000)  # older: kept 3
    assert await store.txn_offsets.finish("h", 7, 1, [], ended_ms=500)
    assert await store.txn_offsets.finish("g", 8, 5, [], ended_ms=900)
    await store.commit()
    store = await backend.reopen(store)
    assert await store.txn_offsets.load_ended() == [
        EndedEpochRow("h", 7, 1, 500), EndedEpochRow("g", 8, 5, 900),
        EndedEpochRow("g", 7, 3, 1_000)]
    assert await store.txn_offsets.finish("g", 8, 5, [], ended_ms=3_000)  # repeated
    assert await store.txn_offsets.finish("g", 7, 4, [], ended_ms=2_500)  # raised
    await store.commit()
    assert await store.txn_offsets.load_ended("g") == [
        EndedEpochRow("g", 7, 4, 2_500), EndedEpochRow("g", 8, 5, 3_000)]
    store.txn_offsets.prune_ended(2_500)  # ends before 2,500 go
    await store.commit()
    store = await backend.reopen(store)
    assert await store.txn_offsets.load_ended() == [
        EndedEpochRow("g", 7, 4, 2_500), EndedEpochRow("g", 8, 5, 3_000)]
    assert await store.txn_offsets.load_ended("h") == []


async def test_pending_offsets_of_a_deleted_group_or_topic_go(backend: Backend) -> None:
    """A deleted group's pending offsets go, and every group's of a deleted topic;
    the rest, and the ended epochs, stay."""
    store = await backend.open()
    on_u = PendingOffsetRow("h", "tx-7", 7, 1, "u", 0, 40, None, 1_040)
    kept = pending("h", 7, 1, 0, 30)
    assert await store.txn_offsets.save([pending("g", 7, 1, 0, 10), pending("g", 8, 0, 1, 20),
                                         kept, on_u])
    assert await store.txn_offsets.finish("g", 9, 2, [], ended_ms=1_000)
    await store.commit()
    store.txn_offsets.delete_group("g")
    store.txn_offsets.delete_topic("u")
    await store.commit()
    store = await backend.reopen(store)
    assert await store.txn_offsets.load() == [kept]
    assert await store.txn_offsets.load_ended() == [EndedEpochRow("g", 9, 2, 1_000)]


async def test_a_newer_schema_version_is_refused(backend: Backend) -> None:
    store = await backend.open()
    store.engine.write(upsert_sql("conveyor_schema", ["singleton"], ["version"]), (1, 99))
    await store.close()
    newer = backend.make()
    with pytest.raises(StorageError, match="newer schema"):
        await newer.open()
    await newer.close()


# --- PostgreSQL faults -----------------------------------------------------------------
async def test_postgres_crash_mid_commit_loses_and_duplicates_nothing(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """``pg_ctl stop -m immediate`` while a large transaction is in flight: the commit
    either happened or is sent again after the restart (decided by reading the commit
    sequence back); either way every row is there exactly once."""
    store = SqlStateStore(PostgresEngine(postgres_dsn, SystemClock()))
    await store.open()
    rows = [CommittedOffsetRow("g", f"t{index % 50}", index, index, None, -1, 0)
            for index in range(20_000)]
    store.save_committed_offsets(rows)
    commit = asyncio.ensure_future(store.commit())
    await asyncio.sleep(0)  # the flush task starts sending
    await asyncio.to_thread(postgres_server.crash)
    await asyncio.to_thread(postgres_server.start)
    await commit
    assert len(await store.load_committed_offsets("g")) == 20_000
    assert isinstance(store.engine, PostgresEngine)
    assert store.engine.reconnects >= 1
    store.save_topic(TopicRow("after", 1, "topic", {}, 0))
    await store.commit()
    await store.close()
    reopened = SqlStateStore(PostgresEngine(postgres_dsn, SystemClock()))
    await reopened.open()
    assert len(await reopened.load_committed_offsets("g")) == 20_000
    assert [row.name for row in await reopened.load_topics()] == ["after"]
    await reopened.close()


async def test_postgres_down_gives_retriable_errors_then_recovers(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    engine = PostgresEngine(postgres_dsn, SystemClock(), retry_window_ms=300)
    store = SqlStateStore(engine)
    await store.open()
    store.save_topic(TopicRow("before", 1, "topic", {}, 0))
    await store.commit()
    await asyncio.to_thread(postgres_server.crash)
    store.save_topic(TopicRow("during", 1, "topic", {}, 0))
    with pytest.raises(StorageError, match="unavailable"):
        await store.commit()
    store.save_topic(TopicRow("later", 1, "topic", {}, 0))
    await asyncio.to_thread(postgres_server.start)
    await store.commit()  # the kept transaction first, then the newer write
    assert sorted(row.name for row in await store.load_topics()) == [
        "before", "during", "later"]
    await store.close()


async def test_postgres_unreachable_or_read_only_is_a_clear_error(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    closed_port = PostgresEngine(
        f"postgresql://postgres@127.0.0.1:{free_port()}/x", SystemClock())
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL"):
        await SqlStateStore(closed_port).open()
    database = postgres_dsn.rsplit("/", 1)[-1]
    postgres_server.sql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    with pytest.raises(StorageError, match="read-only"):
        await SqlStateStore(PostgresEngine(postgres_dsn, SystemClock())).open()


async def test_postgres_rejected_write_fails_its_turn_only(postgres_dsn: str) -> None:
    """A write PostgreSQL cannot take (a bug) fails the callers of its transaction with
    a storage error, once, and is dropped; the next turn commits normally."""
    store = SqlStateStore(PostgresEngine(postgres_dsn, SystemClock()))
    await store.open()
    store.engine.write("INSERT INTO counters (name, value) VALUES (?, ?)", ("x", "not a number"))
    with pytest.raises(StorageError, match=r"rejected a state write|cannot take"):
        await store.commit()
    store.save_topic(TopicRow("fine", 1, "topic", {}, 0))
    await store.commit()
    assert [row.name for row in await store.load_topics()] == ["fine"]
    await store.close()


async def test_postgres_stalled_state_writes_are_bounded(postgres_dsn: str) -> None:
    """Another connection holds the commit-sequence row, so the engine's transaction
    waits (a stalled database). Past the backlog bound ``commit()`` answers the
    retriable StorageBusyError at once instead of piling up waiters; the writes stay
    queued in order and all commit once the database answers."""
    import asyncpg

    engine = PostgresEngine(postgres_dsn, SystemClock(), backlog_rows_max=20)
    store = SqlStateStore(engine)
    await store.open()
    store.save_topic(TopicRow("first", 1, "topic", {}, 0))
    await store.commit()
    blocker = await asyncpg.connect(postgres_dsn)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT * FROM conveyor_commit FOR UPDATE")
    try:
        store.save_topic(TopicRow("stalled", 1, "topic", {}, 0))
        waiting = asyncio.ensure_future(store.commit())  # sent: waits for the lock
        await asyncio.sleep(0)  # the commit and then the engine's flush task start
        await asyncio.sleep(0)
        assert engine.backlog()[0] == 1  # in flight
        for index in range(5):
            store.save_topic(TopicRow(f"queued-{index}", 1, "topic", {}, 0))
        small = asyncio.ensure_future(store.commit())  # under the bound: waits too
        await asyncio.sleep(0)
        for index in range(30):
            store.save_topic(TopicRow(f"over-{index}", 1, "topic", {}, 0))
        assert engine.backlog()[0] > 20
        with pytest.raises(StorageBusyError):
            await store.commit()  # at once, while the database still stalls
        assert engine.busy() is not None
        assert not waiting.done() and not small.done()
    finally:
        await transaction.rollback()
        await blocker.close()
    await waiting
    await small
    await store.commit()
    assert engine.busy() is None and engine.backlog() == (0, 0)
    names = sorted(row.name for row in await store.load_topics())
    assert names == sorted(["first", "stalled"] + [f"queued-{i}" for i in range(5)]
                           + [f"over-{i}" for i in range(30)])
    await store.close()


async def test_postgres_guarded_member_writes_follow_their_guard(postgres_dsn: str) -> None:
    """A cluster node's member write (save_guarded) lands whole when its guard finds its
    row, and not at all when it does not."""
    store = SqlStateStore(PostgresEngine(postgres_dsn, SystemClock()))
    await store.open()
    try:
        store.engine.add_schema(["CREATE TABLE IF NOT EXISTS guard_rows (name TEXT)"])
        store.engine.write("INSERT INTO guard_rows (name) VALUES (?)", ("mine",))
        await store.commit()
        held = WriteGuard("SELECT name FROM guard_rows WHERE name = $1 FOR SHARE", ("mine",))
        lost = WriteGuard("SELECT name FROM guard_rows WHERE name = $1 FOR SHARE", ("gone",))
        written = MemberChanges(CONSUMER, "g", {"epoch": 1}, {"a": {"epoch": 1}})
        assert await store.members.save_guarded(written, held)
        refused = MemberChanges(CONSUMER, "g", {"epoch": 2}, {"b": {"epoch": 2}}, ("a",))
        assert not await store.members.save_guarded(refused, lost)
        assert await store.members.load(CONSUMER, "g") == [
            StoredGroup(CONSUMER, "g", {"epoch": 1}, {"a": {"epoch": 1}})]
    finally:
        await store.close()


async def test_postgres_guarded_pending_offsets_follow_their_guard(postgres_dsn: str) -> None:
    """A cluster node's pending offsets and their end are written only while its guard
    finds its row: refused, neither the pending nor the committed offsets change."""
    store = SqlStateStore(PostgresEngine(postgres_dsn, SystemClock()))
    await store.open()
    try:
        store.engine.add_schema(["CREATE TABLE IF NOT EXISTS guard_rows (name TEXT)"])
        store.engine.write("INSERT INTO guard_rows (name) VALUES (?)", ("mine",))
        await store.commit()
        held = WriteGuard("SELECT name FROM guard_rows WHERE name = $1 FOR SHARE", ("mine",))
        lost = WriteGuard("SELECT name FROM guard_rows WHERE name = $1 FOR SHARE", ("gone",))
        kept = pending("g", 7, 1, 0, 10)
        assert await store.txn_offsets.save([kept], held)
        assert not await store.txn_offsets.save([pending("g", 7, 1, 0, 99)], lost)
        assert not await store.txn_offsets.finish("g", 7, 1, [kept], lost, ended_ms=1_000)
        assert await store.txn_offsets.load("g") == [kept]
        assert await store.load_committed_offsets("g") == []
        assert await store.txn_offsets.load_ended("g") == []  # no end recorded either
        assert await store.txn_offsets.finish("g", 7, 1, [kept], held, ended_ms=1_000)
        assert await store.txn_offsets.load("g") == []
        assert await store.txn_offsets.load_ended("g") == [EndedEpochRow("g", 7, 1, 1_000)]
        assert [row.committed_offset for row in await store.load_committed_offsets("g")] == [10]
    finally:
        await store.close()
