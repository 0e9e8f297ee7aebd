"""HTTP API benchmark beside Redis, in the same run on the same machine.

What: 1 KiB messages.
- publish throughput with batches of 1, 100 and 1000 messages per request;
- consume throughput in the same batch sizes: Conveyor ordered reads (fetch) and
  shared-group acquire + ack; Redis lists (RPOP count) and streams
  (XREADGROUP COUNT + XACK);
- end-to-end latency p50/p99 at a fixed publish rate, a consumer long-polling
  (Conveyor acquire with wait; Redis BRPOP and XREADGROUP BLOCK).
Both sides are driven through their Python clients (conveyor.Client on httpx,
redis-py), one connection each, so the client cost is in both numbers. One client
waits for each answer, so publish batch 1 measures one request's round trip (client
CPU + server CPU + fsync), not what the server can do: ``--clients N`` (default 4)
adds a publish-batch-1 phase from N client processes at once on both sides
(``publish_batch_1_clients`` / ``stream_xadd_batch_1_clients``).

Durability settings are part of the result: Conveyor topics use fsync=always
(group-committed), Redis runs with ``appendonly yes`` and ``appendfsync always``
unless --redis-fsync=everysec is given.

Run: ``.venv/bin/python -m bench.http.run [--seconds 10] [--rounds 3] [--rate 200]
[--clients 4]``; writes
bench/results/http.json. Needs redis-server on PATH (apt-get install redis-server).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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

from bench.measure import CpuMeter, provenance, summarise
from conveyor import Client
from conveyor.client import encode_message
from conveyor.testing.server import BrokerProcess, free_port

RESULTS = Path(__file__).resolve().parent.parent / "results" / "http.json"
VALUE = b"x" * 1024
BATCH_SIZES = (1, 100, 1000)


def timed(seconds: float, step: Callable[[], int], drains: bool = False) -> dict[str, Any]:
    """Run ``step`` (returns messages handled) for ``seconds``; msg/s and CPU figures.

    ``drains``: a consume phase ends early when a step returns 0 (nothing left), and
    the rate is taken over the time until then (marked ``drained``)."""
    count = 0
    meter = CpuMeter(_BROKER_PID[0])
    started = time.perf_counter()
    drained = False
    while (elapsed := time.perf_counter() - started) < seconds:
        handled = step()
        if handled == 0 and drains:
            drained = True
            break
        count += handled
    elapsed = time.perf_counter() - started
    return {"msg_per_s": round(count / elapsed), "messages": count, "drained": drained,
            **meter.stop()}


_BROKER_PID: list[int | None] = [None]  # the process CpuMeter watches as "broker"


def _publish_one_worker(system: str, address: str, key: str, seconds: float,
                        gates: tuple[Any, Any, Any], counts: Any, index: int) -> None:
    """One client process of ``clients_phase``: publishes of one message for ``seconds``
    (Conveyor: ``conveyor.Client.publish_batch`` of one; Redis: one XADD), one connection."""
    step: Callable[[], object]
    if system == "conveyor":
        client = Client(address)
        document = [encode_message(VALUE)]
        step = lambda: client.publish_batch(key, document)  # noqa: E731
    else:
        connection = redis.Redis(port=int(address))
        step = lambda: connection.xadd(key, {"v": VALUE})  # noqa: E731
    ready, done, leave = gates
    step()  # connected before the phase starts
    ready.wait()
    count = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()
        count += 1
    counts[index] = count
    done.wait()
    leave.wait()  # alive until the parent has read this process's CPU time


def clients_phase(system: str, address: str, key: str, seconds: float,
                  clients: int) -> dict[str, Any]:
    """Publish batch 1 from ``clients`` processes at once (each its own connection): what
    the server does when one Python client is not the limit. CPU of the broker and of
    every client process, as ``timed`` reports it."""
    context = multiprocessing.get_context("spawn")
    ready, done = context.Barrier(clients + 1), context.Barrier(clients + 1)
    leave = context.Event()
    counts = context.Array("q", clients)
    workers = [context.Process(target=_publish_one_worker, args=(
        system, address, key, seconds, (ready, done, leave), counts, index))
        for index in range(clients)]
    for worker in workers:
        worker.start()
    try:
        ready.wait(timeout=60)
        meter = CpuMeter(_BROKER_PID[0], [worker.pid for worker in workers if worker.pid])
        started = time.perf_counter()
        done.wait(timeout=seconds + 60)  # every worker has counted and stopped
        figures = meter.stop()
        elapsed = time.perf_counter() - started
    finally:
        leave.set()
        for worker in workers:
            worker.join(timeout=30)
    total = sum(counts)
    return {"msg_per_s": round(total / elapsed), "messages": total, "drained": False,
            "clients": clients, **figures}


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    if len(samples_ms) < 2:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "samples": len(samples_ms)}
    cuts = statistics.quantiles(samples_ms, n=100)
    return {"p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3),
            "samples": len(samples_ms)}


# --- Conveyor -------------------------------------------------------------------------
def conveyor_throughput(client: Client, seconds: float, tag: str) -> dict[str, Any]:
    """Publish into a queue, read it back ordered, then drain it with acquire + ack."""
    results: dict[str, Any] = {}
    for batch in BATCH_SIZES:
        queue = f"bench-{batch}-{tag}"
        client.create_queue(queue)
        documents = [encode_message(VALUE) for _ in range(batch)]
        results[f"publish_batch_{batch}"] = timed(
            seconds, lambda t=queue, d=documents: len(client.publish_batch(t, d)))

        positions: dict[int, int] = {0: 0}

        def read(t: str = queue, b: int = batch) -> int:
            nonlocal positions
            fetched = client.fetch(t, offsets=positions, limit=b)
            positions = fetched.next_offsets
            return len(fetched.messages)
        results[f"ordered_read_batch_{batch}"] = timed(seconds, read, drains=True)

        # The queue's records twice over: first a second shared group on its topic drains
        # them with the two requests of the old API (nothing is acked in the queue's own
        # group meanwhile, so work-queue retention keeps them), then the queue's group
        # with the acks carried by the next acquire.
        results[f"shared_acquire_then_ack_batch_{batch}"] = timed(
            seconds, acquire_then_ack(client, queue, "two-requests", batch), drains=True)
        results[f"shared_acquire_ack_batch_{batch}"] = timed(
            seconds, acquire_carrying_acks(client, queue, queue, batch), drains=True)
    return results


def acquire_then_ack(client: Client, topic: str, group: str, batch: int
                     ) -> Callable[[], int]:
    """One cycle = two requests: acquire, then ack its receipts (the API before httpack)."""
    def step() -> int:
        messages = client.acquire(topic, group, limit=min(batch, 1000))
        if messages:
            client.ack(topic, group, [m.receipt for m in messages if m.receipt])
        return len(messages)
    return step


def acquire_carrying_acks(client: Client, topic: str, group: str, batch: int
                          ) -> Callable[[], int]:
    """One cycle = one request: the acquire carries the last batch's acks (as a worker
    would; the last acks ride on the empty acquire that ends the phase). A failed ack
    fails the run: the figure must count only acknowledged work."""
    pending: list[str] = []

    def step() -> int:
        messages = client.acquire(topic, group, limit=min(batch, 1000), ack=pending)
        if messages.ack_failures:
            raise RuntimeError(f"acks failed: {messages.ack_failures[:3]}")
        pending[:] = [m.receipt for m in messages if m.receipt]
        return len(messages)
    return step


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
def redis_throughput(connection: redis.Redis, seconds: float, tag: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for batch in BATCH_SIZES:
        values = [VALUE] * batch
        key, stream = f"list-{batch}-{tag}", f"stream-{batch}-{tag}"
        results[f"list_lpush_batch_{batch}"] = timed(
            seconds, lambda k=key, v=values: connection.lpush(k, *v) and len(v))
        results[f"list_rpop_batch_{batch}"] = timed(
            seconds, lambda k=key, b=batch: len(connection.rpop(k, b) or []), drains=True)

        def xadd(s: str = stream, b: int = batch) -> int:
            pipe = connection.pipeline(transaction=False)  # one round trip per batch
            for _ in range(b):
                pipe.xadd(s, {"v": VALUE})
            pipe.execute()
            return b
        results[f"stream_xadd_batch_{batch}"] = timed(seconds, xadd)
        connection.xgroup_create(stream, "workers", id="0")

        connection.xgroup_create(stream, "two-round-trips", id="0")

        def read_then_ack(s: str = stream, b: int = batch) -> int:
            entries = connection.xreadgroup("two-round-trips", "c1", {s: ">"}, count=b)
            ids = [entry_id for _, items in entries for entry_id, _ in items]
            if ids:
                connection.xack(s, "two-round-trips", *ids)
            return len(ids)
        results[f"stream_xreadgroup_then_xack_batch_{batch}"] = timed(
            seconds, read_then_ack, drains=True)
        pending: list[bytes] = []

        def read_ack(s: str = stream, b: int = batch, pending: list[bytes] = pending) -> int:
            # Redis's best: the last batch's XACK and the next XREADGROUP pipelined in one
            # round trip, as the Conveyor row carries its acks on the next acquire
            pipe = connection.pipeline(transaction=False)
            if pending:
                pipe.xack(s, "workers", *pending)
            pipe.xreadgroup("workers", "c1", {s: ">"}, count=b)
            entries = pipe.execute()[-1]
            pending[:] = [entry_id for _, items in entries for entry_id, _ in items]
            return len(pending)
        results[f"stream_xreadgroup_xack_batch_{batch}"] = timed(seconds, read_ack, drains=True)
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


RATIOS = {f"{what}_batch_{batch}": (f"{ours}_batch_{batch}", f"{theirs}_batch_{batch}")
          for batch in BATCH_SIZES
          for what, ours, theirs in (("publish_vs_xadd", "publish", "stream_xadd"),
                                     ("acquire_ack_vs_xreadgroup_xack", "shared_acquire_ack",
                                      "stream_xreadgroup_xack"))}
RATIOS.update({f"acquire_then_ack_vs_xreadgroup_then_xack_batch_{batch}": (
    f"shared_acquire_then_ack_batch_{batch}", f"stream_xreadgroup_then_xack_batch_{batch}")
    for batch in BATCH_SIZES})
RATIOS["publish_vs_xadd_batch_1_clients"] = ("publish_batch_1_clients",
                                             "stream_xadd_batch_1_clients")


def _medians(rounds: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per case: the median msg/s (headline) and the summary with spread and CPU."""
    headline: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    for case in rounds[0]:
        values = [one[case] for one in rounds if case in one]
        if "msg_per_s" not in values[0]:
            headline[case] = values[len(values) // 2]  # latency: the middle round
            detail[case] = values
            continue
        summary = summarise([float(v["msg_per_s"]) for v in values])
        headline[f"{case}_msg_per_s"] = round(summary["median"])
        summary["broker_cpu_pct"] = [v["broker_cpu_pct"] for v in values]
        summary["client_cpu_pct"] = [v["client_cpu_pct"] for v in values]
        summary["client_bound_rounds"] = sum(bool(v["client_bound"]) for v in values)
        summary["drained_rounds"] = sum(bool(v["drained"]) for v in values)
        detail[case] = summary
    return headline, detail


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved, medians")
    parser.add_argument("--rate", type=int, default=200, help="messages/s for latency")
    parser.add_argument("--redis-fsync", choices=("always", "everysec"), default="always")
    parser.add_argument("--systems", default="conveyor,redis")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes of the publish-batch-1 phase beside the "
                             "one-client phases (0 or 1: no such phase)")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="where the JSON goes (bench/results/http.json)")
    arguments = parser.parse_args()
    systems = arguments.systems.split(",")
    missing: dict[str, str] = {}
    if "redis" in systems and shutil.which("redis-server") is None:
        missing["redis"] = "redis-server not on PATH (apt-get install -y redis-server)"
        systems.remove("redis")
        print(f"PEER MISSING: {missing['redis']}; Conveyor runs alone", file=sys.stderr)
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    peer_version = None
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for index in range(arguments.rounds):
            tag = f"r{index}"
            if "conveyor" in systems:
                (root / f"conveyor-{tag}").mkdir()
                broker = BrokerProcess(root / f"conveyor-{tag}", listeners=("http",))
                broker.start()
                assert broker.process is not None
                _BROKER_PID[0] = broker.process.pid
                try:
                    url = f"http://127.0.0.1:{broker.ports['http']}"
                    with Client(url) as client:
                        result = conveyor_throughput(client, arguments.seconds, tag)
                        if arguments.clients > 1:
                            client.create_queue(f"bench-1c-{tag}")
                    if arguments.clients > 1:
                        result["publish_batch_1_clients"] = clients_phase(
                            "conveyor", url, f"bench-1c-{tag}", arguments.seconds,
                            arguments.clients)
                    result["e2e_shared_acquire"] = conveyor_latency(
                        url, arguments.rate, min(arguments.seconds, 10.0))
                    ours.append(result)
                finally:
                    broker.stop()
            if "redis" in systems:
                (root / f"redis-{tag}").mkdir()
                redis_process, redis_port = start_redis(root / f"redis-{tag}",
                                                        arguments.redis_fsync)
                _BROKER_PID[0] = redis_process.pid
                try:
                    connection = redis.Redis(port=redis_port)
                    result = redis_throughput(connection, arguments.seconds, tag)
                    if arguments.clients > 1:
                        result["stream_xadd_batch_1_clients"] = clients_phase(
                            "redis", str(redis_port), f"stream-1c-{tag}", arguments.seconds,
                            arguments.clients)
                    result.update(redis_latency(redis_port, arguments.rate,
                                                min(arguments.seconds, 10.0)))
                    peer_version = connection.info()["redis_version"]
                    theirs.append(result)
                finally:
                    redis_process.terminate()
                    redis_process.wait(timeout=10)
    conveyor, conveyor_detail = _medians(ours) if ours else ({}, {})
    peer, peer_detail = _medians(theirs) if theirs else ({}, {})
    ratios = {}
    if ours and theirs:
        for name, (mine, other) in RATIOS.items():
            if mine not in ours[0] or other not in theirs[0]:
                continue
            per_round = [one[mine]["msg_per_s"] / max(1, two[other]["msg_per_s"])
                         for one, two in zip(ours, theirs, strict=True)]
            ratios[name] = summarise(per_round)
    document = {
        "benchmark": "bench/http/run.py",
        **provenance([sys.executable, "-m", "bench.http.run", *sys.argv[1:]]),
        "settings": {"value_bytes": len(VALUE), "seconds_per_phase": arguments.seconds,
                     "rounds": arguments.rounds,
                     "latency_rate_msg_per_s": arguments.rate,
                     "conveyor_fsync": "always",
                     "client": "one Python process, one connection (conveyor.Client / "
                               "redis-py); client_bound marks >= 90 % of a core",
                     "clients_of_publish_batch_1_clients": arguments.clients,
                     "redis": {"version": peer_version, "appendonly": "yes",
                               "appendfsync": arguments.redis_fsync}},
        "missing_peers": missing,
        "conveyor_http": conveyor,
        "redis": peer,
        "ratios_conveyor_over_redis_per_round": ratios,
        "detail": {"conveyor_http": conveyor_detail, "redis": peer_detail},
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({"conveyor_http": conveyor, "redis": peer, "ratios": {
        name: value["median"] for name, value in ratios.items()}}, indent=2))


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
