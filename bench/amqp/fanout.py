"""AMQP fanout with publisher confirms: one persistent message to 4 durable queues.

Run: ``python bench/amqp/fanout.py --source DIR [--seconds S] [--publishers N]`` (a plain
script; ``--source`` is the checkout whose ``conveyor serve`` runs, so two checkouts
are measured by the same code). A fanout exchange bound to ``--queues`` queues; each
of ``--publishers`` threads (pika ``BlockingConnection``, confirms on) publishes a 1 KiB
persistent message and waits for its confirm, so msg/s is the inverse of the confirm
latency times the publishers: every destination's append must be durable before the
confirm. Phase 1 measures msg/s, confirm latency and the broker's CPU; phase 2 (as
long) attaches ``strace -c`` to count the broker's fdatasync/fsync calls per message
(strace slows the broker, so phase 2's rate is not reported). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pika
import psutil

from conveyor.testing.server import BrokerProcess

BODY = b"x" * 1024


def publish_for(port: int, seconds: float, latencies: list[float], lock: threading.Lock) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    channel = connection.channel()
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=2)
    own: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        channel.basic_publish("fan", "", BODY, properties)
        own.append(time.monotonic() - started)
    connection.close()
    with lock:
        latencies.extend(own)


def phase(port: int, seconds: float, publishers: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=publish_for, args=(port, seconds, latencies, lock))
               for _ in range(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--queues", type=int, default=4)
    arguments = parser.parse_args()
    source = str(Path(arguments.source).resolve())
    with tempfile.TemporaryDirectory(prefix="conveyor-fanout-") as work:
        broker = BrokerProcess(Path(work) / "data", listeners=("amqp",),
                               environ={"PYTHONPATH": source}, cwd=Path(source))
        broker.start()
        try:
            assert broker.process is not None
            port = broker.ports["amqp"]
            connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
            channel = connection.channel()
            channel.exchange_declare("fan", "fanout", durable=True)
            for index in range(arguments.queues):
                channel.queue_declare(f"q{index}", durable=True)
                channel.queue_bind(f"q{index}", "fan")
            connection.close()
            process = psutil.Process(broker.process.pid)
            cpu_before = sum(process.cpu_times()[:2])
            started = time.monotonic()
            latencies = phase(port, arguments.seconds, arguments.publishers)
            elapsed = time.monotonic() - started
            cpu_s = sum(process.cpu_times()[:2]) - cpu_before
            counts_path = Path(work) / "strace.txt"
            tracer = subprocess.Popen(
                ["strace", "-f", "-c", "-e", "trace=fdatasync,fsync", "-o", str(counts_path),
                 "-p", str(broker.process.pid)], stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # strace attaches to every thread
            traced = len(phase(port, arguments.seconds, arguments.publishers))
            tracer.terminate()
            tracer.wait(timeout=30)
            syncs = sum(int(match.group(1)) for match in re.finditer(
                r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(?:fdatasync|fsync)$",
                counts_path.read_text(), re.MULTILINE))
        finally:
            broker.stop()
    latencies.sort()
    result: dict[str, Any] = {
        "source": source, "queues": arguments.queues, "publishers": arguments.publishers,
        "msg_per_s": round(len(latencies) / elapsed),
        "confirm_ms_p50": round(1000 * statistics.median(latencies), 2),
        "confirm_ms_p99": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
        "broker_cpu_pct": round(100 * cpu_s / elapsed, 1),
        "broker_cpu_us_per_msg": round(1e6 * cpu_s / max(len(latencies), 1), 1),
        "fsyncs_per_msg_traced": round(syncs / max(traced, 1), 2),
        "load": os.getloadavg()[0],
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
