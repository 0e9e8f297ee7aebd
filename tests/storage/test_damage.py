"""Damage inside segments: a corrupt batch is set aside and skipped, never served or
allowed to take valid batches after it down (issue 9 item 5).

Method: fill a partition on a MemoryFileSystem, flip one bit inside a chosen batch of a
sealed or the active segment, reopen, and read every offset back.
"""

from __future__ import annotations

import logging

import pytest
from storage_helpers import SMALL, make_batch, values_of

from conveyor.storage.log_store import FileLogStore
from conveyor.storage.record_batch import read_header, validate_batch
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem

VALUE_PAD = b"-" * 90


async def filled(fs: MemoryFileSystem, clock: SimClock, count: int) -> FileLogStore:
    store = FileLogStore("/data", fs, clock)
    await store.open()
    log = await store.create_partition("t", 0, SMALL)
    for index in range(count):
        await log.append(make_batch([b"%04d" % index + VALUE_PAD]))
    return store


def flip_in_batch(fs: MemoryFileSystem, path: str, batch_number: int, *,
                  delta: int = 70) -> int:
    """Flip a bit ``delta`` bytes into the n-th batch of ``path``; its base offset."""
    handle = fs.open(path)
    position = 0
    for _ in range(batch_number):
        position += read_header(fs.pread(handle, 61, position)).size_bytes
    base_offset = read_header(fs.pread(handle, 61, position)).base_offset
    byte = fs.pread(handle, 1, position + delta)
    fs.pwrite(handle, bytes([byte[0] ^ 0x04]), position + delta)
    fs.fdatasync(handle)
    fs.close(handle)
    return base_offset


def read_all(store: FileLogStore) -> list[int]:
    log = store.partition("t", 0)
    offsets: list[int] = []
    offset = log.log_start_offset
    while offset < log.high_watermark:
        data = log.read(offset, 10_000).read_bytes()
        if not data:
            break
        position = 0
        while position < len(data):  # every batch served passes the CRC check
            header = validate_batch(data, position)
            position += header.size_bytes
        got = [record_offset for record_offset, _ in values_of(data)]
        offsets.extend(got)
        offset = got[-1] + 1
    return offsets


async def reopen(fs: MemoryFileSystem, clock: SimClock) -> FileLogStore:
    store = FileLogStore("/data", fs, clock)
    await store.open()
    return store


@pytest.mark.parametrize("delta", [70, 9])  # in the payload; in the batch length field
async def test_flipped_bit_in_sealed_segment_is_skipped_and_logged(
    clock: SimClock, caplog: pytest.LogCaptureFixture, delta: int,
) -> None:
    fs = MemoryFileSystem()
    store = await filled(fs, clock, 60)
    log = store.partition("t", 0)
    assert len(log.segments) >= 3
    sealed = log.segments[1]
    await store.close()
    bad_offset = flip_in_batch(fs, sealed.log_path, 3, delta=delta)
    store = await reopen(fs, clock)
    with caplog.at_level(logging.ERROR):
        offsets = read_all(store)
        again = read_all(store)
    assert offsets == again == [offset for offset in range(60) if offset != bad_offset]
    assert "corrupt batch on disk set aside" in caplog.text
    assert sealed.log_path in caplog.text
    assert caplog.text.count("corrupt batch on disk set aside") == 1  # once, not per read
    log = store.partition("t", 0)
    assert log.damaged_batches == 1
    # reading from inside the damaged batch answers the next valid one
    assert values_of(log.read(bad_offset, 1).read_bytes())[0][0] == bad_offset + 1


async def test_flipped_bit_mid_active_segment_sets_aside_not_truncates(
    clock: SimClock, caplog: pytest.LogCaptureFixture,
) -> None:
    fs = MemoryFileSystem()
    store = await filled(fs, clock, 60)
    log = store.partition("t", 0)
    active = log.active_segment
    active_first = active.base_offset
    active_count = log.log_end_offset - active_first
    assert active_count >= 4
    await store.close()
    bad_offset = flip_in_batch(fs, active.log_path, 1)
    with caplog.at_level(logging.WARNING):
        store = await reopen(fs, clock)
    log = store.partition("t", 0)
    recovery = store.recovery("t", 0)
    assert log.log_end_offset == 60 and recovery.log_end_offset == 60
    assert recovery.lost_from_offset == -1
    assert recovery.skipped_offsets == ((bad_offset, bad_offset + 1),)
    assert "corrupt batch set aside" in caplog.text and "truncated" not in caplog.text
    assert read_all(store) == [offset for offset in range(60) if offset != bad_offset]
    assert (await log.append(make_batch([b"next"]))).base_offset == 60


async def test_torn_tail_is_reported_as_lost_range(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await filled(fs, clock, 30)
    path = store.partition("t", 0).active_segment.log_path
    await store.close()
    handle = fs.open(path)
    fs.truncate(handle, fs.size(handle) - 5)
    fs.close(handle)
    store = await reopen(fs, clock)
    recovery = store.recovery("t", 0)
    assert recovery.log_end_offset == 29 and recovery.lost_from_offset == 29
    assert recovery.skipped_offsets == () and not recovery.clean
