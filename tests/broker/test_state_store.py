"""Goal: the SQLite StateStore batches one loop turn's writes into one transaction,
reports durability only after COMMIT, survives reopen, and its SQL is dialect-neutral.

Method: count COMMITs through a connection trace, reopen the file, and render the
queries for the PostgreSQL placeholder."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

import conveyor.storage.sqlite_engine as sqlite_engine_module
import conveyor.storage.state_store as state_store_module
from conveyor.storage.state_store import (
    POSTGRESQL,
    SCHEMA,
    BindingRow,
    CommittedOffsetRow,
    ExchangeRow,
    SqliteStateStore,
    TopicRow,
    upsert_sql,
)


async def test_one_transaction_per_loop_turn(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state.sqlite3")
    await store.open()
    statements: list[str] = []
    store.connection.set_trace_callback(statements.append)

    async def writer(index: int) -> None:
        store.save_topic(TopicRow(f"t{index}", 1, "topic", {}, 0))
        await store.commit()

    await asyncio.gather(*(writer(index) for index in range(20)))
    assert statements.count("COMMIT") == 1
    assert statements.count("BEGIN") == 1
    await store.close()
    reopened = SqliteStateStore(tmp_path / "state.sqlite3")
    await reopened.open()
    assert len(await reopened.load_topics()) == 20
    mode = reopened.sqlite.query_now("PRAGMA journal_mode")[0][0]
    synchronous = reopened.sqlite.query_now("PRAGMA synchronous")[0][0]
    assert (mode, synchronous) == ("wal", 1)  # 1 = NORMAL: the WAL fdatasync runs off-loop
    await reopened.close()


async def test_rows_round_trip(tmp_path: Path) -> None:
    store = SqliteStateStore(":memory:")
    await store.open()
    store.save_exchange(ExchangeRow("e", "topic", True, False, False, "ae", (("k", "v"),)))
    store.save_binding(BindingRow("e", "queue", "q", "a.#", (("x-match", "any"),)))
    store.save_binding(BindingRow("e", "queue", "q", "a.#", (("x-match", "any"),)))  # upsert
    store.save_committed_offsets([CommittedOffsetRow("g", "t", 0, 5, None, -1, 1)])
    store.save_committed_offsets([CommittedOffsetRow("g", "t", 0, 7, "m", 2, 3)])
    assert store.next_counter("ids") == 0
    assert store.next_counter("ids") == 1
    await store.commit()
    assert (await store.load_exchanges())[0].arguments == (("k", "v"),)
    assert len(await store.load_bindings()) == 1
    assert (await store.load_committed_offsets("g"))[0].committed_offset == 7
    store.delete_group("g")
    assert await store.load_committed_offsets() == []
    await store.close()


def test_sql_is_dialect_neutral() -> None:
    query = upsert_sql("topics", ["name"], ["partitions"])
    assert query == (
        "INSERT INTO topics (name, partitions) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET partitions = excluded.partitions"
    )
    assert POSTGRESQL.sql(query).count("%s") == 2 and "?" not in POSTGRESQL.sql(query)
    for statement in SCHEMA:
        assert "AUTOINCREMENT" not in statement and "?" not in statement


async def test_commit_returns_only_after_the_wal_fdatasync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMIT runs without an fsync; the committers are answered once an fdatasync of the
    WAL, in a worker thread, has returned (and a caller whose writes another COMMIT
    already carried waits for that fsync too)."""
    store = SqliteStateStore(tmp_path / "state.sqlite3")
    await store.open()
    release = threading.Event()
    synced: list[int] = []

    def slow_fdatasync(fd: int) -> None:
        assert release.wait(10)
        synced.append(fd)

    monkeypatch.setattr(state_store_module.os, "fdatasync", slow_fdatasync)
    store.save_topic(TopicRow("t", 1, "topic", {}, 0))
    first = asyncio.create_task(store.commit())
    for _ in range(5):
        await asyncio.sleep(0)  # let the COMMIT run (zero-time yields, no clock)
    second = asyncio.create_task(store.commit())  # nothing new: waits for the same fsync
    for _ in range(5):
        await asyncio.sleep(0)
    assert not first.done() and not second.done()
    release.set()
    await asyncio.gather(first, second)
    assert len(synced) == 1
    monkeypatch.undo()
    await store.close()


async def test_checkpoints_run_in_a_worker_thread_not_in_a_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's automatic checkpoint (fsyncs inside COMMIT, on the event loop) is off;
    once the WAL passes the bound a PASSIVE checkpoint copies it into the database from
    a worker thread, and the data reads back after a reopen."""
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_WAL_BYTES", 64 << 10)
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_SYNCS_MIN", 1)
    path = tmp_path / "state.sqlite3"
    store = SqliteStateStore(path)
    await store.open()
    assert store.connection.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    loop_thread = threading.get_ident()
    threads: list[int] = []
    engine = store.sqlite
    checkpoint = engine._run_checkpoint

    def recorded() -> None:
        threads.append(threading.get_ident())
        checkpoint()

    monkeypatch.setattr(engine, "_run_checkpoint", recorded)
    size_before = path.stat().st_size
    for index in range(40):  # ~40 x 4 KiB of config text: past the 64 KiB bound
        store.save_topic(TopicRow(f"t{index}", 1, "topic", {"x": "y" * 4000}, 0))
        await store.commit()
    while engine._checkpoint is not None and not engine._checkpoint.done():
        await asyncio.shield(engine._checkpoint)
    assert threads and loop_thread not in threads
    assert path.stat().st_size > size_before  # pages copied out of the WAL
    await store.close()
    reopened = SqliteStateStore(path)
    await reopened.open()
    assert len(await reopened.load_topics()) == 40
    await reopened.close()


async def test_a_reused_wal_past_the_bound_is_not_checkpointed_after_every_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpointed WAL is reused from its start and keeps its size, so the size alone
    stays past the bound: without a count every WAL fdatasync was followed by a
    checkpoint (and its fsync of the database). Grow the WAL well past the bound, then
    commit small changes that fit in the reused space: no checkpoint until
    ``CHECKPOINT_SYNCS_MIN`` fdatasyncs have passed."""
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_WAL_BYTES", 64 << 10)
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_SYNCS_MIN", 10_000)
    store = SqliteStateStore(tmp_path / "state.sqlite3")
    await store.open()
    engine = store.sqlite
    checkpoints: list[int] = []
    rounds = engine._checkpoint_round

    def counted(held: bool, frames_before: int, number: int) -> None:
        if number == 1:
            checkpoints.append(1)
        rounds(held, frames_before, number)

    monkeypatch.setattr(engine, "_checkpoint_round", counted)

    async def commit(name: str, text: str) -> None:
        store.save_topic(TopicRow(name, 1, "topic", {"x": text}, 0))
        await store.commit()
        while engine._checkpoint is not None and not engine._checkpoint.done():
            await asyncio.shield(engine._checkpoint)

    for index in range(120):  # ~500 KiB of WAL: it grows, checkpoints follow the growth
        await commit(f"big{index}", "y" * 4000)
    assert checkpoints, "the growing WAL was checkpointed"
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_SYNCS_MIN", 1)
    await commit("small", "checkpointed")  # one more, complete: the WAL starts over
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_SYNCS_MIN", 10_000)
    grown = len(checkpoints)
    for index in range(30):  # a page or two each: fits in the reused WAL
        await commit("small", str(index))
    assert len(checkpoints) == grown, "no checkpoint per fdatasync of a reused WAL"
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_SYNCS_MIN", 1)
    await commit("small", "last")
    assert len(checkpoints) == grown + 1
    await store.close()


def _wal_sequence(path: Path) -> int:
    """The WAL header's checkpoint sequence: +1 each time a writer starts it over."""
    with open(str(path) + "-wal", "rb") as file:
        return int.from_bytes(file.read(16)[12:16], "big")


def _hold_in_held_round(engine: sqlite_engine_module.SqliteEngine,
                        monkeypatch: pytest.MonkeyPatch,
                        release: threading.Event) -> asyncio.Event:
    """Make the checkpoint's held round wait for ``release``; the event returned is
    set when it has begun (the writes are held from then on)."""
    loop = asyncio.get_running_loop()
    holding = asyncio.Event()
    checkpoint = engine._run_checkpoint

    def blocking() -> None:
        if engine._holding and not holding.is_set():  # the first held round
            loop.call_soon_threadsafe(holding.set)
            release.wait(30)
        checkpoint()

    monkeypatch.setattr(engine, "_run_checkpoint", blocking)
    return holding


async def _grow_until(store: SqliteStateStore, holding: asyncio.Event) -> None:
    """Commit big rows until a checkpoint's held round holds the writes (the last
    commit may then wait for the release: it is left running)."""
    index = 0
    waiting = asyncio.create_task(holding.wait())
    while not holding.is_set():
        store.save_topic(TopicRow(f"t{index}", 1, "topic", {"x": "y" * 4000}, 0))
        committing = asyncio.create_task(store.commit())
        await asyncio.wait([committing, waiting], return_when=asyncio.FIRST_COMPLETED)
        index += 1
    await waiting


async def _store_in_held_round(path: Path, monkeypatch: pytest.MonkeyPatch,
                               release: threading.Event) -> SqliteStateStore:
    """An open store at ``path`` whose checkpoint is in its held round, waiting for
    ``release`` (small thresholds, so a few big rows start one)."""
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_WAL_BYTES", 64 << 10)
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_SYNCS_MIN", 1)
    store = SqliteStateStore(path)
    await store.open()
    holding = _hold_in_held_round(store.sqlite, monkeypatch, release)
    await _grow_until(store, holding)
    return store


async def test_writes_wait_in_memory_while_the_checkpoint_catches_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """During the held round a write is held, not COMMITted (another connection does
    not see it), its commit() waits; at the end it is COMMITted and fsynced, in the
    transaction that starts the WAL over."""
    path = tmp_path / "state.sqlite3"
    release = threading.Event()
    store = await _store_in_held_round(path, monkeypatch, release)
    sequence = _wal_sequence(path)
    store.save_topic(TopicRow("held", 1, "topic", {}, 0))
    committing = asyncio.create_task(store.commit())
    for _ in range(5):
        await asyncio.sleep(0)  # zero-time yields: the turn's COMMIT would have run
    other = sqlite3.connect(path)
    seen = "SELECT count(*) FROM topics WHERE name = 'held'"
    assert other.execute(seen).fetchone() == (0,)
    assert not committing.done()
    release.set()
    await committing
    assert other.execute(seen).fetchone() == (1,)
    assert _wal_sequence(path) == sequence + 1, "the held transaction started the WAL over"
    other.close()
    await store.close()


async def test_a_query_during_the_catch_up_reads_the_held_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read your writes: a query while writes are held puts them in first."""
    path = tmp_path / "state.sqlite3"
    release = threading.Event()
    store = await _store_in_held_round(path, monkeypatch, release)
    store.save_topic(TopicRow("held", 1, "topic", {}, 0))
    store.delete_topic("t0")
    names = {row.name for row in await store.load_topics()}
    assert "held" in names and "t0" not in names
    release.set()
    await store.commit()
    await store.close()


async def test_no_hold_when_the_rounds_never_get_short(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writes are held only after a round beside the COMMITs copied few frames (the
    hold is then short); a checkpoint whose rounds never got there ends after
    ``CHECKPOINT_ROUNDS_MAX`` of them without holding anything."""
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_WAL_BYTES", 64 << 10)
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_SYNCS_MIN", 1)
    monkeypatch.setattr(sqlite_engine_module, "CHECKPOINT_HOLD_FRAMES_MAX", -1)
    store = SqliteStateStore(tmp_path / "state.sqlite3")
    await store.open()
    engine = store.sqlite
    rounds: list[tuple[bool, int]] = []
    checkpoint_round = engine._checkpoint_round

    def recorded(held: bool, frames_before: int, number: int) -> None:
        rounds.append((held, number))
        checkpoint_round(held, frames_before, number)

    monkeypatch.setattr(engine, "_checkpoint_round", recorded)
    for index in range(40):
        store.save_topic(TopicRow(f"t{index}", 1, "topic", {"x": "y" * 4000}, 0))
        await store.commit()
        while engine._checkpoint is not None and not engine._checkpoint.done():
            await asyncio.shield(engine._checkpoint)
    assert rounds and not any(held for held, _ in rounds)
    assert max(number for _, number in rounds) == sqlite_engine_module.CHECKPOINT_ROUNDS_MAX
    await store.close()
