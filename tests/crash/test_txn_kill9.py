"""Kill -9 between the markers of a multi-partition commit (or abort): on restart every
partition ends the same way, nothing half-visible.

Method: a real child process (txn_child.py) runs a broker, writes a transactional record
to each of 3 partitions and ends the transaction, its marker writer wrapped so that only
the first marker is written; once that marker is durable the parent SIGKILLs it. The
parent opens a broker on the same directory and checks: the coordinator finished the
decision it had persisted (PrepareCommit/PrepareAbort is written before any marker),
every partition has its marker and a last stable offset at its end, and the committed
reads (what read_committed consumers and every other protocol see) hold all three
records after a commit and none after an abort.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.storage.control_batch import CONTROL_ABORT, CONTROL_COMMIT, control_type
from conveyor.storage.record_batch import RecordData, build_batch, decode_records, split_batches
from conveyor.testing.server import run_broker

CHILD = Path(__file__).with_name("txn_child.py")
ROOT = Path(__file__).resolve().parents[2]


def kill_between_markers(directory: Path, mode: str) -> int:
    child = subprocess.Popen([sys.executable, str(CHILD), str(directory), mode],
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    try:
        assert child.stdout.readline().startswith(b"ready")
        line = child.stdout.readline()
        assert line.startswith(b"marker"), line
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    return int(line.split()[1])


@pytest.mark.parametrize("mode", ["commit", "abort"])
async def test_kill9_between_markers(tmp_path: Path, mode: str) -> None:
    data = tmp_path / "data"
    marked = kill_between_markers(data, mode)
    async with run_broker(data) as server:
        broker = server.broker
        description = broker.describe_transaction("crash-tid")
        assert description is not None
        assert description.state == ("CompleteCommit" if mode == "commit" else "CompleteAbort")
        values = []
        for partition in range(3):
            offsets = broker.offsets("crash-txn", partition)
            assert broker.last_stable_offset("crash-txn", partition) == offsets.high_watermark
            data_slice, _ = await broker.fetch("crash-txn", partition, 0, 1 << 20)
            raw = data_slice.read_bytes()
            markers = [control_type(decode_records(raw, position)[0])
                       for position, header in split_batches(raw) if header.is_control]
            expected = CONTROL_COMMIT if mode == "commit" else CONTROL_ABORT
            # the partition marked before the kill has its marker twice (the second ends
            # nothing); the others got theirs on recovery
            assert markers == [expected] * (2 if partition == marked else 1)
            values += [r.value for r in await broker.read_records("crash-txn", partition, 0, 10)]
        if mode == "commit":
            assert sorted(values) == [b"v0", b"v1", b"v2"]
        else:
            assert values == []
        # the producer goes on with its next sequence: recovery re-scanned the log past
        # the producer-state checkpoint, markers included, and a marker has no sequence
        producer = (description.producer_id, description.producer_epoch)
        added = await broker.add_partitions_to_txn("crash-tid", *producer, [("crash-txn", 0)])
        assert added == {("crash-txn", 0): None}
        batch = build_batch([RecordData(None, b"next", (), 1000)], producer_id=producer[0],
                            producer_epoch=producer[1], base_sequence=1, is_transactional=True)
        await broker.append_batch("crash-txn", 0, batch)
        await broker.end_txn("crash-tid", *producer, commit=True)
        records = await broker.read_records("crash-txn", 0, 0, 10)
        assert [r.value for r in records] == ([b"v0"] if mode == "commit" else []) + [b"next"]
