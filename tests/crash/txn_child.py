"""Child process for test_txn_kill9: a multi-partition transaction killed between markers.

Usage: python txn_child.py <data-dir> <commit|abort>. Runs a broker on the directory,
writes one transactional record to each of 3 partitions, then ends the transaction;
the coordinator's marker writer is wrapped so that the first marker is appended
(durable: fsync=always) and every other one never is. Prints ``marker <partition>``
once the first marker is durable and then waits to be SIGKILLed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.server import run_broker

PARTITIONS = 3


async def main(directory: str, mode: str) -> None:
    async with run_broker(Path(directory)) as server:
        broker = server.broker
        await broker.create_topic("crash-txn", PARTITIONS)
        producer_id, epoch = await broker.init_producer_id("crash-tid", 60_000)
        keys = [("crash-txn", partition) for partition in range(PARTITIONS)]
        outcome = await broker.add_partitions_to_txn("crash-tid", producer_id, epoch, keys)
        assert all(error is None for error in outcome.values()), outcome
        for partition in range(PARTITIONS):
            batch = build_batch([RecordData(None, f"v{partition}".encode(), (), 1000)],
                                producer_id=producer_id, producer_epoch=epoch,
                                base_sequence=0, is_transactional=True)
            await broker.append_batch("crash-txn", partition, batch)
        write_marker = broker.transactions._write_marker
        written: list[int] = []
        never = asyncio.Event()

        async def first_marker_only(topic: str, partition: int, *rest: object) -> int:
            if written:
                await never.wait()
            written.append(partition)
            offset = await write_marker(topic, partition, *rest)  # type: ignore[arg-type]
            print(f"marker {partition}", flush=True)
            await never.wait()
            return offset

        broker.transactions._write_marker = first_marker_only
        print("ready", flush=True)
        await broker.end_txn("crash-tid", producer_id, epoch, commit=mode == "commit")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
