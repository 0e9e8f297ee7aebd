"""HTTP API benchmark beside Redis, in the same run on the same machine.

What: 1 KiB messages.
- publish throughput with batches of 1, 100 and 1000 messages per request;
- consume throughput in the same batch sizes: Conveyor ordered reads (fetch) and
  shared-group acquire + ack; Redis lists (RPOP count) and streams
  (XREADGROUP COUNT + XACK);
- end-to-end latency p50/p99 at a fixed publish rate, a consumer long-polling
  (Conveyor acquire with wait; Redis BRPOP and XREADGROUP BLOCK).
Both sides are driven through their Python clients (conveyor.Client on httpx,
redis-py), one connection each, so the client cost is in both numbers.

Durability settings are part of the result: Conveyor topics use fsync=always
(group-committed), Redis runs with ``appendonly yes`` and ``appendfsync always``
unless --redis-fsync=everysec is given.

Run: ``.venv/bin/python -m bench.http.run [--seconds 2] [--rate 200]``; writes
bench/results/http.json. Needs redis-server on PATH (apt-get install redis-server).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from conveyor import Client
from conveyor.client import encode_message
from conveyor.testing.server import BrokerProcess, free_port

RESULTS = Path(__file__).resolve().parent.parent / "results" / "http.json"
VALUE = b"x" * 1024
BATCH_SIZES = (1, 100, 1000)


def timed(seconds: float, step: Callable[[], int]) -> float:
    """Run ``step`` (returns messages handled) until ``seconds`` pass; messages/s."""
    count = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        count += step()
    return round(count / elapsed)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    if len(samples_ms) < 2:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "samples": len(samples_ms)}
    cuts = statistics.quantiles(samples_ms, n=100)
    return {"p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3),
            "samples": len(samples_ms)}


# --- Conveyor -------------------------------------------------------------------------
def conveyor_throughput(client: Client, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for batch in BATCH_SIZES:
        topic = f"bench-{batch}"
        client.create_topic(topic)
        documents = [encode_message(VALUE) for _ in range(batch)]
        results[f"publish_batch_{batch}_msg_per_s"] = timed(
            seconds, lambda t=topic, d=documents: len(client.publish_batch(t, d)))

        positions: dict[int, int] = {0: 0}

        def read(t: str = topic, b: int = batch) -> int:
            nonlocal positions
            fetched = client.fetch(t, offsets=positions, limit=b)
            positions = fetched.next_offsets
            return len(fetched.messages) or 1
        results[f"ordered_read_batch_{batch}_msg_per_s"] = timed(seconds, read)

        def acquire_ack(t: str = topic, b: int = batch) -> int:
            messages = client.acquire(t, "workers", limit=min(b, 1000))
            if messages:
                client.ack(t, "workers", [m.receipt for m in messages if m.receipt])
            return len(messages) or 1
        results[f"shared_acquire_ack_batch_{batch}_msg_per_s"] = timed(seconds, acquire_ack)
    return results


def conveyor_latency(url: str, rate: int, seconds: float) -> dict[str, Any]:
    samples: list[float] = []
    with Client(url) as producer, Client(url) as consumer:
        producer.create_queue("latency")
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                messages = consumer.acquire("latency", limit=100, wait_s=0.5)
                for message in messages:
                    sent = float((message.value or b"0").split(b" ", 1)[0])
                    samples.append((time.perf_counter() - sent) * 1000)
                if messages:  # one ack request for the batch, as a worker would
                    consumer.ack("latency", "latency", [m.receipt or "" for m in messages])

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        paced(rate, seconds, lambda: producer.publish(
            "latency", f"{time.perf_counter()} ".encode() + VALUE[:1000]))
        time.sleep(0.5)  # bench only: let the last messages arrive
        stop.set()
        thread.join(timeout=5)
    return percentiles(samples)


def paced(rate: int, seconds: float, send: Callable[[], object]) -> None:
    interval = 1.0 / rate
    next_at = time.perf_counter()
    end = next_at + seconds
    while next_at < end:
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send()
        next_at += interval


# --- Redis ----------------------------------------------------------------------------
def redis_throughput(connection: redis.Redis, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for batch in BATCH_SIZES:
        values = [VALUE] * batch
        key, stream = f"list-{batch}", f"stream-{batch}"
        results[f"list_lpush_batch_{batch}_msg_per_s"] = timed(
            seconds, lambda k=key, v=values: connection.lpush(k, *v) and len(v))
        results[f"list_rpop_batch_{batch}_msg_per_s"] = timed(
            seconds, lambda k=key, b=batch: len(connection.rpop(k, b) or [None]))

        def xadd(s: str = stream, b: int = batch) -> int:
            pipe = connection.pipeline(transaction=False)
            for _ in range(b):
                pipe.xadd(s, {"v": VALUE})
            pipe.execute()
            return b
        results[f"stream_xadd_batch_{batch}_msg_per_s"] = timed(seconds, xadd)
        connection.xgroup_create(stream, "workers", id="0")

        def read_ack(s: str = stream, b: int = batch) -> int:
            entries = connection.xreadgroup("workers", "c1", {s: ">"}, count=b)
            ids = [entry_id for _, items in entries for entry_id, _ in items]
            if ids:
                connection.xack(s, "workers", *ids)
            return len(ids) or 1
        results[f"stream_xreadgroup_xack_batch_{batch}_msg_per_s"] = timed(seconds, read_ack)
    return results


def redis_latency(port: int, rate: int, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in ("list", "stream"):
        samples: list[float] = []
        producer = redis.Redis(port=port)
        consumer = redis.Redis(port=port)
        stop = threading.Event()
        if kind == "stream":
            producer.xgroup_create("latency-stream", "workers", id="$", mkstream=True)

        def consume(kind: str = kind, consumer: redis.Redis = consumer,
                    samples: list[float] = samples, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                if kind == "list":
                    item = consumer.brpop(["latency-list"], timeout=0.5)
                    values = [item[1]] if item else []
                else:
                    entries = consumer.xreadgroup("workers", "c1", {"latency-stream": ">"},
                                                  count=100, block=500)
                    values = []
                    for _, items in entries:
                        for entry_id, fields in items:
                            values.append(fields[b"v"])
                            consumer.xack("latency-stream", "workers", entry_id)
                for value in values:
                    samples.append((time.perf_counter() - float(value.split(b" ", 1)[0]))
                                   * 1000)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()

        def send(kind: str = kind, producer: redis.Redis = producer) -> None:
            value = f"{time.perf_counter()} ".encode() + VALUE[:1000]
            if kind == "list":
                producer.lpush("latency-list", value)
            else:
                producer.xadd("latency-stream", {"v": value})

        paced(rate, seconds, send)
        time.sleep(0.5)
        stop.set()
        thread.join(timeout=5)
        results[f"{kind}_e2e"] = percentiles(samples)
    return results


def start_redis(directory: Path, fsync: str) -> tuple[subprocess.Popen[bytes], int]:
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("redis-server not found: apt-get install redis-server")
    port = free_port()
    process = subprocess.Popen(
        [executable, "--port", str(port), "--dir", str(directory), "--save", "",
         "--appendonly", "yes", "--appendfsync", fsync],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    connection = redis.Redis(port=port)
    for _ in range(100):
        try:
            connection.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rate", type=int, default=200, help="messages/s for latency")
    parser.add_argument("--redis-fsync", choices=("always", "everysec"), default="always")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "conveyor").mkdir()
        (root / "redis").mkdir()
        broker = BrokerProcess(root / "conveyor", listeners=("http",))
        broker.start()
        redis_process, redis_port = start_redis(root / "redis", arguments.redis_fsync)
        try:
            url = f"http://127.0.0.1:{broker.ports['http']}"
            with Client(url) as client:
                conveyor = conveyor_throughput(client, arguments.seconds)
            conveyor["e2e_shared_acquire"] = conveyor_latency(url, arguments.rate,
                                                              arguments.seconds)
            connection = redis.Redis(port=redis_port)
            peer = redis_throughput(connection, arguments.seconds)
            peer.update(redis_latency(redis_port, arguments.rate, arguments.seconds))
            peer_version = connection.info()["redis_version"]
        finally:
            broker.stop()
            redis_process.terminate()
            redis_process.wait(timeout=10)
    document = {
        "benchmark": "bench/http/run.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {"platform": platform.platform(), "cpus": _cpus(),
                    "python": platform.python_version()},
        "settings": {"value_bytes": len(VALUE), "seconds_per_case": arguments.seconds,
                     "latency_rate_msg_per_s": arguments.rate,
                     "conveyor_fsync": "always",
                     "redis": {"version": peer_version, "appendonly": "yes",
                               "appendfsync": arguments.redis_fsync}},
        "conveyor_http": conveyor,
        "redis": peer,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
