"""RecordBatch v2 codec: round-trips, every compression, corruption detection, kafka-python compat.

Method: build batches with the codec, decode them back and compare; flip bits and expect
CorruptRecordError; exchange batches with kafka-python's DefaultRecordBatch(Builder).
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.errors import CorruptRecordError
from conveyor.storage import record_batch
from conveyor.storage.record_batch import (
    BATCH_HEADER_BYTES,
    Compression,
    RecordData,
    build_batch,
    decode_records,
    iter_records,
    patch_base_offset,
    patch_partition_leader_epoch,
    read_header,
    split_batches,
    valid_prefix_bytes,
    validate_batch,
)

with warnings.catch_warnings():  # kafka-python's import uses deprecated importlib calls
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

SEED = int(os.environ.get("CONVEYOR_SEED", random.SystemRandom().randrange(2**32)))
print(f"CONVEYOR_SEED={SEED}")

SAMPLE = [
    RecordData(b"k1", b"v1", (("h", b"x"), ("n", None)), 1_000),
    RecordData(None, b"v2" * 100, (), 1_005),
    RecordData(b"k3", None, (), 999),
]

records_strategy = st.lists(
    st.builds(
        RecordData,
        key=st.none() | st.binary(max_size=40),
        value=st.none() | st.binary(max_size=300),
        headers=st.lists(
            st.tuples(st.text(max_size=10), st.none() | st.binary(max_size=20)), max_size=3
        ).map(tuple),
        timestamp_ms=st.integers(0, 2**41),
    ),
    min_size=1,
    max_size=20,
)


@given(records=records_strategy, base_offset=st.integers(0, 2**40),
       compression=st.sampled_from(list(Compression)))
@settings(max_examples=150, deadline=None)
def test_round_trip(records: list[RecordData], base_offset: int, compression: Compression) -> None:
    batch = build_batch(records, base_offset=base_offset, compression=compression)
    header = validate_batch(batch)
    assert header.size_bytes == len(batch)
    assert header.record_count == len(records)
    assert header.last_offset == base_offset + len(records) - 1
    assert header.max_timestamp_ms == max(record.timestamp_ms for record in records)
    decoded = decode_records(batch)
    assert [(r.offset, r.timestamp_ms, r.key, r.value, r.headers) for r in decoded] == [
        (base_offset + i, r.timestamp_ms, r.key, r.value, r.headers) for i, r in enumerate(records)
    ]


@pytest.mark.parametrize("compression", list(Compression))
def test_every_compression_decodes_and_sets_attributes(compression: Compression) -> None:
    batch = build_batch(SAMPLE, base_offset=7, compression=compression)
    assert validate_batch(batch).compression is compression
    assert [record.value for record in decode_records(batch)] == [r.value for r in SAMPLE]


def test_raw_snappy_is_accepted() -> None:
    import struct

    import cramjam
    import crc32c

    plain = bytearray(build_batch(SAMPLE))
    body = bytes(cramjam.snappy.compress_raw(bytes(plain[BATCH_HEADER_BYTES:])))
    batch = bytearray(plain[:BATCH_HEADER_BYTES]) + body
    struct.pack_into(">i", batch, 8, len(batch) - 12)
    struct.pack_into(">h", batch, 21, int(Compression.SNAPPY))
    struct.pack_into(">I", batch, 17, crc32c.crc32c(bytes(batch[21:])))
    assert [record.key for record in decode_records(batch)] == [r.key for r in SAMPLE]


def test_header_fields_and_flags() -> None:
    batch = build_batch(SAMPLE, base_offset=5, producer_id=9, producer_epoch=2, base_sequence=11,
                        is_transactional=True)
    header = read_header(batch)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (9, 2, 11)
    assert header.is_transactional and not header.is_control
    assert header.timestamp_type == 0
    assert header.base_timestamp_ms == 1_000


def test_patches_sit_outside_crc() -> None:
    batch = bytearray(build_batch(SAMPLE))
    patch_base_offset(batch, 123_456)
    patch_partition_leader_epoch(batch, 7)
    header = validate_batch(batch)
    assert (header.base_offset, header.partition_leader_epoch) == (123_456, 7)
    assert decode_records(batch)[2].offset == 123_458


def test_every_bit_flip_in_crc_range_is_detected() -> None:
    batch = build_batch(SAMPLE, compression=Compression.NONE)
    rng = random.Random(SEED)
    for _ in range(200):
        corrupted = bytearray(batch)
        bit = rng.randrange(17 * 8, len(batch) * 8)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptRecordError):
            decode_records(corrupted)


def test_bad_magic_and_truncation_raise_with_evidence() -> None:
    batch = bytearray(build_batch(SAMPLE))
    with pytest.raises(CorruptRecordError) as caught:
        validate_batch(batch[:-1])
    assert caught.value.details["size_bytes"] == len(batch)
    batch[16] = 1
    with pytest.raises(CorruptRecordError, match="magic"):
        validate_batch(batch)
    with pytest.raises(CorruptRecordError):
        read_header(batch[:60])


def test_split_batches_and_valid_prefix() -> None:
    first = build_batch(SAMPLE[:1])
    second = build_batch(SAMPLE, base_offset=1, compression=Compression.GZIP)
    payload = first + second
    positions = [position for position, _ in split_batches(payload)]
    assert positions == [0, len(first)]
    assert valid_prefix_bytes(payload) == len(payload)
    assert valid_prefix_bytes(payload[:-3]) == len(first)
    assert valid_prefix_bytes(payload + b"\x00" * 10) == len(payload)
    with pytest.raises(CorruptRecordError):
        split_batches(payload[:-3])
    with pytest.raises(CorruptRecordError):
        split_batches(b"")
    assert [record.offset for record in iter_records(payload)] == [0, 1, 2, 3]
    assert list(iter_records(b"")) == []


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.GZIP])
def test_kafka_python_batch_decodes_here(compression: Compression) -> None:
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=int(compression), is_transactional=False, producer_id=4,
        producer_epoch=1, base_sequence=0, batch_size=1 << 20,
    )
    for index in range(5):
        builder.append(index, 1_000 + index, f"k{index}".encode(), b"v" * index,
                       [("h", b"1")])
    batch = bytes(builder.build())
    header = validate_batch(batch)
    assert header.compression is compression and header.producer_id == 4
    records = decode_records(batch)
    assert [(r.offset, r.timestamp_ms, r.key, r.value, r.headers) for r in records] == [
        (i, 1_000 + i, f"k{i}".encode(), b"v" * i, (("h", b"1"),)) for i in range(5)
    ]


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.GZIP])
def test_batch_built_here_decodes_in_kafka_python(compression: Compression) -> None:
    batch = bytearray(build_batch(SAMPLE, base_offset=40, compression=compression))
    reader = DefaultRecordBatch(batch)
    assert reader.validate_crc()
    decoded = list(reader)
    assert [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in decoded] == [
        (40 + i, r.timestamp_ms, r.key, r.value, list(r.headers)) for i, r in enumerate(SAMPLE)
    ]


def test_a_large_value_builds_the_same_batch_as_the_small_path_would() -> None:
    # Values above the large-value threshold are encoded without a join; same records back.
    value = bytes(range(256)) * 1024  # 256 KiB
    batch = build_batch([RecordData(b"k", value, (("h", b"v"),), 7),
                         RecordData(None, b"small", (), 8)])
    records = list(iter_records(batch))
    assert [(r.key, r.value, r.headers, r.timestamp_ms) for r in records] == [
        (b"k", value, (("h", b"v"),), 7), (None, b"small", (), 8)]


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.SNAPPY,
                                         Compression.LZ4, Compression.ZSTD])
def test_decompression_output_is_bounded(
    monkeypatch: pytest.MonkeyPatch, compression: Compression,
) -> None:
    """A small compressed batch that expands past the limit is refused, not inflated."""
    monkeypatch.setattr(record_batch, "DECOMPRESSED_BATCH_BYTES_MAX", 1 << 20)
    bomb = build_batch([RecordData(None, bytes(2 << 20))], compression=compression)
    assert len(bomb) < 200_000
    with pytest.raises(CorruptRecordError, match="decompressed batch too large"):
        decode_records(bomb)
    fits = build_batch([RecordData(None, bytes(900_000))], compression=compression)
    [record] = decode_records(fits)
    assert record.value == bytes(900_000)


def test_fast_decoder_reads_what_the_careful_one_reads() -> None:
    """The fast path (inline varints of one or two bytes, records built through the
    slots) must give the careful decoder's records for every varint width a field can
    have: sizes of 0, 63/64 (one/two bytes), 8191/8192 (two/three), a None key, header
    values of None and of two bytes, timestamp and offset deltas past one byte."""
    rng = random.Random(SEED)
    sizes = [0, 1, 63, 64, 100, 1024, 8191, 8192, 20_000]
    records = [
        RecordData(
            key=None if index % 3 == 0 else bytes(rng.randrange(256)
                                                  for _ in range(rng.choice(sizes[:6]))),
            value=os.urandom(rng.choice(sizes)),
            headers=tuple((f"h{number}", None if number == 1 else os.urandom(
                rng.choice(sizes[:6]))) for number in range(index % 4)),
            timestamp_ms=1_700_000_000_000 + index * rng.choice([1, 70, 9_000, 2_000_000]),
        )
        for index in range(200)
    ]
    batch = build_batch(records, base_offset=5)
    header = read_header(batch)
    body = bytes(batch[BATCH_HEADER_BYTES:header.size_bytes])
    fast, fast_end = record_batch._decode_records_fast(body, header)
    careful, careful_end = record_batch._decode_records_carefully(body, header)
    assert fast == careful and fast_end == careful_end == len(body)
    again, _ = record_batch._decode_records_fast(body, header)  # header sections cached
    assert again == careful
    assert [type(record) for record in fast] == [record_batch.Record] * len(records)
    assert {hash(record) for record in fast} == {hash(record) for record in careful}
    assert [(record.key, record.value) for record in fast] == [
        (data.key, data.value) for data in records]


def test_records_with_the_same_header_bytes_share_one_headers_tuple() -> None:
    """The fast decoder keeps each header section it decoded (bounded): records whose
    headers are byte-identical (an AMQP publisher's) get one shared tuple, equal to what
    the careful decoder reads; different headers get their own."""
    alike = (("conveyor.amqp-properties", b"\x10\x00\x02"), ("conveyor.exchange", b""),
             ("conveyor.routing-key", b"jobs"))
    other = (("conveyor.routing-key", b"other"),)
    batch = build_batch([RecordData(None, b"a", alike), RecordData(None, b"b", other),
                         RecordData(None, b"c", alike), RecordData(b"k", b"d", alike)])
    records = decode_records(batch)
    assert [record.headers for record in records] == [alike, other, alike, alike]
    assert records[0].headers is records[2].headers is records[3].headers
    assert records[1].headers is not records[0].headers
