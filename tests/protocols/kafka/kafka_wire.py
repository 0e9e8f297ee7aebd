"""Client-side helpers for Kafka codec tests: build request frames, split responses.

Uses kio's writer for request bodies (the client side of the conversation),
so tests exercise Conveyor's server codec against an independent encoder.
"""

from __future__ import annotations

import io
import struct
from typing import Any

from kio.serial import entity_reader, entity_writer

from conveyor.protocols.kafka.framing import is_flexible
from conveyor.protocols.kafka.messages import response_class


def request_header(api_key: int, version: int, correlation_id: int, client_id: str | None) -> bytes:
    out = struct.pack(">hhi", api_key, version, correlation_id)
    if client_id is None:
        out += b"\xff\xff"
    else:
        out += struct.pack(">h", len(client_id.encode())) + client_id.encode()
    if is_flexible(api_key, version):
        out += b"\x00"
    return out


def body_bytes(entity: Any) -> bytes:
    buffer = io.BytesIO()
    entity_writer(type(entity))(buffer, entity)
    return buffer.getvalue()


def request_frame(entity: Any, correlation_id: int = 1, client_id: str | None = "test") -> bytes:
    api_key, version = int(entity.__api_key__), int(entity.__version__)
    payload = request_header(api_key, version, correlation_id, client_id) + body_bytes(entity)
    return struct.pack(">i", len(payload)) + payload


def split_frames(data: bytes) -> list[bytes]:
    frames = []
    position = 0
    while position < len(data):
        (size,) = struct.unpack_from(">i", data, position)
        frames.append(data[position + 4 : position + 4 + size])
        position += 4 + size
    assert position == len(data)
    return frames


def parse_response(payload: bytes, api_key: int, version: int) -> tuple[int, Any]:
    """(correlation_id, kio response) from one response frame payload."""
    (correlation_id,) = struct.unpack_from(">i", payload, 0)
    position = 4
    if is_flexible(api_key, version) and api_key != 18:
        assert payload[position] == 0  # empty header tag section
        position += 1
    cls = response_class(api_key, version)
    entity, size = entity_reader(cls)(payload[position:], 0)
    assert size == len(payload) - position
    return correlation_id, entity
