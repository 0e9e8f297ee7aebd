"""Acks carried by the acquire against acquire, then ack: interleaved on one broker.

For a shared machine: both ways of cycling run in alternating slices of ``--slice``
seconds on the same broker, each on its own queue of ``--stored`` 1 KiB messages, so the
neighbours' load falls on both alike; each slice reports msg/s and the broker's and the
client's CPU per message (µs). Medians per way and batch, with every slice's value.

Run:  .venv/bin/python -m bench.http.ab_acks [--batches 100,1000] [--slices 6]
      [--slice 2] [--stored 120000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ab import rotated
from bench.measure import CpuMeter
from conveyor import Client
from conveyor.client import encode_message
from conveyor.testing.server import BrokerProcess

VALUE = b"x" * 1024
WAYS = ("then_ack", "carried")


def run_slice(client: Client, queue: str, batch: int, carried: bool, seconds: float,
              broker_pid: int) -> dict[str, Any]:
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
            if messages:
                client.ack(queue, queue, [m.receipt for m in messages if m.receipt])
        if not messages:
            break
        handled += len(messages)
    if pending:
        client.ack(queue, queue, pending)  # the slice ends: settle the last batch
    cpu = meter.stop()
    count = max(1, handled)
    return {"msg_per_s": round(handled / cpu["wall_s"]),
            "broker_us": round(cpu["broker_cpu_pct"] * cpu["wall_s"] / 100 / count * 1e6, 1),
            "client_us": round(cpu["client_cpu_pct"][0] * cpu["wall_s"] / 100 / count * 1e6,
                               1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="100,1000")
    parser.add_argument("--slices", type=int, default=6, help="per way and batch")
    parser.add_argument("--slice", type=float, default=2.0, help="seconds per slice")
    parser.add_argument("--stored", type=int, default=120_000, help="messages per queue")
    options = parser.parse_args()
    found: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        broker = BrokerProcess(Path(directory) / "conveyor", listeners=("http",))
        broker.data_dir.mkdir()
        broker.start()
        assert broker.process is not None
        try:
            with Client(f"http://127.0.0.1:{broker.ports['http']}") as client:
                documents = [encode_message(VALUE) for _ in range(1000)]
                for batch in (int(b) for b in options.batches.split(",")):
                    for way in WAYS:
                        client.create_queue(f"{way}-{batch}")
                        for _ in range(options.stored // 1000):
                            client.publish_batch(f"{way}-{batch}", documents)
                    for index in range(options.slices):
                        order = rotated(WAYS, index)
                        for way in order:
                            result = run_slice(client, f"{way}-{batch}", batch,
                                               way == "carried", options.slice,
                                               broker.process.pid)
                            result["load_1m"] = round(os.getloadavg()[0], 2)
                            found.setdefault(f"{way}_{batch}", []).append(result)
                            print(f"{way}_{batch} {json.dumps(result)}", flush=True)
        finally:
            broker.stop()
    for case, results in found.items():
        print(case, {field: statistics.median(r[field] for r in results)
                     for field in ("msg_per_s", "broker_us", "client_us")},
              "slices:", [r["msg_per_s"] for r in results])


if __name__ == "__main__":
    main()
