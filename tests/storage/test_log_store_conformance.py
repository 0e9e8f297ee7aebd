"""Conformance: every LogStore backend passes the same suite through the seam alone.

Method: each test gets a ``Backend`` (tests/storage/log_backends.py): a way to open a
store over the same data again (close/reopen), and a crash that loses what the backend
never made durable (file: MemoryFileSystem.crash, which keeps only fsynced bytes and a
torn tail; PostgreSQL: ``pg_ctl stop -m immediate`` of a real server). The tests use
only the LogStore methods of storage/log_api.py, so a new backend joins by adding a
fixture parameter. The file backend's own details (segments, indexes, rolls) are
tested in test_file_log_store.py.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from log_backends import Backend
from storage_helpers import make_batch, values_of

from conveyor.errors import CorruptRecordError, OffsetOutOfRangeError, UnknownPartitionError
from conveyor.storage.log_api import AppendInfo, AppendRequest, LogStore
from conveyor.storage.log_config import LogConfig
from conveyor.storage.record_batch import RecordData, build_batch, iter_records, split_batches


async def append(store: LogStore, topic: str, partition: int, data: bytes) -> AppendInfo:
    (outcome,) = await store.append([AppendRequest(topic, partition, data)])
    assert isinstance(outcome, AppendInfo), outcome
    return outcome


async def read_all(store: LogStore, topic: str, partition: int,
                   offset: int = 0) -> list[tuple[int, bytes | None]]:
    collected: list[tuple[int, bytes | None]] = []
    end = store.offsets(topic, partition).high_watermark
    while offset < end:
        chunk = values_of((await store.read(topic, partition, offset, 1 << 20)).read_bytes())
        collected += [item for item in chunk if item[0] >= offset]
        offset = chunk[-1][0] + 1
    return collected


async def test_append_assigns_offsets_and_reads_back(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("orders", 0, LogConfig())
    first = await append(store, "orders", 0, make_batch([b"a", b"b"]))
    second = await append(store, "orders", 0, make_batch([b"c"]) + make_batch([b"d", b"e"]))
    assert (first.base_offset, first.last_offset) == (0, 1)
    assert (second.base_offset, second.last_offset) == (2, 4)
    offsets = store.offsets("orders", 0)
    assert (offsets.log_start_offset, offsets.high_watermark, offsets.log_end_offset) == (0, 5, 5)
    data = (await store.read("orders", 0, 0, 1 << 20)).read_bytes()
    assert values_of(data) == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d"), (4, b"e")]
    assert [header.base_offset for _, header in split_batches(data)] == [0, 2, 3]
    # the batch holding offset 4 starts at 3
    assert values_of((await store.read("orders", 0, 4, 1 << 20)).read_bytes())[0] == (3, b"d")
    assert (await store.read("orders", 0, 5, 100)).size_bytes == 0
    with pytest.raises(OffsetOutOfRangeError):
        await store.read("orders", 0, 6, 100)
    await store.close()


async def test_read_returns_whole_batches_and_at_least_one(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, LogConfig())
    batch = make_batch([b"x" * 500])
    for _ in range(10):
        await append(store, "t", 0, batch)
    assert (await store.read("t", 0, 0, 1)).size_bytes == len(batch)  # past bytes_max: one
    assert (await store.read("t", 0, 0, len(batch) * 3 + 10)).size_bytes == len(batch) * 3
    assert len((await store.read("t", 0, 2, 10**6)).read_bytes()) == len(batch) * 8
    await store.close()


async def test_one_call_appends_to_many_partitions_with_errors_of_its_own(
        backend: Backend) -> None:
    store = await backend.open()
    for partition in range(3):
        await store.create_partition("t", partition, LogConfig())
    damaged = bytearray(make_batch([b"bad"]))
    damaged[-1] ^= 1
    outcomes = await store.append([
        AppendRequest("t", 0, make_batch([b"a0", b"a1"])),
        AppendRequest("t", 1, make_batch([b"b0"])),
        AppendRequest("t", 2, bytes(damaged)),
        AppendRequest("missing", 0, make_batch([b"x"])),
        AppendRequest("t", 0, make_batch([b"a2"])),
    ])
    assert [(o.base_offset, o.last_offset) for o in outcomes
            if isinstance(o, AppendInfo)] == [(0, 1), (0, 0), (2, 2)]
    assert isinstance(outcomes[2], CorruptRecordError)
    assert isinstance(outcomes[3], UnknownPartitionError)
    assert await read_all(store, "t", 0) == [(0, b"a0"), (1, b"a1"), (2, b"a2")]
    assert store.offsets("t", 2).high_watermark == 0
    await store.close()


async def test_concurrent_appends_get_distinct_contiguous_offsets(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, LogConfig())

    async def producer(index: int) -> list[AppendInfo]:
        return [await append(store, "t", 0, make_batch([b"%d-%d" % (index, n), b"."]))
                for n in range(5)]

    results = await asyncio.gather(*(producer(index) for index in range(8)))
    ranges = sorted((info.base_offset, info.last_offset) for infos in results for info in infos)
    assert ranges == [(offset, offset + 1) for offset in range(0, 80, 2)]
    stored = await read_all(store, "t", 0)
    assert [offset for offset, _ in stored] == list(range(80))
    await store.close()


async def test_record_for_timestamp(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, LogConfig())
    for index in range(30):
        await append(store, "t", 0, make_batch([b"v" * 100], timestamp_ms=1_000 + index * 10))
    assert await store.record_for_timestamp("t", 0, 0) == (0, 1_000)
    assert await store.record_for_timestamp("t", 0, 1_000) == (0, 1_000)
    assert await store.record_for_timestamp("t", 0, 1_001) == (1, 1_010)
    assert await store.record_for_timestamp("t", 0, 1_250) == (25, 1_250)
    assert await store.record_for_timestamp("t", 0, 1_291) is None
    await store.delete_before("t", 0, 10)
    assert await store.record_for_timestamp("t", 0, 0) == (10, 1_100)
    await store.close()


async def test_delete_before_moves_log_start_and_survives_reopen(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, backend.small_config)
    for index in range(40):
        await append(store, "t", 0, make_batch([b"%03d" % index]))
    await store.delete_before("t", 0, 25)
    assert store.offsets("t", 0).log_start_offset == 25
    with pytest.raises(OffsetOutOfRangeError):
        await store.read("t", 0, 24, 100)
    assert (await read_all(store, "t", 0, 25))[0] == (25, b"025")
    await store.delete_before("t", 0, 1_000)  # clamped to the high watermark
    assert store.offsets("t", 0).log_start_offset == 40
    await store.close()
    store = await backend.open()
    assert store.offsets("t", 0).log_start_offset == 40
    assert (await append(store, "t", 0, make_batch([b"next"]))).base_offset == 40
    assert await read_all(store, "t", 0, 40) == [(40, b"next")]
    await store.close()


async def test_close_and_reopen_keeps_partitions_offsets_and_config(backend: Backend) -> None:
    store = await backend.open()
    config = LogConfig(retention_ms=60_000, cleanup_policy="work-queue")
    await store.create_partition("t", 3, config)
    await store.create_partition("u", 0, LogConfig())
    for index in range(12):
        await append(store, "t", 3, make_batch([b"%02d" % index]))
    await store.close()
    store = await backend.open()
    assert store.partitions() == [("t", 3), ("u", 0)]
    assert store.has_partition("t", 3) and not store.has_partition("t", 0)
    assert store.config("t", 3) == config
    assert store.offsets("t", 3).high_watermark == 12
    recovery = store.recovery("t", 3)
    assert (recovery.log_end_offset, recovery.lost_from_offset, recovery.skipped_offsets) == (
        12, -1, ())
    assert (await read_all(store, "t", 3))[11] == (11, b"11")
    assert (await append(store, "t", 3, make_batch([b"12"]))).base_offset == 12
    await store.close()


async def test_config_updates_and_partition_lifecycle(backend: Backend) -> None:
    store = await backend.open()
    with pytest.raises(UnknownPartitionError):
        store.offsets("none", 0)
    with pytest.raises(UnknownPartitionError):
        await store.read("none", 0, 0, 100)
    await store.create_partition("t", 0, LogConfig())
    await store.create_partition("t", 0, LogConfig(retention_ms=5))  # exists: reconfigured
    assert store.config("t", 0).retention_ms == 5
    await store.set_config("t", 0, LogConfig(retention_ms=7))
    assert store.config("t", 0).retention_ms == 7
    await append(store, "t", 0, make_batch([b"a"]))
    usage = store.usage("t", 0)
    assert usage.size_bytes >= len(make_batch([b"a"])) and not usage.failed
    assert usage.max_timestamp_ms == 1_700_000_000_000
    await store.delete_partition("t", 0)
    assert store.partitions() == []
    await store.create_partition("t", 0, LogConfig())  # a new, empty partition
    assert store.offsets("t", 0).high_watermark == 0
    await store.close()
    store = await backend.open()
    assert store.partitions() == [("t", 0)] and store.config("t", 0).retention_ms == 7 * 86_400_000
    await store.close()


async def test_invalid_payload_is_rejected_without_writing(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, LogConfig())
    damaged = bytearray(make_batch([b"a"]))
    damaged[-1] ^= 1
    (outcome,) = await store.append([AppendRequest("t", 0, bytes(damaged))])
    assert isinstance(outcome, CorruptRecordError)
    assert store.offsets("t", 0).high_watermark == 0 and store.usage("t", 0).size_bytes == 0
    await store.close()


async def test_set_aside_batch_is_skipped_by_readers(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, LogConfig())
    for value in (b"a", b"b", b"c"):
        await append(store, "t", 0, make_batch([value]))
    store.set_aside("t", 0, 1, "undecodable: test")
    assert await read_all(store, "t", 0) == [(0, b"a"), (2, b"c")]
    assert store.usage("t", 0).damaged_batches == 1
    await store.close()


async def test_time_retention_drops_old_records(backend: Backend) -> None:
    store = await backend.open()
    now_ms = backend.clock.wall_ms()
    config = LogConfig(retention_ms=60_000, segment_bytes=backend.small_config.segment_bytes,
                       index_interval_bytes=256)
    await store.create_partition("t", 0, config)
    for index in range(30):
        await append(store, "t", 0, make_batch([b"old%02d" % index + b"." * 100],
                                               timestamp_ms=now_ms - 120_000))
    for index in range(30):
        await append(store, "t", 0, make_batch([b"new%02d" % index + b"." * 100],
                                               timestamp_ms=now_ms))
    await store.run_retention()
    start = store.offsets("t", 0).log_start_offset
    assert 0 < start <= 30  # old records go (whole segments/chunks); no new one does
    kept = await read_all(store, "t", 0, start)
    assert [offset for offset, _ in kept] == list(range(start, 60))
    await store.close()


async def test_acknowledged_appends_survive_a_crash(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, LogConfig(fsync="always"))
    acknowledged = [await append(store, "t", 0, make_batch([b"%02d" % index]))
                    for index in range(20)]
    assert acknowledged[-1].last_offset == 19
    await backend.crash(store)
    store = await backend.open()
    offsets = store.offsets("t", 0)
    assert offsets.high_watermark >= 20
    assert (await read_all(store, "t", 0))[:20] == [(index, b"%02d" % index)
                                                    for index in range(20)]
    assert (await append(store, "t", 0, make_batch([b"after"]))).base_offset == \
        offsets.high_watermark
    await store.close()


# --- truncation of the tail ----------------------------------------------------------
async def test_truncate_drops_the_tail_at_batch_boundaries(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, backend.small_config)
    for index in range(10):
        await append(store, "t", 0, make_batch([b"%02d" % index + b"." * 100]))
    assert (await append(store, "t", 0, make_batch([b"10", b"11", b"12"]))).base_offset == 10
    for index in range(13, 30):
        await append(store, "t", 0, make_batch([b"%02d" % index + b"." * 100]))
    # an offset inside a batch drops the whole batch: the log ends at its base offset
    assert await store.truncate("t", 0, 11) == 10
    offsets = store.offsets("t", 0)
    assert (offsets.log_start_offset, offsets.high_watermark, offsets.log_end_offset) == (0, 10, 10)
    assert [offset for offset, _ in await read_all(store, "t", 0)] == list(range(10))
    assert (await store.read("t", 0, 10, 1 << 20)).size_bytes == 0
    with pytest.raises(OffsetOutOfRangeError):
        await store.read("t", 0, 11, 100)
    assert await store.truncate("t", 0, 25) == 10  # at or past the end: nothing changes
    assert (await append(store, "t", 0, make_batch([b"new"]))).base_offset == 10
    await store.close()
    store = await backend.open()
    assert store.offsets("t", 0).high_watermark == 11
    stored = await read_all(store, "t", 0)
    assert stored[-1] == (10, b"new") and len(stored) == 11
    await store.delete_before("t", 0, 3)
    with pytest.raises(OffsetOutOfRangeError):
        await store.truncate("t", 0, 2)
    assert await store.truncate("t", 0, 3) == 3  # everything readable goes
    assert await read_all(store, "t", 0, 3) == []
    assert (await append(store, "t", 0, make_batch([b"again"]))).base_offset == 3
    await store.close()


async def test_truncation_survives_a_crash(backend: Backend) -> None:
    store = await backend.open()
    await store.create_partition("t", 0, LogConfig(fsync="always",
                                                   segment_bytes=backend.small_config.segment_bytes))
    for index in range(40):
        await append(store, "t", 0, make_batch([b"%02d" % index + b"." * 60]))
    assert await store.truncate("t", 0, 15) == 15
    assert (await append(store, "t", 0, make_batch([b"after"]))).base_offset == 15
    await backend.crash(store)
    store = await backend.open()
    assert store.offsets("t", 0).high_watermark == 16
    stored = await read_all(store, "t", 0)
    assert [offset for offset, _ in stored] == list(range(16))
    assert stored[14][1] == b"14" + b"." * 60 and stored[15] == (15, b"after")
    await store.close()


# --- compaction (cleanup.policy=compact) ------------------------------------------------
def keyed(key: bytes | None, value: bytes | None, timestamp_ms: int) -> bytes:
    return build_batch([RecordData(key, value, (), timestamp_ms)])


Row = tuple[int, bytes | None, bytes | None]


async def read_keyed(store: LogStore, topic: str = "c") -> list[Row]:
    offsets = store.offsets(topic, 0)
    rows: list[Row] = []
    offset = offsets.log_start_offset
    while offset < offsets.high_watermark:
        chunk = list(iter_records((await store.read(topic, 0, offset, 1 << 20)).read_bytes()))
        if not chunk:
            break
        rows += [(r.offset, r.key, r.value) for r in chunk if r.offset >= offset]
        offset = chunk[-1].offset + 1
    return rows


def latest_view(rows: list[Row]) -> dict[bytes, bytes | None]:
    view: dict[bytes, bytes | None] = {}
    for _, key, value in rows:
        if key is not None:
            view[key] = value
    return {key: value for key, value in view.items() if value is not None}


async def filled_compact(backend: Backend, store: LogStore, **changes: int) -> None:
    """40 records over keys k0..k4, key "gone" set at 2 and deleted (tombstone) at 21, one
    record without a key at 7 (the same log as tests/storage/test_compaction.py)."""
    config = dataclasses.replace(backend.small_config, segment_bytes=600,
                                 cleanup_policy="compact", delete_retention_ms=10_000,
                                 index_interval_bytes=128, **changes)
    await store.create_partition("c", 0, config)
    now_ms = backend.clock.wall_ms()
    for index in range(40):
        key: bytes | None = b"gone" if index in (2, 21) else b"k%d" % (index % 5)
        key = None if index == 7 else key
        value = None if index == 21 else b"v%d" % index
        await append(store, "c", 0, keyed(key, value, now_ms))


async def test_compaction_keeps_the_latest_per_key_and_drops_old_tombstones(
        backend: Backend) -> None:
    store = await backend.open()
    await filled_compact(backend, store)
    before = await read_keyed(store)
    assert await store.compact("c", 0) > 0
    after = await read_keyed(store)
    assert set(after) <= set(before)  # offsets never change
    assert latest_view(after) == latest_view(before)
    assert len(after) < len(before)
    assert (0, b"k0", b"v0") not in after and (2, b"gone", b"v2") not in after
    assert (7, None, b"v7") in after  # no key: kept
    assert (21, b"gone", None) in after  # tombstone kept within delete_retention_ms
    assert (39, b"k4", b"v39") in after
    assert store.offsets("c", 0).high_watermark == 40
    assert (await append(store, "c", 0, keyed(b"k0", b"v40", 0))).base_offset == 40
    backend.clock.advance(20_000)
    await store.compact("c", 0)
    after_retention = await read_keyed(store)
    assert (21, b"gone", None) not in after_retention
    assert latest_view(after_retention) == {**latest_view(before), b"k0": b"v40"}
    await store.close()
    store = await backend.open()  # the cleaned log is what a restart finds
    assert await read_keyed(store) == after_retention
    await store.close()


async def test_compaction_respects_min_lag_and_other_policies(backend: Backend) -> None:
    store = await backend.open()
    await filled_compact(backend, store, min_compaction_lag_ms=60_000)
    before = await read_keyed(store)
    assert await store.compact("c", 0) == 0
    assert await read_keyed(store) == before
    await store.create_partition("d", 0, LogConfig())  # cleanup.policy=delete
    for index in range(6):
        await append(store, "d", 0, keyed(b"same", b"%d" % index, backend.clock.wall_ms()))
    assert await store.compact("d", 0) == 0
    assert len(await read_keyed(store, "d")) == 6
    await store.close()


async def test_compaction_while_appending_keeps_every_latest_value(backend: Backend) -> None:
    store = await backend.open()
    await filled_compact(backend, store)

    async def producer() -> list[int]:
        return [(await append(store, "c", 0, keyed(b"k%d" % (index % 7), b"late%d" % index,
                                                  backend.clock.wall_ms()))).base_offset
                for index in range(30)]

    offsets, _ = await asyncio.gather(producer(), store.compact("c", 0))
    assert offsets == list(range(40, 70))
    await store.compact("c", 0)
    after = await read_keyed(store)
    view = latest_view(after)
    for index in range(23, 30):  # the last value written of k0..k6
        assert view[b"k%d" % (index % 7)] == b"late%d" % index
    assert [row for row in after if row[0] >= 69] == [(69, b"k1", b"late29")]
    await store.close()
