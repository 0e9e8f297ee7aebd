"""Segment and indexes: sparse entries every index_interval_bytes, lookups, rebuild, files.

Method: append batches of known sizes to one Segment on a MemoryFileSystem and check
index entries, batch lookups and read ranges against positions computed by hand.
"""

from __future__ import annotations

from storage_helpers import make_batch

from conveyor.storage import segment_files
from conveyor.storage.index import OffsetIndex, TimeIndex
from conveyor.storage.record_batch import patch_base_offset, split_batches
from conveyor.storage.segment import Segment
from conveyor.testing.memory_fs import MemoryFileSystem


def filled_segment(count: int = 20) -> tuple[Segment, int]:
    fs = MemoryFileSystem()
    fs.make_dirs("/d")
    segment = Segment.create(fs, "/d", 100, index_interval_bytes=300, created_ms=0)
    for index in range(count):
        payload = bytearray(make_batch([b"a" * 90, b"b"], timestamp_ms=1_000 + index))
        patch_base_offset(payload, 100 + 2 * index)
        segment.append(payload, split_batches(payload))
    return segment, len(payload)


def test_sparse_index_entries_and_lookups() -> None:
    segment, size = filled_segment()
    assert segment.next_offset == 140 and segment.size_bytes == 20 * size
    per_entry = -(-300 // size)  # batches between entries
    assert segment.offset_index.positions == [
        size * per_entry * n for n in range(1, 20 // per_entry + (20 % per_entry > 0))]
    position, header = segment.find_batch(117, segment.size_bytes) or (None, None)
    assert header is not None and header.base_offset == 116 and position == 8 * size
    assert segment.find_batch(140, segment.size_bytes) is None
    assert segment.read_end(0, size, 1, segment.size_bytes) == size
    assert segment.read_end(0, size, size * 5 + 3, segment.size_bytes) == size * 5
    assert segment.read_end(size, size, 10**6, size * 7) == size * 7


def test_index_files_round_trip_and_reject_damage() -> None:
    index = OffsetIndex(10)
    index.append(12, 100)
    index.append(15, 400)
    loaded = OffsetIndex.from_bytes(10, index.to_bytes())
    assert loaded is not None and loaded.lookup(14) == (12, 100) and loaded.lookup(3) == (10, 0)
    assert OffsetIndex.from_bytes(10, index.to_bytes()[:-1]) is None
    assert OffsetIndex.from_bytes(10, index.to_bytes()[8:] + index.to_bytes()[:8]) is None
    times = TimeIndex(10)
    times.append(50, 12)
    times.append(40, 15)  # kept non-decreasing
    assert times.timestamps_ms == [50, 50]
    assert times.lookup(51) == 15 and times.lookup(50) == 10
    assert TimeIndex.from_bytes(10, times.to_bytes()) is not None


def test_load_indexes_uses_files_and_rebuild_matches() -> None:
    segment, _ = filled_segment()
    segment.write_indexes()
    expected = (list(segment.offset_index.positions), segment.next_offset,
                segment.max_timestamp_ms)
    reopened = Segment.open(segment.fs, "/d", 100, index_interval_bytes=300, created_ms=0)
    assert reopened.load_indexes()
    assert (reopened.offset_index.positions, reopened.next_offset,
            reopened.max_timestamp_ms) == expected
    segment.fs.remove(segment_files.offset_index_path("/d", 100))
    missing = Segment.open(segment.fs, "/d", 100, index_interval_bytes=300, created_ms=0)
    assert not missing.load_indexes()
    missing.rebuild(validate=True)
    assert (missing.offset_index.positions, missing.next_offset,
            missing.max_timestamp_ms) == expected


def test_index_with_a_flipped_bit_in_a_middle_entry_is_rebuilt() -> None:
    """Index files are never fsynced: a crash may flip a bit in any entry. Only the last
    entry used to be checked against the log, so a middle entry pointing mid-batch was
    trusted, a read landed there and acknowledged records were set aside as corrupt."""
    segment, _ = filled_segment()
    segment.write_indexes()
    path = segment_files.offset_index_path("/d", 100)
    handle = segment.fs.open(path)
    data = bytearray(segment.fs.pread(handle, 1 << 16, 0))
    assert len(data) >= 3 * 8 + 4  # several entries and the checksum
    data[8 + 7] ^= 0x10  # the second entry's position: still increasing, now mid-batch
    segment.fs.pwrite(handle, bytes(data), 0)
    segment.fs.close(handle)
    reopened = Segment.open(segment.fs, "/d", 100, index_interval_bytes=300, created_ms=0)
    assert not reopened.load_indexes()  # the checksum caught it: rebuild
    reopened.rebuild(validate=True)
    assert reopened.offset_index.positions == segment.offset_index.positions
    assert reopened.damage.damage == {}


def test_truncate_to_drops_index_entries_past_the_cut() -> None:
    segment, size = filled_segment()
    segment.truncate_to(size * 10)
    assert segment.next_offset == 120 and segment.size_bytes == size * 10
    assert all(position < size * 10 for position in segment.offset_index.positions)
