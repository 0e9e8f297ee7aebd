"""Retention: the pure policy function, and run_retention deleting whole old segments.

Method: feed SegmentInfo lists with known sizes/timestamps; then drive a store with a
SimClock and check which segments and offsets remain.
"""

from __future__ import annotations

from storage_helpers import make_batch

from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.retention import RetentionPolicy, SegmentInfo, segments_to_delete
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem

SEGMENTS = [SegmentInfo(0, 100, 1_000), SegmentInfo(10, 100, 2_000),
            SegmentInfo(20, 100, 3_000), SegmentInfo(30, 100, 9_000)]


def test_time_retention_deletes_an_expired_prefix() -> None:
    assert segments_to_delete(SEGMENTS, RetentionPolicy(retention_ms=1_500), 4_000) == [0, 10]
    assert segments_to_delete(SEGMENTS, RetentionPolicy(retention_ms=-1), 10**9) == []


def test_never_deletes_the_active_segment() -> None:
    assert segments_to_delete(SEGMENTS, RetentionPolicy(retention_ms=0), 10**9) == [0, 10, 20]
    assert segments_to_delete(SEGMENTS[-1:], RetentionPolicy(retention_bytes=0), 0) == []


def test_size_retention_deletes_while_at_least_retention_bytes_remain() -> None:
    assert segments_to_delete(SEGMENTS, RetentionPolicy(retention_bytes=250), 0) == [0]
    assert segments_to_delete(SEGMENTS, RetentionPolicy(retention_bytes=200), 0) == [0, 10]
    assert segments_to_delete(SEGMENTS, RetentionPolicy(retention_bytes=400), 0) == []


def test_deletion_stops_at_the_first_kept_segment() -> None:
    unordered = [SegmentInfo(0, 100, 5_000), SegmentInfo(10, 100, 1_000), SegmentInfo(20, 1, 1)]
    assert segments_to_delete(unordered, RetentionPolicy(retention_ms=2_000), 4_000) == []


async def test_run_retention_removes_old_segments(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = FileLogStore("/data", fs, clock)
    await store.open()
    config = LogConfig(segment_bytes=1_000, retention_ms=60_000)
    log = await store.create_partition("t", 0, config)
    for _ in range(20):
        await log.append(make_batch([b"x" * 200], timestamp_ms=clock.wall_ms()))
    clock.advance(30_000)
    for _ in range(5):
        await log.append(make_batch([b"y" * 200], timestamp_ms=clock.wall_ms()))
    await store.run_retention()
    assert log.log_start_offset == 0
    clock.advance(40_000)
    await store.run_retention()
    assert log.log_start_offset >= 20 - 4 and log.log_start_offset <= 20
    assert log.high_watermark == 25
    logs = [name for name in fs.list_dir("/data/t-0") if name.endswith(".log")]
    assert logs == [f"{segment.base_offset:020d}.log" for segment in log.segments]
