"""FileLogStore: the file backend of the LogStore seam (storage/log_api.py).

Owns: the set of partitions under one data root (``<root>/<topic>-<partition>/``),
their LogConfig, opening them with recovery, and the periodic retention/compaction
pass. Knows nothing of protocols, groups or topics beyond their names. The broker
sees only the LogStore methods; ``partition()`` (the PartitionLog itself, segments
and descriptors) is for this package, its tests and ``conveyor verify``.
Time and the file system come in through the constructor. Not thread-safe: one loop
(a new partition's files are made in a worker thread, nothing shared is touched there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import posixpath
from collections.abc import Sequence

from conveyor.clock import Clock
from conveyor.errors import OperatingError, UnknownPartitionError
from conveyor.storage import compaction, segment_files
from conveyor.storage.fs import FileSystem, in_thread
from conveyor.storage.log_api import (
    AppendInfo,
    AppendOutcome,
    AppendRequest,
    LogOffsets,
    LogSlice,
    LogStore,
    PartitionRecovery,
    PartitionUsage,
    VisibleHook,
)
from conveyor.storage.log_config import CleanupPolicy, FsyncPolicy, LogConfig
from conveyor.storage.partition_log import PartitionLog
from conveyor.storage.recovery import RecoveryReport, load_segments
from conveyor.storage.retention import RetentionPolicy, SegmentInfo, segments_to_delete
from conveyor.storage.segment import Segment

CONFIG_FILE = "log-config.json"
# what load_segments returns: (segments, log start offset, recovery reports)
_Opened = tuple[list[Segment], int, list[RecoveryReport]]
__all__ = ["CONFIG_FILE", "CleanupPolicy", "FileLogStore", "FsyncPolicy", "LogConfig", "LogStore"]


class FileLogStore(VisibleHook):  # told when a high watermark advances
    def __init__(self, root: str | os.PathLike[str], fs: FileSystem, clock: Clock,
                 default_config: LogConfig | None = None) -> None:
        self.root = os.fspath(root)
        self.fs = fs
        self.clock = clock
        self.default_config = default_config or LogConfig()
        self._logs: dict[tuple[str, int], PartitionLog] = {}
        # (topic, partition) -> resolved when its creation (files in a thread) ends
        self._creating: dict[tuple[str, int], asyncio.Future[None]] = {}
        self.recovery_reports: list[RecoveryReport] = []

    def _visible(self, topic: str, partition: int) -> None:
        if self.on_visible is not None:
            self.on_visible(topic, partition)

    async def open(self) -> None:
        """Scan the root and recover every partition directory found."""
        self.fs.make_dirs(self.root)
        for name in self.fs.list_dir(self.root):
            parsed = segment_files.parse_partition_directory(name)
            if parsed is not None and parsed not in self._logs:
                config = self._read_config(posixpath.join(self.root, name))
                self._logs[parsed] = self._load(parsed[0], parsed[1], config)

    def _read_config(self, directory: str) -> LogConfig:
        """The config saved beside the segments (so retention is right before redeclaring)."""
        path = posixpath.join(directory, CONFIG_FILE)
        if not self.fs.exists(path):
            return self.default_config
        handle = self.fs.open(path)
        try:
            saved = json.loads(self.fs.pread(handle, self.fs.size(handle), 0))
        except ValueError:
            return self.default_config
        finally:
            self.fs.close(handle)
        fields = {field.name for field in dataclasses.fields(LogConfig)}
        return LogConfig(**{key: value for key, value in saved.items() if key in fields})

    def _write_config(self, directory: str, config: LogConfig) -> None:
        data = json.dumps(dataclasses.asdict(config), sort_keys=True).encode()
        segment_files.write_file_atomically(self.fs, directory, CONFIG_FILE, data)

    def _load(self, topic: str, partition: int, config: LogConfig) -> PartitionLog:
        directory = segment_files.partition_directory(self.root, topic, partition)
        opened = load_segments(self.fs, directory, self.clock,
                               index_interval_bytes=config.index_interval_bytes)
        return self._open_log(topic, partition, config, opened)

    def _open_log(self, topic: str, partition: int, config: LogConfig,
                  opened: _Opened) -> PartitionLog:
        directory = segment_files.partition_directory(self.root, topic, partition)
        segments, log_start_offset, reports = opened
        self.recovery_reports.extend(reports)
        log = PartitionLog(self.fs, directory, self.clock, config, segments, log_start_offset)
        log.on_visible = functools.partial(self._visible, topic, partition)
        lost = [report.truncated_from_offset for report in reports if report.truncated_bytes]
        log.recovery = PartitionRecovery(
            topic, partition, log.log_start_offset, log.log_end_offset,
            lost_from_offset=min(lost) if lost else -1,
            skipped_offsets=tuple((item.first_offset, item.next_offset)
                                  for report in reports for item in report.set_aside),
            reports=tuple(reports))
        log.damaged_batches = sum(len(report.set_aside) for report in reports)
        return log

    # --- the LogStore seam ----------------------------------------------------------------
    def has_partition(self, topic: str, partition: int) -> bool:
        return (topic, partition) in self._logs

    def config(self, topic: str, partition: int) -> LogConfig:
        return self.partition(topic, partition).config

    async def set_config(self, topic: str, partition: int, config: LogConfig) -> None:
        await self.update_config(topic, partition, config)

    def offsets(self, topic: str, partition: int) -> LogOffsets:
        log = self.partition(topic, partition)
        return LogOffsets(log.log_start_offset, log.high_watermark, log.log_end_offset)

    async def append(self, requests: Sequence[AppendRequest]) -> list[AppendOutcome]:
        """Write every request now (each partition's bytes in one write), then wait for
        their group commits: appends of one call share the fsyncs of one loop turn."""
        if len(requests) == 1:  # the hot path: no list of futures
            request = requests[0]
            try:
                return [await self.partition(request.topic, request.partition)
                        .append(request.batches)]
            except OperatingError as error:
                return [error]
        written: list[tuple[AppendInfo, asyncio.Future[None]] | OperatingError] = []
        for request in requests:
            try:
                written.append(self.partition(request.topic, request.partition)
                               .write(request.batches))
            except OperatingError as error:
                written.append(error)
        outcomes: list[AppendOutcome] = []
        for item in written:
            if isinstance(item, OperatingError):
                outcomes.append(item)
                continue
            info, durable = item
            try:
                await durable
            except OperatingError as error:
                outcomes.append(error)
            else:
                outcomes.append(info)
        return outcomes

    async def read(self, topic: str, partition: int, offset: int, bytes_max: int) -> LogSlice:
        return self.partition(topic, partition).read(offset, bytes_max)

    async def record_for_timestamp(self, topic: str, partition: int,
                                   timestamp_ms: int) -> tuple[int, int] | None:
        return self.partition(topic, partition).record_for_timestamp(timestamp_ms)

    def set_aside(self, topic: str, partition: int, offset: int, reason: str) -> None:
        self.partition(topic, partition).set_aside_batch(offset, reason)

    async def delete_before(self, topic: str, partition: int, offset: int) -> None:
        await self.partition(topic, partition).delete_before(offset)

    async def truncate(self, topic: str, partition: int, offset: int) -> int:
        return await self.partition(topic, partition).truncate(offset)

    async def compact(self, topic: str, partition: int) -> int:
        log = self.partition(topic, partition)
        if log.config.cleanup_policy != "compact":
            return 0
        return await compaction.compact(log, self.clock.wall_ms())

    def usage(self, topic: str, partition: int) -> PartitionUsage:
        log = self.partition(topic, partition)
        segments = log.segments
        return PartitionUsage(
            sum(segment.size_bytes for segment in segments), len(segments),
            max((segment.max_timestamp_ms for segment in segments), default=-1),
            log.damaged_batches, log.failed is not None)

    def recovery(self, topic: str, partition: int) -> PartitionRecovery:
        """How this partition came out of recovery when it was opened (log end, losses)."""
        recovery = self.partition(topic, partition).recovery
        assert recovery is not None, "FileLogStore sets recovery on every log it opens"
        return recovery

    def partitions(self) -> list[tuple[str, int]]:
        return sorted(self._logs)

    async def create_partition(self, topic: str, partition: int,
                               config: LogConfig) -> PartitionLog:
        """Create (or, if it exists, reconfigure and return) a partition log.

        The files (directory, config, first segment: four fsyncs, ~10 ms on a disk)
        are made in a worker thread: a request creating thousands of partitions kept
        the event loop, and so every client of every protocol, waiting for a minute.
        """
        key = (topic, partition)
        while key in self._creating:  # one creation per partition at a time
            await asyncio.shield(self._creating[key])
        if key in self._logs:
            await self.update_config(topic, partition, config)
            return self._logs[key]
        directory = segment_files.partition_directory(self.root, topic, partition)
        created: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._creating[key] = created
        try:
            opened = await in_thread(self._create_files, directory, config)
            log = self._logs[key] = self._open_log(topic, partition, config, opened)
        finally:
            del self._creating[key]
            created.set_result(None)
        return log

    def _create_files(self, directory: str, config: LogConfig) -> _Opened:
        """The file work of a new partition (worker thread; touches nothing shared)."""
        self.fs.make_dirs(directory)
        self.fs.fsync_dir(self.root)
        self._write_config(directory, config)
        return load_segments(self.fs, directory, self.clock,
                             index_interval_bytes=config.index_interval_bytes)

    def partition(self, topic: str, partition: int) -> PartitionLog:
        try:
            return self._logs[(topic, partition)]
        except KeyError:
            raise UnknownPartitionError("unknown partition", topic=topic,
                                        partition=partition) from None

    async def update_config(self, topic: str, partition: int, config: LogConfig) -> None:
        """The new config in effect now; its file written (and fsynced) in a worker thread."""
        log = self.partition(topic, partition)
        if config != log.config:
            log.update_config(config)
            async with log.maintenance:  # one write at a time, each of the newest config
                if not log.closed:
                    await in_thread(self._write_config, log.directory, log.config)

    async def delete_partition(self, topic: str, partition: int) -> None:
        log = self.partition(topic, partition)
        async with log.maintenance:  # a compaction or retention pass ends first
            await log.close()
            del self._logs[(topic, partition)]
            await in_thread(self._remove_files, log.directory)

    def _remove_files(self, directory: str) -> None:
        """A deleted partition's directory, in a worker thread (nothing shared is touched)."""
        for name in self.fs.list_dir(directory):
            self.fs.remove(f"{directory}/{name}")
        self.fs.remove_dir(directory)
        self.fs.fsync_dir(self.root)

    async def run_retention(self) -> None:
        """One pass: time/size retention for ``delete`` logs, cleaning for ``compact`` logs."""
        now_ms = self.clock.wall_ms()
        for log in list(self._logs.values()):
            config = log.config
            if config.cleanup_policy == "delete":
                infos = [SegmentInfo(segment.base_offset, segment.size_bytes,
                                     segment.max_timestamp_ms) for segment in log.segments]
                policy = RetentionPolicy(config.retention_ms, config.retention_bytes)
                doomed = segments_to_delete(infos, policy, now_ms)
                if doomed:
                    async with log.maintenance:
                        if not log.closed:
                            await log.delete_segments(doomed)
            elif config.cleanup_policy == "compact":
                await compaction.compact(log, now_ms)

    async def close(self) -> None:
        for log in list(self._logs.values()):
            async with log.maintenance:  # a compaction or retention pass ends first
                await log.close()
        self._logs.clear()
