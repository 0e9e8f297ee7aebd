"""The Kafka server-side codec: bytes in -> typed requests; typed responses -> bytes.

Owns: turning frames into events (``Request``, ``UnsupportedRequest``) and
responses into framed bytes, with the error answers the protocol defines for a
request Conveyor cannot serve. Sans-IO, after h11: ``receive_data(data)``, then
``next_event()`` until it returns ``NEED_DATA``; ``send(...)`` returns bytes.

Rules: a frame whose size is out of bounds, whose header is truncated, or
whose body does not parse raises an ``OperatingError`` (the adapter closes the
connection: Kafka's own broker does the same for bytes it cannot parse); an
ApiVersions request of a version Conveyor does not know is answered with
UNSUPPORTED_VERSION in the v0 layout (KIP-511), so newer clients can
downgrade; any other unknown api key or version is an ``UnsupportedRequest``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from conveyor.errors import InvalidRequestError
from conveyor.protocols.kafka.framing import (
    API_VERSIONS_KEY,
    FRAME_BYTES_MAX_DEFAULT,
    NEED_DATA,
    FrameDecoder,
    NeedData,
    RequestHeader,
    frame,
    response_header,
)
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, encode_entity, parse_body

UNSUPPORTED_VERSION: Final = 35

_API_VERSION_ENTRY = struct.Struct(">hhh")


@dataclass(frozen=True, slots=True)
class Request:
    header: RequestHeader
    body: Any  # kio's request dataclass for (api_key, api_version)


@dataclass(frozen=True, slots=True)
class UnsupportedRequest:
    """A whole frame with an api key or version Conveyor does not serve."""

    header: RequestHeader


Event = Request | UnsupportedRequest | NeedData


def api_versions_v0_error() -> bytes:
    """ApiVersionsResponse v0 body: UNSUPPORTED_VERSION plus the supported versions."""
    body = bytearray(struct.pack(">hi", UNSUPPORTED_VERSION, len(SUPPORTED_VERSIONS)))
    for api_key, (low, high) in sorted(SUPPORTED_VERSIONS.items()):
        body += _API_VERSION_ENTRY.pack(api_key, low, high)
    return bytes(body)


class ServerCodec:
    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT) -> None:
        self._decoder = FrameDecoder(frame_bytes_max)

    @property
    def buffered_bytes(self) -> int:
        return self._decoder.buffered_bytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._decoder.receive_data(data)

    def next_event(self) -> Event:
        frame_or_need = self._decoder.next_frame()
        if isinstance(frame_or_need, NeedData):
            return NEED_DATA
        header = frame_or_need.header
        versions = SUPPORTED_VERSIONS.get(header.api_key)
        if versions is None or not versions[0] <= header.api_version <= versions[1]:
            return UnsupportedRequest(header)
        return Request(header, parse_body(header.api_key, header.api_version, frame_or_need.body))

    def send(self, header: RequestHeader, response: Any) -> bytes:
        """Frame a kio response entity for the request ``header``."""
        assert response.__api_key__ == header.api_key
        assert response.__version__ == header.api_version
        return frame(
            response_header(header.correlation_id, header.api_key, header.flexible),
            encode_entity(response),
        )

    def send_unsupported(self, header: RequestHeader) -> bytes:
        """The answer to an ``UnsupportedRequest``; only ApiVersions has one."""
        if header.api_key != API_VERSIONS_KEY:
            raise InvalidRequestError(
                "unsupported api key or version",
                api_key=header.api_key, version=header.api_version,
            )
        return frame(response_header(header.correlation_id, API_VERSIONS_KEY, False),
                     api_versions_v0_error())
