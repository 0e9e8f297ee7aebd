"""Goal: ShareFetch's record batch carries exactly the acquired records at their own
offsets, and AcquiredRecords ranges group consecutive offsets of one delivery count.

Method: encode deliveries with gaps, decode with the storage codec (CRC checked).
"""

from __future__ import annotations

from conveyor.broker.types import Delivery
from conveyor.protocols.kafka.share_records import acquired_ranges, encode_batch
from conveyor.storage.record_batch import decode_records


def delivery(offset: int, count: int = 1) -> Delivery:
    return Delivery(f"r{offset}", "t", 0, offset, 1_000 + offset, b"k%d" % offset,
                    None if offset == 9 else b"v%d" % offset, (("h", b"x"), ("n", None)),
                    count, 0)


def test_batch_keeps_offsets_keys_values_headers() -> None:
    deliveries = [delivery(offset) for offset in (9, 3, 4, 7)]
    records = decode_records(encode_batch(deliveries))
    assert [record.offset for record in records] == [3, 4, 7, 9]
    assert [record.value for record in records] == [b"v3", b"v4", b"v7", None]
    assert records[0].key == b"k3" and records[0].timestamp_ms == 1_003
    assert records[0].headers == (("h", b"x"), ("n", None))
    assert encode_batch([]) == b""


def test_ranges_split_on_gaps_and_delivery_counts() -> None:
    deliveries = [delivery(0), delivery(1), delivery(2, 2), delivery(3, 2), delivery(5, 2)]
    assert acquired_ranges(deliveries) == [(0, 1, 1), (2, 3, 2), (5, 5, 2)]
