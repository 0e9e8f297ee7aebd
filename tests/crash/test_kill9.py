"""Kill -9: every record acknowledged under fsync=always survives SIGKILL, intact.

Method: a real child process (kill9_child.py) appends through the LogStore seam
(FileLogStore on the real disk, or PostgresLogStore on the session's PostgreSQL) and
prints each acknowledged (offset, crc32) line. The parent SIGKILLs it at a random
moment, restarts it on the same directory or database, 20 times, then reopens the
store and checks every acknowledged record at its offset. Seed: CONVEYOR_SEED or
printed. tests/crash/test_mixed_kill9.py kills a whole server under real clients.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from kill9_child import open_store

from conveyor.storage.record_batch import iter_records

CHILD = Path(__file__).with_name("kill9_child.py")
ROOT = Path(__file__).resolve().parents[2]
KILLS = 20


def run_until_killed(directory: Path, seed: int, delay_s: float,
                     storage: str) -> list[tuple[int, int]]:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), str(seed), storage],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    ready = child.stdout.readline()
    assert ready.startswith(b"ready"), ready
    time.sleep(delay_s)  # a real process at a random moment: wall time is the point here
    child.send_signal(signal.SIGKILL)
    output = child.stdout.read()
    child.wait()
    acknowledged = []
    for line in output.split(b"\n"):
        parts = line.split()
        if len(parts) == 2:  # a torn last line was never fully acknowledged to us
            acknowledged.append((int(parts[0]), int(parts[1])))
    return acknowledged


@pytest.fixture(params=["file", "postgresql"])
def storage(request: pytest.FixtureRequest) -> str:
    if request.param == "file":
        return "file:"
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


def test_acknowledged_records_survive_sigkill(tmp_path: Path, storage: str) -> None:
    seed = int(os.environ.get("CONVEYOR_SEED", random.SystemRandom().randrange(2**32)))
    print(f"CONVEYOR_SEED={seed}")
    rng = random.Random(seed)
    acknowledged: dict[int, int] = {}
    for run in range(KILLS):
        for offset, checksum in run_until_killed(tmp_path, seed + run, rng.uniform(0.0, 0.25),
                                                 storage):
            assert acknowledged.setdefault(offset, checksum) == checksum, "offset reused"
    assert len(acknowledged) > 100, "the child must have acknowledged appends"
    found = asyncio.run(read_all_checksums(tmp_path, storage))
    missing = {offset: checksum for offset, checksum in acknowledged.items()
               if found.get(offset) != checksum}
    assert not missing, f"lost or damaged acknowledged records: {sorted(missing)[:10]}"


async def read_all_checksums(tmp_path: Path, storage: str) -> dict[int, int]:
    store = open_store(str(tmp_path), storage)
    await store.open()
    offsets = store.offsets("crash", 0)
    found: dict[int, int] = {}
    offset = offsets.log_start_offset
    while offset < offsets.high_watermark:
        data = (await store.read("crash", 0, offset, 1 << 20)).read_bytes()
        records = list(iter_records(data))
        found.update((record.offset, zlib.crc32(record.value or b"")) for record in records)
        offset = records[-1].offset + 1
    await store.close()
    return found
