"""PartitionLog: the ordered segments of one partition, its offsets and its read slices.

Owns: assigning offsets (patching base offsets of incoming batches), rolling segments
by size and age, the log start offset and high watermark, whole-batch read slices for
``os.sendfile``, timestamp lookup and deleting whole segments from the front.
Knows nothing of protocols, groups or why records are deleted.

Offsets: ``log_start_offset`` <= every readable offset < ``high_watermark``. The high
watermark is the next offset to be written once everything written is durable under
the fsync policy (single node: HW = log end after each acknowledged append); reads
never see bytes past it, so a consumer never sees a record a crash could lose.
Not thread-safe: called from one event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conveyor.clock import Clock
from conveyor.errors import (
    OffsetOutOfRangeError,
    PartitionFailedError,
    StorageError,
    StorageFullError,
)
from conveyor.fault_log import ConditionLog
from conveyor.storage import segment_files
from conveyor.storage.damage import Damage
from conveyor.storage.fs import FileSystem, in_thread
from conveyor.storage.group_commit import GroupCommitter
from conveyor.storage.log_api import AppendInfo, LogSlice
from conveyor.storage.record_batch import (
    BatchHeader,
    decode_records,
    patch_base_offset,
    read_header,
    split_batches,
)
from conveyor.storage.segment import Segment

if TYPE_CHECKING:
    from collections.abc import Callable

    from conveyor.storage.log_api import PartitionRecovery
    from conveyor.storage.log_config import LogConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Written:
    segment: Segment
    end_position: int
    end_offset: int


class PartitionLog:
    def __init__(
        self, fs: FileSystem, directory: str, clock: Clock, config: LogConfig,
        segments: list[Segment], log_start_offset: int,
    ) -> None:
        assert segments, "a partition log always has an active segment"
        self.fs = fs
        self.directory = directory
        self.clock = clock
        self.config = config
        self.segments = segments
        self._log_start_offset = max(log_start_offset, segments[0].base_offset)
        active = segments[-1]
        self._visible = _Written(active, active.size_bytes, active.next_offset)
        self.committer = self._new_committer()
        self.recovery: PartitionRecovery | None = None  # set by the LogStore that opened it
        self.damaged_batches = 0  # corrupt batches found and set aside since open
        self.faults = ConditionLog(logger, clock)  # full disk etc.: once per condition
        # the log start offset as durable in its file
        self._log_start_written = self._log_start_offset
        # held by whatever changes the set of segment files off the loop (the log-start
        # file, retention, compaction, deleting the partition): one at a time
        self.maintenance = asyncio.Lock()
        self.closed = False
        # told when the high watermark advances, before the appends it covers are
        # answered (in the durability pass's callback under fsync=always): the log store
        # passes it on to whoever wakes the partition's readers
        self.on_visible: Callable[[], None] | None = None

    def _new_committer(self) -> GroupCommitter:
        committer = GroupCommitter(self.fs, self.clock, policy=self.config.fsync,
                                   interval_ms=self.config.fsync_interval_ms,
                                   on_durable=self._advance_visible)
        committer.name = self.directory
        return committer

    @property
    def failed(self) -> PartitionFailedError | None:
        """Set after an fdatasync failure: appends are refused with it until restart."""
        return self.committer.failed

    def _advance_visible(self, written: _Written) -> None:
        if written.end_offset > self._visible.end_offset:
            self._visible = written
            if self.on_visible is not None:
                try:
                    self.on_visible()
                except Exception:  # a reader's wake must not keep the appends unanswered
                    logger.exception("waking the readers of %s failed", self.directory)

    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def high_watermark(self) -> int:
        return self._visible.end_offset

    @property
    def log_end_offset(self) -> int:
        return self.segments[-1].next_offset

    @property
    def visible_segment(self) -> Segment:
        """The segment holding the high watermark."""
        return self._visible.segment

    @property
    def active_segment(self) -> Segment:
        return self.segments[-1]

    def update_config(self, config: LogConfig) -> None:
        self.committer.policy = config.fsync
        self.committer.interval_ms = config.fsync_interval_ms
        self.config = config

    # --- append ------------------------------------------------------------------------
    async def append(self, batches: bytes | bytearray | memoryview) -> AppendInfo:
        """Validate, assign offsets, write; return once durable under the fsync policy."""
        info, durable = self.write(batches)
        await durable
        return info

    def write(self, batches: bytes | bytearray | memoryview
              ) -> tuple[AppendInfo, asyncio.Future[None]]:
        """Validate, assign offsets and write now; the future resolves once durable."""
        if self.committer.failed is not None:
            raise self.committer.failed
        headers = split_batches(batches)
        payload = bytearray(batches)
        base_offset = next_offset = self.log_end_offset
        patched: list[tuple[int, BatchHeader]] = []
        for position, header in headers:
            patch_base_offset(payload, next_offset, position)
            patched.append((position, read_header(payload, position)))  # the new offset
            next_offset += header.last_offset_delta + 1
        condition = f"disk full writing {self.directory}"
        try:
            self._maybe_roll(len(payload))
            segment = self.active_segment
            segment.append(payload, patched)
        except StorageFullError as error:
            self.faults.failed(condition, error)
            raise
        self.faults.recovered(condition)
        written = _Written(segment, segment.size_bytes, segment.next_offset)
        durable = self.committer.wrote(segment.handle, written)
        return AppendInfo(base_offset, next_offset - 1, -1,
                          max(header.max_timestamp_ms for _, header in headers)), durable

    def _maybe_roll(self, incoming_bytes: int) -> None:
        active = self.active_segment
        if active.size_bytes == 0:
            return
        too_big = active.size_bytes + incoming_bytes > self.config.segment_bytes
        too_old = self.clock.monotonic_ms() - active.created_ms >= self.config.segment_ms
        if too_big or too_old:
            try:
                self.roll()
            except OSError as error:
                error_type = StorageFullError if error.errno == errno.ENOSPC else StorageError
                raise error_type("cannot roll segment", directory=self.directory,
                                 reason=str(error)) from error

    def roll(self) -> Segment:
        """Seal the active segment (write its indexes) and start a new one at log end.

        The new file's directory entry is made durable by the committer's next pass, with
        the first records written to it (no directory fsync on the event loop); until
        then nothing in it is acknowledged, and recovery of a lost entry loses only them."""
        self.active_segment.write_indexes()
        segment = Segment.create(self.fs, self.directory, self.log_end_offset,
                                 index_interval_bytes=self.config.index_interval_bytes,
                                 created_ms=self.clock.monotonic_ms(), sync_directory=False)
        self.committer.new_file(self.directory)
        self.segments.append(segment)
        return segment

    # --- read --------------------------------------------------------------------------
    def _visible_end(self, segment: Segment) -> int:
        if segment is self._visible.segment:
            return self._visible.end_position
        if segment.base_offset < self._visible.segment.base_offset:
            return segment.size_bytes
        return 0

    def _check_range(self, offset: int) -> None:
        if not self._log_start_offset <= offset <= self.high_watermark:
            raise OffsetOutOfRangeError(
                "offset out of range", offset=offset, log_start_offset=self._log_start_offset,
                high_watermark=self.high_watermark,
            )

    def _segments_from(self, offset: int) -> list[Segment]:
        bases = [segment.base_offset for segment in self.segments]
        return self.segments[max(0, bisect.bisect_right(bases, offset) - 1):]

    def read(self, offset: int, bytes_max: int) -> LogSlice:
        """Whole batches from the one holding ``offset``; at least one batch, empty at HW.

        A slice stays within one segment (as Kafka's fetch); the caller reads on from the
        offset after its last record. Parts stay valid until the segment is deleted.
        """
        self._check_range(offset)
        if offset == self.high_watermark:
            return LogSlice()
        for segment in self._segments_from(offset):
            end = self._visible_end(segment)
            while True:
                found = segment.find_batch(offset, end)
                if found is None:
                    break
                position, header = found
                stop = end if header is None else segment.read_end(
                    position, header.size_bytes, bytes_max, end)
                damage = segment.verify(position, stop)
                self._report_damage(segment)
                if damage is not None:
                    if damage.position == position:
                        continue  # set aside now: look again past it
                    stop = damage.position
                size = stop - position
                return LogSlice(((self.fs.fileno(segment.handle), position, size),),
                                ((self.fs, segment.handle, position, size),))
        return LogSlice()

    def set_aside_batch(self, offset: int, reason: str) -> Damage | None:
        """Set aside the batch holding ``offset``: its CRC holds but its records cannot be
        decoded (written before ingress checked them, or by a client whose batches only
        Kafka readers saw). Logged once like on-disk damage; every reader skips it from
        now on, in this process (a restart finds it again on the first decode)."""
        for segment in self._segments_from(offset):
            found = segment.find_batch(offset, self._visible_end(segment))
            if found is None:
                continue
            position, header = found
            if header is None or header.base_offset > offset:
                return None  # already skipped, or on-disk damage read() handles
            item = Damage(segment.log_path, position, position + header.size_bytes,
                          header.base_offset, header.last_offset + 1, reason)
            segment.damage.add(item)
            self._report_damage(segment)
            return item
        return None

    def _report_damage(self, segment: Segment) -> None:
        for item in segment.damage.take_unreported():
            self.damaged_batches += 1
            log_damage(item)

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """The first offset whose record timestamp is >= ``timestamp_ms``, or None."""
        found = self.record_for_timestamp(timestamp_ms)
        return None if found is None else found[0]

    def record_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, own timestamp) of the first record whose timestamp is >= the target
        (Kafka's ListOffsets answers both), or None."""
        for segment in self.segments:
            if segment.max_timestamp_ms < timestamp_ms:
                continue
            _, start = segment.offset_index.lookup(segment.time_index.lookup(timestamp_ms))
            end = self._visible_end(segment)
            for position, header in segment.batch_headers(start):
                if position >= end:
                    break
                start_offset = self._log_start_offset
                if header.max_timestamp_ms < timestamp_ms or header.last_offset < start_offset:
                    continue
                data = self.fs.pread(segment.handle, header.size_bytes, position)
                for record in decode_records(data):
                    if record.timestamp_ms >= timestamp_ms and record.offset >= start_offset:
                        return record.offset, record.timestamp_ms
        return None

    # --- deletion ----------------------------------------------------------------------
    async def delete_before(self, offset: int) -> None:
        """Advance the log start offset to ``offset`` and delete segments wholly below it.

        Readers see the new start at once; the ``log-start-offset`` file (write, fdatasync,
        rename, directory fsync) is written in a worker thread, one write at a time, each
        with the newest start; the call returns once the start it set is durable."""
        offset = min(offset, self.high_watermark)
        if offset <= self._log_start_offset:
            return
        self._log_start_offset = offset
        async with self.maintenance:
            if self.closed:
                return
            target = self._log_start_offset
            if target > self._log_start_written:
                await in_thread(segment_files.write_file_atomically, self.fs, self.directory,
                                segment_files.LOG_START_OFFSET_FILE, str(target).encode())
                self._log_start_written = target
            doomed = [segment.base_offset for segment in self.segments[:-1]
                      if segment.next_offset <= self._log_start_offset]
            await self.delete_segments(doomed)

    async def delete_segments(self, base_offsets: list[int]) -> None:
        """Delete these (non-active) segments; the log start moves past a deleted prefix.
        The files are unlinked now; the directory fsync runs in a worker thread. The
        caller holds ``maintenance``."""
        doomed = set(base_offsets) - {self.active_segment.base_offset}
        doomed &= {segment.base_offset for segment in self.segments}
        if not doomed:
            return
        for segment in [segment for segment in self.segments if segment.base_offset in doomed]:
            self.committer.forget(segment.handle)
            segment.delete()
        self.segments = [segment for segment in self.segments if segment.base_offset not in doomed]
        self._log_start_offset = max(self._log_start_offset, self.segments[0].base_offset)
        await in_thread(self.fs.fsync_dir, self.directory)

    async def truncate(self, offset: int) -> int:
        """Drop every batch whose last offset is >= ``offset`` (the LogStore seam's
        ``truncate``: later segments deleted, the one holding the cut cut at a batch
        boundary, the cut made durable by an fdatasync in a worker thread); return the
        new log end."""
        if offset < self._log_start_offset:
            raise OffsetOutOfRangeError(
                "truncation below the log start", offset=offset,
                log_start_offset=self._log_start_offset)
        async with self.maintenance:  # compaction and retention stay out meanwhile
            await self.committer.settle()  # writes in flight: durable (or failed) first
            if offset >= self.log_end_offset:
                return self.log_end_offset
            doomed = [segment for segment in self.segments[1:] if segment.base_offset >= offset]
            for segment in doomed:
                self.committer.forget(segment.handle)
                segment.delete()
            self.segments = self.segments[:len(self.segments) - len(doomed)]
            segment = self.active_segment
            cut = next((position for position, header in segment.batch_headers()
                        if header.last_offset >= offset), segment.size_bytes)
            segment.truncate_to(cut)
            if segment.next_offset < self._log_start_offset:  # a compaction gap under the cut
                segment.write_indexes()
                self.segments.append(Segment.create(
                    self.fs, self.directory, self._log_start_offset,
                    index_interval_bytes=self.config.index_interval_bytes,
                    created_ms=self.clock.monotonic_ms()))
            active = self.active_segment
            try:
                # the cut, then the deleted and created names (as delete_segments)
                await in_thread(self._sync_cut, segment.handle)
            except OSError as error:
                raise self.committer.fail(error) from error
            self.committer.truncated()
            self._visible = _Written(active, active.size_bytes, active.next_offset)
            logger.warning("log truncated: %s from offset %d (log end now %d)", self.directory,
                           offset, active.next_offset)
            return active.next_offset

    def _sync_cut(self, handle: int) -> None:
        """In a worker thread: the truncated file's new length, then its directory."""
        self.fs.fdatasync(handle)
        self.fs.fsync_dir(self.directory)

    async def close(self) -> None:
        self.closed = True
        await self.committer.close()
        self.active_segment.write_indexes()
        for segment in self.segments:
            segment.close()


def log_damage(item: Damage) -> None:
    """One ERROR line per corrupt batch found by a reader (server-side corruption)."""
    logger.error("corrupt batch on disk set aside; readers skip offsets [%s, %s): %s at %d "
                 "(%s)", item.first_offset if item.first_offset >= 0 else "?",
                 item.next_offset if item.next_offset >= 0 else "end", item.path,
                 item.position, item.reason,
                 extra={"path": item.path, "position": item.position,
                        "size_bytes": item.size_bytes, "first_offset": item.first_offset,
                        "next_offset": item.next_offset, "reason": item.reason})

