"""Recovery: torn and bit-flipped tails are truncated, indexes are rebuilt, acks survive.

Method: write through FileLogStore on a MemoryFileSystem, damage the active segment
(truncate mid-batch, flip bits, random crashes), reopen and compare with what was acked.
"""

from __future__ import annotations

import logging

import pytest
from storage_helpers import SMALL, make_batch, seeded_rng, values_of

from conveyor.storage import segment_files
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem


async def filled(fs: MemoryFileSystem, clock: SimClock, count: int,
                 config: LogConfig = SMALL) -> FileLogStore:
    store = FileLogStore("/data", fs, clock)
    await store.open()
    log = await store.create_partition("t", 0, config)
    for index in range(count):
        await log.append(make_batch([b"%04d" % index + b"-" * 90]))
    return store


def damage(fs: MemoryFileSystem, path: str, *, cut: int = 0, flip_from_end: int = 0) -> None:
    handle = fs.open(path)
    size = fs.size(handle)
    if cut:
        fs.truncate(handle, size - cut)
    if flip_from_end:
        byte = fs.pread(handle, 1, size - flip_from_end)
        fs.pwrite(handle, bytes([byte[0] ^ 0x10]), size - flip_from_end)
    fs.fdatasync(handle)
    fs.close(handle)


async def reopen(fs: MemoryFileSystem, clock: SimClock) -> FileLogStore:
    store = FileLogStore("/data", fs, clock)
    await store.open()
    return store


@pytest.mark.parametrize("cut, flip", [(7, 0), (0, 5), (60, 0)])
async def test_damaged_tail_is_truncated_and_reported(
    clock: SimClock, caplog: pytest.LogCaptureFixture, cut: int, flip: int
) -> None:
    fs = MemoryFileSystem()
    store = await filled(fs, clock, 30)
    path = store.partition("t", 0).active_segment.log_path
    await store.close()
    damage(fs, path, cut=cut, flip_from_end=flip)
    with caplog.at_level(logging.WARNING, logger="conveyor.storage.recovery"):
        store = await reopen(fs, clock)
    [report] = store.recovery_reports
    assert report.path == path and report.truncated_bytes > 0
    assert "truncated" in caplog.text
    log = store.partition("t", 0)
    assert log.high_watermark == 29  # the last batch is gone, the rest intact
    assert values_of(log.read(28, 1).read_bytes()) == [(28, b"0028" + b"-" * 90)]
    assert (await log.append(make_batch([b"again"]))).base_offset == 29


async def test_missing_or_bad_indexes_are_rebuilt(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await filled(fs, clock, 60)
    log = store.partition("t", 0)
    sealed = log.segments[0]
    expected_positions = list(sealed.offset_index.positions)
    assert expected_positions, "the sealed segment must have index entries"
    await store.close()
    fs.remove(segment_files.time_index_path("/data/t-0", sealed.base_offset))
    handle = fs.open(segment_files.offset_index_path("/data/t-0", log.segments[1].base_offset))
    fs.pwrite(handle, b"\xff" * 8, 0)
    fs.close(handle)
    store = await reopen(fs, clock)
    log = store.partition("t", 0)
    assert log.segments[0].offset_index.positions == expected_positions
    assert store.recovery_reports == []
    for offset in range(60):
        assert values_of(log.read(offset, 1).read_bytes())[-1][0] == offset


async def test_random_crashes_keep_every_acknowledged_record(clock: SimClock) -> None:
    rng = seeded_rng()
    fs = MemoryFileSystem()
    acknowledged: dict[int, bytes] = {}
    for _round in range(30):
        store = await reopen(fs, clock)
        log = await store.create_partition("t", 0, SMALL)
        for _ in range(rng.randint(1, 15)):
            value = rng.randbytes(rng.randint(1, 300))
            info = await log.append(make_batch([value]))
            acknowledged[info.base_offset] = value
        fs.crash(rng)
    store = await reopen(fs, clock)
    log = store.partition("t", 0)
    for offset, value in acknowledged.items():
        assert values_of(log.read(offset, 1).read_bytes())[-1] == (offset, value)
