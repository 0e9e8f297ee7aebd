"""Partition choice for produced records.

Owns: Kafka's murmur2 hash exactly as the Java client computes it (so a keyed
record lands on the same partition whichever client or protocol produced it),
``partition_for_key`` = positive(murmur2(key)) % partitions, and the sticky
choice for records without a key: every keyless record of one publish call goes
to one partition, and the next call moves round-robin to the next partition
(Kafka's KIP-480 sticky partitioner, batch-granular).

Must not know: topics' storage, protocols. Randomness comes from the caller's rng.
"""

from __future__ import annotations

import random

_MASK_32 = 0xFFFFFFFF
_SEED = 0x9747B28C
_MULTIPLIER = 0x5BD1E995
_SHIFT = 24


def murmur2(data: bytes) -> int:
    """MurmurHash2 (32-bit, seed 0x9747b28c) as a signed 32-bit int, like Java's Utils.murmur2."""
    length = len(data)
    hash_value = (_SEED ^ length) & _MASK_32
    whole_words = length // 4
    for index in range(whole_words):
        word = int.from_bytes(data[index * 4 : index * 4 + 4], "little")
        word = (word * _MULTIPLIER) & _MASK_32
        word ^= word >> _SHIFT
        word = (word * _MULTIPLIER) & _MASK_32
        hash_value = (hash_value * _MULTIPLIER) & _MASK_32
        hash_value ^= word
    tail = whole_words * 4
    remaining = length - tail
    if remaining >= 3:
        hash_value ^= data[tail + 2] << 16
    if remaining >= 2:
        hash_value ^= data[tail + 1] << 8
    if remaining >= 1:
        hash_value ^= data[tail]
        hash_value = (hash_value * _MULTIPLIER) & _MASK_32
    hash_value ^= hash_value >> 13
    hash_value = (hash_value * _MULTIPLIER) & _MASK_32
    hash_value ^= hash_value >> 15
    return hash_value - (1 << 32) if hash_value & 0x80000000 else hash_value


def to_positive(value: int) -> int:
    """Java's Utils.toPositive: clear the sign bit (not abs: abs(MIN_VALUE) overflows)."""
    return value & 0x7FFFFFFF


def partition_for_key(key: bytes, partitions: int) -> int:
    assert partitions > 0
    return to_positive(murmur2(key)) % partitions


class StickyPartitioner:
    """Keyless records: one partition per topic until ``next_batch`` moves it round-robin."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        # topic -> partition keyless records currently stick to
        self._current: dict[str, int] = {}

    def partition(self, topic: str, key: bytes | None, partitions: int) -> int:
        if key is not None:
            return partition_for_key(key, partitions)
        current = self._current.get(topic)
        if current is None or current >= partitions:
            current = self._rng.randrange(partitions)
            self._current[topic] = current
        return current

    def next_batch(self, topic: str, partitions: int) -> None:
        """A batch of keyless records was sent: the next one goes to the next partition."""
        current = self._current.get(topic)
        if current is not None:
            self._current[topic] = (current + 1) % partitions

    def forget(self, topic: str) -> None:
        self._current.pop(topic, None)
