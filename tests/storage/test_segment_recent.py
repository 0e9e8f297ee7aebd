"""The segment's memo of recent batches: a tailing lookup without a scan, never stale.

Method: append batches of seeded random sizes to one Segment on a MemoryFileSystem, then
compare every ``find_batch`` answer (each offset, each visible end at a batch boundary)
with the answer of the index + scan way (the same segment reopened and rebuilt from its
file, which has no memo). Then change the segment the ways a partition does (truncate and
append again, set a batch aside, a failed write) and compare again: an answer from a
memo that outlived the change would name bytes the file no longer holds there.
"""

from __future__ import annotations

import random

import pytest
from storage_helpers import make_batch, seeded_rng

from conveyor.errors import StorageError
from conveyor.storage.damage import Damage
from conveyor.storage.record_batch import BatchHeader, patch_base_offset, split_batches
from conveyor.storage.segment import RECENT_BATCHES_MAX, Segment
from conveyor.testing.memory_fs import MemoryFileSystem


class CountingFileSystem(MemoryFileSystem):
    """Counts preads; ``fail_writes`` makes pwrite raise (a failed write)."""

    def __init__(self) -> None:
        super().__init__()
        self.preads = 0
        self.fail_writes = False

    def pread(self, handle: int, size: int, position: int) -> bytes:
        self.preads += 1
        return super().pread(handle, size, position)

    def pwrite(self, handle: int, data: bytes | bytearray | memoryview, position: int) -> None:
        if self.fail_writes:
            super().pwrite(handle, bytes(data)[:7], position)  # a torn start, then the error
            raise OSError(5, "injected I/O error")
        super().pwrite(handle, data, position)


def new_segment() -> Segment:
    fs = CountingFileSystem()
    fs.make_dirs("/d")
    return Segment.create(fs, "/d", 100, index_interval_bytes=300, created_ms=0)


def append_batches(segment: Segment, rng: random.Random, count: int, tag: bytes = b"a") -> None:
    """``count`` appends of one batch each (1-3 records of 1-200 bytes)."""
    for _ in range(count):
        values = [tag * rng.randrange(1, 200) for _ in range(rng.randrange(1, 4))]
        payload = bytearray(make_batch(values))
        patch_base_offset(payload, segment.next_offset)
        segment.append(payload, split_batches(payload))


def reference(segment: Segment) -> Segment:
    """The same file opened afresh: its lookups go the index + scan way."""
    fresh = Segment.open(segment.fs, "/d", segment.base_offset, index_interval_bytes=300,
                         created_ms=0)
    fresh.rebuild(validate=False)
    fresh.damage = segment.damage
    return fresh


def boundaries(segment: Segment) -> list[int]:
    return [position + header.size_bytes for position, header in segment.batch_headers()]


def assert_same_answers(segment: Segment) -> None:
    fresh = reference(segment)
    for end in [0, *boundaries(segment)]:
        for offset in range(segment.base_offset, segment.next_offset + 2):
            assert segment.find_batch(offset, end) == fresh.find_batch(offset, end), (offset, end)
    ends = boundaries(segment)
    for start, first_end in zip([0, *ends], ends, strict=False):
        for bytes_max in (1, 150, 400, 1_000, 10_000):
            assert segment.read_end(start, first_end - start, bytes_max, ends[-1]) == \
                fresh.read_end(start, first_end - start, bytes_max, ends[-1]), (start, bytes_max)


def test_answers_match_the_index_and_scan_way() -> None:
    rng = seeded_rng()
    segment = new_segment()
    append_batches(segment, rng, 10)
    assert_same_answers(segment)
    append_batches(segment, rng, RECENT_BATCHES_MAX * 2 + 5)  # the memo trimmed, twice
    assert_same_answers(segment)


def test_a_tailing_lookup_reads_nothing_from_the_file() -> None:
    """The consumer at the log end asks for the batch just appended: the memo answers."""
    segment = new_segment()
    append_batches(segment, random.Random(7), 40)
    fs = segment.fs
    assert isinstance(fs, CountingFileSystem)
    last_position, last = list(segment.batch_headers())[-1]
    before = fs.preads
    assert segment.find_batch(last.base_offset, segment.size_bytes) == (last_position, last)
    assert fs.preads == before


def test_truncate_then_append_answers_from_the_new_batches() -> None:
    """A cut drops batches the memo held; the offsets come back on different bytes."""
    rng = seeded_rng()
    segment = new_segment()
    append_batches(segment, rng, 30)
    headers = list(segment.batch_headers())
    cut_position, cut_header = headers[20]
    assert segment.find_batch(cut_header.base_offset, segment.size_bytes) == \
        (cut_position, cut_header)  # answered from the memo
    segment.truncate_to(cut_position)
    assert segment.next_offset == cut_header.base_offset
    assert segment.find_batch(cut_header.base_offset, segment.size_bytes) is None
    append_batches(segment, rng, 15, tag=b"z")
    found = segment.find_batch(cut_header.base_offset, segment.size_bytes)
    assert found is not None and found[0] == cut_position and found[1] != cut_header
    assert_same_answers(segment)


def test_a_set_aside_batch_is_skipped() -> None:
    """A batch set aside (records undecodable) is jumped over by every reader."""
    segment = new_segment()
    append_batches(segment, random.Random(11), 12)
    headers = list(segment.batch_headers())
    position, header = headers[-3]
    assert segment.find_batch(header.base_offset, segment.size_bytes) == (position, header)
    segment.damage.add(Damage(segment.log_path, position, position + header.size_bytes,
                              header.base_offset, header.last_offset + 1, "test"))
    after = headers[-2]
    assert segment.find_batch(header.base_offset, segment.size_bytes) == after
    assert_same_answers(segment)


def test_a_failed_write_leaves_the_memo_whole() -> None:
    segment = new_segment()
    rng = seeded_rng()
    append_batches(segment, rng, 8)
    fs = segment.fs
    assert isinstance(fs, CountingFileSystem)
    fs.fail_writes = True
    with pytest.raises(StorageError):
        append_batches(segment, rng, 1)
    fs.fail_writes = False
    append_batches(segment, rng, 3, tag=b"y")
    assert_same_answers(segment)


def test_sealing_empties_the_memo() -> None:
    """A sealed segment (indexes written) keeps no memo: thousands of them stay cheap."""
    segment = new_segment()
    append_batches(segment, random.Random(3), 5)
    segment.write_indexes()
    fs = segment.fs
    assert isinstance(fs, CountingFileSystem)
    before = fs.preads
    header: BatchHeader | None
    _, header = segment.find_batch(segment.next_offset - 1, segment.size_bytes) or (0, None)
    assert header is not None and header.last_offset == segment.next_offset - 1
    assert fs.preads > before  # the index + scan way


def test_a_memo_that_does_not_end_at_the_append_is_dropped() -> None:
    """Should the memo ever not end where an append starts (a change that forgot to
    empty it), the append drops it instead of failing: the index answers meanwhile."""
    rng = seeded_rng()
    segment = new_segment()
    append_batches(segment, rng, 6)
    segment._recent.pop()  # the memo now ends one batch before the file does
    segment._recent_last_offsets.pop()
    append_batches(segment, rng, 3)
    assert len(segment._recent) == 3, "only the batches appended since are remembered"
    assert_same_answers(segment)
