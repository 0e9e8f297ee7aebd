"""The embedded consumer protocol of classic groups (protocol type "consumer").

Owns: reading a ConsumerProtocolSubscription (what a classic member sends in JoinGroup:
version int16, topics, user data, v1+ owned partitions, v2+ generation, v3+ rack) and
writing a ConsumerProtocolAssignment (what SyncGroup hands back: version int16, topic
partitions, user data). Needed where the broker computes a classic member's assignment
(a classic member of a KIP-848 consumer group during the online migration) and where it
reads what a classic group's members own (the upgrade).

Rules: sans-IO, pure. Bytes that do not parse give what parsed before them (a
subscription without a valid owned-partitions section owns nothing), never an error;
every count is checked against the bytes left before anything is sized by it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

Partitions = dict[str, frozenset[int]]


@dataclass(frozen=True, slots=True)
class Subscription:
    version: int = 0
    topics: tuple[str, ...] = ()
    owned: Partitions = field(default_factory=dict)
    complete: bool = False  # the topic list parsed


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.position = 0

    def _take(self, size: int) -> memoryview:
        if size < 0 or self.position + size > len(self.view):
            raise ValueError("truncated")
        chunk = self.view[self.position:self.position + size]
        self.position += size
        return chunk

    def int16(self) -> int:
        return int(struct.unpack(">h", self._take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self._take(4))[0])

    def count(self, item_bytes_min: int) -> int:
        number = self.int32()
        if number < 0:
            return 0
        if number * item_bytes_min > len(self.view) - self.position:
            raise ValueError("count beyond the bytes received")
        return number

    def string(self) -> str:
        length = self.int16()
        if length < 0:
            raise ValueError("null string")
        return bytes(self._take(length)).decode()

    def skip_bytes(self) -> None:
        length = self.int32()
        if length > 0:
            self._take(length)

    def topic_partitions(self) -> Partitions:
        result: dict[str, set[int]] = {}
        for _ in range(self.count(6)):
            topic = self.string()
            parts = result.setdefault(topic, set())
            for _ in range(self.count(4)):
                parts.add(self.int32())
        return {topic: frozenset(parts) for topic, parts in result.items() if parts}


def parse_subscription(metadata: bytes) -> Subscription:
    """A classic member's subscription; partial when the bytes end early or are bad."""
    reader = _Reader(bytes(metadata))
    try:
        version = reader.int16()
        topics = tuple(reader.string() for _ in range(reader.count(2)))
    except (ValueError, UnicodeDecodeError, struct.error):
        return Subscription()
    try:
        reader.skip_bytes()
        owned = reader.topic_partitions() if version >= 1 else {}
    except (ValueError, UnicodeDecodeError, struct.error):
        owned = {}
    return Subscription(version, topics, owned, True)


def parse_assignment(data: bytes) -> Partitions:
    """The partitions of a ConsumerProtocolAssignment (none if it does not parse)."""
    reader = _Reader(bytes(data))
    try:
        reader.int16()
        return reader.topic_partitions()
    except (ValueError, UnicodeDecodeError, struct.error):
        return {}


def encode_assignment(partitions: Mapping[str, frozenset[int]], version: int = 0) -> bytes:
    """A ConsumerProtocolAssignment naming ``partitions`` (user data null)."""
    topics = sorted((topic, sorted(parts)) for topic, parts in partitions.items() if parts)
    out = bytearray(struct.pack(">hi", max(0, min(version, 3)), len(topics)))
    for topic, parts in topics:
        name = topic.encode()
        out += struct.pack(">h", len(name)) + name + struct.pack(">i", len(parts))
        out += b"".join(struct.pack(">i", part) for part in parts)
    out += struct.pack(">i", -1)
    return bytes(out)
