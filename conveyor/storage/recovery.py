"""Recovery: bring one partition directory to a consistent state when it is opened.

Owns the startup steps, in order: finish or roll back the suffix states compaction
leaves (``.cleaned``: delete; ``.swap``: rename over the live ``.log``), delete
temporary and orphaned index files, load each sealed segment's indexes (rebuilding
them when missing or inconsistent), and re-validate every batch of the active
segment, truncating a torn or corrupt tail. Trusts the log, never the indexes.
Each truncation is logged and returned as a ``RecoveryReport``.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

from conveyor.clock import Clock
from conveyor.storage import segment_files
from conveyor.storage.fs import FileSystem
from conveyor.storage.segment import Segment

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    path: str
    position: int  # where the valid batches end (the file now ends here)
    truncated_bytes: int


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


def recover_segment(segment: Segment, *, contiguous: bool = False) -> RecoveryReport | None:
    """Validate every batch (CRC included), rebuild indexes and truncate a bad tail."""
    file_bytes = segment.fs.size(segment.handle)
    valid_end = segment.rebuild(validate=True, contiguous=contiguous)
    if valid_end == file_bytes:
        return None
    segment.fs.truncate(segment.handle, valid_end)
    segment.fs.fdatasync(segment.handle)
    report = RecoveryReport(segment.log_path, valid_end, file_bytes - valid_end)
    logger.warning("truncated torn or corrupt log tail: %s", report)
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
            report = recover_segment(segment, contiguous=is_active)
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
