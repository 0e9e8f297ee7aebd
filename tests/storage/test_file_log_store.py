"""FileLogStore and its PartitionLogs (segments, rolls, indexes) on both file systems
(OsFileSystem, MemoryFileSystem).

Method: append batches through the public API, then check offsets, read slices, rolls,
timestamps, deletion and reopening; every assertion runs on both file systems.
"""

from __future__ import annotations

import pytest
from storage_helpers import SMALL, make_batch, values_of

from conveyor.errors import CorruptRecordError, OffsetOutOfRangeError, UnknownPartitionError
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.testing.clock import SimClock


async def test_append_assigns_offsets_and_reads_back(any_store: FileLogStore) -> None:
    await any_store.open()
    log = await any_store.create_partition("orders", 0, LogConfig())
    first = await log.append(make_batch([b"a", b"b"]))
    second = await log.append(make_batch([b"c"]) + make_batch([b"d", b"e"]))
    assert (first.base_offset, first.last_offset) == (0, 1)
    assert (second.base_offset, second.last_offset) == (2, 4)
    assert log.high_watermark == 5 and log.log_start_offset == 0
    assert values_of(log.read(0, 1 << 20).read_bytes()) == [
        (0, b"a"), (1, b"b"), (2, b"c"), (3, b"d"), (4, b"e")]
    assert values_of(log.read(4, 1 << 20).read_bytes())[0] == (3, b"d")  # the containing batch
    assert log.read(5, 100).size_bytes == 0
    with pytest.raises(OffsetOutOfRangeError):
        log.read(6, 100)


async def test_read_returns_whole_batches_and_at_least_one(any_store: FileLogStore) -> None:
    await any_store.open()
    log = await any_store.create_partition("t", 0, LogConfig())
    batch = make_batch([b"x" * 500])
    for _ in range(10):
        await log.append(batch)
    assert log.read(0, 1).size_bytes == len(batch)  # larger than bytes_max, still one batch
    assert log.read(0, len(batch) * 3 + 10).size_bytes == len(batch) * 3
    assert log.read(2, 10**6).size_bytes == len(batch) * 8


async def test_rolls_segments_and_reopens(any_store: FileLogStore) -> None:
    await any_store.open()
    log = await any_store.create_partition("t", 3, SMALL)
    for index in range(40):
        await log.append(make_batch([b"%03d" % index + b"." * 100]))
    assert len(log.segments) >= 3
    expected = [(offset, b"%03d" % offset + b"." * 100) for offset in range(40)]
    collected = []
    offset = 0
    while offset < log.high_watermark:
        chunk = values_of(log.read(offset, 10**6).read_bytes())
        collected += chunk
        offset = chunk[-1][0] + 1
    assert collected == expected
    await any_store.close()
    reopened = FileLogStore(any_store.root, any_store.fs, any_store.clock)
    await reopened.open()
    assert reopened.partitions() == [("t", 3)]
    log = reopened.partition("t", 3)
    assert log.high_watermark == 40
    assert values_of(log.read(17, 1).read_bytes()) == [expected[17]]
    assert (await log.append(make_batch([b"next"]))).base_offset == 40


async def test_offset_for_timestamp(any_store: FileLogStore) -> None:
    await any_store.open()
    log = await any_store.create_partition("t", 0, SMALL)
    for index in range(30):
        await log.append(make_batch([b"v" * 100], timestamp_ms=1_000 + index * 10))
    assert log.offset_for_timestamp(0) == 0
    assert log.offset_for_timestamp(1_000) == 0
    assert log.offset_for_timestamp(1_001) == 1
    assert log.offset_for_timestamp(1_250) == 25
    assert log.offset_for_timestamp(1_290) == 29
    assert log.offset_for_timestamp(1_291) is None


async def test_delete_before_moves_log_start(any_store: FileLogStore) -> None:
    await any_store.open()
    log = await any_store.create_partition("t", 0, SMALL)
    for _ in range(40):
        await log.append(make_batch([b"v" * 100]))
    segments_before = len(log.segments)
    await log.delete_before(25)
    assert log.log_start_offset == 25
    assert len(log.segments) < segments_before
    assert all(segment.next_offset > 25 for segment in log.segments)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(24, 100)
    assert values_of(log.read(25, 1).read_bytes())[0][0] <= 25
    await any_store.close()
    reopened = FileLogStore(any_store.root, any_store.fs, any_store.clock)
    await reopened.open()
    assert reopened.partition("t", 0).log_start_offset == 25


async def test_invalid_payload_is_rejected_without_writing(any_store: FileLogStore) -> None:
    await any_store.open()
    log = await any_store.create_partition("t", 0, LogConfig())
    damaged = bytearray(make_batch([b"a"]))
    damaged[-1] ^= 1
    with pytest.raises(CorruptRecordError):
        await log.append(bytes(damaged))
    assert log.high_watermark == 0 and log.active_segment.size_bytes == 0


async def test_unknown_and_deleted_partitions(any_store: FileLogStore) -> None:
    await any_store.open()
    with pytest.raises(UnknownPartitionError):
        any_store.partition("none", 0)
    log = await any_store.create_partition("t", 0, LogConfig())
    assert await any_store.create_partition("t", 0, SMALL) is log
    assert log.config == SMALL
    await log.append(make_batch([b"a"]))
    await any_store.delete_partition("t", 0)
    assert any_store.partitions() == []
    assert not any_store.fs.exists(log.directory)


async def test_rolls_by_segment_age(any_store: FileLogStore, clock: SimClock) -> None:
    await any_store.open()
    log = await any_store.create_partition("t", 0, LogConfig(segment_ms=1_000))
    await log.append(make_batch([b"a"]))
    await log.append(make_batch([b"b"]))
    assert len(log.segments) == 1
    clock.advance(1_000)
    await log.append(make_batch([b"c"]))
    assert [segment.base_offset for segment in log.segments] == [0, 2]


async def test_on_visible_is_told_before_the_append_returns(any_store: FileLogStore) -> None:
    """The broker wakes a partition's waiting reads from ``on_visible``: it is called
    once the records are visible (durable under fsync=always), before the append that
    wrote them returns, so the readers' wake-up does not wait for the writer's turn."""
    await any_store.open()
    log = await any_store.create_partition("t", 2, LogConfig())
    seen: list[tuple[str, int, int, bool]] = []
    returned = [False]
    any_store.on_visible = lambda topic, partition: seen.append(
        (topic, partition, any_store.offsets(topic, partition).high_watermark, returned[0]))
    appended = await log.append(make_batch([b"a", b"b"]))
    returned[0] = True
    assert seen == [("t", 2, 2, False)] and appended.last_offset == 1
