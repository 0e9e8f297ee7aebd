"""Recovery: bring one partition directory to a consistent state when it is opened.

Owns the startup steps, in order: finish or roll back the suffix states compaction
leaves (``.cleaned``: delete; ``.swap``: rename over the live ``.log``), delete
temporary and orphaned index files, load each sealed segment's indexes (rebuilding
them when missing or inconsistent), and re-validate every batch of the active
segment. Trusts the log, never the indexes.

Only a torn tail is truncated: bytes after the last valid batch of the active
segment. A corrupt batch that valid batches follow is set aside (kept on disk,
skipped by readers, see storage/damage.py), in any segment; a bad tail of a sealed
segment is set aside too. Each truncation and set-aside is logged and returned as a
``RecoveryReport``; ``PartitionRecovery`` sums them up per partition (the API the
broker uses to clamp its state to the recovered log end).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

from conveyor.clock import Clock
from conveyor.storage import segment_files
from conveyor.storage.damage import Damage
from conveyor.storage.fs import FileSystem
from conveyor.storage.log_api import PartitionRecovery
from conveyor.storage.segment import Segment

logger = logging.getLogger(__name__)
__all__ = ["PartitionRecovery", "RecoveryReport", "load_segments"]


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What recovery changed in one segment file."""

    path: str
    position: int  # where the valid batches end (the file now ends here unless kept)
    truncated_bytes: int  # torn tail cut off (0 when nothing was truncated)
    truncated_from_offset: int = -1  # every offset >= this in the file was lost (-1: none)
    set_aside: tuple[Damage, ...] = ()  # corrupt ranges kept on disk, skipped by readers


def finish_suffix_states(fs: FileSystem, directory: str) -> None:
    """Complete interrupted compaction swaps and delete leftovers of interrupted writes."""
    changed = False
    for name in fs.list_dir(directory):
        path = posixpath.join(directory, name)
        if name.endswith(segment_files.CLEANED_SUFFIX) or name.endswith(".tmp"):
            fs.remove(path)
            changed = True
        elif name.endswith(segment_files.SWAP_SUFFIX):
            live = path[: -len(segment_files.SWAP_SUFFIX)]
            base_offset = segment_files.base_offset_of(posixpath.basename(live))
            if base_offset is not None:
                _remove_indexes(fs, directory, base_offset)
            fs.rename(path, live)
            changed = True
    if changed:
        fs.fsync_dir(directory)


def _remove_indexes(fs: FileSystem, directory: str, base_offset: int) -> None:
    for path in (segment_files.offset_index_path(directory, base_offset),
                 segment_files.time_index_path(directory, base_offset)):
        if fs.exists(path):
            fs.remove(path)


def recover_segment(segment: Segment, *, is_active: bool = True) -> RecoveryReport | None:
    """Validate every batch (CRC included), rebuild indexes; set aside or truncate damage."""
    file_bytes = segment.fs.size(segment.handle)
    valid_end = segment.rebuild(validate=True, contiguous=is_active)
    truncated_bytes, truncated_from = 0, -1
    if valid_end < file_bytes:
        if is_active:
            segment.fs.truncate(segment.handle, valid_end)
            segment.fs.fdatasync(segment.handle)
            truncated_bytes, truncated_from = file_bytes - valid_end, segment.next_offset
        else:
            segment.set_aside_tail(valid_end, "corrupt tail of a sealed segment")
    set_aside = tuple(segment.damage.take_unreported())
    if not truncated_bytes and not set_aside:
        return None
    report = RecoveryReport(segment.log_path, valid_end, truncated_bytes, truncated_from,
                            set_aside)
    for item in set_aside:
        logger.error("corrupt batch set aside (kept on disk, skipped by readers): %s at %d",
                     item.path, item.position,
                     extra={"path": item.path, "position": item.position,
                            "size_bytes": item.size_bytes, "first_offset": item.first_offset,
                            "next_offset": item.next_offset, "reason": item.reason})
    if truncated_bytes:
        logger.warning("truncated torn log tail: %s bytes at %s (offsets from %s lost)",
                       truncated_bytes, valid_end, truncated_from,
                       extra={"path": segment.log_path})
    return report


def load_segments(
    fs: FileSystem, directory: str, clock: Clock, *, index_interval_bytes: int,
) -> tuple[list[Segment], int, list[RecoveryReport]]:
    """Open a partition directory: (segments, log start offset, recovery reports)."""
    finish_suffix_states(fs, directory)
    names = fs.list_dir(directory)
    bases = sorted(base for base in map(segment_files.base_offset_of, names) if base is not None)
    log_start_offset = _read_log_start_offset(fs, directory)
    for name in names:
        stem, _, suffix = name.partition(".")
        if suffix in ("index", "timeindex") and stem.isdigit() and int(stem) not in bases:
            fs.remove(posixpath.join(directory, name))
    now_ms = clock.monotonic_ms()
    if not bases:
        segment = Segment.create(fs, directory, log_start_offset,
                                 index_interval_bytes=index_interval_bytes, created_ms=now_ms)
        return [segment], log_start_offset, []
    segments, reports = [], []
    for position, base_offset in enumerate(bases):
        segment = Segment.open(fs, directory, base_offset,
                               index_interval_bytes=index_interval_bytes, created_ms=now_ms)
        is_active = position == len(bases) - 1
        if is_active or not segment.load_indexes():
            report = recover_segment(segment, is_active=is_active)
            if report is not None:
                reports.append(report)
            if not is_active:
                segment.write_indexes()
        segments.append(segment)
    log_end = segments[-1].next_offset
    if log_start_offset > log_end:
        # the log-start file is durable while the records below it may not be
        # (fsync=interval/never): a crash can leave it past the recovered log end
        logger.warning("log start offset %d past the recovered log end %d in %s: "
                       "moved back", log_start_offset, log_end, directory)
        log_start_offset = log_end
        segment_files.write_file_atomically(
            fs, directory, segment_files.LOG_START_OFFSET_FILE, str(log_end).encode())
    return segments, log_start_offset, reports


def _read_log_start_offset(fs: FileSystem, directory: str) -> int:
    path = posixpath.join(directory, segment_files.LOG_START_OFFSET_FILE)
    if not fs.exists(path):
        return 0
    handle = fs.open(path)
    try:
        text = fs.pread(handle, 64, 0).decode(errors="replace").strip()
    finally:
        fs.close(handle)
    return int(text) if text.isdigit() else 0
