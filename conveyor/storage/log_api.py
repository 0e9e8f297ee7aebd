"""The LogStore seam: what the broker may ask of partition logs, in value types only.

Every backend (FileLogStore: segments on local disk; PostgresLogStore: one row per
RecordBatch) implements ``LogStore``; tests/storage/test_log_store_conformance.py runs
one suite against each. Nothing here names a file, a descriptor or SQL: a read returns
a ``LogSlice`` whose bytes are either in memory or an opaque file region the Kafka
listener may hand to ``os.sendfile`` (``parts``); every other reader calls
``read_bytes()``.

Offsets of a partition: ``log_start_offset`` <= every readable offset <
``high_watermark`` <= ``log_end_offset``. Readers never see past the high watermark
(records a crash could still lose). ``offsets()`` is synchronous: a backend keeps the
numbers of the partitions it serves in memory and moves them only after its own
durable appends (the PostgreSQL backend assigns offsets in the database, never from
that copy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from conveyor.errors import OperatingError

if TYPE_CHECKING:
    from conveyor.storage.fs import FileSystem
    from conveyor.storage.log_config import LogConfig

Payload = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class LogOffsets:
    log_start_offset: int
    high_watermark: int
    log_end_offset: int


@dataclass(frozen=True, slots=True)
class PartitionLease:
    """A cluster node's lease on a partition (conveyor/cluster writes it; opaque here):
    a store shared by nodes writes an append carrying it only while ``check`` (a SELECT
    taking owner-row names $1 and epochs $2, then ``parameters``, that share-locks the
    rows still this node's at those epochs under a live lease and returns their
    ``name, epoch``) returns (``name``, ``epoch``), in the append's own transaction;
    else the append is answered NotLeaderError."""

    name: str
    epoch: int
    check: str
    parameters: tuple[int | str, ...]


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """RecordBatch v2 bytes (one or more batches) for one partition; offsets are assigned
    by the store (the base offsets in ``batches`` are ignored and patched)."""

    topic: str
    partition: int
    batches: Payload
    # idempotent batches (producer id >= 0): a backend that several nodes share checks
    # their sequences against the producer's last batch in the partition inside the
    # append (PostgreSQL: under the head lock) and answers a retry with the offsets it
    # got the first time. The file backend leaves this to the broker's ProducerStates.
    check_sequences: bool = False
    # a cluster node's Kafka produce: its lease on the partition when it took the
    # append. None: not fenced (queue publishes and transaction markers are written by
    # any node; the file backend has no owners).
    lease: PartitionLease | None = None


@dataclass(frozen=True, slots=True)
class AppendInfo:
    base_offset: int
    last_offset: int
    log_append_time_ms: int  # -1: batches keep their create-time timestamps (as Kafka)
    max_timestamp_ms: int
    duplicate: bool = False  # a retry of batches already written at these offsets


# one outcome per AppendRequest, in order: a failure of one partition is its own
AppendOutcome = AppendInfo | OperatingError


@dataclass(frozen=True)
class LogSlice:
    """Whole batches from a read. Either ``data`` (in memory) or ``parts``: file regions
    (fileno, position, size) valid until the partition's retention deletes them, for
    ``os.sendfile``. ``read_bytes()`` always gives the bytes."""

    parts: tuple[tuple[int, int, int], ...] = ()
    _sources: tuple[tuple[FileSystem, int, int, int], ...] = field(default=(), repr=False)
    data: bytes = b""

    @property
    def size_bytes(self) -> int:
        if self.parts:
            return sum(size for _, _, size in self.parts)
        return len(self.data)

    def read_bytes(self) -> bytes:
        if not self._sources:
            return self.data
        return b"".join(fs.pread(handle, size, position)
                        for fs, handle, position, size in self._sources)


@dataclass(frozen=True, slots=True)
class PartitionUsage:
    """What metrics and admin APIs show of a partition (segments: 0 without segments)."""

    size_bytes: int
    segments: int
    max_timestamp_ms: int  # -1: no record
    damaged_batches: int = 0
    failed: bool = False  # appends refused until restart (an fsync failed)


@dataclass(frozen=True, slots=True)
class PartitionRecovery:
    """How a partition came out of recovery when the store opened it.

    ``log_end_offset`` is the next offset to be written after recovery; broker state
    (shared-group cursors, producer sequences, committed offsets) must not point
    past it. ``lost_from_offset`` >= 0 means records from there on (up to whatever
    the state remembers) were truncated away as a torn tail. ``skipped_offsets`` are
    the [first, next) ranges of set-aside corrupt batches (first = -1 when the
    corrupt header is unreadable; next = -1 when no valid batch follows it).
    ``reports``: the backend's own evidence (file backend: one RecoveryReport a file).
    """

    topic: str
    partition: int
    log_start_offset: int
    log_end_offset: int
    lost_from_offset: int = -1
    skipped_offsets: tuple[tuple[int, int], ...] = ()
    reports: tuple[object, ...] = field(default=())

    @property
    def clean(self) -> bool:
        return not self.reports and self.lost_from_offset < 0 and not self.skipped_offsets


class VisibleHook:
    """A LogStore's ``on_visible``: None (nobody listens) until the broker sets it."""

    on_visible: Callable[[str, int], None] | None = None


class LogStore(Protocol):
    """Partition logs under one root (a directory, a database). One event loop."""

    # told (on the loop) when a partition's high watermark advances, before the appends
    # it makes visible are answered: the broker wakes its waiting reads a loop turn
    # earlier than after the append returns (which tells it too). None: nobody listens;
    # a store may also never call it.
    on_visible: Callable[[str, int], None] | None

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    def partitions(self) -> list[tuple[str, int]]: ...
    def has_partition(self, topic: str, partition: int) -> bool: ...
    async def create_partition(self, topic: str, partition: int, config: LogConfig) -> object:
        """Create a partition (or, if it exists, apply ``config`` to it); callers of the
        seam ignore what it returns (the file backend hands its tests the PartitionLog)."""
    def config(self, topic: str, partition: int) -> LogConfig: ...
    async def set_config(self, topic: str, partition: int, config: LogConfig) -> None: ...
    async def delete_partition(self, topic: str, partition: int) -> None: ...
    def offsets(self, topic: str, partition: int) -> LogOffsets: ...

    async def append(self, requests: Sequence[AppendRequest]) -> list[AppendOutcome]:
        """Append everything a loop turn has, each request to its partition; returns once
        durable (per the partition's fsync policy). One outcome per request."""

    async def read(self, topic: str, partition: int, offset: int, bytes_max: int) -> LogSlice:
        """Whole batches from the one holding ``offset``: at least one batch (even past
        ``bytes_max``), empty at the high watermark; OffsetOutOfRangeError outside
        [log start, high watermark]."""

    async def record_for_timestamp(self, topic: str, partition: int,
                                   timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, own timestamp) of the first record with timestamp >= the target."""

    def set_aside(self, topic: str, partition: int, offset: int, reason: str) -> None:
        """A CRC-valid batch holding ``offset`` cannot be decoded: readers skip it."""

    async def delete_before(self, topic: str, partition: int, offset: int) -> None:
        """Move the log start to ``offset`` (at most the high watermark)."""

    async def truncate(self, topic: str, partition: int, offset: int) -> int:
        """Drop the tail: every batch whose last offset is >= ``offset``, durably, and
        return the new log end (= high watermark). Batches are never split: an offset
        inside a batch drops that whole batch, so the new end is then its base offset;
        below a compaction gap it is the end of the last batch kept, never below the log
        start. ``offset`` >= the log end changes nothing; below the log start:
        OffsetOutOfRangeError. For a leader-epoch truncation or a recovery that finds
        the tail unusable; Kafka's DeleteRecords (the head) is ``delete_before``. The
        caller holds back appends to the partition meanwhile and clamps the state that
        names dropped offsets (broker/log_end.py)."""

    async def compact(self, topic: str, partition: int) -> int:
        """Clean one ``cleanup.policy=compact`` partition now (0 for other policies):
        keep the latest record of every key, tombstones until ``delete_retention_ms``,
        records without a key; only batches older than ``min_compaction_lag_ms``.
        Offsets never change (gaps appear). Safe against appends running meanwhile and
        against a crash midway (readers see each batch either before or after).
        Returns how many units (file: segments; PostgreSQL: batch rows) were rewritten."""

    async def run_retention(self) -> None:
        """One pass of time/size retention and compaction over every partition."""

    def usage(self, topic: str, partition: int) -> PartitionUsage: ...
    def recovery(self, topic: str, partition: int) -> PartitionRecovery: ...
