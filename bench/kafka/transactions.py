"""Transactional produce beside the idempotent producer, on Conveyor, with confluent-kafka.

Run:  .venv/bin/python bench/kafka/transactions.py [--scale 1.0]

One Conveyor child process (defaults: file storage, fsync=always), one partition per
phase, 100 B values, acks=all, linger.ms=5:
- idempotent: ``enable.idempotence`` producer, one flush at the end;
- transactional, a commit every 1000 records;
- transactional, a commit every 100 records.
Each transaction costs AddPartitionsToTxn + EndTxn round trips and, on the broker, a
persisted PrepareCommit, a marker append (fsynced) and a persisted CompleteCommit, so
the smaller the transactions the larger the gap. A read_committed consume of the
transactional topic follows (records/s). CPU seconds of the broker and the client are
reported per phase. Results: bench/results/kafka_transactions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import Consumer, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RunningBroker, create_topic, measured, start_broker

RESULTS = Path(__file__).resolve().parent.parent / "results" / "kafka_transactions.json"
TIMEOUT_S = 120
SIZE = 100


def produce(broker: RunningBroker, topic: str, count: int, per_transaction: int) -> dict[str, Any]:
    """``per_transaction`` 0: the idempotent producer, no transactions."""
    config: dict[str, Any] = {"bootstrap.servers": broker.bootstrap, "acks": "all",
                              "linger.ms": 5, "batch.size": 1 << 20,
                              "queue.buffering.max.messages": 1_000_000,
                              "enable.idempotence": True}
    if per_transaction:
        config["transactional.id"] = f"bench-{topic}"
    producer = Producer(config)
    if per_transaction:
        producer.init_transactions(TIMEOUT_S)
    value = b"x" * SIZE
    started = time.perf_counter()
    transactions = 0
    for number in range(count):
        if per_transaction and number % per_transaction == 0:
            producer.begin_transaction()
        while True:
            try:
                producer.produce(topic, value)
                break
            except BufferError:
                producer.poll(0.01)
        if per_transaction and (number + 1) % per_transaction == 0:
            producer.commit_transaction(TIMEOUT_S)
            transactions += 1
    if per_transaction and count % per_transaction:
        producer.commit_transaction(TIMEOUT_S)
        transactions += 1
    assert producer.flush(TIMEOUT_S) == 0
    elapsed = time.perf_counter() - started
    return {"records": count, "transactions": transactions,
            "records_per_s": round(count / elapsed),
            "transactions_per_s": round(transactions / elapsed, 1)}


def consume_committed(broker: RunningBroker, topic: str, count: int) -> dict[str, Any]:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"bench-{topic}",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "fetch.max.bytes": 50 << 20})
    consumer.assign([TopicPartition(topic, 0, 0)])
    seen = 0
    started = time.perf_counter()
    while seen < count and time.perf_counter() - started < TIMEOUT_S:
        seen += sum(1 for message in consumer.consume(10_000, 1.0) if not message.error())
    elapsed = time.perf_counter() - started
    consumer.close()
    assert seen == count, (seen, count)
    return {"records": count, "records_per_s": round(count / elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies record counts")
    arguments = parser.parse_args()
    count = int(50_000 * arguments.scale)
    workdir = Path(tempfile.mkdtemp(prefix="kafka-txn-bench-"))
    phases: dict[str, Any] = {}
    try:
        with start_broker("conveyor", workdir) as broker:
            for name, per_transaction in (("idempotent", 0), ("transactional_1000", 1000),
                                          ("transactional_100", 100)):
                topic = f"bench-{name}"
                create_topic(broker, topic)
                phases[name] = measured(
                    broker, lambda t=topic, p=per_transaction: produce(broker, t, count, p))
            phases["consume_read_committed_100"] = measured(
                broker, lambda: consume_committed(broker, "bench-transactional_100", count))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "clients": {"confluent_kafka": str(confluent_kafka.__version__),
                    "librdkafka": confluent_kafka.libversion()[0]},
        "notes": "conveyor defaults (file storage, fsync=always); one partition; 100 B values; "
                 "acks=all; linger.ms=5",
        "scale": arguments.scale, "phases": phases,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
