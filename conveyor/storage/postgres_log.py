"""PostgresLogStore: the LogStore seam (storage/log_api.py) on PostgreSQL, via asyncpg.

Owns: the log tables (storage/postgres_log_schema.py), the view this process keeps
of each partition's offsets, config and size, reads, retention and the append
transactions (storage/postgres_append.py: all appends of one loop turn in one
transaction that locks the partition heads in order and assigns offsets there).

Durability: an append is acknowledged after its transaction commits; for a partition
with ``fsync=always`` (the default) with ``synchronous_commit`` on (the server's
setting: on, and a synchronous standby for failover without loss), for
``interval``/``never`` with ``SET LOCAL synchronous_commit = off`` (PostgreSQL flushes
the WAL within ``wal_writer_delay``; a server crash may lose the last few hundred ms,
never corrupt). The offsets view moves only after a commit, so readers never see a
batch that is not committed. One node per database for now (the next issue shares
partitions between nodes with leases: then the view is refreshed from the heads).
Not thread-safe: one event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from conveyor.clock import Clock
from conveyor.errors import (
    OffsetOutOfRangeError,
    OperatingError,
    StorageBusyError,
    StorageError,
    UnknownPartitionError,
)
from conveyor.storage import postgres_log_schema as sql
from conveyor.storage.log_api import (
    AppendOutcome,
    AppendRequest,
    LogOffsets,
    LogSlice,
    PartitionRecovery,
    PartitionUsage,
    VisibleHook,
)
from conveyor.storage.log_config import LogConfig
from conveyor.storage.postgres_append import (
    CONNECTION_ERRORS,
    QUEUE_APPENDS_MAX,
    QUEUE_BYTES_MAX,
    Committed,
    PendingAppend,
    TurnAppender,
)
from conveyor.storage.postgres_compaction import (
    ROWS_PER_TRANSACTION,
    BackgroundCompaction,
    CompactionJob,
    compact_partition,
)
from conveyor.storage.postgres_dsn import (
    COMMAND_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    LOG_SESSION_SETTINGS,
)
from conveyor.storage.postgres_truncation import truncate_tail
from conveyor.storage.record_batch import (
    decode_records,
    patch_base_offset,
    patch_partition_leader_epoch,
    split_batches,
)

logger = logging.getLogger(__name__)

CHUNK_OFFSETS = 1 << 20  # offsets per range chunk: what retention drops at once
READ_ROWS = 64  # rows fetched per query of a read
POOL_CLOSE_TIMEOUT_S = 10.0  # then the pool's connections are terminated


@dataclass(slots=True)
class _Partition:
    """This process's view of one partition (moved after each own commit)."""

    topic: str
    partition: int
    partition_id: int
    next_offset: int
    log_start_offset: int
    config: LogConfig
    size_bytes: int = 0
    max_timestamp_ms: int = -1
    chunks_from: int = 0  # the first range chunk not dropped yet


class PostgresLogStore(VisibleHook):  # on_visible: never called here
    def __init__(self, dsn: str, clock: Clock, rng: random.Random | None = None, *,
                 default_config: LogConfig | None = None, chunk_offsets: int = CHUNK_OFFSETS,
                 pool_size_max: int = 8, leader_epoch: int | None = None,
                 queue_bytes_max: int = QUEUE_BYTES_MAX,
                 queue_appends_max: int = QUEUE_APPENDS_MAX) -> None:
        self.dsn = dsn
        self.clock = clock
        self.rng = rng or random.Random()
        self.default_config = default_config or LogConfig()
        self.chunk_offsets = chunk_offsets
        self.pool_size_max = pool_size_max
        # patched into every batch read (outside the CRC); None: as written, the file
        # backend's behaviour (a single node has no leader changes; leases will set it)
        self.leader_epoch = leader_epoch
        # the bound on appends waiting for the database (postgres_append.py)
        self.queue_bytes_max = queue_bytes_max
        self.queue_appends_max = queue_appends_max
        # also refuse appends while this says so (server/storage.py: the state engine's
        # backlog on the same database is past its bound)
        self.admission: Callable[[], StorageBusyError | None] | None = None
        self._pool: Any = None
        self._appender: TurnAppender | None = None
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._by_id: dict[int, _Partition] = {}
        # (topic, partition) -> base offsets of CRC-valid batches no reader can decode
        self._set_aside: dict[tuple[str, int], set[int]] = {}
        # compaction: batch rows per transaction, a test hook after each one, the pass
        self.compaction_rows = ROWS_PER_TRANSACTION
        self.after_compaction_transaction: Callable[[], None] | None = None
        self._compaction = BackgroundCompaction(self.compact, self.has_partition)

    # --- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.pool_size_max,
                server_settings=LOG_SESSION_SETTINGS, command_timeout=COMMAND_TIMEOUT_S,
                timeout=CONNECT_TIMEOUT_S)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            raise StorageError("cannot reach the log database", reason=str(error)) from error
        async with self._pool.acquire() as connection, connection.transaction():
            # one opener at a time creates the schema
            await connection.execute("SELECT pg_advisory_xact_lock(7140001)")
            for statement in sql.SCHEMA:
                await connection.execute(statement)
            version = await connection.fetchval("SELECT max(version) FROM conveyor_log_schema")
            if version is None:
                await connection.execute("INSERT INTO conveyor_log_schema VALUES ($1)",
                                         sql.SCHEMA_VERSION)
            elif version > sql.SCHEMA_VERSION:
                raise StorageError("the log database has a newer schema", version=version,
                                   supported=sql.SCHEMA_VERSION)
            rows = await connection.fetch(sql.LOAD_HEADS)
        for row in rows:
            self._remember(_Partition(
                row["topic"], row["partition"], row["partition_id"], row["next_offset"],
                row["log_start_offset"], _config_from_json(row["config"], self.default_config),
            chunks_from=row["chunks_from"]))
        await self._refresh_usage()
        self._appender = TurnAppender(self._pool, self.clock, self.rng, self.chunk_offsets,
                                      self._committed, queue_bytes_max=self.queue_bytes_max,
                                      queue_appends_max=self.queue_appends_max)

    def _remember(self, part: _Partition) -> None:
        self._partitions[(part.topic, part.partition)] = part
        self._by_id[part.partition_id] = part

    async def close(self) -> None:
        await self._compaction.close()  # a pass is cancelled: its transaction rolls back
        if self._appender is not None:
            appender, self._appender = self._appender, None
            await appender.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                # close waits for every acquired connection to come back: bounded, so a
                # query stuck on a stalled database cannot keep its socket open past close
                await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT_S)
            except (*CONNECTION_ERRORS, asyncpg.PostgresError, TimeoutError):
                pool.terminate()  # the database went away or a query hangs: drop them
        self._partitions.clear()
        self._by_id.clear()

    # --- partitions --------------------------------------------------------------------
    def partitions(self) -> list[tuple[str, int]]:
        return sorted(self._partitions)

    def has_partition(self, topic: str, partition: int) -> bool:
        return (topic, partition) in self._partitions

    def _part(self, topic: str, partition: int) -> _Partition:
        try:
            return self._partitions[(topic, partition)]
        except KeyError:
            raise UnknownPartitionError("unknown partition", topic=topic,
                                        partition=partition) from None

    async def create_partition(self, topic: str, partition: int, config: LogConfig) -> None:
        existing = self._partitions.get((topic, partition))
        if existing is not None:
            await self.set_config(topic, partition, config)
            return
        async with self._connection() as connection, connection.transaction():
            row = await connection.fetchrow(sql.CREATE_HEAD, topic, partition,
                                            _config_to_json(config))
            pid = row["partition_id"]
            await connection.execute(sql.create_partition_table(pid))
            await self._ensure_ahead(connection, pid, row["next_offset"], row["chunks_until"])
        self._remember(_Partition(topic, partition, pid, row["next_offset"],
                                  row["log_start_offset"], config))

    async def _ensure_ahead(self, connection: Any, pid: int, next_offset: int,
                            chunks_until: int) -> None:
        """Keep the chunk of ``next_offset`` and the one after it created."""
        until = next_offset // self.chunk_offsets + 2
        if until <= chunks_until:
            return
        await connection.execute("SELECT 1 FROM conveyor_log_partitions "
                                 "WHERE partition_id = $1 FOR UPDATE", pid)
        for chunk in range(chunks_until, until):
            await connection.execute(sql.create_chunk(pid, chunk, self.chunk_offsets))
        await connection.execute(sql.SET_CHUNKS_UNTIL, pid, until)

    def config(self, topic: str, partition: int) -> LogConfig:
        return self._part(topic, partition).config

    async def set_config(self, topic: str, partition: int, config: LogConfig) -> None:
        part = self._part(topic, partition)
        if config == part.config:
            return
        async with self._connection() as connection:
            await connection.execute(sql.SET_CONFIG, part.partition_id, _config_to_json(config))
        part.config = config

    async def delete_partition(self, topic: str, partition: int) -> None:
        part = self._part(topic, partition)
        async with self._connection() as connection, connection.transaction():
            await connection.execute(sql.drop_partition_table(part.partition_id))
            await connection.execute(sql.DELETE_HEAD, part.partition_id)
            await connection.execute(sql.DELETE_PRODUCERS, part.partition_id)
        del self._partitions[(topic, partition)]
        del self._by_id[part.partition_id]
        self._set_aside.pop((topic, partition), None)

    async def refresh_partition(self, topic: str, partition: int) -> None:
        """Read the partition's head again (another node appended since: conveyor/cluster)."""
        part = self._part(topic, partition)
        async with self._connection() as connection:
            row = await connection.fetchrow(
                "SELECT next_offset, log_start_offset FROM conveyor_log_partitions "
                "WHERE partition_id = $1", part.partition_id)
        if row is not None:
            part.next_offset = max(part.next_offset, row["next_offset"])
            part.log_start_offset = max(part.log_start_offset, row["log_start_offset"])

    async def stored_partitions(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> its id, of every partition in the database now."""
        async with self._connection() as connection:
            rows = await connection.fetch(sql.PARTITION_IDS)
        return {(row["topic"], row["partition"]): row["partition_id"] for row in rows}

    def forget_partition(self, topic: str, partition: int, stored_id: int | None) -> bool:
        """Another node deleted the partition (``stored_id`` None) or made it anew (another
        id): forget this node's view, leave the database alone. True when forgotten."""
        part = self._partitions.get((topic, partition))
        if part is None or part.partition_id == stored_id:
            return False
        del self._partitions[(topic, partition)], self._by_id[part.partition_id]
        self._set_aside.pop((topic, partition), None)
        return True

    def observe_head(self, topic: str, partition: int, next_offset: int) -> bool:
        """Another node committed up to ``next_offset``; True when that moved our view."""
        part = self._partitions.get((topic, partition))
        if part is None or next_offset <= part.next_offset:
            return False
        part.next_offset = next_offset
        return True

    def offsets(self, topic: str, partition: int) -> LogOffsets:
        part = self._part(topic, partition)
        return LogOffsets(part.log_start_offset, part.next_offset, part.next_offset)

    # --- append ------------------------------------------------------------------------
    async def append(self, requests: Sequence[AppendRequest]) -> list[AppendOutcome]:
        """Validate each request now; write all of this loop turn's in one transaction."""
        appender = self._appender
        if appender is None:
            raise StorageError("log store closed")
        busy = self.admission() if self.admission is not None else None
        if busy is not None:
            return [busy] * len(requests)
        loop = None
        outcomes: list[AppendOutcome | None] = []
        waiting: list[tuple[int, Any]] = []
        for request in requests:
            try:
                part = self._part(request.topic, request.partition)
                headers = split_batches(request.batches)
            except OperatingError as error:
                outcomes.append(error)
                continue
            refused = appender.admit(len(request.batches))
            if refused is not None:
                outcomes.append(refused)
                continue
            if loop is None:
                loop = asyncio.get_running_loop()
            future = loop.create_future()
            appender.submit(PendingAppend(
                request.topic, request.partition, part.partition_id,
                memoryview(request.batches).cast("B"), headers, part.config.fsync == "always",
                request.check_sequences, future, request.lease))
            waiting.append((len(outcomes), future))
            outcomes.append(None)
        for index, future in waiting:
            outcomes[index] = await future
        return [outcome for outcome in outcomes if outcome is not None]

    def queued(self) -> tuple[int, int]:
        """(appends, payload bytes) waiting for the database now (bounded)."""
        appender = self._appender
        return (0, 0) if appender is None else (appender.queued_appends, appender.queued_bytes)

    def _committed(self, committed: list[Committed]) -> None:
        for item in committed:
            part = self._by_id.get(item.partition_id)
            if part is None:
                continue
            part.next_offset = max(part.next_offset, item.next_offset)
            part.size_bytes += item.size_bytes
            part.max_timestamp_ms = max(part.max_timestamp_ms, item.max_timestamp_ms)

    # --- read --------------------------------------------------------------------------
    def _check_range(self, part: _Partition, offset: int) -> None:
        if not part.log_start_offset <= offset <= part.next_offset:
            raise OffsetOutOfRangeError(
                "offset out of range", offset=offset, log_start_offset=part.log_start_offset,
                high_watermark=part.next_offset)

    async def read(self, topic: str, partition: int, offset: int, bytes_max: int) -> LogSlice:
        part = self._part(topic, partition)
        self._check_range(part, offset)
        high_watermark = part.next_offset
        skipped = self._set_aside.get((topic, partition), set())
        out = bytearray()
        position = offset
        async with self._connection() as connection:
            while position < high_watermark:
                rows = await connection.fetch(sql.READ_BATCHES, part.partition_id, position,
                                              high_watermark, READ_ROWS,
                                              max(bytes_max - len(out), 1))
                for row in rows:
                    base, payload = row["base_offset"], row["payload"]
                    if base in skipped:
                        continue
                    if out and len(out) + len(payload) > bytes_max:
                        return LogSlice(data=bytes(out))
                    start = len(out)
                    out += payload
                    patch_base_offset(out, base, start)
                    if self.leader_epoch is not None:
                        patch_partition_leader_epoch(out, self.leader_epoch, start)
                if not rows or (out and len(rows) < READ_ROWS):
                    break  # the end, or the byte cap (a cap on set-aside rows only goes on)
                position = _next_position(rows)
        return LogSlice(data=bytes(out))

    async def record_for_timestamp(self, topic: str, partition: int,
                                   timestamp_ms: int) -> tuple[int, int] | None:
        part = self._part(topic, partition)
        skipped = self._set_aside.get((topic, partition), set())
        position = part.log_start_offset
        async with self._connection() as connection:
            while position < part.next_offset:
                rows = await connection.fetch(sql.FIND_TIMESTAMP, part.partition_id, position,
                                              part.next_offset, timestamp_ms)
                for row in rows:
                    if row["base_offset"] in skipped:
                        continue
                    data = bytearray(row["payload"])
                    patch_base_offset(data, row["base_offset"])
                    for record in decode_records(data):
                        if record.timestamp_ms >= timestamp_ms \
                                and record.offset >= part.log_start_offset:
                            return record.offset, record.timestamp_ms
                if not rows:
                    break
                position = _next_position(rows)
        return None

    def set_aside(self, topic: str, partition: int, offset: int, reason: str) -> None:
        """Readers in this process skip the batch at ``offset`` (its base offset)."""
        self._part(topic, partition)
        skipped = self._set_aside.setdefault((topic, partition), set())
        if offset not in skipped:
            skipped.add(offset)
            logger.error("undecodable batch set aside; readers skip it: %s/%s at offset %d "
                         "(%s)", topic, partition, offset, reason)

    # --- deletion ----------------------------------------------------------------------
    async def delete_before(self, topic: str, partition: int, offset: int) -> None:
        part = self._part(topic, partition)
        offset = min(offset, part.next_offset)
        if offset <= part.log_start_offset:
            return
        async with self._connection() as connection:
            await connection.execute(sql.SET_LOG_START, part.partition_id, offset)
            part.log_start_offset = offset
            await _drop_chunks_below(connection, part, self.chunk_offsets)

    # --- truncation and compaction ----------------------------------------------------
    async def truncate(self, topic: str, partition: int, offset: int) -> int:
        """Drop every batch whose last offset >= ``offset`` (storage/postgres_truncation.py:
        one transaction under the head lock); appends in flight commit first."""
        part = self._part(topic, partition)
        if self._appender is not None:
            await self._appender.idle()
        async with self._connection() as connection:
            new_end = await truncate_tail(connection, part.partition_id, offset)
        if new_end == part.next_offset:
            return new_end
        part.next_offset = new_end
        skipped = self._set_aside.get((topic, partition), set())
        skipped -= {base for base in skipped if base >= new_end}
        await self._refresh_usage([part])
        logger.warning("log truncated: %s/%d from offset %d (log end now %d)", topic,
                       partition, offset, new_end)
        return new_end

    async def compact(self, topic: str, partition: int) -> int:
        """Clean one compact partition now, on a connection of its own, in transactions
        of bounded size (storage/postgres_compaction.py)."""
        part = self._part(topic, partition)
        if part.config.cleanup_policy != "compact":
            return 0
        job = CompactionJob(part.partition_id, part.log_start_offset, part.next_offset,
                            part.config, self.clock.wall_ms())
        in_doubt = self._appender.in_doubt if self._appender is not None else set()
        async with self._connection() as connection:
            rewritten = await compact_partition(
                connection, job, in_doubt, self.compaction_rows,
                after_transaction=self.after_compaction_transaction)
        if rewritten:
            await self._refresh_usage([part])
        return rewritten

    async def compaction_idle(self) -> None:
        """Wait for the background compaction pass, if one runs (tests)."""
        await self._compaction.idle()

    async def run_retention(self) -> None:
        """Time/size retention (``delete``) and work-queue chunk drops; a chunk ahead;
        a background compaction pass of ``compact`` partitions (the caller does not
        wait for it: one pass at a time)."""
        self._compaction.start([key for key, part in self._partitions.items()
                                if part.config.cleanup_policy == "compact"])
        now_ms = self.clock.wall_ms()
        async with self._connection() as connection:
            for part in list(self._partitions.values()):
                target = await _retention_target(connection, part, now_ms)
                if target > part.log_start_offset:
                    await connection.execute(sql.SET_LOG_START, part.partition_id, target)
                    part.log_start_offset = target
                await _drop_chunks_below(connection, part, self.chunk_offsets)
                row = await connection.fetchrow(
                    "SELECT next_offset, chunks_until FROM conveyor_log_partitions "
                    "WHERE partition_id = $1", part.partition_id)
                if row is not None:
                    async with connection.transaction():
                        await self._ensure_ahead(connection, part.partition_id,
                                                 row["next_offset"], row["chunks_until"])
        await self._refresh_usage()

    async def _refresh_usage(self, parts: Sequence[_Partition] | None = None) -> None:
        async with self._connection() as connection:
            for part in list(self._partitions.values()) if parts is None else parts:
                size, newest = await connection.fetchrow(sql.USAGE, part.partition_id,
                                                         part.log_start_offset)
                part.size_bytes, part.max_timestamp_ms = int(size), int(newest)

    # --- views -------------------------------------------------------------------------
    def usage(self, topic: str, partition: int) -> PartitionUsage:
        part = self._part(topic, partition)
        # "segments": the range chunks holding the partition's offsets (the file
        # backend's segments play the same part in retention)
        chunks = part.next_offset // self.chunk_offsets - part.chunks_from + 1
        return PartitionUsage(part.size_bytes, chunks, part.max_timestamp_ms,
                              len(self._set_aside.get((topic, partition), ())))

    def recovery(self, topic: str, partition: int) -> PartitionRecovery:
        """Nothing to repair: a commit is whole or absent (lost ranges: none)."""
        part = self._part(topic, partition)
        return PartitionRecovery(topic, partition, part.log_start_offset, part.next_offset)

    def _connection(self) -> Any:
        if self._pool is None:
            raise StorageError("log store closed")
        return _Acquired(self._pool)


class _Acquired:
    """``async with``: a pooled connection; a lost database becomes StorageError."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._connection: Any = None

    async def __aenter__(self) -> Any:
        try:
            self._connection = await self._pool.acquire()
        except CONNECTION_ERRORS as error:
            raise StorageError("database unavailable", reason=str(error)) from error
        return self._connection

    async def __aexit__(self, kind: Any, error: BaseException | None, trace: Any) -> None:
        try:
            await self._pool.release(self._connection)
        except CONNECTION_ERRORS:
            logger.warning("dropping a broken database connection")
        if isinstance(error, CONNECTION_ERRORS):
            raise StorageError("database unavailable", reason=str(error)) from error


async def _drop_chunks_below(connection: Any, part: _Partition, chunk_offsets: int) -> None:
    """Drop whole chunks whose every batch is below the log start (DROP TABLE)."""
    pid = part.partition_id
    chunk = await connection.fetchval(sql.CHUNKS_FROM, pid)
    if chunk is None:  # the partition was deleted meanwhile (a topic or queue delete)
        return
    first_kept = chunk
    while (chunk + 1) * chunk_offsets <= part.log_start_offset:
        last = await connection.fetchval(
            sql.CHUNK_LAST_OFFSET.format(chunk=sql.chunk_table(pid, chunk)))
        if last >= part.log_start_offset:
            break
        await connection.execute(sql.drop_chunk(pid, chunk))
        chunk += 1
    if chunk != first_kept:
        await connection.execute(sql.SET_CHUNKS_FROM, pid, chunk)
    part.chunks_from = chunk


async def _retention_target(connection: Any, part: _Partition, now_ms: int) -> int:
    """The log start that time/size retention (``delete`` policy) asks for."""
    config = part.config
    target = part.log_start_offset
    if config.cleanup_policy == "delete" and config.retention_ms >= 0:
        found = await connection.fetchval(
            sql.FIRST_NEWER_THAN, part.partition_id, part.log_start_offset,
            now_ms - config.retention_ms)
        target = max(target, part.next_offset if found is None else found)
    if config.cleanup_policy == "delete" and config.retention_bytes >= 0:
        found = await connection.fetchval(
            sql.FIRST_WITHIN_BYTES, part.partition_id, part.log_start_offset,
            config.retention_bytes)
        target = max(target, part.next_offset if found is None else found)
    return int(target)


def _next_position(rows: Sequence[Any]) -> int:
    """The offset after the last batch of ``rows`` (its last offset + 1)."""
    return int(rows[-1]["last_offset"]) + 1


def _config_to_json(config: LogConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _config_from_json(text: str, default: LogConfig) -> LogConfig:
    try:
        saved = json.loads(text)
    except ValueError:
        return default
    fields = {field.name for field in dataclasses.fields(LogConfig)}
    return LogConfig(**{key: value for key, value in saved.items() if key in fields})
