"""The SQL of PostgresLogStore: tables, the append transaction's statements, chunk DDL.

Tables (``docs/postgres.md``, "Log data"):

``conveyor_log_partitions``: one head row per partition: ``partition_id`` (the key
every batch row carries), topic and partition, ``next_offset`` (the next offset to
assign: offsets are assigned here, under this row's lock, never from a node's memory),
``log_start_offset`` and the LogConfig as JSON.

``conveyor_log_batches``: one row per RecordBatch v2 as the client sent it, with the
offsets assigned to it (``base_offset``, ``last_offset``), its max timestamp, producer id,
epoch and base sequence, record count, the id of the transaction that wrote it
(``write_id``, to settle a commit whose outcome was lost) and the bytes. The stored
header keeps the client's base offset and leader epoch; both sit outside the CRC and
are patched when read. Partitioned twice: LIST by ``partition_id`` (one table per log
partition, ``conveyor_log_p<id>``), then RANGE by ``base_offset`` in chunks of
``chunk_offsets`` offsets (``conveyor_log_p<id>_c<n>``). Retention drops whole chunks
below the log start (``DROP TABLE``, no row-by-row DELETE, no vacuum debt); rows of the
chunk that holds the log start stay until the whole chunk is below it (as a segment
of the file backend does). Reads use the index on (partition_id, last_offset).
"""

from __future__ import annotations

SCHEMA_VERSION = 1

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conveyor_log_partitions (
        partition_id BIGSERIAL PRIMARY KEY,
        topic TEXT NOT NULL,
        partition INTEGER NOT NULL,
        next_offset BIGINT NOT NULL DEFAULT 0,
        log_start_offset BIGINT NOT NULL DEFAULT 0,
        chunks_from BIGINT NOT NULL DEFAULT 0,
        chunks_until BIGINT NOT NULL DEFAULT 0,
        config TEXT NOT NULL,
        UNIQUE (topic, partition))""",
    """CREATE TABLE IF NOT EXISTS conveyor_log_batches (
        partition_id BIGINT NOT NULL,
        base_offset BIGINT NOT NULL,
        last_offset BIGINT NOT NULL,
        max_timestamp_ms BIGINT NOT NULL,
        producer_id BIGINT NOT NULL,
        producer_epoch SMALLINT NOT NULL,
        base_sequence INTEGER NOT NULL,
        record_count INTEGER NOT NULL,
        write_id BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        PRIMARY KEY (partition_id, base_offset)
    ) PARTITION BY LIST (partition_id)""",
    """CREATE INDEX IF NOT EXISTS conveyor_log_batches_last
        ON conveyor_log_batches (partition_id, last_offset)""",
    # batches are often compressed by their producers: no second (pglz) compression
    "ALTER TABLE conveyor_log_batches ALTER COLUMN payload SET STORAGE EXTERNAL",
    """CREATE TABLE IF NOT EXISTS conveyor_log_producers (
        partition_id BIGINT NOT NULL,
        producer_id BIGINT NOT NULL,
        producer_epoch SMALLINT NOT NULL,
        last_sequence INTEGER NOT NULL,
        PRIMARY KEY (partition_id, producer_id))""",
    """CREATE TABLE IF NOT EXISTS conveyor_log_schema (
        version INTEGER NOT NULL)""",
)

LOAD_HEADS = """SELECT partition_id, topic, partition, next_offset, log_start_offset,
    chunks_from, config FROM conveyor_log_partitions ORDER BY topic, partition"""

CREATE_HEAD = """INSERT INTO conveyor_log_partitions (topic, partition, config)
    VALUES ($1, $2, $3) ON CONFLICT (topic, partition) DO UPDATE SET config = EXCLUDED.config
    RETURNING partition_id, next_offset, log_start_offset, chunks_until"""

# the append transaction, step 1: every touched head, locked in one order (no deadlock
# between two nodes appending to the same partitions)
LOCK_HEADS = """SELECT partition_id, next_offset, chunks_until FROM conveyor_log_partitions
    WHERE partition_id = ANY($1::bigint[]) ORDER BY partition_id FOR UPDATE"""

# step 2: every batch row, by binary COPY
BATCH_COLUMNS = ("partition_id", "base_offset", "last_offset", "max_timestamp_ms", "producer_id",
                 "producer_epoch", "base_sequence", "record_count", "write_id", "payload")

# step 3: the heads move on
ADVANCE_HEADS = """UPDATE conveyor_log_partitions AS head SET next_offset = moved.next_offset
    FROM unnest($1::bigint[], $2::bigint[]) AS moved(partition_id, next_offset)
    WHERE head.partition_id = moved.partition_id"""

# idempotent producers: their last sequence per partition, read and written under the
# head lock of the append transaction
LOAD_PRODUCERS = """SELECT state.partition_id, state.producer_id, producer_epoch, last_sequence
    FROM conveyor_log_producers AS state
    JOIN unnest($1::bigint[], $2::bigint[]) AS wanted(partition_id, producer_id)
        ON state.partition_id = wanted.partition_id AND state.producer_id = wanted.producer_id"""
SAVE_PRODUCERS = """INSERT INTO conveyor_log_producers
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::smallint[], $4::integer[])
    ON CONFLICT (partition_id, producer_id) DO UPDATE SET
        producer_epoch = EXCLUDED.producer_epoch, last_sequence = EXCLUDED.last_sequence"""
# a retry of one of the producer's recent batches: where it went the first time
FIND_RETRIED = """SELECT base_offset, last_offset, producer_epoch, base_sequence
    FROM conveyor_log_batches WHERE partition_id = $1 AND producer_id = $2
    ORDER BY last_offset DESC LIMIT 5"""
DELETE_PRODUCERS = "DELETE FROM conveyor_log_producers WHERE partition_id = $1"

# after a lost COMMIT: did the transaction with this write id land?
SHARE_HEAD = """SELECT 1 FROM conveyor_log_partitions WHERE partition_id = $1 FOR SHARE"""
WRITTEN_BY = """SELECT write_id FROM conveyor_log_batches
    WHERE partition_id = $1 AND base_offset = $2"""

# Up to $4 batches from $2, and of those only as many as $5 bytes need (the batch that
# crosses $5 included; the caller cuts there): the running size is computed from the
# stored lengths, so the batches past the cut are never detoasted or sent.
READ_BATCHES = """SELECT base_offset, last_offset, payload FROM (
        SELECT base_offset, last_offset, payload,
            sum(octet_length(payload)) OVER (ORDER BY last_offset)
                - octet_length(payload) AS bytes_before
        FROM conveyor_log_batches
        WHERE partition_id = $1 AND last_offset >= $2 AND base_offset < $3
        ORDER BY last_offset LIMIT $4) AS batches
    WHERE bytes_before < $5 ORDER BY last_offset"""

FIND_TIMESTAMP = """SELECT base_offset, last_offset, payload FROM conveyor_log_batches
    WHERE partition_id = $1 AND last_offset >= $2 AND base_offset < $3
        AND max_timestamp_ms >= $4
    ORDER BY last_offset LIMIT 16"""

USAGE = """SELECT coalesce(sum(octet_length(payload)), 0), coalesce(max(max_timestamp_ms), -1)
    FROM conveyor_log_batches WHERE partition_id = $1 AND last_offset >= $2"""

# retention: the first offset a time/size policy keeps
FIRST_NEWER_THAN = """SELECT base_offset FROM conveyor_log_batches
    WHERE partition_id = $1 AND last_offset >= $2 AND max_timestamp_ms >= $3
    ORDER BY last_offset LIMIT 1"""
FIRST_WITHIN_BYTES = """SELECT base_offset FROM (
        SELECT base_offset, last_offset, sum(octet_length(payload))
            OVER (ORDER BY last_offset DESC) AS newer_bytes
        FROM conveyor_log_batches WHERE partition_id = $1 AND last_offset >= $2) sized
    WHERE newer_bytes <= $3 ORDER BY last_offset LIMIT 1"""

SET_LOG_START = """UPDATE conveyor_log_partitions SET log_start_offset = $2
    WHERE partition_id = $1 AND log_start_offset < $2"""
SET_CONFIG = "UPDATE conveyor_log_partitions SET config = $2 WHERE partition_id = $1"
SET_CHUNKS_UNTIL = """UPDATE conveyor_log_partitions SET chunks_until = $2
    WHERE partition_id = $1 AND chunks_until < $2"""
SET_CHUNKS_FROM = "UPDATE conveyor_log_partitions SET chunks_from = $2 WHERE partition_id = $1"
CHUNKS_FROM = "SELECT chunks_from FROM conveyor_log_partitions WHERE partition_id = $1"
CHUNK_LAST_OFFSET = "SELECT coalesce(max(last_offset), -1) FROM {chunk}"
DELETE_HEAD = "DELETE FROM conveyor_log_partitions WHERE partition_id = $1"
# every partition and its id (a cluster node finds those deleted or made anew elsewhere)
PARTITION_IDS = "SELECT topic, partition, partition_id FROM conveyor_log_partitions"

# compaction (storage/postgres_compaction.py) and truncation of one partition: its rewrite
# transactions and a truncation take this lock, so a truncation sees every rewritten row
PARTITION_WRITE_LOCK = "SELECT pg_advisory_xact_lock(7140002, $1::integer)"
COMPACT_SCAN = """SELECT base_offset, last_offset, record_count, write_id, payload
    FROM conveyor_log_batches
    WHERE partition_id = $1 AND last_offset >= $2 AND base_offset < $3
    ORDER BY last_offset LIMIT $4"""
# the first batch too young to compact (min.compaction.lag.ms)
FIRST_NEWER_THAN_BEFORE = """SELECT base_offset FROM conveyor_log_batches
    WHERE partition_id = $1 AND last_offset >= $2 AND base_offset < $3
        AND max_timestamp_ms > $4
    ORDER BY last_offset LIMIT 1"""
# a planned row is deleted only if it is still the one planned from
DELETE_COMPACTED = """DELETE FROM conveyor_log_batches AS batch
    USING unnest($2::bigint[], $3::bigint[], $4::integer[])
        AS planned(base_offset, write_id, record_count)
    WHERE batch.partition_id = $1 AND batch.base_offset = planned.base_offset
        AND batch.write_id = planned.write_id AND batch.record_count = planned.record_count
    RETURNING batch.base_offset"""

# truncation of the tail (every batch whose last offset >= $2), under the head lock
LOCK_HEAD = """SELECT next_offset, log_start_offset FROM conveyor_log_partitions
    WHERE partition_id = $1 FOR UPDATE"""
TRUNCATE_TAIL = """DELETE FROM conveyor_log_batches WHERE partition_id = $1 AND last_offset >= $2
    RETURNING producer_id"""
KEPT_LAST_OFFSET = """SELECT coalesce(max(last_offset), -1) FROM conveyor_log_batches
    WHERE partition_id = $1 AND last_offset < $2"""
SET_NEXT_OFFSET = "UPDATE conveyor_log_partitions SET next_offset = $2 WHERE partition_id = $1"
PRODUCER_LAST_BATCH = """SELECT producer_epoch, base_sequence, record_count
    FROM conveyor_log_batches WHERE partition_id = $1 AND producer_id = $2
        AND base_sequence >= 0
    ORDER BY last_offset DESC LIMIT 1"""
DELETE_PRODUCER = "DELETE FROM conveyor_log_producers WHERE partition_id = $1 AND producer_id = $2"


def partition_table(partition_id: int) -> str:
    return f"conveyor_log_p{int(partition_id)}"


def chunk_table(partition_id: int, chunk: int) -> str:
    return f"conveyor_log_p{int(partition_id)}_c{int(chunk)}"


def create_partition_table(partition_id: int) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {partition_table(partition_id)} PARTITION OF "
            f"conveyor_log_batches FOR VALUES IN ({int(partition_id)}) "
            f"PARTITION BY RANGE (base_offset)")


def create_chunk(partition_id: int, chunk: int, chunk_offsets: int) -> str:
    low, high = chunk * chunk_offsets, (chunk + 1) * chunk_offsets
    return (f"CREATE TABLE IF NOT EXISTS {chunk_table(partition_id, chunk)} PARTITION OF "
            f"{partition_table(partition_id)} FOR VALUES FROM ({low}) TO ({high})")


def drop_partition_table(partition_id: int) -> str:
    return f"DROP TABLE IF EXISTS {partition_table(partition_id)}"


def drop_chunk(partition_id: int, chunk: int) -> str:
    return f"DROP TABLE IF EXISTS {chunk_table(partition_id, chunk)}"
