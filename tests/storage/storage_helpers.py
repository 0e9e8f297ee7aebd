"""Helpers shared by the storage tests: batch builders, readers, seeded randomness."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

from conveyor.storage.log_store import LogConfig
from conveyor.storage.record_batch import RecordData, build_batch, iter_records


def make_batch(values: Sequence[bytes], *, timestamp_ms: int = 1_700_000_000_000,
               keys: Sequence[bytes | None] | None = None) -> bytes:
    keys = keys if keys is not None else [None] * len(values)
    return build_batch([RecordData(key, value, (), timestamp_ms)
                        for key, value in zip(keys, values, strict=True)])


def values_of(data: bytes) -> list[tuple[int, bytes | None]]:
    return [(record.offset, record.value) for record in iter_records(data)]


def seeded_rng() -> random.Random:
    seed = int(os.environ.get("CONVEYOR_SEED", random.SystemRandom().randrange(2**32)))
    print(f"CONVEYOR_SEED={seed}")
    return random.Random(seed)


SMALL = LogConfig(segment_bytes=2_000, index_interval_bytes=256)
