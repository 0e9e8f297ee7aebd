"""Record batches and acquired-record ranges for ShareFetch responses.

Owns: encoding the records a share member acquired as RecordBatch v2 (magic 2,
uncompressed, CRC32C) with their own offsets, and the ``AcquiredRecords`` ranges
(first offset, last offset, delivery count) that tell the client which of them
it holds. Sans-IO and pure.

Why not the log's own batches, as Kafka sends: a shared group hands out single
records of a batch (others may be held by other members, acknowledged, or dead),
so the response carries exactly the acquired records. Offsets of one partition
go into one batch as deltas from the first; gaps between them are allowed (a
compacted log has them too) and ``last_offset_delta`` names the last record.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import crc32c

from conveyor.broker.types import Delivery

MAGIC: Final = 2
# base offset, batch length, partition leader epoch, magic, crc, attributes,
# last offset delta, base timestamp, max timestamp, producer id, producer epoch,
# base sequence, record count
_HEADER: Final = struct.Struct(">qiibIhiqqqhii")
_CRC_POSITION: Final = 17
_CRC_START: Final = 21
_LOG_OVERHEAD_BYTES: Final = 12  # base offset + batch length


def _varint(value: int) -> bytes:
    """Zigzag varint (Kafka's record fields)."""
    encoded = (value << 1) ^ (value >> 63)
    out = bytearray()
    while encoded >= 0x80:
        out.append((encoded & 0x7F) | 0x80)
        encoded >>= 7
    out.append(encoded)
    return bytes(out)


def _sized(data: bytes | None) -> bytes:
    return b"\x01" if data is None else _varint(len(data)) + data


def _record(delivery: Delivery, offset_delta: int, base_timestamp_ms: int) -> bytes:
    parts = [b"\x00", _varint(delivery.timestamp_ms - base_timestamp_ms),
             _varint(offset_delta), _sized(delivery.key), _sized(delivery.value),
             _varint(len(delivery.headers))]
    for name, value in delivery.headers:
        parts.append(_sized(name.encode()))
        parts.append(_sized(value))
    body = b"".join(parts)
    return _varint(len(body)) + body


def encode_batch(deliveries: Sequence[Delivery]) -> bytes:
    """One batch of one partition's deliveries, in offset order (empty: no bytes)."""
    if not deliveries:
        return b""
    ordered = sorted(deliveries, key=lambda delivery: delivery.offset)
    base_offset = ordered[0].offset
    base_timestamp_ms = min(delivery.timestamp_ms for delivery in ordered)
    max_timestamp_ms = max(delivery.timestamp_ms for delivery in ordered)
    records = b"".join(_record(delivery, delivery.offset - base_offset, base_timestamp_ms)
                       for delivery in ordered)
    batch = bytearray(_HEADER.size) + records
    _HEADER.pack_into(
        batch, 0, base_offset, len(batch) - _LOG_OVERHEAD_BYTES, -1, MAGIC, 0, 0,
        ordered[-1].offset - base_offset, base_timestamp_ms, max_timestamp_ms, -1, -1, -1,
        len(ordered))
    struct.pack_into(">I", batch, _CRC_POSITION, crc32c.crc32c(bytes(batch[_CRC_START:])))
    return bytes(batch)


def acquired_ranges(deliveries: Sequence[Delivery]) -> list[tuple[int, int, int]]:
    """(first offset, last offset, delivery count) runs of consecutive offsets with the
    same delivery count."""
    ranges: list[tuple[int, int, int]] = []
    for delivery in sorted(deliveries, key=lambda item: item.offset):
        if ranges and ranges[-1][1] + 1 == delivery.offset and (
                ranges[-1][2] == delivery.delivery_count):
            first, _, count = ranges[-1]
            ranges[-1] = (first, delivery.offset, count)
        else:
            ranges.append((delivery.offset, delivery.offset, delivery.delivery_count))
    return ranges
