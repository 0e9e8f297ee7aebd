"""Segment: one ``.log`` file of whole record batches plus its two sparse indexes.

Owns: writing batches at the end of the file, indexing them every
``index_interval_bytes``, finding the batch that holds an offset, choosing whole-batch
read ranges, and rebuilding the indexes from the log. Knows nothing of rolling,
retention or fsync policy (the PartitionLog decides those).

Invariants: the file is a sequence of whole batches with increasing offsets from
``base_offset`` (compaction may leave gaps); ``size_bytes`` is the end of the last
batch written; a failed write is truncated back so the file never holds a partial
batch while the process runs. Not thread-safe: one event loop owns a segment.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator, Mapping

from conveyor.errors import CorruptRecordError, StorageError, StorageFullError
from conveyor.storage import segment_files
from conveyor.storage.damage import Damage, SegmentDamage, check_batch, claimed_offset, resync
from conveyor.storage.fs import FileSystem
from conveyor.storage.index import OffsetIndex, TimeIndex
from conveyor.storage.record_batch import (
    BATCH_HEADER_BYTES,
    LOG_OVERHEAD_BYTES,
    MAGIC,
    BatchHeader,
    read_header,
    validate_batch,
)

SCAN_CHUNK_BYTES = 1 << 20
LOOKUP_CHUNK_BYTES = 16 << 10
# Batches the recent-batch memo keeps (trimmed to half when full): a consumer that tails
# the log fetches one of the last few batches appended; further behind, the index + scan
# way (a pread of LOOKUP_CHUNK_BYTES, then headers up to the next index entry: 30-50 µs
# for 100 B records) takes over. ~0.4 KiB an entry, on the active segment only (sealing
# empties it): under 16 KiB a partition.
RECENT_BATCHES_MAX = 32


def scan_batches(
    fs: FileSystem, handle: int, start: int, end: int, *, validate: bool,
    chunk_bytes: int = SCAN_CHUNK_BYTES, jumps: Mapping[int, int] | None = None,
) -> Iterator[tuple[int, BatchHeader]]:
    """(position, header) of each whole batch from ``start``; stops at the first bad one."""
    return iter(BatchScan(fs, handle, start, end, validate=validate, chunk_bytes=chunk_bytes,
                          jumps=jumps))


class BatchScan:
    """Iterates whole batches; afterwards ``position`` is where it stopped.

    ``position == end`` means every byte was whole batches; anything less is the
    start of a bad or torn batch. ``jumps`` maps the position of set-aside damage to
    where the next valid batch starts.
    """

    def __init__(
        self, fs: FileSystem, handle: int, start: int, end: int, *, validate: bool,
        chunk_bytes: int = SCAN_CHUNK_BYTES, jumps: Mapping[int, int] | None = None,
    ) -> None:
        self.fs, self.handle, self.end = fs, handle, end
        self.position = start
        self.validate = validate
        self.chunk_bytes = chunk_bytes
        self.jumps = jumps or {}

    def __iter__(self) -> Iterator[tuple[int, BatchHeader]]:
        fs, handle, end, chunk_bytes = self.fs, self.handle, self.end, self.chunk_bytes
        buffer, buffer_start = b"", self.position
        while self.position + BATCH_HEADER_BYTES <= end:
            position = self.position
            if position in self.jumps:
                self.position = self.jumps[position]
                continue
            if position < buffer_start or \
                    position - buffer_start + BATCH_HEADER_BYTES > len(buffer):
                buffer = fs.pread(handle, min(chunk_bytes, end - position), position)
                buffer_start = position
            header = read_header(buffer, position - buffer_start)
            size = header.size_bytes
            if header.magic != MAGIC or size < BATCH_HEADER_BYTES or position + size > end:
                return
            if self.validate:
                if position - buffer_start + size > len(buffer):
                    buffer, buffer_start = fs.pread(handle, max(chunk_bytes, size), position), \
                        position
                try:
                    validate_batch(buffer, position - buffer_start)
                except CorruptRecordError:
                    return
            self.position = position + size
            yield position, header


class Segment:
    def __init__(
        self, fs: FileSystem, directory: str, base_offset: int, handle: int,
        index_interval_bytes: int, created_ms: int,
    ) -> None:
        self.fs = fs
        self.directory = directory
        self.base_offset = base_offset
        self.handle = handle
        self.index_interval_bytes = index_interval_bytes
        self.created_ms = created_ms
        self.size_bytes = 0
        self.next_offset = base_offset
        self.max_timestamp_ms = -1
        self.offset_index = OffsetIndex(base_offset)
        self.time_index = TimeIndex(base_offset)
        self._bytes_since_index = 0
        self.damage = SegmentDamage()
        # The recent-batch memo: (position, header) of the last batches this process
        # appended, contiguous and ending at size_bytes, with their last offsets
        # (ascending) beside them for bisect. Emptied by anything that rewrites what the
        # segment holds (rebuild, truncation, a set-aside tail, sealing).
        self._recent: list[tuple[int, BatchHeader]] = []
        self._recent_last_offsets: list[int] = []

    @classmethod
    def create(
        cls, fs: FileSystem, directory: str, base_offset: int, *, index_interval_bytes: int,
        created_ms: int, sync_directory: bool = True,
    ) -> Segment:
        """A new empty segment file; ``sync_directory=False``: the caller makes its
        directory entry durable (a roll: the group committer's next pass)."""
        handle = fs.open(segment_files.log_path(directory, base_offset), create=True)
        fs.truncate(handle, 0)
        if sync_directory:
            fs.fsync_dir(directory)
        return cls(fs, directory, base_offset, handle, index_interval_bytes, created_ms)

    @classmethod
    def open(
        cls, fs: FileSystem, directory: str, base_offset: int, *, index_interval_bytes: int,
        created_ms: int,
    ) -> Segment:
        """Open an existing segment without reading it (call load_indexes or rebuild next)."""
        handle = fs.open(segment_files.log_path(directory, base_offset))
        segment = cls(fs, directory, base_offset, handle, index_interval_bytes, created_ms)
        segment.size_bytes = fs.size(handle)
        return segment

    @property
    def log_path(self) -> str:
        return segment_files.log_path(self.directory, self.base_offset)

    # --- writing -----------------------------------------------------------------------
    def append(self, payload: bytes | bytearray | memoryview,
               batches: list[tuple[int, BatchHeader]]) -> None:
        """Write whole batches (positions relative to ``payload``) at the end of the file."""
        start = self.size_bytes
        try:
            self.fs.pwrite(self.handle, payload, start)
        except OSError as error:
            self.fs.truncate(self.handle, start)
            if error.errno == errno.ENOSPC:
                raise StorageFullError("disk full", path=self.log_path, position=start) from error
            raise StorageError("write failed", path=self.log_path, reason=str(error)) from error
        recent, last_offsets = self._recent, self._recent_last_offsets
        # whatever cut or rewrote the file emptied the memo (rebuild, set_aside_tail); if
        # it still does not end here, it is dropped, not trusted (the index answers)
        if recent and recent[-1][0] + recent[-1][1].size_bytes != start:
            self.forget_recent()
        if len(recent) >= RECENT_BATCHES_MAX:
            del recent[:RECENT_BATCHES_MAX // 2], last_offsets[:RECENT_BATCHES_MAX // 2]
        for relative, header in batches:
            self._index_batch(start + relative, header)
            recent.append((start + relative, header))
            last_offsets.append(header.last_offset)
        self.size_bytes = start + len(payload)
        self.damage.mark_verified(start, self.size_bytes)  # validated before the write

    def _index_batch(self, position: int, header: BatchHeader) -> None:
        if self._bytes_since_index >= self.index_interval_bytes:
            self.offset_index.append(header.base_offset, position)
            self.time_index.append(self.max_timestamp_ms, header.base_offset)
            self._bytes_since_index = 0
        self._bytes_since_index += header.size_bytes
        self.max_timestamp_ms = max(self.max_timestamp_ms, header.max_timestamp_ms)
        self.next_offset = header.last_offset + 1

    def truncate_to(self, size_bytes: int) -> None:
        """Cut the file at a batch boundary and drop index entries past it."""
        self.fs.truncate(self.handle, size_bytes)
        self.damage.forget_after(size_bytes)
        self.rebuild(end=size_bytes, validate=False)

    # --- indexes -----------------------------------------------------------------------
    def rebuild(self, *, end: int | None = None, validate: bool, contiguous: bool = False) -> int:
        """Re-derive indexes and offsets from the log; return the end of the last good batch.

        ``contiguous``: a batch whose base offset (outside the CRC) is not the next offset
        ends the good part too (an active segment has no compaction gaps).

        With ``validate``, a corrupt batch that a valid batch follows is set aside (kept
        in the file, recorded in ``damage``, skipped by readers) and the scan goes on;
        bytes after the last valid batch are left for the caller (a torn tail).
        """
        self.forget_recent()
        self.offset_index = OffsetIndex(self.base_offset)
        self.time_index = TimeIndex(self.base_offset)
        self._bytes_since_index = 0
        self.max_timestamp_ms = -1
        self.next_offset = self.base_offset
        limit = self.fs.size(self.handle) if end is None else end
        valid_end = 0
        position = 0
        while True:
            scan = BatchScan(self.fs, self.handle, position, limit, validate=validate,
                             jumps=self.damage.jumps)
            stale = False
            for batch_position, header in scan:
                # after a set-aside batch the next valid one defines the offsets again
                if (contiguous and (position == 0 or batch_position != position)
                        and header.base_offset != self.next_offset):
                    stale = True
                    break
                self._index_batch(batch_position, header)
                valid_end = batch_position + header.size_bytes
                if validate:
                    self.damage.mark_verified(batch_position, valid_end)
            if stale or not validate or scan.position >= limit:
                break
            found = resync(self.fs, self.handle, scan.position, limit, self.next_offset)
            if found is None:
                break
            self.damage.add(Damage(self.log_path, scan.position, found[0],
                                   claimed_offset(self.fs, self.handle, scan.position),
                                   found[1].base_offset, "corrupt batch (valid batches follow)"))
            position = found[0]
        self.size_bytes = valid_end
        return valid_end

    def set_aside_tail(self, position: int, reason: str) -> Damage:
        """Keep a bad tail of a sealed segment on disk but never serve it."""
        size = self.fs.size(self.handle)
        item = Damage(self.log_path, position, size, claimed_offset(self.fs, self.handle, position),
                      -1, reason)
        self.damage.add(item)
        self.forget_recent()
        self.size_bytes = size
        return item

    def verify(self, start: int, stop: int) -> Damage | None:
        """CRC-check the batches in [start, stop) not checked yet; the first damage found.

        A new damage is remembered (readers then jump over it); the caller reports it.
        """
        position = start
        while True:
            position = self.damage.verified_until(position)
            if position >= stop:
                return None
            known = self.damage.damage.get(position)
            if known is not None:
                return known
            checked = check_batch(self.fs, self.handle, position, self.size_bytes)
            if isinstance(checked, BatchHeader):
                self.damage.mark_verified(position, position + checked.size_bytes)
                position += checked.size_bytes
                continue
            found = resync(self.fs, self.handle, position, self.size_bytes, 0)
            item = Damage(self.log_path, position,
                          found[0] if found else self.size_bytes,
                          claimed_offset(self.fs, self.handle, position),
                          found[1].base_offset if found else -1, checked)
            self.damage.add(item)
            return item

    def load_indexes(self) -> bool:
        """Use the index files if consistent with the log; False means call rebuild."""
        directory, base_offset = self.directory, self.base_offset
        offsets = self._read_index(segment_files.offset_index_path(directory, base_offset))
        times = self._read_index(segment_files.time_index_path(directory, base_offset))
        if offsets is None or times is None:
            return False
        offset_index = OffsetIndex.from_bytes(self.base_offset, offsets)
        time_index = TimeIndex.from_bytes(self.base_offset, times)
        if offset_index is None or time_index is None or time_index.offsets != offset_index.offsets:
            return False
        self.forget_recent()
        start = offset_index.positions[-1] if offset_index.positions else 0
        if start and not self._batch_starts_at(start, offset_index.offsets[-1]):
            return False
        self.offset_index, self.time_index = offset_index, time_index
        self.max_timestamp_ms = time_index.timestamps_ms[-1] if time_index.timestamps_ms else -1
        self.next_offset = offset_index.offsets[-1] if offset_index.offsets else self.base_offset
        end = start
        for position, header in scan_batches(self.fs, self.handle, start, self.size_bytes,
                                             validate=False, jumps=self.damage.jumps):
            self._bytes_since_index += header.size_bytes
            self.max_timestamp_ms = max(self.max_timestamp_ms, header.max_timestamp_ms)
            self.next_offset = header.last_offset + 1
            end = position + header.size_bytes
        return end == self.size_bytes

    def _read_index(self, path: str) -> bytes | None:
        if not self.fs.exists(path):
            return None
        handle = self.fs.open(path)
        try:
            return self.fs.pread(handle, self.fs.size(handle), 0)
        finally:
            self.fs.close(handle)

    def _batch_starts_at(self, position: int, offset: int) -> bool:
        data = self.fs.pread(self.handle, BATCH_HEADER_BYTES, position)
        if len(data) < BATCH_HEADER_BYTES:
            return False
        header = read_header(data)
        return header.magic == MAGIC and header.base_offset == offset

    def write_indexes(self) -> None:
        """Persist both indexes (derived data: no fsync needed, checked on load).

        Called when the segment is sealed (rolled, closed, rewritten): its memo of recent
        batches goes too, so sealed segments hold no memory for it."""
        self.forget_recent()
        for path, data in (
            (segment_files.offset_index_path(self.directory, self.base_offset),
             self.offset_index.to_bytes()),
            (segment_files.time_index_path(self.directory, self.base_offset),
             self.time_index.to_bytes()),
        ):
            handle = self.fs.open(path, create=True)
            try:
                self.fs.truncate(handle, 0)
                self.fs.pwrite(handle, data, 0)
            finally:
                self.fs.close(handle)

    # --- reading -----------------------------------------------------------------------
    def find_batch(self, offset: int, end: int) -> tuple[int, BatchHeader | None] | None:
        """Position and header of the first batch before ``end`` whose last offset >= offset.

        ``(position, None)``: the bytes at ``position`` are not a readable batch (call
        ``verify`` to set them aside); ``None``: no such batch before ``end``.
        """
        if self._recent and not self.damage.jumps:
            found = self._find_recent(offset, end)
            if found is not None:
                return found
        _, start = self.offset_index.lookup(offset)
        scan = BatchScan(self.fs, self.handle, start, end, validate=False,
                         chunk_bytes=LOOKUP_CHUNK_BYTES, jumps=self.damage.jumps)
        for position, header in scan:
            if header.last_offset >= offset:
                return position, header
        if scan.position < end:
            return scan.position, None
        return None

    def _find_recent(self, offset: int, end: int) -> tuple[int, BatchHeader] | None:
        """``find_batch`` from the memo when it can answer alone: the batch found is
        whole before ``end``, and it is the segment's first batch with last offset >=
        ``offset`` because the batch before it in the file (the memo's previous entry)
        ends below ``offset``, or it starts at or below ``offset``, or it is the first.

        None: ask the index. Unused while set-aside damage exists (readers must jump).
        """
        recent = self._recent
        index = bisect.bisect_left(self._recent_last_offsets, offset)
        if index == len(recent):
            return None  # past the last batch appended: the scan says so
        position, header = recent[index]
        if index == 0 and header.base_offset > offset and position != 0:
            return None  # a batch before the memo may hold it
        if position + header.size_bytes > end:
            return None  # not visible yet (or end cuts it): the scan's rules decide
        return position, header

    def forget_recent(self) -> None:
        """Empty the memo of recent batches (the segment's contents changed or sealed)."""
        self._recent.clear()  # in place: append's locals keep naming the memo
        self._recent_last_offsets.clear()

    def read_end(self, start: int, first_size: int, bytes_max: int, end: int) -> int:
        """End of the longest run of whole batches from ``start`` within bytes_max (>= 1).

        The recent-batch memo answers when it holds the batch after the first one."""
        result = start + first_size
        target = min(start + bytes_max, end)
        if target <= result:
            return result
        if self._recent and not self.damage.jumps:
            recent = self._recent
            index = bisect.bisect_left(recent, (result,))  # the batch starting at result
            if index < len(recent) and recent[index][0] == result:
                for position, header in recent[index:]:  # contiguous: no scan needed
                    if position + header.size_bytes > target:
                        break
                    result = position + header.size_bytes
                return result
        _, scan_from = self.offset_index.lookup_position(target)
        scan_from = max(scan_from, result)
        if scan_from > result:
            result = scan_from  # every batch between result and scan_from ends before it
        for position, header in scan_batches(self.fs, self.handle, scan_from, target,
                                             validate=False, chunk_bytes=LOOKUP_CHUNK_BYTES,
                                             jumps=self.damage.jumps):
            if position > result:
                break  # set-aside damage lies between: the slice stops before it
            result = position + header.size_bytes
        return result

    def batch_headers(self, start: int = 0) -> Iterator[tuple[int, BatchHeader]]:
        return scan_batches(self.fs, self.handle, start, self.size_bytes, validate=False,
                            jumps=self.damage.jumps)

    # --- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        self.fs.close(self.handle)

    def delete(self) -> None:
        """Close and remove the log (first) and its indexes; the caller fsyncs the directory."""
        self.close()
        for path in (self.log_path,
                     segment_files.offset_index_path(self.directory, self.base_offset),
                     segment_files.time_index_path(self.directory, self.base_offset)):
            if self.fs.exists(path):
                self.fs.remove(path)


__all__ = ["LOG_OVERHEAD_BYTES", "BatchScan", "Segment", "scan_batches"]
