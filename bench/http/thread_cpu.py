"""The broker's CPU per HTTP request, per thread (user and system), Conveyor alone.

For a shared machine: py-spy's wall-clock samples count a thread that waits for a core
as busy where it waits, so on a loaded host they overstate the event loop and the
executor; the kernel's CPU time per thread does not. One client, one connection, for
``--seconds``: ``health`` (``GET /health``, the floor of one request), ``publish``
(publish batch 1, 1 KiB), ``acquire`` (acquire ``--batch`` + ack of the receipts,
``--stored`` messages published first) or ``carried`` (one acquire ``--batch`` per cycle
carrying the last batch's acks). Prints, per message: each broker thread's user
and system µs (the event loop is the busiest; the others are the executor's fdatasync
threads) and the client's, beside msg/s and the load average.

Run:  .venv/bin/python -m bench.http.thread_cpu {health,publish,acquire,carried} [--seconds 5]
      [--batch 100] [--stored 80000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from conveyor import Client
from conveyor.client import encode_message
from conveyor.testing.server import BrokerProcess

VALUE = b"x" * 1024


def _thread_times(process: psutil.Process) -> dict[int, tuple[float, float]]:
    return {thread.id: (thread.user_time, thread.system_time) for thread in process.threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("health", "publish", "acquire", "carried"),
                        help="carried: acquire --batch carrying the last batch's acks")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=100, help="acquire: records per acquire")
    parser.add_argument("--stored", type=int, default=80_000, help="acquire: published first")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        broker = BrokerProcess(Path(directory) / "conveyor", listeners=("http",))
        broker.data_dir.mkdir()
        broker.start()
        assert broker.process is not None
        try:
            process = psutil.Process(broker.process.pid)
            with Client(f"http://127.0.0.1:{broker.ports['http']}") as client:
                client.create_queue("q")
                one = [encode_message(VALUE)]
                if options.mode in ("acquire", "carried"):
                    thousand = [encode_message(VALUE) for _ in range(1000)]
                    for _ in range(max(1, options.stored // 1000)):
                        client.publish_batch("q", thousand)

                def acquire_ack() -> int:
                    messages = client.acquire("q", limit=options.batch)
                    if messages:
                        client.ack("q", "q", [m.receipt for m in messages if m.receipt])
                    return len(messages)

                pending: list[str] = []

                def carried() -> int:
                    messages = client.acquire("q", limit=options.batch, ack=pending)
                    assert not messages.ack_failures, messages.ack_failures[:3]
                    pending[:] = [m.receipt for m in messages if m.receipt]
                    return len(messages)

                steps: dict[str, Callable[[], int]] = {
                    "health": lambda: len([client.health()]),
                    "publish": lambda: len(client.publish_batch("q", one)),
                    "acquire": acquire_ack,
                    "carried": carried,
                }
                step = steps[options.mode]
                for _ in range(100):  # warm: connections, caches, the first segment
                    if options.mode not in ("acquire", "carried"):
                        step()
                before, client_before = _thread_times(process), psutil.Process().cpu_times()
                started, handled = time.perf_counter(), 0
                while time.perf_counter() - started < options.seconds:
                    count = step()
                    if count == 0:
                        break
                    handled += count
                wall_s = time.perf_counter() - started
                after, client_after = _thread_times(process), psutil.Process().cpu_times()
        finally:
            broker.stop()
    handled = max(1, handled)
    threads = []
    for thread_id, (user, system) in after.items():
        user_before, system_before = before.get(thread_id, (0.0, 0.0))
        figures = (round((user - user_before) / handled * 1e6, 2),
                   round((system - system_before) / handled * 1e6, 2))
        if sum(figures) > 0:
            threads.append(figures)
    threads.sort(reverse=True)
    print(json.dumps({
        "mode": options.mode,
        "batch": options.batch if options.mode in ("acquire", "carried") else 1,
        "messages": handled, "msg_per_s": round(handled / wall_s),
        "broker_threads_user_system_us_per_msg": threads,
        "client_user_system_us_per_msg": [
            round((client_after.user - client_before.user) / handled * 1e6, 2),
            round((client_after.system - client_before.system) / handled * 1e6, 2)],
        "load_average_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
