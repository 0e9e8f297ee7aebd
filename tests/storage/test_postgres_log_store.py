"""PostgresLogStore beyond the conformance suite: what only a shared database can get wrong.

Method: a real PostgreSQL (tests/conftest.py). Two stores on one database append to one
partition at once (offsets come from the locked head row, so they never collide, unlike
in-memory counters); the server is crashed (``pg_ctl stop -m immediate``) under load
(every acknowledged append is there afterwards, exactly once); a TCP proxy between
store and server cuts the connection right after (or right before) a COMMIT, so the
commit's outcome is unknown to the store and must be read back; retention drops whole
range chunks (tables), never rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from storage_helpers import make_batch, values_of

from conveyor.clock import SystemClock
from conveyor.errors import (
    InvalidProducerEpochError,
    OperatingError,
    OutOfOrderSequenceError,
    StorageBusyError,
    StorageError,
)
from conveyor.storage.log_api import AppendInfo, AppendOutcome, AppendRequest
from conveyor.storage.log_config import LogConfig
from conveyor.storage.postgres_log import PostgresLogStore
from conveyor.storage.record_batch import RecordData, build_batch, iter_records
from conveyor.testing.clock import SimClock
from conveyor.testing.postgres import PostgresServer


def new_store(dsn: str, seed: int = 1, chunk_offsets: int = 8) -> PostgresLogStore:
    return PostgresLogStore(dsn, SimClock(), random.Random(seed), chunk_offsets=chunk_offsets)


async def read_values(store: PostgresLogStore, topic: str) -> list[tuple[int, bytes | None]]:
    found: list[tuple[int, bytes | None]] = []
    offset = store.offsets(topic, 0).log_start_offset
    while offset < store.offsets(topic, 0).high_watermark:
        chunk = values_of((await store.read(topic, 0, offset, 1 << 20)).read_bytes())
        found += [item for item in chunk if item[0] >= offset]
        offset = chunk[-1][0] + 1
    return found


async def test_two_stores_on_one_database_never_share_an_offset(postgres_dsn: str) -> None:
    first, second = new_store(postgres_dsn, 1), new_store(postgres_dsn, 2)
    await first.open()
    await first.create_partition("t", 0, LogConfig())
    await second.open()  # sees the partition the first one made

    async def produce(store: PostgresLogStore, name: bytes) -> list[AppendInfo]:
        infos = []
        for index in range(25):
            (info,) = await store.append([AppendRequest("t", 0, make_batch(
                [name + b"%02d" % index]))])
            assert isinstance(info, AppendInfo)
            infos.append(info)
        return infos

    results = await asyncio.gather(produce(first, b"a"), produce(second, b"b"))
    offsets = sorted(info.base_offset for infos in results for info in infos)
    assert offsets == list(range(50))
    await first.close()
    await second.close()
    reader = new_store(postgres_dsn)
    await reader.open()
    stored = await read_values(reader, "t")
    assert [offset for offset, _ in stored] == list(range(50))
    assert sorted(value or b"" for _, value in stored) == sorted(
        [b"a%02d" % i for i in range(25)] + [b"b%02d" % i for i in range(25)])
    await reader.close()


async def test_acknowledged_appends_survive_a_crash_under_load(
        postgres_server: PostgresServer, postgres_dsn: str) -> None:
    # a real clock: a COMMIT cut by the crash is read back, retried until the server is up
    store = PostgresLogStore(postgres_dsn, SystemClock(), random.Random(1), chunk_offsets=8)
    await store.open()
    await store.create_partition("t", 0, LogConfig())
    acknowledged: dict[bytes, int] = {}
    failed: list[bytes] = []
    some_acknowledged = asyncio.Event()
    crashed = asyncio.Event()

    async def producer(name: int) -> None:
        for index in range(10_000):
            if crashed.is_set():
                return
            value = b"%d-%d" % (name, index)
            (outcome,) = await store.append([AppendRequest("t", 0, make_batch([value]))])
            if isinstance(outcome, OperatingError):
                assert isinstance(outcome, StorageError), outcome
                failed.append(value)
                return
            acknowledged[value] = outcome.base_offset
            if len(acknowledged) >= 200:
                some_acknowledged.set()

    async with asyncio.TaskGroup() as group:
        for name in range(6):
            group.create_task(producer(name))
        await some_acknowledged.wait()
        await asyncio.to_thread(postgres_server.crash)
        crashed.set()
        await asyncio.to_thread(postgres_server.start)
    await store.close()
    store = new_store(postgres_dsn)
    await store.open()
    stored = await read_values(store, "t")
    assert [offset for offset, _ in stored] == list(range(len(stored)))  # no gap, no repeat
    where = {value: offset for offset, value in stored}
    assert len(where) == len(stored)  # no value twice
    assert all(where.get(value) == offset for value, offset in acknowledged.items())
    assert not set(failed) & set(acknowledged)
    await store.close()


class CommitCutter:
    """A TCP proxy to PostgreSQL that drops one connection at the first COMMIT sent
    through it: ``after=True`` forwards the COMMIT first (it lands, its answer is lost),
    ``after=False`` drops it (the transaction never commits)."""

    def __init__(self, port: int, after: bool) -> None:
        self.port = port
        self.after = after
        self.armed = False
        self.cut = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        cut_here = asyncio.Event()  # this connection is the one being cut

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if self.armed and not self.cut.is_set() and b"COMMIT" in data.upper():
                    self.cut.set()
                    cut_here.set()
                    if self.after:
                        upstream_writer.write(data)
                        await upstream_writer.drain()
                    break
                upstream_writer.write(data)
                await upstream_writer.drain()

        async def server_to_client() -> None:
            while data := await upstream_reader.read(65536):
                if cut_here.is_set():  # the COMMIT's answer never reaches the store
                    break
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.ensure_future(client_to_server()),
                 asyncio.ensure_future(server_to_client())]
        with contextlib.suppress(Exception):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        if cut_here.is_set() and self.after:
            await asyncio.sleep(0.2)  # let the server read the COMMIT before it sees EOF
        for pump in pumps:
            pump.cancel()
        for stream in (writer, upstream_writer):
            stream.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def proxied(dsn: str, after: bool) -> AsyncIterator[tuple[str, CommitCutter]]:
    head, _, database = dsn.rpartition("/")
    host_port = head.rpartition("@")[2]
    cutter = CommitCutter(int(host_port.rpartition(":")[2]), after)
    port = await cutter.start()
    try:
        yield f"{head.rpartition(':')[0]}:{port}/{database}", cutter
    finally:
        await cutter.close()


@pytest.mark.parametrize("committed", [True, False])
async def test_a_commit_whose_answer_is_lost_is_read_back(
        postgres_dsn: str, committed: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "conveyor.storage.postgres_append")
    async with proxied(postgres_dsn, after=committed) as (dsn, cutter):
        store = new_store(dsn)
        await store.open()
        await store.create_partition("t", 0, LogConfig())
        (first,) = await store.append([AppendRequest("t", 0, make_batch([b"before"]))])
        assert isinstance(first, AppendInfo)
        cutter.armed = True
        (outcome,) = await store.append([AppendRequest("t", 0, make_batch([b"cut"]))])
        assert cutter.cut.is_set()
        assert "commit outcome unknown" in caplog.text
        if committed:
            assert isinstance(outcome, AppendInfo) and outcome.base_offset == 1
        else:
            assert isinstance(outcome, StorageError)
        (after,) = await store.append([AppendRequest("t", 0, make_batch([b"after"]))])
        assert isinstance(after, AppendInfo)
        await store.close()
    reader = new_store(postgres_dsn)
    await reader.open()
    expected = [b"before", b"cut", b"after"] if committed else [b"before", b"after"]
    assert await read_values(reader, "t") == list(enumerate(expected))
    await reader.close()


class _Intervening:
    """A pool whose next COMMIT commits and then answers as a backend terminated while
    it waited for the synchronous standby (57P01: committed locally), and whose next
    connection is then refused as by a server shutting down (57P03)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.commits_to_fail = 0
        self.acquires_to_refuse = 0

    def acquire(self) -> _Acquire:
        return _Acquire(self)

    async def release(self, connection: Any) -> None:
        await self.pool.release(getattr(connection, "inner", connection))


class _Acquire:
    def __init__(self, owner: _Intervening) -> None:
        self.owner = owner
        self.connection: Any = None

    async def _get(self) -> Any:
        if self.owner.acquires_to_refuse:
            self.owner.acquires_to_refuse -= 1
            raise asyncpg.exceptions.CannotConnectNowError("the database system is shutting down")
        return _Connection(self.owner, await self.owner.pool.acquire())

    def __await__(self) -> Any:
        return self._get().__await__()

    async def __aenter__(self) -> Any:
        self.connection = await self._get()
        return self.connection

    async def __aexit__(self, *exc: object) -> None:
        await self.owner.release(self.connection)


class _Connection:
    def __init__(self, owner: _Intervening, inner: Any) -> None:
        self.owner = owner
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def transaction(self) -> Any:
        return _Transaction(self.owner, self.inner.transaction())


class _Transaction:
    def __init__(self, owner: _Intervening, inner: Any) -> None:
        self.owner = owner
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def __aenter__(self) -> Any:
        return await self.inner.__aenter__()

    async def __aexit__(self, *exc: Any) -> Any:
        return await self.inner.__aexit__(*exc)

    async def commit(self) -> None:
        await self.inner.commit()
        if self.owner.commits_to_fail:
            self.owner.commits_to_fail -= 1
            self.owner.acquires_to_refuse = 1  # the read-back's first try
            raise asyncpg.exceptions.AdminShutdownError(
                "terminating connection due to administrator command")


async def test_a_commit_answered_by_an_operator_intervention_is_read_back(
        postgres_dsn: str) -> None:
    """Issue 12 (records written twice after a failover): a COMMIT answered 57P01 may
    have committed, and a read-back refused 57P03 has not answered yet; neither is "not
    committed" (the producer would re-send the committed batch, possibly under a new
    epoch that no sequence check can match)."""
    # the real clock: the read-back sleeps 50 ms before its second try
    store = PostgresLogStore(postgres_dsn, SystemClock(), random.Random(1), chunk_offsets=8)
    await store.open()
    await store.create_partition("t", 0, LogConfig())
    appender = store._appender
    assert appender is not None
    pool = _Intervening(appender._pool)
    appender._pool = pool
    pool.commits_to_fail = 1
    data = producer_batch([b"a", b"b"], 42, 0, 0)
    (outcome,) = await store.append([AppendRequest("t", 0, data, check_sequences=True)])
    assert pool.commits_to_fail == 0 and pool.acquires_to_refuse == 0
    assert isinstance(outcome, AppendInfo) and not outcome.duplicate
    assert (outcome.base_offset, outcome.last_offset) == (0, 1)
    (retry,) = await store.append([AppendRequest("t", 0, data, check_sequences=True)])
    assert isinstance(retry, AppendInfo) and retry.duplicate and retry.base_offset == 0
    await store.close()


async def test_retention_drops_whole_chunks_not_rows(postgres_dsn: str) -> None:
    store = new_store(postgres_dsn, chunk_offsets=10)
    await store.open()
    await store.create_partition("q", 0, LogConfig(cleanup_policy="work-queue"))
    for index in range(45):
        await store.append([AppendRequest("q", 0, make_batch([b"%02d" % index]))])
    await store.delete_before("q", 0, 25)
    connection = await asyncpg.connect(postgres_dsn)
    try:
        tables = sorted(row[0] for row in await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'conveyor_log_p%\\_c%'"))
        rows = await connection.fetchval("SELECT count(*) FROM conveyor_log_batches")
    finally:
        await connection.close()
    # chunks 0 and 1 (offsets 0..19) dropped; chunk 2 holds the log start; 3, 4 and the
    # one ahead stay
    assert [name.rpartition("_c")[2] for name in tables] == ["2", "3", "4", "5"]
    assert rows == 25
    assert (await read_values(store, "q"))[0] == (25, b"25")
    await store.close()


async def test_retention_of_a_partition_deleted_meanwhile_does_nothing(
        postgres_dsn: str) -> None:
    """Work-queue retention racing a delete (the queue deleted here or on another node
    while its retention pass runs): the partition's row is gone, so there is nothing to
    drop; it must not fail (it used to raise a TypeError and fail the broker's close)."""
    store = new_store(postgres_dsn, chunk_offsets=10)
    await store.open()
    await store.create_partition("gone", 0, LogConfig(cleanup_policy="work-queue"))
    for index in range(25):
        await store.append([AppendRequest("gone", 0, make_batch([b"%02d" % index]))])
    connection = await asyncpg.connect(postgres_dsn)
    try:  # another node's delete: the head row goes, this store's memory still has it
        await connection.execute(
            "DELETE FROM conveyor_log_partitions WHERE topic = 'gone' AND partition = 0")
    finally:
        await connection.close()
    await store.delete_before("gone", 0, 15)
    await store.close()


def producer_batch(values: list[bytes], producer_id: int, epoch: int, sequence: int) -> bytes:
    return build_batch([RecordData(None, value, (), 1_700_000_000_000) for value in values],
                       producer_id=producer_id, producer_epoch=epoch, base_sequence=sequence)


async def test_idempotent_sequences_are_checked_under_the_head_lock(postgres_dsn: str) -> None:
    """Two nodes: a retry reaching the other node is answered with the first offsets."""
    first, second = new_store(postgres_dsn, 1), new_store(postgres_dsn, 2)
    await first.open()
    await first.create_partition("t", 0, LogConfig())
    await second.open()

    async def send(store: PostgresLogStore, data: bytes) -> AppendOutcome:
        (outcome,) = await store.append([AppendRequest("t", 0, data, check_sequences=True)])
        return outcome

    batch = producer_batch([b"a", b"b"], 42, 0, 0)
    written = await send(first, batch)
    assert isinstance(written, AppendInfo) and not written.duplicate
    retried = await send(second, batch)
    assert isinstance(retried, AppendInfo) and retried.duplicate
    assert (retried.base_offset, retried.last_offset) == (written.base_offset, written.last_offset)
    following = await send(second, producer_batch([b"c"], 42, 0, 2))
    assert isinstance(following, AppendInfo) and following.base_offset == 2
    assert isinstance(await send(first, producer_batch([b"x"], 42, 0, 7)),
                      OutOfOrderSequenceError)
    # one call holding a batch and its own retry: written once
    again = producer_batch([b"d"], 42, 0, 3)
    outcomes = await first.append([AppendRequest("t", 0, again, check_sequences=True)] * 2)
    assert [(o.base_offset, o.duplicate) for o in outcomes
            if isinstance(o, AppendInfo)] == [(3, False), (3, True)]
    fenced = await send(first, producer_batch([b"y"], 42, 1, 0))  # a new epoch starts at 0
    assert isinstance(fenced, AppendInfo) and fenced.base_offset == 4
    assert isinstance(await send(second, producer_batch([b"z"], 42, 0, 4)),
                      InvalidProducerEpochError)
    await first.close()
    await second.close()
    reader = new_store(postgres_dsn)
    await reader.open()
    assert [value for _, value in await read_values(reader, "t")] == [b"a", b"b", b"c", b"d",
                                                                      b"y"]
    await reader.close()


async def test_a_new_epoch_must_start_at_sequence_zero(postgres_dsn: str) -> None:
    """Kafka's rule (ProducerAppendInfo): a batch of a producer epoch newer than the
    stored one is refused unless its sequence is 0; a producer the partition holds no
    state for may start at any sequence (KIP-360)."""
    store = new_store(postgres_dsn, 1)
    await store.open()
    await store.create_partition("t", 0, LogConfig())

    async def send(data: bytes) -> AppendOutcome:
        (outcome,) = await store.append([AppendRequest("t", 0, data, check_sequences=True)])
        return outcome

    assert isinstance(await send(producer_batch([b"a", b"b"], 42, 0, 0)), AppendInfo)
    refused = await send(producer_batch([b"x"], 42, 1, 2))  # epoch 1 going on at 2
    assert isinstance(refused, OutOfOrderSequenceError)
    assert isinstance(await send(producer_batch([b"y"], 42, 1, 5)), OutOfOrderSequenceError)
    bumped = await send(producer_batch([b"c"], 42, 1, 0))
    assert isinstance(bumped, AppendInfo) and bumped.base_offset == 2
    going_on = await send(producer_batch([b"d"], 42, 1, 1))
    assert isinstance(going_on, AppendInfo) and going_on.base_offset == 3
    unknown = await send(producer_batch([b"e"], 77, 3, 40))  # no state here: accepted
    assert isinstance(unknown, AppendInfo) and unknown.base_offset == 4
    assert isinstance(await send(producer_batch([b"f"], 77, 3, 41)), AppendInfo)
    assert [value for _, value in await read_values(store, "t")] == [
        b"a", b"b", b"c", b"d", b"e", b"f"]
    await store.close()


# --- compaction and truncation -----------------------------------------------------------
Row = tuple[int, bytes | None, bytes | None]


async def keyed_rows(store: PostgresLogStore, topic: str) -> list[Row]:
    rows: list[Row] = []
    offset = store.offsets(topic, 0).log_start_offset
    while offset < store.offsets(topic, 0).high_watermark:
        chunk = list(iter_records((await store.read(topic, 0, offset, 1 << 20)).read_bytes()))
        rows += [(r.offset, r.key, r.value) for r in chunk if r.offset >= offset]
        offset = chunk[-1].offset + 1
    return rows


def latest(rows: list[Row]) -> dict[bytes | None, bytes | None]:
    return {key: value for _, key, value in rows}


async def filled_compacted(store: PostgresLogStore) -> None:
    """20 batches of 4 records over 6 keys (most batches lose some records, not all)."""
    await store.create_partition("c", 0, LogConfig(cleanup_policy="compact"))
    for batch in range(20):
        records = [RecordData(b"k%d" % ((batch * 4 + n) % 6), b"v%d-%d" % (batch, n), (),
                              1_700_000_000_000) for n in range(4)]
        await store.append([AppendRequest("c", 0, build_batch(records))])


async def test_a_crash_between_compaction_transactions_leaves_a_consistent_log(
        postgres_server: PostgresServer, postgres_dsn: str) -> None:
    """Each rewrite transaction is atomic: after a server crash midway some batches are
    cleaned and the rest are not, every record read is one written at its offset, and
    the next pass finishes the job."""
    store = new_store(postgres_dsn)
    await store.open()
    await filled_compacted(store)
    before = await keyed_rows(store, "c")
    transactions: list[int] = []

    def crash_after_two() -> None:
        transactions.append(1)
        if len(transactions) == 2:
            postgres_server.restart("immediate")

    store.compaction_rows = 2
    store.after_compaction_transaction = crash_after_two
    with pytest.raises((OperatingError, asyncpg.PostgresError, OSError)):
        await store.compact("c", 0)
    with contextlib.suppress(Exception):
        await store.close()
    store = new_store(postgres_dsn)
    await store.open()
    midway = await keyed_rows(store, "c")
    assert set(midway) < set(before) and latest(midway) == latest(before)
    assert len(before) - len(midway) >= 4  # two transactions of two batches committed
    store.compaction_rows = 2
    assert await store.compact("c", 0) > 0
    done = await keyed_rows(store, "c")
    assert latest(done) == latest(before)
    assert len(done) == len({key for _, key, _ in before})  # one record per key is left
    await store.close()


async def test_run_retention_compacts_in_the_background(postgres_dsn: str) -> None:
    store = new_store(postgres_dsn)
    await store.open()
    await filled_compacted(store)
    before = await keyed_rows(store, "c")
    size_before = store.usage("c", 0).size_bytes
    await store.run_retention()
    await store.compaction_idle()
    after = await keyed_rows(store, "c")
    assert latest(after) == latest(before) and len(after) == 6
    assert store.usage("c", 0).size_bytes < size_before
    await store.close()


async def test_truncation_rewinds_idempotent_producer_sequences(postgres_dsn: str) -> None:
    store = new_store(postgres_dsn)
    await store.open()
    await store.create_partition("t", 0, LogConfig())

    async def send(data: bytes) -> AppendOutcome:
        (outcome,) = await store.append([AppendRequest("t", 0, data, check_sequences=True)])
        return outcome

    first = producer_batch([b"a", b"b"], 42, 0, 0)
    assert isinstance(await send(first), AppendInfo)
    assert isinstance(await send(producer_batch([b"c"], 42, 0, 2)), AppendInfo)
    assert isinstance(await send(producer_batch([b"x"], 7, 0, 0)), AppendInfo)
    assert await store.truncate("t", 0, 2) == 2
    # producer 42's last batch kept ends at sequence 1: sequence 2 is next again
    again = await send(producer_batch([b"c2"], 42, 0, 2))
    assert isinstance(again, AppendInfo) and (again.base_offset, again.duplicate) == (2, False)
    retried = await send(first)
    assert isinstance(retried, AppendInfo) and retried.duplicate and retried.base_offset == 0
    # producer 7 has no batch left: it starts afresh
    fresh = await send(producer_batch([b"y"], 7, 0, 0))
    assert isinstance(fresh, AppendInfo) and (fresh.base_offset, fresh.duplicate) == (3, False)
    assert [value for _, value in await read_values(store, "t")] == [b"a", b"b", b"c2", b"y"]
    await store.close()


# --- a stalled database: bounded appends ------------------------------------------------
async def test_appends_waiting_for_a_stalled_database_are_bounded(postgres_dsn: str) -> None:
    """Another connection holds the partition head's lock (the database "stalls" for the
    append transaction): appends past the bound are refused at once with the retriable
    StorageBusyError while the queue stays under the bound; once the lock goes every
    acknowledged append is there at its offset, and nothing refused is."""
    store = PostgresLogStore(postgres_dsn, SimClock(), random.Random(3), chunk_offsets=64,
                             queue_bytes_max=20_000, queue_appends_max=15)
    await store.open()
    await store.create_partition("t", 0, LogConfig())
    blocker = await asyncpg.connect(postgres_dsn)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT * FROM conveyor_log_partitions FOR UPDATE")
    batches = [make_batch([b"%03d" % index + b"." * 1_000]) for index in range(60)]
    seen_queued: list[tuple[int, int]] = []
    tasks: list[asyncio.Task[list[AppendOutcome]]] = []
    refused_at_once = 0
    try:
        for batch in batches:
            task = asyncio.ensure_future(store.append([AppendRequest("t", 0, batch)]))
            tasks.append(task)
            await asyncio.sleep(0)  # one loop turn per producer request
            await asyncio.sleep(0)
            seen_queued.append(store.queued())
            if task.done():
                refused_at_once += 1
                (outcome,) = task.result()
                assert isinstance(outcome, StorageBusyError), outcome
        assert refused_at_once >= 40
        assert all(count <= 15 and size <= 20_000 for count, size in seen_queued)
        assert max(size for _, size in seen_queued) > 15_000  # the queue did fill up
    finally:
        await transaction.rollback()
        await blocker.close()
    outcomes = [outcome for task in tasks for outcome in await task]
    written = {outcome.base_offset: index for index, outcome in enumerate(outcomes)
               if isinstance(outcome, AppendInfo)}
    assert len(written) == 60 - refused_at_once
    assert all(isinstance(o, AppendInfo | StorageBusyError) for o in outcomes)
    assert store.queued() == (0, 0)
    stored = await read_values(store, "t")
    assert [offset for offset, _ in stored] == sorted(written)
    for offset, value in stored:
        assert value == b"%03d" % written[offset] + b"." * 1_000
    # accepting again once the database answers
    (after,) = await store.append([AppendRequest("t", 0, make_batch([b"after"]))])
    assert isinstance(after, AppendInfo) and after.base_offset == len(written)
    await store.close()
