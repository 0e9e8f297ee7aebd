"""HTTP shared-group acquire + ack, Conveyor alone, with an optional py-spy profile.

A short, focused run for profiling the broker's per-message cost on one path (issue 17):
publish ``--messages`` 1 KiB messages into a fresh queue (batches of 1,000), then drain it
with ``client.acquire(limit=batch)`` + ``client.ack`` (``--carried``: one
``client.acquire(limit=batch, ack=<the last batch's receipts>)``) for each ``--batches``
size, each phase at most ``--seconds``, and report messages per broker-CPU-second (the figure that a
shared machine disturbs least) beside the raw rate and the client's CPU.

Run:  .venv/bin/python -m bench.http.profile_acquire [--batches 100,1000] [--seconds 6]
      [--messages 60000] [--profile DIR] [--carried]

With ``--profile DIR`` the broker is recorded with py-spy (``bench.amqp.profile``) during
each acquire + ack phase; summarise with ``python -m bench.amqp.profile FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.amqp import profile
from bench.measure import CpuMeter
from conveyor import Client
from conveyor.client import encode_message
from conveyor.testing.server import BrokerProcess

VALUE = b"x" * 1024
PUBLISH_BATCH = 1_000


def drain(client: Client, queue: str, batch: int, seconds: float, broker_pid: int,
          carried: bool = False) -> dict[str, Any]:
    """``carried``: each acquire carries the last batch's acks (one request per cycle)."""
    meter = CpuMeter(broker_pid)
    started = time.perf_counter()
    handled = 0
    pending: list[str] = []
    while time.perf_counter() - started < seconds:
        if carried:
            messages = client.acquire(queue, limit=batch, ack=pending)
            assert not messages.ack_failures, messages.ack_failures[:3]
            pending = [m.receipt for m in messages if m.receipt]
        else:
            messages = client.acquire(queue, limit=batch)
        if not messages:
            break
        if not carried:
            client.ack(queue, queue, [m.receipt for m in messages if m.receipt])
        handled += len(messages)
    if pending:
        client.ack(queue, queue, pending)  # stopped by the clock: settle the last batch
    cpu = meter.stop()
    broker_cpu_s = cpu["broker_cpu_pct"] * cpu["wall_s"] / 100
    return {"batch": batch, "carried": carried, "messages": handled, **cpu,
            "msg_per_s": round(handled / cpu["wall_s"]),
            "msg_per_broker_cpu_s": round(handled / max(broker_cpu_s, 1e-9))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="100,1000")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--messages", type=int, default=60_000, help="published per phase")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--carried", action="store_true",
                        help="acks carried by the next acquire (acquire(ack=...))")
    options = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as directory:
        broker = BrokerProcess(Path(directory) / "conveyor", listeners=("http",))
        broker.data_dir.mkdir()
        broker.start()
        assert broker.process is not None
        try:
            with Client(f"http://127.0.0.1:{broker.ports['http']}") as client:
                for batch in (int(b) for b in options.batches.split(",")):
                    queue = f"profile-{batch}"
                    client.create_queue(queue)
                    documents = [encode_message(VALUE) for _ in range(PUBLISH_BATCH)]
                    for _ in range(max(1, options.messages // PUBLISH_BATCH)):
                        client.publish_batch(queue, documents)
                    recording: contextlib.AbstractContextManager[bool] = (
                        profile.record(broker.process.pid,
                                       options.profile / f"http-acquire-ack-{batch}.txt")
                        if options.profile else contextlib.nullcontext(False))
                    with recording:
                        results.append(drain(client, queue, batch, options.seconds,
                                             broker.process.pid, options.carried))
                    print(json.dumps(results[-1]), flush=True)
        finally:
            broker.stop()
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
