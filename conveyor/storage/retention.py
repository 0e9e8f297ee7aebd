"""Retention: which whole segments a ``delete`` policy removes. Pure functions, no I/O.

Only a prefix of the log is ever deleted (oldest first) and never the active segment.
By time: a segment goes once its newest record is older than ``retention_ms``
(``-1`` disables). By size: the oldest segments go while the partition stays above
``retention_bytes`` without them (``-1`` disables).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    base_offset: int
    size_bytes: int
    max_timestamp_ms: int  # -1 when the segment is empty


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    retention_ms: int = -1
    retention_bytes: int = -1


def segments_to_delete(
    segments: list[SegmentInfo], policy: RetentionPolicy, now_ms: int
) -> list[int]:
    """Base offsets of the prefix of ``segments`` (oldest first, last = active) to delete."""
    sealed = segments[:-1]
    total_bytes = sum(segment.size_bytes for segment in segments)
    doomed: list[int] = []
    for segment in sealed:
        expired = policy.retention_ms >= 0 and (
            0 <= segment.max_timestamp_ms < now_ms - policy.retention_ms
        )
        oversized = policy.retention_bytes >= 0 and (
            total_bytes - segment.size_bytes >= policy.retention_bytes
        )
        if not (expired or oversized):
            break
        doomed.append(segment.base_offset)
        total_bytes -= segment.size_bytes
    return doomed
