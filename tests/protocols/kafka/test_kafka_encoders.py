"""Goal: the hand-written Produce/Fetch encoders write exactly what kio's writer writes.

Method: for every served version, build the same response both ways and compare
the bytes; for Fetch, record pieces given as file ranges are substituted with
the file's bytes before comparing.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Any

import pytest
from kafka_wire import parse_response
from kio.schema.errors import ErrorCode

from conveyor.protocols.kafka.encoders import (
    FetchPartitionResult,
    ProducePartitionResult,
    encode_fetch_response,
    encode_produce_response,
    piece_size,
    unsigned_varint,
)
from conveyor.protocols.kafka.framing import is_flexible
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, encode_entity, response_class

ZERO = datetime.timedelta(0)


def kio_produce(version: int) -> Any:
    cls = response_class(0, version)
    module = __import__(cls.__module__, fromlist=["x"])
    partition: dict[str, Any] = {
        "index": 2, "error_code": ErrorCode.none, "base_offset": 41, "log_append_time": None,
    }
    if version >= 5:
        partition["log_start_offset"] = 3
    if version >= 8:
        partition["record_errors"] = ()
        partition["error_message"] = None
    partitions = (module.PartitionProduceResponse(**partition),)
    topic = module.TopicProduceResponse(name="orders", partition_responses=partitions)
    return cls(responses=(topic,), throttle_time=ZERO)


@pytest.mark.parametrize("version", range(3, 13))
def test_produce_matches_kio(version: int) -> None:
    ours = encode_produce_response(
        9, version,
        [("orders", [ProducePartitionResult(2, 0, 41, -1, 3)])],
    )
    header = b"\x00\x00\x00\x09" + (b"\x00" if is_flexible(0, version) else b"")
    kio_body = encode_entity(kio_produce(version))
    assert ours[4:] == header + kio_body
    assert int.from_bytes(ours[:4], "big") == len(ours) - 4
    correlation_id, parsed = parse_response(ours[4:], 0, version)
    assert correlation_id == 9
    assert parsed.responses[0].partition_responses[0].base_offset == 41


def test_produce_versions_cover_supported() -> None:
    assert SUPPORTED_VERSIONS[0] == (3, 12)
    assert SUPPORTED_VERSIONS[1] == (4, 12)


def joined(pieces: list[Any]) -> bytes:
    out = bytearray()
    for piece in pieces:
        if isinstance(piece, tuple):
            fileno, position, size = piece
            out += os.pread(fileno, size, position)
        else:
            out += piece
    return bytes(out)


@pytest.mark.parametrize("version", range(4, 13))
def test_fetch_matches_kio_and_passes_file_ranges_through(version: int) -> None:
    records = b"R" * 100
    with tempfile.TemporaryFile() as file:
        file.write(b"xx" + records[:60])
        file.flush()
        pieces = encode_fetch_response(
            5, version,
            [("t", [
                FetchPartitionResult(0, 0, 10, 10, 0, [(file.fileno(), 2, 60), records[60:]]),
                FetchPartitionResult(1, 1, 4, 4, 0, []),
            ])],
        )
        assert (file.fileno(), 2, 60) in pieces
        data = joined(pieces)
    assert int.from_bytes(data[:4], "big") == sum(piece_size(p) for p in pieces) - 4
    correlation_id, parsed = parse_response(data[4:], 1, version)
    assert correlation_id == 5
    first, second = parsed.responses[0].partitions
    assert first.records == records and first.high_watermark == 10
    assert second.error_code == 1 and second.records == b""
    assert encode_entity(parsed) == data[4 + 4 + (1 if version >= 12 else 0):]


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16384, 2**31 - 1])
def test_unsigned_varint(value: int) -> None:
    encoded = unsigned_varint(value)
    decoded = 0
    for index, byte in enumerate(encoded):
        decoded |= (byte & 0x7F) << (7 * index)
    assert decoded == value
    assert all(byte & 0x80 for byte in encoded[:-1]) and not encoded[-1] & 0x80
