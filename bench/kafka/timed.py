"""Time-based Kafka phases with several client processes (bench/kafka/throughput.py).

A produce phase runs ``seconds`` in ``producers`` processes, each producing to every
partition of the topic (librdkafka's partitioner); the consume phase then reads all of
it back in ``consumers`` processes, each assigned its share of the partitions from
offset 0. Every worker reports its record count, its own CPU seconds and its wall
time, so the phase knows each client process's CPU (``client_bound`` when one used
>= 90 % of a core: the number then says more about the client than the broker).
Also the machine's own ceilings in the same run: sequential write + fdatasync of the
disk under the work directory, and TCP loopback bandwidth.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from bench.measure import CLIENT_BOUND_PCT

TIMEOUT_S = 120


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _produce_worker(bootstrap: str, topic: str, size: int, seconds: float,
                    max_buffered: int = 1_000_000) -> dict[str, Any]:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "batch.size": 1 << 20, "queue.buffering.max.messages": max_buffered})
    value = b"x" * size
    delivered = [0]

    def on_delivery(error: Any, _message: Any) -> None:
        if error is None:
            delivered[0] += 1

    cpu, started = _cpu_s(), time.perf_counter()
    end = started + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            try:
                producer.produce(topic, value, on_delivery=on_delivery)
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(TIMEOUT_S)
    return {"records": delivered[0], "wall_s": time.perf_counter() - started,
            "cpu_s": _cpu_s() - cpu}


def _consume_worker(bootstrap: str, topic: str, partitions: list[int],
                    ends: list[int]) -> dict[str, Any]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{topic}",
                         "enable.auto.commit": False, "fetch.max.bytes": 50 << 20})
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    want = sum(ends)
    received = 0
    cpu, started = _cpu_s(), time.perf_counter()
    deadline = started + TIMEOUT_S
    while received < want and time.perf_counter() < deadline:
        for message in consumer.consume(10_000, 0.5):
            if message.error() is None:
                received += 1
    wall_s = time.perf_counter() - started
    consumer.close()
    return {"records": received, "wall_s": wall_s, "cpu_s": _cpu_s() - cpu,
            "complete": received >= want}


def _phase(workers: list[dict[str, Any]], size: int, broker_cpu_s: float,
           wall_s: float) -> dict[str, Any]:
    records = sum(w["records"] for w in workers)
    client_pct = [round(100 * w["cpu_s"] / max(1e-9, w["wall_s"]), 1) for w in workers]
    return {"records": records, "records_per_s": round(records / wall_s),
            "mb_per_s": round(records * size / wall_s / 1e6, 2), "wall_s": round(wall_s, 2),
            "processes": len(workers), "broker_cpu_pct": round(100 * broker_cpu_s / wall_s, 1),
            "client_cpu_pct": client_pct,
            "client_bound": max(client_pct, default=0) >= CLIENT_BOUND_PCT,
            **({"complete": all(w.get("complete", True) for w in workers)})}


def produce_phase(broker: Any, topic: str, size: int, seconds: float,
                  producers: int, max_buffered: int = 1_000_000) -> dict[str, Any]:
    """``max_buffered``: records a producer may hold unacknowledged (librdkafka's
    queue.buffering.max.messages); with a slow broker a large buffer fills within the
    phase and the final flush outlasts it."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(producers) as pool:
        before, started = broker.cpu_s(), time.perf_counter()
        workers = pool.starmap(_produce_worker, [
            (broker.bootstrap, topic, size, seconds, max_buffered)] * producers)
        wall_s = time.perf_counter() - started
        broker_cpu_s = broker.cpu_s() - before
    # the pool's start-up is outside the workers' own clocks: rate over their span
    span = max(w["wall_s"] for w in workers)
    return _phase(workers, size, broker_cpu_s * span / wall_s, span)


def consume_phase(broker: Any, topic: str, size: int, partitions: int,
                  consumers: int, ends: dict[int, int]) -> dict[str, Any]:
    consumers = max(1, min(consumers, partitions))
    shares = [list(range(index, partitions, consumers)) for index in range(consumers)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(consumers) as pool:
        before, started = broker.cpu_s(), time.perf_counter()
        workers = pool.starmap(_consume_worker, [
            (broker.bootstrap, topic, share, [ends[p] for p in share]) for share in shares])
        wall_s = time.perf_counter() - started
        broker_cpu_s = broker.cpu_s() - before
    span = max(w["wall_s"] for w in workers)
    return _phase(workers, size, broker_cpu_s * span / wall_s, span)


def log_ends(broker: Any, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench-ends"})
    try:
        return {p: _log_end(consumer, TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close()


def _log_end(consumer: Any, partition: Any, deadline_s: float = 30.0) -> int:
    """The partition's high watermark; a partition the client's metadata does not know
    yet (a new topic, or a leader that just moved between cluster nodes) is asked again
    until the deadline."""
    from confluent_kafka import KafkaError, KafkaException

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return int(consumer.get_watermark_offsets(partition, timeout=deadline_s)[1])
        except KafkaException as error:
            code = error.args[0].code() if error.args else None
            if code != KafkaError._UNKNOWN_PARTITION or time.monotonic() >= deadline:
                raise
            consumer.list_topics(partition.topic, timeout=5)  # refresh the metadata


def disk_write_mb_per_s(directory: Path, megabytes: int = 256) -> float:
    """Sequential 1 MiB writes then one fdatasync, on the disk the brokers write to."""
    path = directory / "disk-probe"
    chunk = b"\0" * (1 << 20)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for _ in range(megabytes):
            os.write(fd, chunk)
        os.fdatasync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return round(megabytes * (1 << 20) / (time.perf_counter() - started) / 1e6, 1)


def loopback_mb_per_s(seconds: float = 2.0) -> float:
    """One TCP connection over 127.0.0.1, 1 MiB sends, a thread draining it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    received = [0]

    def drain() -> None:
        while data := peer.recv(1 << 20):
            received[0] += len(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    chunk = b"\0" * (1 << 20)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        client.sendall(chunk)
    client.close()
    reader.join(10)
    elapsed = time.perf_counter() - started
    peer.close()
    server.close()
    return round(received[0] / elapsed / 1e6, 1)
