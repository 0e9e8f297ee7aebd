"""Goal: keyed records land where Kafka's Java client (and kafka-python) would put them.

Method: compare murmur2 against kafka-python's implementation on fixed and seeded
random keys; check the sticky choice for keyless records moves round-robin."""

from __future__ import annotations

import random
import warnings

import pytest
from broker_harness import seed

with warnings.catch_warnings():  # kafka-python imports with deprecated importlib APIs
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.partitioner.default import murmur2 as kafka_murmur2

from conveyor.broker.partitioner import (
    StickyPartitioner,
    murmur2,
    partition_for_key,
    to_positive,
)

FIXED_KEYS = [b"", b"a", b"ab", b"abc", b"abcd", b"abcde", b"foo", b"21", b"\xff\xfe\xfd",
              b"\x80" * 7, "ключ".encode(), b"0123456789" * 10]


@pytest.mark.parametrize("key", FIXED_KEYS)
def test_murmur2_matches_kafka_python(key: bytes) -> None:
    assert to_positive(murmur2(key)) == kafka_murmur2(key) & 0x7FFFFFFF


def test_murmur2_known_java_values() -> None:
    # Values from Kafka's own UtilsTest (signed 32-bit ints).
    assert murmur2(b"21") == -973932308
    assert murmur2(b"foobar") == -790332482
    assert murmur2(b"a-little-bit-long-string") == -985981536
    assert murmur2(b"a-little-bit-longer-string") == -1486304829
    assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == -58897971
    assert murmur2(b"abc") == 479470107


def test_murmur2_random_keys_match_kafka_python() -> None:
    rng = random.Random(seed())
    for _ in range(500):
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        assert to_positive(murmur2(key)) == kafka_murmur2(key) & 0x7FFFFFFF, key


def test_partition_for_key_is_positive_modulo() -> None:
    for partitions in (1, 3, 7, 100):
        for key in FIXED_KEYS:
            expected = (kafka_murmur2(key) & 0x7FFFFFFF) % partitions
            assert partition_for_key(key, partitions) == expected


def test_sticky_for_null_keys_rotates_per_batch() -> None:
    partitioner = StickyPartitioner(random.Random(seed()))
    first = partitioner.partition("t", None, 3)
    assert partitioner.partition("t", None, 3) == first
    partitioner.next_batch("t", 3)
    assert partitioner.partition("t", None, 3) == (first + 1) % 3
    assert partitioner.partition("t", b"foo", 3) == partition_for_key(b"foo", 3)
