"""Broker CPU per message when messages come one at a time: publish, deliver, ack.

Run: ``python -m bench.amqp.cycle_cost --sources A,B [--messages 3000] [--rounds 5]
[--gap-ms 0.5]`` (a plain script). The regime of the AMQP e2e phase at 2,000 msg/s on
an idle machine, where every message has the broker to itself (each fsync pass, save
and COMMIT covers one message), without sockets or client processes, so that the
neighbours of a shared machine disturb it far less than the socket benchmark
(``e2e_ab.py``), whose passes cover more messages the busier the machine is.

For each checkout in turn (A, B, A, B, ...) a child process with ``PYTHONPATH`` at that
checkout opens a Broker on the OS file system and SQLite in a scratch directory and
declares a queue. A consumer task parks in ``acquire`` (wait 1 s, as the AMQP
consumer does) and acks each delivery without waiting for durability (AMQP's
``basic.ack``); a publisher publishes one 1 KiB message with AMQP's headers, awaits
it (the publisher confirm: written and fsynced), waits until the consumer has it,
then sleeps ``--gap-ms``. It prints the process CPU time (``time.process_time``: every
thread) per message, the mean and p99 of publish-start to delivery (wall: the
machine's load shows in it), and per message: fsync passes, sync jobs, fdatasyncs of
the log and of the SQLite WAL, COMMITs and thread hand-offs (executor calls of the
barrier and the state store). On uvloop, as ``conveyor serve``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.ab import print_medians, rotated, run_child

CHILD = r'''
import asyncio, json, os, random, sys, time
from pathlib import Path
from conveyor.broker.broker import Broker, BrokerConfig
from conveyor.broker.types import Message
from conveyor.clock import SystemClock
from conveyor.storage import durability, sqlite_engine
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore
from conveyor.storage.state_store import SqliteStateStore

counts = {"fdatasync_log": 0, "fdatasync_wal": 0, "commits": 0, "executor_calls": 0}
original_fdatasync = os.fdatasync

def fdatasync(descriptor):
    try:
        name = os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        name = ""
    counts["fdatasync_wal" if name.endswith("-wal") else "fdatasync_log"] += 1
    original_fdatasync(descriptor)

os.fdatasync = fdatasync
original_commit = sqlite_engine.SqliteEngine._commit_now

def commit_now(self):
    if self._in_transaction:
        counts["commits"] += 1
    original_commit(self)

sqlite_engine.SqliteEngine._commit_now = commit_now
original_call = sqlite_engine.call_in_thread

def call_in_thread(function, *arguments):
    counts["executor_calls"] += 1
    return original_call(function, *arguments)

if hasattr(durability, "call_in_thread"):  # checkouts before the sync threads
    durability.call_in_thread = call_in_thread
else:
    original_start = durability.start_in_thread

    def start_in_thread(function, argument, done):
        counts["executor_calls"] += 1
        return original_start(function, argument, done)

    durability.start_in_thread = start_in_thread
sqlite_engine.call_in_thread = call_in_thread

async def main(directory, count, gap_s):
    clock = SystemClock()
    broker = Broker(FileLogStore(directory + "/logs", OsFileSystem(), clock),
                    SqliteStateStore(Path(directory) / "state.sqlite3"), clock,
                    random.Random(1), BrokerConfig())
    await broker.open()
    await broker.declare_queue("q")
    headers = (("amqp.properties", b"\x10\x00\x02"), ("amqp.exchange", b""),
               ("amqp.routing-key", b"q"), ("delivery-mode", b"2"))
    body = bytes(1024)
    arrived = asyncio.Event()

    async def consume():
        while True:
            deliveries = await broker.acquire("q", "q", records_max=250, lock_ms=1_800_000,
                                              wait_ms=1000, consumer_id="amqp/1/1/1")
            if deliveries:
                await broker.ack([d.receipt for d in deliveries], wait_durable=False)
                arrived.set()

    consumer = asyncio.create_task(consume())
    for _ in range(200):  # warm-up
        arrived.clear()
        await broker.publish("q", [Message(body, None, headers)])
        await arrived.wait()
    barrier = durability.barrier_for_loop()
    passes, jobs = barrier.pass_count, barrier.job_count
    with open(Path(directory) / "state.sqlite3-wal", "rb") as file:
        wal_sequence_start = int.from_bytes(file.read(16)[12:16], "big")
    for key in counts:
        counts[key] = 0
    latencies = []
    start = time.process_time()
    for _ in range(count):
        arrived.clear()
        sent = time.perf_counter()
        await broker.publish("q", [Message(body, None, headers)])
        await arrived.wait()
        latencies.append((time.perf_counter() - sent) * 1000)
        await asyncio.sleep(gap_s)
    cpu_s = time.process_time() - start
    wal = Path(directory) / "state.sqlite3-wal"
    with open(wal, "rb") as file:
        header = file.read(16)
    wal_bytes = wal.stat().st_size
    # the WAL header's checkpoint sequence: +1 each time a writer restarts the WAL
    wal_restarts = int.from_bytes(header[12:16], "big") - wal_sequence_start
    per = {key: round(value / count, 3) for key, value in counts.items()}
    per["passes"] = round((barrier.pass_count - passes) / count, 3)
    per["sync_jobs"] = round((barrier.job_count - jobs) / count, 3)
    consumer.cancel()
    try:
        await consumer
    except asyncio.CancelledError:
        pass
    await broker.close()
    latencies.sort()
    print(json.dumps({"cpu_us_per_msg": round(cpu_s / count * 1e6, 1),
                      "latency_ms_mean": round(sum(latencies) / count, 3),
                      "latency_ms_p99": round(latencies[int(count * 0.99)], 3),
                      "latency_ms_max": round(latencies[-1], 3),
                      "wal_bytes_end": wal_bytes, "wal_restarts": wal_restarts,
                      "per_msg": per, "load": round(os.getloadavg()[0], 2)}))

import uvloop  # the loop conveyor serve runs on
uvloop.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000))
'''


def one_run(source: str, messages: int, gap_ms: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="cycle-cost-") as scratch:
        return run_child(source, CHILD, scratch, str(messages), str(gap_ms))

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sources", required=True)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap-ms", type=float, default=0.5)
    options = parser.parse_args()
    sources = [str(Path(source).resolve()) for source in options.sources.split(",")]
    runs: dict[str, list[dict[str, object]]] = {source: [] for source in sources}
    for index in range(options.rounds):
        for source in rotated(sources, index):
            result = one_run(source, options.messages, options.gap_ms)
            runs[source].append(result)
            print(json.dumps({"source": Path(source).name, **result}), flush=True)
    print_medians(runs, ("cpu_us_per_msg", "latency_ms_mean", "latency_ms_p99"))

if __name__ == "__main__":
    main()
