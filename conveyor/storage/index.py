"""OffsetIndex and TimeIndex: sparse, derived lookups from offsets/timestamps to positions.

Owns the in-memory entries and the file format of the two per-segment indexes. They
are derived data, written without fsync and rebuilt from the .log when missing or
damaged; so each file ends with a CRC32C of its entries (4 bytes, big-endian). Without
it a crash that tore or flipped a bit in an entry's position went unnoticed (only the
last entry was checked against the log), a read landed mid-batch, and a sound batch of
acknowledged records was set aside as corrupt (found by test_recovery's random crashes).

OffsetIndex file: entries of 8 bytes, big-endian (relative offset uint32, position
uint32), strictly increasing in both. An entry means "a batch starts at this position
and its base offset is base_offset + relative offset".
TimeIndex file: entries of 12 bytes (timestamp int64, relative offset uint32). The entry
(T, O) means "every batch before offset O has max timestamp <= T" and O has an
OffsetIndex entry; T is non-decreasing, so a search can skip every batch before O when
T is below the wanted timestamp. Not thread-safe.
"""

from __future__ import annotations

import bisect
import struct

import crc32c

OFFSET_ENTRY = struct.Struct(">II")
TIME_ENTRY = struct.Struct(">qI")
_CHECKSUM = struct.Struct(">I")


def _sealed(entries: bytes) -> bytes:
    return entries + _CHECKSUM.pack(crc32c.crc32c(entries))


def _entries(data: bytes, entry_bytes: int) -> bytes | None:
    """The entries of a file whose checksum matches, else None."""
    if len(data) < _CHECKSUM.size or (len(data) - _CHECKSUM.size) % entry_bytes:
        return None
    entries, (checksum,) = data[:-_CHECKSUM.size], _CHECKSUM.unpack(data[-_CHECKSUM.size:])
    return entries if crc32c.crc32c(entries) == checksum else None


class OffsetIndex:
    def __init__(self, base_offset: int) -> None:
        self.base_offset = base_offset
        self.offsets: list[int] = []
        self.positions: list[int] = []

    def append(self, offset: int, position: int) -> None:
        assert not self.offsets or (offset > self.offsets[-1] and position > self.positions[-1])
        self.offsets.append(offset)
        self.positions.append(position)

    def lookup(self, offset: int) -> tuple[int, int]:
        """(offset, position) of the last entry at or before ``offset``; segment start if none."""
        index = bisect.bisect_right(self.offsets, offset) - 1
        if index < 0:
            return self.base_offset, 0
        return self.offsets[index], self.positions[index]

    def lookup_position(self, position: int) -> tuple[int, int]:
        """(offset, position) of the last entry at or before file ``position``."""
        index = bisect.bisect_right(self.positions, position) - 1
        if index < 0:
            return self.base_offset, 0
        return self.offsets[index], self.positions[index]

    def truncate_to_position(self, position: int) -> None:
        keep = bisect.bisect_left(self.positions, position)
        del self.offsets[keep:], self.positions[keep:]

    def to_bytes(self) -> bytes:
        return _sealed(b"".join(
            OFFSET_ENTRY.pack(offset - self.base_offset, position)
            for offset, position in zip(self.offsets, self.positions, strict=True)
        ))

    @classmethod
    def from_bytes(cls, base_offset: int, data: bytes) -> OffsetIndex | None:
        """Parse a file; None when its checksum, size or ordering shows it is damaged."""
        entries = _entries(data, OFFSET_ENTRY.size)
        if entries is None:
            return None
        index = cls(base_offset)
        for relative, position in OFFSET_ENTRY.iter_unpack(entries):
            if index.offsets and (base_offset + relative <= index.offsets[-1]
                                  or position <= index.positions[-1]):
                return None
            index.append(base_offset + relative, position)
        return index


class TimeIndex:
    def __init__(self, base_offset: int) -> None:
        self.base_offset = base_offset
        self.timestamps_ms: list[int] = []
        self.offsets: list[int] = []

    def append(self, timestamp_ms: int, offset: int) -> None:
        if self.timestamps_ms:
            timestamp_ms = max(timestamp_ms, self.timestamps_ms[-1])
        self.timestamps_ms.append(timestamp_ms)
        self.offsets.append(offset)

    def lookup(self, timestamp_ms: int) -> int:
        """An offset such that every batch before it has max timestamp < ``timestamp_ms``."""
        index = bisect.bisect_left(self.timestamps_ms, timestamp_ms) - 1
        return self.base_offset if index < 0 else self.offsets[index]

    def truncate_to_offset(self, offset: int) -> None:
        keep = bisect.bisect_left(self.offsets, offset)
        del self.timestamps_ms[keep:], self.offsets[keep:]

    def to_bytes(self) -> bytes:
        return _sealed(b"".join(
            TIME_ENTRY.pack(timestamp_ms, offset - self.base_offset)
            for timestamp_ms, offset in zip(self.timestamps_ms, self.offsets, strict=True)
        ))

    @classmethod
    def from_bytes(cls, base_offset: int, data: bytes) -> TimeIndex | None:
        entries = _entries(data, TIME_ENTRY.size)
        if entries is None:
            return None
        index = cls(base_offset)
        for timestamp_ms, relative in TIME_ENTRY.iter_unpack(entries):
            if index.offsets and (timestamp_ms < index.timestamps_ms[-1]
                                  or base_offset + relative <= index.offsets[-1]):
                return None
            index.append(timestamp_ms, base_offset + relative)
        return index
