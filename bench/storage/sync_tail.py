"""The disk's fdatasync latency, one write at a time: appending vs overwriting (issue 17).

Run:  .venv/bin/python -m bench.storage.sync_tail [--seconds 5] [--size 100] [--dir DIR]

Each mode writes ``--size`` bytes and fdatasyncs, one after the other, for ``--seconds``:
- ``append``: at the end of the file (the file grows: on ext4 every fdatasync then
  commits the journal for the new size, what Conveyor's segments do today);
- ``overwrite``: into a file zero-filled and synced beforehand, below its size (no
  metadata to commit: only the data and a cache flush, as PostgreSQL's pre-zeroed WAL
  segments).
Prints p50/p90/p99/p99.9/max in µs per mode. Modes alternate in two rounds (ABAB).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PREFILL_BYTES = 64 << 20


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    result: dict[str, float] = {"count": len(ordered)}
    for percentile in (50, 90, 99, 99.9):
        rank = min(len(ordered) - 1, int(len(ordered) * percentile / 100))
        result[f"p{percentile:g}"] = round(ordered[rank] * 1e6, 1)
    result["max"] = round(ordered[-1] * 1e6, 1)
    return result


def run(mode: str, directory: Path, size: int, seconds: float) -> dict[str, float]:
    path = directory / f"sync-tail-{mode}"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        if mode == "overwrite":
            chunk = b"\0" * (1 << 20)
            for position in range(0, PREFILL_BYTES, len(chunk)):
                os.pwrite(descriptor, chunk, position)
            os.fsync(descriptor)
        record = b"r" * size
        samples: list[float] = []
        position = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and position + size <= PREFILL_BYTES:
            started = time.perf_counter()
            os.pwrite(descriptor, record, position)
            os.fdatasync(descriptor)
            samples.append(time.perf_counter() - started)
            position += size
        return _percentiles(samples)
    finally:
        os.close(descriptor)
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None)
    options = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="sync-tail-", dir=options.dir))
    try:
        for round_index in range(2):
            for mode in ("append", "overwrite"):
                result = run(mode, directory, options.size, options.seconds)
                print(json.dumps({"round": round_index, "mode": mode, "us": result}),
                      flush=True)
    finally:
        directory.rmdir()


if __name__ == "__main__":
    main()
