"""Damage: finding, setting aside and remembering corrupt batches inside a segment file.

Owns: the search for the next valid batch after a corrupt one (``resync``), the
``Damage`` record of a byte range that is kept on disk but never served, and the
per-segment map of verified and damaged ranges (``SegmentDamage``). Pure over the
FileSystem seam; knows nothing of partitions, protocols or logging policy.

Kafka's recovery (LogSegment.recover) truncates at the first bad batch; we truncate
only when nothing valid follows (a torn tail). A corrupt batch that valid batches
follow is set aside: the bytes stay (for forensics and ``conveyor verify``), readers
jump over them, and the offsets it held are reported as skipped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from conveyor.errors import CorruptRecordError
from conveyor.storage.fs import FileSystem
from conveyor.storage.record_batch import (
    BATCH_HEADER_BYTES,
    MAGIC,
    BatchHeader,
    read_header,
    validate_batch,
)

RESYNC_CHUNK_BYTES = 1 << 20
_MAGIC_POSITION = 16


@dataclass(frozen=True, slots=True)
class Damage:
    """A corrupt byte range of a segment file that readers skip."""

    path: str
    position: int  # where the corrupt batch starts
    resume_position: int  # the next valid batch (or the end of the file)
    first_offset: int  # base offset the corrupt header claims (-1 when unreadable)
    next_offset: int  # base offset of the batch at resume_position (-1: none follows)
    reason: str

    @property
    def size_bytes(self) -> int:
        return self.resume_position - self.position


def check_batch(fs: FileSystem, handle: int, position: int, end: int) -> BatchHeader | str:
    """The header of a valid batch at ``position`` (CRC included), or why it is not one."""
    head = fs.pread(handle, BATCH_HEADER_BYTES, position)
    if len(head) < BATCH_HEADER_BYTES:
        return "truncated batch header"
    header = read_header(head)
    if header.magic != MAGIC:
        return f"bad magic {header.magic}"
    if header.size_bytes < BATCH_HEADER_BYTES or position + header.size_bytes > end:
        return f"bad batch length {header.batch_length}"
    try:
        return validate_batch(fs.pread(handle, header.size_bytes, position))
    except CorruptRecordError as error:
        return str(error)


def claimed_offset(fs: FileSystem, handle: int, position: int) -> int:
    head = fs.pread(handle, BATCH_HEADER_BYTES, position)
    return read_header(head).base_offset if len(head) == BATCH_HEADER_BYTES else -1


def resync(
    fs: FileSystem, handle: int, start: int, end: int, min_offset: int,
) -> tuple[int, BatchHeader] | None:
    """The first valid batch after ``start`` (exclusive) whose base offset >= min_offset.

    Candidates are positions with the magic byte in place; each is CRC-checked, so a
    stray 0x02 in a payload is not mistaken for a batch. Reads ``end - start`` bytes
    at most, in chunks.
    """
    position = start + 1
    while position + BATCH_HEADER_BYTES <= end:
        chunk = fs.pread(handle, min(RESYNC_CHUNK_BYTES, end - position), position)
        if len(chunk) < BATCH_HEADER_BYTES:
            return None
        search_from = _MAGIC_POSITION
        while True:
            found = chunk.find(MAGIC.to_bytes(1, "big"), search_from)
            if found < 0 or found - _MAGIC_POSITION + BATCH_HEADER_BYTES > len(chunk):
                break
            candidate = position + found - _MAGIC_POSITION
            header = read_header(chunk, found - _MAGIC_POSITION)
            if header.base_offset >= min_offset and header.size_bytes >= BATCH_HEADER_BYTES \
                    and candidate + header.size_bytes <= end:
                checked = check_batch(fs, handle, candidate, end)
                if isinstance(checked, BatchHeader):
                    return candidate, checked
            search_from = found + 1
        position += max(1, len(chunk) - BATCH_HEADER_BYTES + 1)
    return None


class SegmentDamage:
    """Verified ranges and set-aside damage of one segment file (in memory only).

    Verified ranges are merged half-open byte intervals whose batches passed the CRC
    check in this process (appended here, recovered, or checked on a first read), so
    each byte is checked at most once per process.
    """

    def __init__(self) -> None:
        self.damage: dict[int, Damage] = {}  # position -> damage starting there
        self.jumps: dict[int, int] = {}  # position -> resume position (for BatchScan)
        self.unreported: list[Damage] = []  # found but not yet logged/counted
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, item: Damage) -> bool:
        """Remember ``item``; False if it was already known."""
        if item.position in self.damage:
            return False
        self.damage[item.position] = item
        self.jumps[item.position] = item.resume_position
        self.unreported.append(item)
        return True

    def take_unreported(self) -> list[Damage]:
        found, self.unreported = self.unreported, []
        return found

    def mark_verified(self, start: int, end: int) -> None:
        if end <= start:
            return
        index = bisect.bisect_left(self._ends, start)
        stop = bisect.bisect_right(self._starts, end)
        if index < stop:
            start = min(start, self._starts[index])
            end = max(end, self._ends[stop - 1])
        self._starts[index:stop] = [start]
        self._ends[index:stop] = [end]

    def verified_until(self, position: int) -> int:
        """The end of the verified range holding ``position`` (``position`` if none)."""
        index = bisect.bisect_right(self._starts, position) - 1
        if index >= 0 and self._ends[index] > position:
            return self._ends[index]
        return position

    def forget_after(self, size_bytes: int) -> None:
        """The file was truncated to ``size_bytes``."""
        self.damage = {p: d for p, d in self.damage.items() if p < size_bytes}
        self.jumps = {p: d.resume_position for p, d in self.damage.items()}
        pairs = [(s, min(e, size_bytes)) for s, e in zip(self._starts, self._ends, strict=True)
                 if s < size_bytes]
        self._starts = [s for s, _ in pairs]
        self._ends = [e for _, e in pairs]
