"""Kafka end-to-end latency at a fixed rate, broken down per stage (issue 17).

Run:  .venv/bin/python -m bench.kafka.latency_stages [--seconds 10] [--rate 1000]
      [--rounds 2] [--peers conveyor,tansu] [--clients default,nodelay] [--no-probes]
      [--output FILE]

The latency phase of bench/kafka/throughput.py (one confluent-kafka producer, acks=all,
linger.ms=0, 100 B records at ``--rate``; one consumer in the same process, assigned the
partition, fetch.wait.max.ms=10, fetch.min.bytes=1), with every record numbered so the
client splits its latency in two: send -> delivery report (the produce round trip:
acks=all, so Conveyor's fdatasync is in it) and delivery report -> received by the
consumer. A poller thread serves the delivery reports (the throughput bench polls after
each send instead, so its e2e figures do not depend on this).

Conveyor runs under bench/kafka/stage_probes.py (unless ``--no-probes``): its per-stage
histograms of the broker (frame read -> handler, write, barrier waits, executor hand-off,
fdatasync, fetch wake-up -> answer, loop lag, GC pauses) are cleared when the measured
phase starts and kept with the client's figures.

``--clients``: ``default`` is the throughput bench's client configuration; ``nodelay``
adds ``socket.nagle.disable=true`` to producer and consumer (librdkafka leaves Nagle's
algorithm on by default; Kafka's Java client always sets TCP_NODELAY).
Each (peer, clients) pair gets a fresh broker per round; rounds interleave them.
Results: bench/results/kafka_latency_stages.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from bench.kafka.stage_probes import histogram
from bench.kafka.throughput import TIMEOUT_S, create_topic, measured, start_broker
from bench.measure import provenance

RESULTS = Path(__file__).resolve().parent.parent / "results" / "kafka_latency_stages.json"
STAMP = struct.Struct(">dQ")  # send time (perf_counter), sequence number
RECORD_BYTES = 100
CLIENTS: dict[str, dict[str, Any]] = {
    "default": {},
    "nodelay": {"socket.nagle.disable": True},
}


def client_latency(bootstrap: str, topic: str, rate_per_s: int, seconds: float,
                   extra: dict[str, Any], on_start: Callable[[], None]) -> dict[str, Any]:
    """Send ``rate_per_s`` numbered records for ``seconds``; e2e, ack and after-ack
    latency histograms (ms)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"lat-{topic}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10,
                         "fetch.min.bytes": 1, **extra})
    consumer.assign([TopicPartition(topic, 0, 0)])
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0,
                         **extra})
    total = int(rate_per_s * seconds)
    sent = [0.0] * total
    acked = [0.0] * total
    received = [0.0] * total
    count = [0]
    stop = threading.Event()

    def on_delivery(error: Any, message: Any) -> None:
        if error is None:
            acked[STAMP.unpack_from(message.value())[1]] = time.perf_counter()

    def poll_deliveries() -> None:
        while not stop.is_set():
            producer.poll(0.05)

    def receive() -> None:
        while count[0] < total and not stop.is_set():
            message = consumer.poll(0.1)
            if message is not None and message.error() is None \
                    and len(message.value() or b"") == RECORD_BYTES:  # not the warm-up
                received[STAMP.unpack_from(message.value())[1]] = time.perf_counter()
                count[0] += 1

    threads = [threading.Thread(target=receive, daemon=True),
               threading.Thread(target=poll_deliveries, daemon=True)]
    for thread in threads:
        thread.start()
    producer.produce(topic, b"warm-up")  # metadata and connections before the clock
    producer.flush(TIMEOUT_S)
    time.sleep(1.0)  # the consumer connects and fetches (bench, not a test)
    on_start()
    padding = b"x" * (RECORD_BYTES - STAMP.size)
    interval = 1.0 / rate_per_s
    next_send = time.perf_counter()
    for sequence in range(total):
        current = time.perf_counter()
        if next_send > current:
            time.sleep(next_send - current)
        sent[sequence] = time.perf_counter()
        producer.produce(topic, STAMP.pack(sent[sequence], sequence) + padding,
                         on_delivery=on_delivery)
        next_send += interval
    producer.flush(TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while count[0] < total and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(TIMEOUT_S)
    consumer.close()
    both = [i for i in range(total) if acked[i] and received[i]]
    return {
        "records": total, "received": count[0], "rate_per_s": rate_per_s,
        "e2e_ms": _ms([received[i] - sent[i] for i in both]),
        "ack_ms": _ms([acked[i] - sent[i] for i in both]),
        "received_after_ack_ms": _ms([received[i] - acked[i] for i in both]),
        "received_before_ack": sum(received[i] < acked[i] for i in both),
    }


def _ms(seconds: list[float]) -> dict[str, float]:
    return histogram([value * 1000 for value in seconds], digits=3)


def run_one(peer: str, clients: str, options: argparse.Namespace, workdir: Path,
            tag: str) -> dict[str, Any]:
    directory = workdir / f"{peer}-{clients}-{tag}"
    directory.mkdir(parents=True)
    stats = directory / "stages.json" if peer == "conveyor" and options.probes else None
    with start_broker(peer, directory, probe_stats=stats) as broker:
        create_topic(broker, "latency")

        def phase_starts() -> None:
            if stats is not None:
                os.kill(broker.process.pid, signal.SIGUSR1)

        result = measured(broker, lambda: client_latency(
            broker.bootstrap, "latency", options.rate, options.seconds, CLIENTS[clients],
            phase_starts))
    if stats is not None and stats.exists():
        result["broker_stages"] = json.loads(stats.read_text())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peers", default="conveyor,tansu")
    parser.add_argument("--clients", default="default,nodelay")
    parser.add_argument("--no-probes", dest="probes", action="store_false")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        **provenance([sys.executable, "-m", "bench.kafka.latency_stages", *argv]),
        "settings": {"seconds": options.seconds, "rate_per_s": options.rate,
                     "rounds": options.rounds, "probes": options.probes,
                     "clients": {name: CLIENTS[name] for name in options.clients.split(",")}},
        "runs": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="kafka-latency-"))
    try:
        for index in range(options.rounds):
            for peer in options.peers.split(","):
                for clients in options.clients.split(","):
                    result = run_one(peer, clients, options, workdir, f"r{index}")
                    report["runs"].setdefault(f"{peer}/{clients}", []).append(result)
                    print(peer, clients, f"r{index}", "e2e", result["e2e_ms"], "ack",
                          result["ack_ms"], flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
