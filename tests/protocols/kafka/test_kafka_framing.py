"""Goal: the framing layer cuts frames exactly and rejects bad sizes and headers.

Method: build frames with an independent client-side encoder (kio), feed them
whole, split and byte by byte, and check the parsed headers and bodies.
"""

from __future__ import annotations

import struct

import pytest
from kafka_wire import request_frame
from kio.schema.metadata.v1.request import MetadataRequest as MetadataRequestV1
from kio.schema.metadata.v12.request import MetadataRequest as MetadataRequestV12

from conveyor.errors import InvalidRequestError, LimitExceededError
from conveyor.protocols.kafka.framing import (
    FIRST_FLEXIBLE_VERSION,
    NEED_DATA,
    Frame,
    FrameDecoder,
    is_flexible,
    response_header,
    skip_tagged_fields,
)
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, request_class


def v12_request() -> MetadataRequestV12:
    return MetadataRequestV12(
        topics=None, allow_auto_topic_creation=True, include_topic_authorized_operations=False
    )


def test_flexible_table_matches_kio_schema() -> None:
    for api_key, (low, high) in SUPPORTED_VERSIONS.items():
        for version in range(low, high + 1):
            expected = bool(request_class(api_key, version).__flexible__)
            assert is_flexible(api_key, version) is expected, (api_key, version)
    assert set(SUPPORTED_VERSIONS) <= set(FIRST_FLEXIBLE_VERSION)


def test_whole_frame_parses_header_v2() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(request_frame(v12_request(), correlation_id=77, client_id="me"))
    frame = decoder.next_frame()
    assert isinstance(frame, Frame)
    assert (frame.header.api_key, frame.header.api_version) == (3, 12)
    assert frame.header.correlation_id == 77
    assert frame.header.client_id == "me"
    assert frame.header.flexible
    assert bytes(frame.body) == b"\x00\x01\x00\x00"
    assert decoder.next_frame() is NEED_DATA


def test_header_v1_with_null_client_id() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(request_frame(MetadataRequestV1(topics=None), client_id=None))
    frame = decoder.next_frame()
    assert isinstance(frame, Frame)
    assert frame.header.client_id is None
    assert not frame.header.flexible
    assert bytes(frame.body) == b"\xff\xff\xff\xff"


def test_byte_at_a_time_equals_whole() -> None:
    data = request_frame(v12_request(), 1) + request_frame(MetadataRequestV1(topics=None), 2)
    decoder = FrameDecoder()
    frames = []
    for index in range(len(data)):
        decoder.receive_data(data[index : index + 1])
        while not isinstance(result := decoder.next_frame(), type(NEED_DATA)):
            frames.append(result)
    assert [frame.header.correlation_id for frame in frames] == [1, 2]
    assert decoder.buffered_bytes == 0


def test_unknown_header_tagged_fields_are_skipped() -> None:
    payload = struct.pack(">hhi", 3, 12, 5) + b"\x00\x02id"
    payload += b"\x02" + b"\x07\x02ab" + b"\x09\x00"  # two unknown tags
    payload += b"\x00\x01\x00\x00"
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">i", len(payload)) + payload)
    frame = decoder.next_frame()
    assert isinstance(frame, Frame)
    assert bytes(frame.body) == b"\x00\x01\x00\x00"


def test_oversized_frame_rejected_before_payload_arrives() -> None:
    decoder = FrameDecoder(frame_bytes_max=1024)
    decoder.receive_data(struct.pack(">i", 1025))
    with pytest.raises(LimitExceededError):
        decoder.next_frame()


@pytest.mark.parametrize("size", [-1, 0, 7])
def test_size_below_header_rejected(size: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">i", size) + b"\x00" * 8)
    with pytest.raises(InvalidRequestError):
        decoder.next_frame()


def test_truncated_client_id_rejected() -> None:
    payload = struct.pack(">hhih", 3, 1, 9, 50) + b"abc"
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">i", len(payload)) + payload)
    with pytest.raises(InvalidRequestError):
        decoder.next_frame()


def test_tagged_field_running_past_the_end_rejected() -> None:
    with pytest.raises(InvalidRequestError):
        skip_tagged_fields(b"\x01\x00\x10ab", 0)


def test_response_header_versions() -> None:
    assert response_header(7, 3, flexible=True) == b"\x00\x00\x00\x07\x00"
    assert response_header(7, 3, flexible=False) == b"\x00\x00\x00\x07"
    assert response_header(7, 18, flexible=True) == b"\x00\x00\x00\x07"  # ApiVersions: v0


def test_frames_of_every_size_cut_at_random_read_boundaries_come_out_whole() -> None:
    """Goal: frames inside one read, spread over many reads, and size prefixes split
    between reads all come out byte for byte (the decoder keeps reads as chunks and
    copies each frame out once). Method: frames of 10 B to 300 KiB with distinct bodies
    (header v1: api 3 v1, client_id null), the stream cut at seeded random points."""
    import os
    import random

    seed = int(os.environ.get("CONVEYOR_SEED", "17"))
    rng = random.Random(seed)
    bodies = [bytes(rng.randrange(256) for _ in range(size % 512)) + b"x" * size
              for size in (0, 3, 10, 1000, 70_000, 300_000, 5, 65_536)]
    stream = b"".join(struct.pack(">ihhih", 10 + len(body), 3, 1, index, -1) + body
                      for index, body in enumerate(bodies))
    decoder = FrameDecoder()
    frames: list[Frame] = []
    position = 0
    while position < len(stream):
        step = rng.choice((1, 2, 3, 7, 4096, 65_536, 200_000))
        decoder.receive_data(stream[position:position + step])
        position += step
        while isinstance(frame := decoder.next_frame(), Frame):
            frames.append(frame)
    assert [bytes(frame.body) for frame in frames] == bodies, f"seed {seed}"
    assert [frame.header.correlation_id for frame in frames] == list(range(len(bodies)))
    assert decoder.buffered_bytes == 0
