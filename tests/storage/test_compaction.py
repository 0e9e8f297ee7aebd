"""Compaction: latest value per key, tombstones dropped after delete_retention_ms, crash-safe swap.

Method: write keyed records to a compact partition on a MemoryFileSystem, run the
cleaner and compare the readable records with the expected latest-per-key view. For
crash safety, stop the cleaner at every file-system step in turn (a simulated power
cut), crash the disk, reopen and check the view is still correct.
"""

from __future__ import annotations

import dataclasses
import random

from conveyor.storage.control_batch import build_control_batch
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.record_batch import (
    RecordData,
    build_batch,
    decode_records,
    iter_records,
    patch_base_offset,
    split_batches,
)
from conveyor.storage.txn_cleaning import TransactionCleaning
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem

CONFIG = LogConfig(segment_bytes=600, cleanup_policy="compact", delete_retention_ms=10_000,
                   index_interval_bytes=128)


class PowerCut(Exception):
    pass


class CuttingFileSystem(MemoryFileSystem):
    """Raises PowerCut on the n-th mutating call once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.remaining: int | None = None

    def _step(self) -> None:
        if self.remaining is not None:
            if self.remaining == 0:
                raise PowerCut
            self.remaining -= 1

    def pwrite(self, handle: int, data: bytes | bytearray | memoryview, position: int) -> None:
        self._step()
        super().pwrite(handle, data, position)

    def fdatasync(self, handle: int) -> None:
        self._step()
        super().fdatasync(handle)

    def rename(self, source: str, destination: str) -> None:
        self._step()
        super().rename(source, destination)

    def remove(self, path: str) -> None:
        self._step()
        super().remove(path)

    def fsync_dir(self, path: str) -> None:
        self._step()
        super().fsync_dir(path)


def readable(store: FileLogStore) -> list[tuple[int, bytes | None, bytes | None]]:
    log = store.partition("t", 0)
    if log.high_watermark == log.log_start_offset:
        return []
    records = []
    offset = log.log_start_offset
    while offset < log.high_watermark:
        chunk = list(iter_records(log.read(offset, 10**6).read_bytes()))
        records += [r for r in chunk if r.offset >= offset]
        offset = chunk[-1].offset + 1
    return [(record.offset, record.key, record.value) for record in records]


def latest_view(records: list[tuple[int, bytes | None, bytes | None]]) -> dict[bytes, bytes | None]:
    view: dict[bytes, bytes | None] = {}
    for _, key, value in records:
        if key is not None:
            view[key] = value
    return {key: value for key, value in view.items() if value is not None}


async def filled(fs: MemoryFileSystem, clock: SimClock) -> FileLogStore:
    """40 records over keys k0..k4, plus key "gone" set at offset 2 and deleted at 21."""
    store = FileLogStore("/data", fs, clock)
    await store.open()
    log = await store.create_partition("t", 0, CONFIG)
    for index in range(40):
        key = b"gone" if index in (2, 21) else b"k%d" % (index % 5)
        value = None if index == 21 else b"v%d" % index
        record = RecordData(key, value, (), clock.wall_ms())
        await log.append(build_batch([record]))
    return store


async def test_keeps_latest_value_per_key_and_drops_old_tombstones(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await filled(fs, clock)
    before = readable(store)
    await store.run_retention()
    after = readable(store)
    assert latest_view(after) == latest_view(before)
    assert len(after) < len(before)
    keys_in_sealed = [key for offset, key, _ in after
                      if offset < store.partition("t", 0).active_segment.base_offset]
    assert len(keys_in_sealed) == len(set(keys_in_sealed))  # one record per key, at most
    assert (21, b"gone", None) in after  # tombstone kept within delete_retention_ms
    clock.advance(20_000)
    await store.run_retention()
    assert (21, b"gone", None) not in readable(store)
    assert latest_view(readable(store)) == latest_view(before)


async def test_crash_at_every_step_of_the_swap_recovers(clock: SimClock) -> None:
    rng = random.Random(11)
    step = 0
    while True:
        fs = CuttingFileSystem()
        store = await filled(fs, clock)
        await store.close()
        store = FileLogStore("/data", fs, clock)
        await store.open()
        expected = latest_view(readable(store))
        fs.remaining = step
        try:
            await store.run_retention()
        except PowerCut:
            fs.remaining = None
            fs.crash(rng, flip_bits=False)
            reopened = FileLogStore("/data", fs, clock)
            await reopened.open()
            assert latest_view(readable(reopened)) == expected, f"cut at step {step}"
            assert not [n for n in fs.list_dir("/data/t-0") if n.endswith((".swap", ".cleaned"))]
            step += 1
            continue
        break
    assert step > 5, "the cleaner must have been cut at several steps"


async def test_min_compaction_lag_protects_recent_segments(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await filled(fs, clock)
    await store.update_config("t", 0, dataclasses.replace(CONFIG, min_compaction_lag_ms=60_000))
    before = readable(store)
    await store.run_retention()
    assert readable(store) == before


async def test_open_transactions_are_not_cleaned_and_never_shadow(clock: SimClock) -> None:
    """Goal: records of a transaction without a marker neither shadow a committed value
    of their key nor get cleaned (the cleaner stops below the first open offset), and a
    COMMIT marker that ended nothing goes after delete_retention_ms.
    Method: a committed value, a stray COMMIT marker, then an open transaction over
    several segments, then non-transactional records; compact; read back."""
    store = FileLogStore("/data", MemoryFileSystem(), clock)
    await store.open()
    log = await store.create_partition("t", 0, dataclasses.replace(CONFIG, segment_bytes=200))
    await log.append(build_batch([RecordData(b"k", b"committed", (), clock.wall_ms())]))
    await log.append(build_control_batch(9, 0, True, 0, clock.wall_ms()))  # ends nothing
    for index in range(6):  # the open transaction, spread over several segments
        await log.append(build_batch([RecordData(b"k", b"open%d" % index, (), clock.wall_ms())],
                                     producer_id=7, producer_epoch=0, base_sequence=index,
                                     is_transactional=True))
    for index in range(6):
        await log.append(build_batch([RecordData(b"x", b"x%d" % index, (), clock.wall_ms())]))
    assert len(log.segments) > 3
    clock.advance(20_000)
    await store.run_retention()
    after = readable(store)
    assert (0, b"k", b"committed") in after
    assert [value for _, key, value in after if key == b"k"][1:] == [
        b"open%d" % index for index in range(6)]
    headers = [header for _, header in split_batches(log.read(0, 10**6).read_bytes())]
    assert not any(header.is_control for header in headers)  # the stray marker went


def test_transaction_cleaning_decisions() -> None:
    """The backend-neutral rules: aborted batches dropped, committed ones count for keys,
    an ABORT marker kept, a COMMIT marker kept while one of its records survives."""
    cleaning = TransactionCleaning()
    batches = [
        build_batch([RecordData(b"a", b"1", (), 0)], base_offset=0, producer_id=1,
                    producer_epoch=0, is_transactional=True),
        build_control_batch(1, 0, True, 0, 0),
        build_batch([RecordData(b"a", b"2", (), 0)], base_offset=2, producer_id=1,
                    producer_epoch=0, base_sequence=1, is_transactional=True),
        build_control_batch(1, 0, False, 0, 0),
    ]
    raw = b""
    for offset, batch in enumerate(batches):
        placed = bytearray(batch)
        patch_base_offset(placed, offset)
        raw += bytes(placed)
    headers = []
    for position, header in split_batches(raw):
        cleaning.observe(header, decode_records(raw, position))
        headers.append(header)
    committed, commit_marker, aborted, abort_marker = headers
    assert cleaning.counts_for_keys(committed) and not cleaning.is_aborted(committed)
    assert cleaning.is_aborted(aborted) and not cleaning.counts_for_keys(aborted)
    assert cleaning.keeps_marker(abort_marker, {}, drop_tombstones=True)
    assert cleaning.keeps_marker(commit_marker, {b"a": 0}, drop_tombstones=True)
    assert not cleaning.keeps_marker(commit_marker, {b"a": 5}, drop_tombstones=True)
    assert cleaning.keeps_marker(commit_marker, {b"a": 5}, drop_tombstones=False)
    assert cleaning.first_open_offset() is None
