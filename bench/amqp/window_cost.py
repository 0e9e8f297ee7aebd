"""Broker CPU per message of a queue's consume path without a socket: acquire + ack.

Run: ``python -m bench.amqp.window_cost --sources A,B [--messages 40000] [--rounds 5]``
(a plain script). For each checkout in turn (A, B, A, B, ...) a child process with
``PYTHONPATH`` at that checkout opens a Broker on the OS file system and SQLite in a
scratch directory, publishes ``--messages`` 1 KiB messages with the four headers an
AMQP publish records (in batches of 500), then drains the queue as an AMQP consumer
does: acquire up to 250 records (consumer id, lock 30 min), ack their receipts without
waiting for durability (AMQP's ``basic.ack``), let the loop turn end (as acks arriving
in later reads do: the window's save and the COMMIT run), until empty. It prints the process CPU
time (``time.process_time``: every thread) per message of the drain. With
``--records-from log`` (the default) the appended-records cache is emptied first, so
the records are read and decoded from the log.
The machine's neighbours disturb CPU per message far less than wall-clock rates; the
medians per checkout are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.ab import print_medians, rotated, run_child

CHILD = r'''
import asyncio, json, random, sys, time
from pathlib import Path
from conveyor.broker.broker import Broker, BrokerConfig
from conveyor.broker.types import Message
from conveyor.clock import SystemClock
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore
from conveyor.storage.state_store import SqliteStateStore

async def main(directory: str, count: int, from_log: bool) -> None:
    clock = SystemClock()
    broker = Broker(FileLogStore(directory + "/logs", OsFileSystem(), clock),
                    SqliteStateStore(Path(directory) / "state.sqlite3"), clock,
                    random.Random(1), BrokerConfig())
    await broker.open()
    await broker.declare_queue("q")
    headers = (("amqp.properties", b"\x10\x00\x02"), ("amqp.exchange", b""),
               ("amqp.routing-key", b"q"), ("delivery-mode", b"2"))
    body = bytes(1024)
    for _ in range(count // 500):
        await broker.publish("q", [Message(body, None, headers)] * 500)
    shared = broker.shared_groups
    if from_log:  # decode from the log, as a drain of a backlog does
        cache = getattr(shared, "appended", None)
        if cache is not None:  # the cache's own class (after the split of shared_groups)
            cache.partitions.clear()
            cache.count = cache.size_bytes = 0
        else:  # SharedGroups held it itself before
            shared._appended.clear()
            shared._appended_count = 0
    start = time.process_time()
    drained = 0
    while drained < count:
        deliveries = await broker.acquire("q", "q", records_max=250, lock_ms=1_800_000,
                                          consumer_id="amqp/1/1/1")
        if not deliveries:
            break
        await broker.ack([d.receipt for d in deliveries], wait_durable=False)
        drained += len(deliveries)
        for _ in range(3):  # acks arrive in later reads: the turns end (save, COMMIT)
            await asyncio.sleep(0)
    cpu_s = time.process_time() - start
    await broker.close()
    print(json.dumps({"drained": drained, "cpu_us_per_msg": round(cpu_s / drained * 1e6, 2)}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "log"))
'''


def one_run(source: str, messages: int, records_from: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="window-cost-") as scratch:
        return run_child(source, CHILD, scratch, str(messages), records_from)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sources", required=True)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records-from", choices=("log", "cache"), default="log",
                        help="log: the appended-records cache is emptied before the drain "
                        "(a backlog); cache: published records are served from it")
    options = parser.parse_args()
    sources = [str(Path(source).resolve()) for source in options.sources.split(",")]
    runs: dict[str, list[dict[str, float]]] = {source: [] for source in sources}
    for index in range(options.rounds):
        for source in rotated(sources, index):
            result = one_run(source, options.messages, options.records_from)
            runs[source].append(result)
            print(json.dumps({"source": source, **result}), flush=True)
    print_medians(runs, ("cpu_us_per_msg",))

if __name__ == "__main__":
    main()
