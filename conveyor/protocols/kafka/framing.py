"""Kafka framing: size-prefixed frames, request headers v0-v2, response headers v0-v1.

Owns: cutting a byte stream into frames (int32 size + payload), enforcing the
frame size limit, parsing the request header (api_key, api_version,
correlation_id, client_id, header tagged fields) and writing response headers.
Sans-IO: bytes in, frames out; no sockets, no event loop, no broker.

Header versions (KIP-482): a request to a flexible API version carries header
v2 (v1 + tagged fields); otherwise header v1 (client_id as a nullable int16
string). Responses to flexible versions carry header v1 (correlation_id +
tagged fields) except ApiVersions, which always answers with header v0 so that
a client can read the answer before it knows the broker's versions.

Invariants: a frame is handed out only when all of its bytes arrived; a size
below the smallest header or above ``frame_bytes_max`` is an error before any
payload is buffered; unknown header tagged fields are skipped, as the spec asks.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Final

from conveyor.errors import InvalidRequestError, LimitExceededError

# Kafka's socket.request.max.bytes default (100 MiB) is the precedent for the limit.
FRAME_BYTES_MAX_DEFAULT: Final = 100 * 1024 * 1024
# api_key int16 + api_version int16 + correlation_id int32.
HEADER_BYTES_MIN: Final = 8
API_VERSIONS_KEY: Final = 18

_SIZE = struct.Struct(">i")
_HEADER_FIXED = struct.Struct(">hhi")
_INT16 = struct.Struct(">h")

# First flexible request version of each API (KIP-482), from the protocol's
# message definitions; tests check this table against kio's schema.
FIRST_FLEXIBLE_VERSION: Final[dict[int, int]] = {
    0: 9,  # Produce
    1: 12,  # Fetch
    2: 6,  # ListOffsets
    3: 9,  # Metadata
    8: 8,  # OffsetCommit
    9: 6,  # OffsetFetch
    10: 3,  # FindCoordinator
    11: 6,  # JoinGroup
    12: 4,  # Heartbeat
    13: 4,  # LeaveGroup
    14: 4,  # SyncGroup
    15: 5,  # DescribeGroups
    16: 3,  # ListGroups
    17: 1 << 15,  # SaslHandshake: never flexible
    18: 3,  # ApiVersions
    19: 5,  # CreateTopics
    20: 4,  # DeleteTopics
    21: 2,  # DeleteRecords
    22: 2,  # InitProducerId
    23: 4,  # OffsetForLeaderEpoch
    24: 3,  # AddPartitionsToTxn
    25: 3,  # AddOffsetsToTxn
    26: 3,  # EndTxn
    28: 3,  # TxnOffsetCommit
    29: 2,  # DescribeAcls
    30: 2,  # CreateAcls
    31: 2,  # DeleteAcls
    32: 4,  # DescribeConfigs
    33: 2,  # AlterConfigs
    34: 2,  # AlterReplicaLogDirs
    35: 2,  # DescribeLogDirs
    36: 2,  # SaslAuthenticate
    37: 2,  # CreatePartitions
    42: 2,  # DeleteGroups
    43: 2,  # ElectLeaders
    44: 1,  # IncrementalAlterConfigs
    45: 0,  # AlterPartitionReassignments
    46: 0,  # ListPartitionReassignments
    47: 1 << 15,  # OffsetDelete: never flexible
    48: 1,  # DescribeClientQuotas
    49: 1,  # AlterClientQuotas
    50: 0,  # DescribeUserScramCredentials
    51: 0,  # AlterUserScramCredentials
    55: 0,  # DescribeQuorum
    57: 0,  # UpdateFeatures
    60: 0,  # DescribeCluster
    61: 0,  # DescribeProducers
    65: 0,  # DescribeTransactions
    66: 0,  # ListTransactions
    68: 0,  # ConsumerGroupHeartbeat
    69: 0,  # ConsumerGroupDescribe
    74: 0,  # ListConfigResources
    75: 0,  # DescribeTopicPartitions
    76: 0,  # ShareGroupHeartbeat
    77: 0,  # ShareGroupDescribe
    78: 0,  # ShareFetch
    79: 0,  # ShareAcknowledge
    90: 0,  # DescribeShareGroupOffsets
    91: 0,  # AlterShareGroupOffsets
    92: 0,  # DeleteShareGroupOffsets
}


def is_flexible(api_key: int, api_version: int) -> bool:
    """Whether this request (and its response) uses compact types and tagged fields."""
    first = FIRST_FLEXIBLE_VERSION.get(api_key)
    return first is not None and api_version >= first


@dataclass(frozen=True, slots=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    flexible: bool  # body uses compact types; header v2 was parsed


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole request: its header and the body bytes after it."""

    header: RequestHeader
    body: memoryview


class NeedData:
    """Sentinel type: the buffer holds no complete frame yet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


def read_unsigned_varint(buffer: memoryview | bytes, position: int) -> tuple[int, int]:
    """Decode an unsigned varint at ``position``; returns (value, next position)."""
    value = 0
    shift = 0
    while True:
        if position >= len(buffer):
            raise InvalidRequestError("truncated varint", position=position)
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 28:
            raise InvalidRequestError("varint longer than 5 bytes", position=position)


def skip_tagged_fields(buffer: memoryview | bytes, position: int) -> int:
    """Skip a tagged-field section (count, then tag/size/bytes each); returns the next position."""
    count, position = read_unsigned_varint(buffer, position)
    for _ in range(count):
        _tag, position = read_unsigned_varint(buffer, position)
        size, position = read_unsigned_varint(buffer, position)
        position += size
        if position > len(buffer):
            raise InvalidRequestError("tagged field runs past the frame", position=position)
    return position


def parse_request_header(payload: memoryview) -> tuple[RequestHeader, int]:
    """Parse a request header; returns the header and the offset where the body starts."""
    if len(payload) < HEADER_BYTES_MIN:
        raise InvalidRequestError("frame shorter than a request header", frame_bytes=len(payload))
    api_key, api_version, correlation_id = _HEADER_FIXED.unpack_from(payload, 0)
    position = HEADER_BYTES_MIN
    # Header v1 and v2 both carry client_id as a classic nullable string.
    if position + 2 > len(payload):
        raise InvalidRequestError("truncated client_id", correlation_id=correlation_id)
    (length,) = _INT16.unpack_from(payload, position)
    position += 2
    client_id: str | None = None
    if length >= 0:
        if position + length > len(payload):
            raise InvalidRequestError("truncated client_id", correlation_id=correlation_id)
        try:
            client_id = bytes(payload[position : position + length]).decode()
        except UnicodeDecodeError:
            raise InvalidRequestError(
                "client_id is not utf-8", correlation_id=correlation_id
            ) from None
        position += length
    elif length != -1:
        raise InvalidRequestError("negative client_id length", length=length)
    flexible = is_flexible(api_key, api_version)
    if flexible:
        position = skip_tagged_fields(payload, position)
    header = RequestHeader(api_key, api_version, correlation_id, client_id, flexible)
    return header, position


class FrameDecoder:
    """Accumulates bytes and hands out whole frames.

    ``receive_data`` appends; ``next_frame`` returns a :class:`Frame` or
    ``NEED_DATA``. A bad size raises before the payload is buffered, so a
    client announcing 2 GiB costs nothing.

    The reads are kept as they came (a list of chunks, the first one consumed up to
    ``_offset``) and each frame is copied out of them once: a frame inside one read is a
    slice of it, a frame spread over reads (a produce of a MiB arrives in 64-256 KiB
    reads) one join of its pieces. Appending reads to one bytearray and slicing the
    frame out copied every byte twice more (growth and the compaction's memmove):
    ~22 % of the broker's samples in a 1 KiB acks=all produce phase.
    """

    def __init__(self, frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT) -> None:
        self.frame_bytes_max = frame_bytes_max
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes of _chunks[0] already handed out
        self._buffered = 0  # bytes received and not handed out

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._chunks.append(data if isinstance(data, bytes) else bytes(data))
            self._buffered += len(data)

    def next_frame(self) -> Frame | NeedData:
        if self._buffered < 4:
            return NEED_DATA
        if len(self._chunks[0]) - self._offset < 4:
            self._merge_front(4)
        (size,) = _SIZE.unpack_from(self._chunks[0], self._offset)
        if size < HEADER_BYTES_MIN:
            raise InvalidRequestError("frame size below the request header size", size=size)
        if size > self.frame_bytes_max:
            raise LimitExceededError(
                "frame larger than frame_bytes_max", size=size, limit=self.frame_bytes_max
            )
        if self._buffered < 4 + size:
            return NEED_DATA
        payload = self._take(4 + size, skip=4)  # the size prefix is in the first chunk
        view = memoryview(payload)
        header, body_start = parse_request_header(view)
        return Frame(header, view[body_start:])

    def _merge_front(self, wanted: int) -> None:
        """Join the first chunks until the first holds ``wanted`` unread bytes (a size
        prefix split between reads: a few bytes, rarely)."""
        parts = [self._chunks.popleft()[self._offset:]]
        have = len(parts[0])
        while have < wanted:
            parts.append(self._chunks.popleft())
            have += len(parts[-1])
        self._chunks.appendleft(b"".join(parts))
        self._offset = 0

    def _take(self, count: int, skip: int = 0) -> bytes:
        """Hand out the next ``count`` buffered bytes (without the first ``skip``, which
        must lie in the first chunk): one copy."""
        first = self._chunks[0]
        end = self._offset + count
        if end <= len(first):  # inside one read: a slice
            taken = first[self._offset + skip:end]
            if end == len(first):
                self._chunks.popleft()
                self._offset = 0
            else:
                self._offset = end
        else:  # spread over reads: one join
            parts: list[bytes | memoryview] = [memoryview(first)[self._offset + skip:]]
            remaining = end - len(first)
            self._chunks.popleft()
            while remaining:
                chunk = self._chunks[0]
                if len(chunk) <= remaining:
                    parts.append(self._chunks.popleft())
                    remaining -= len(chunk)
                    self._offset = 0
                else:
                    parts.append(memoryview(chunk)[:remaining])
                    self._offset = remaining
                    remaining = 0
            taken = b"".join(parts)
        self._buffered -= count
        return taken


def response_header(correlation_id: int, api_key: int, flexible: bool) -> bytes:
    """Response header bytes: v1 (with an empty tag section) for flexible versions except
    ApiVersions, else v0."""
    if flexible and api_key != API_VERSIONS_KEY:
        return _SIZE.pack(correlation_id) + b"\x00"
    return _SIZE.pack(correlation_id)


def frame(header: bytes, body: bytes | bytearray | memoryview) -> bytes:
    """Prefix header + body with their int32 size."""
    return b"".join((_SIZE.pack(len(header) + len(body)), header, body))
