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
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.measure import CLIENT_BOUND_PCT

TIMEOUT_S = 120


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _host_s() -> tuple[float, float]:
    """The whole machine's busy and iowait CPU seconds (every core, kernel included)."""
    times = psutil.cpu_times()
    busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
    return busy, getattr(times, "iowait", 0.0)


def _host_pct(before: tuple[float, float], wall_s: float) -> dict[str, float]:
    """``host_cpu_pct``: every process and the kernel (200 = both cores of 2);
    ``host_iowait_pct``: idle cores with disk I/O outstanding."""
    busy, iowait = _host_s()
    return {"host_cpu_pct": round(100 * (busy - before[0]) / wall_s, 1),
            "host_iowait_pct": round(100 * (iowait - before[1]) / wall_s, 1)}


PRODUCER_CONFIG: dict[str, Any] = {"acks": "all", "linger.ms": 5, "batch.size": 1 << 20}


def _produce_worker(bootstrap: str, topic: str, size: int, seconds: float,
                    max_buffered: int = 1_000_000,
                    config: dict[str, Any] | None = None) -> dict[str, Any]:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG,
                         "queue.buffering.max.messages": max_buffered, **(config or {})})
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
    producer.poll(0)  # the acknowledgements that have come: counted within the time
    acked_in_time, flush_started = delivered[0], time.perf_counter()
    producer.flush(TIMEOUT_S)
    finished = time.perf_counter()
    return {"records": delivered[0], "wall_s": finished - started,
            "cpu_s": _cpu_s() - cpu, "acked_in_time": acked_in_time,
            "flush_s": finished - flush_started, "producing_s": flush_started - started}


def _consume_worker(bootstrap: str, topic: str, partitions: list[int],
                    ends: list[int], seconds: float = 0.0) -> dict[str, Any]:
    """Read the partitions from offset 0 to ``ends``, and again from 0 (the same
    records: a re-read, counted) until ``seconds`` have passed; a pass cut by the
    clock counts what it read. ``complete``: at least one whole pass."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{topic}",
                         "enable.auto.commit": False, "fetch.max.bytes": 50 << 20})
    want = sum(ends)
    received = passes = 0
    cpu, started = _cpu_s(), time.perf_counter()
    end, deadline = started + seconds, started + seconds + TIMEOUT_S
    while True:
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        this_pass = 0
        now = time.perf_counter()
        while this_pass < want and now < deadline and not (passes and now >= end):
            for message in consumer.consume(10_000, 0.5):
                if message.error() is None:
                    this_pass += 1
            now = time.perf_counter()
        received += this_pass
        if this_pass < want:
            break  # cut by the clock after a whole pass, or stalled (not complete)
        passes += 1
        if want == 0 or now >= end:
            break
    wall_s = time.perf_counter() - started
    consumer.close()
    return {"records": received, "wall_s": wall_s, "cpu_s": _cpu_s() - cpu,
            "complete": passes > 0, "passes": passes}


def _phase(workers: list[dict[str, Any]], size: int, broker_cpu_s: float,
           wall_s: float, seconds: float, host: dict[str, float] | None = None
           ) -> dict[str, Any]:
    """One phase's figures; ``short_phase`` when it lasted less than its ``seconds``
    (the house rule: a rate over a few seconds is start-up and noise)."""
    records = sum(w["records"] for w in workers)
    client_pct = [round(100 * w["cpu_s"] / max(1e-9, w["wall_s"]), 1) for w in workers]
    phase: dict[str, Any] = {
        "records": records, "records_per_s": round(records / wall_s),
        "mb_per_s": round(records * size / wall_s / 1e6, 2), "wall_s": round(wall_s, 2),
        "seconds": seconds, "short_phase": wall_s < seconds,
        "processes": len(workers), "broker_cpu_pct": round(100 * broker_cpu_s / wall_s, 1),
        "client_cpu_pct": client_pct,
        "client_bound": max(client_pct, default=0) >= CLIENT_BOUND_PCT,
        "complete": all(w.get("complete", True) for w in workers)}
    if all("acked_in_time" in w for w in workers):
        # a producer stops after ``seconds`` and then flushes what it still holds: the
        # rate while every producer was producing, and how long the longest flush took
        producing_s = max(w["producing_s"] for w in workers)
        phase["records_per_s_while_producing"] = round(
            sum(w["acked_in_time"] for w in workers) / producing_s)
        phase["flush_s"] = round(max(w["flush_s"] for w in workers), 2)
    if any("passes" in w for w in workers):
        phase["passes"] = [w.get("passes", 0) for w in workers]
    if host is not None:
        phase.update(host)
        # the kernel's own threads (writeback, journal) and every other process
        phase["host_unaccounted_cpu_pct"] = round(
            host["host_cpu_pct"] - phase["broker_cpu_pct"] - sum(client_pct), 1)
    return phase


def produce_phase(broker: Any, topic: str, size: int, seconds: float,
                  producers: int, max_buffered: int = 1_000_000,
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    """``max_buffered``: records a producer may hold unacknowledged (librdkafka's
    queue.buffering.max.messages); with a slow broker a large buffer fills within the
    phase and the final flush outlasts it. ``config``: librdkafka settings over
    ``PRODUCER_CONFIG`` (the probes of bench/kafka/produce_probe.py)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(producers) as pool:
        before, host, started = broker.cpu_s(), _host_s(), time.perf_counter()
        workers = pool.starmap(_produce_worker, [
            (broker.bootstrap, topic, size, seconds, max_buffered, config)] * producers)
        wall_s = time.perf_counter() - started
        broker_cpu_s = broker.cpu_s() - before
        host_pct = _host_pct(host, wall_s)
    # the pool's start-up is outside the workers' own clocks: rate over their span
    span = max(w["wall_s"] for w in workers)
    return _phase(workers, size, broker_cpu_s * span / wall_s, span, seconds, host_pct)


def consume_phase(broker: Any, topic: str, size: int, partitions: int,
                  consumers: int, ends: dict[int, int], seconds: float = 0.0
                  ) -> dict[str, Any]:
    """Every consumer reads its share from offset 0, again and again until ``seconds``
    have passed (``passes``: whole reads per consumer)."""
    consumers = max(1, min(consumers, partitions))
    shares = [list(range(index, partitions, consumers)) for index in range(consumers)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(consumers) as pool:
        before, host, started = broker.cpu_s(), _host_s(), time.perf_counter()
        workers = pool.starmap(_consume_worker, [
            (broker.bootstrap, topic, share, [ends[p] for p in share], seconds)
            for share in shares])
        wall_s = time.perf_counter() - started
        broker_cpu_s = broker.cpu_s() - before
        host_pct = _host_pct(host, wall_s)
    span = max(w["wall_s"] for w in workers)
    return _phase(workers, size, broker_cpu_s * span / wall_s, span, seconds, host_pct)


FSYNC_SERIES = ("conveyor_storage_fsync_seconds_count", "conveyor_storage_fsync_seconds_sum",
                "conveyor_storage_group_commit_writes_sum")


def fsync_counters(metrics_url: str) -> dict[str, float]:
    """The broker's fdatasync counters from its /metrics (Prometheus text)."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    values = dict.fromkeys(FSYNC_SERIES, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


def fsync_figures(before: dict[str, float], after: dict[str, float], stored_bytes: int,
                  wall_s: float) -> dict[str, float]:
    """Over one phase: segment fdatasyncs a second, KiB each covered, the mean time of
    one, and fdatasync seconds per wall second (several files sync at once, so it can
    pass 1; near 0 the disk waited for the broker, near or over 1 the broker for it)."""
    count = after[FSYNC_SERIES[0]] - before[FSYNC_SERIES[0]]
    seconds = after[FSYNC_SERIES[1]] - before[FSYNC_SERIES[1]]
    writes = after[FSYNC_SERIES[2]] - before[FSYNC_SERIES[2]]
    return {"fdatasyncs_per_s": round(count / wall_s, 1),
            "kib_per_fdatasync": round(stored_bytes / 1024 / max(1.0, count), 1),
            "writes_per_fdatasync": round(writes / max(1.0, count), 2),
            "fdatasync_mean_ms": round(1000 * seconds / max(1.0, count), 3),
            "fdatasync_s_per_s": round(seconds / wall_s, 3)}


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


def disk_log_write_mb_per_s(directory: Path, files: int = 4, megabytes_per_sync: int = 4,
                            seconds: float = 3.0) -> float:
    """Sustained, the way a log writes: ``files`` threads (partitions), each writing
    1 MiB chunks to its own file and fdatasyncing every ``megabytes_per_sync``, for
    ``seconds``. Lower than ``disk_write_mb_per_s`` (one burst into the page cache and
    one flush): here the copy into the page cache and the flush take turns."""
    chunk = b"\0" * (1 << 20)
    paths = [directory / f"disk-log-probe-{index}" for index in range(files)]
    written = [0] * files
    started = time.perf_counter()
    end = started + seconds

    def run(index: int) -> None:
        fd = os.open(paths[index], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            while time.perf_counter() < end:
                for _ in range(megabytes_per_sync):
                    os.write(fd, chunk)
                os.fdatasync(fd)
                written[index] += megabytes_per_sync * len(chunk)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(files)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for path in paths:
        path.unlink()
    return round(sum(written) / elapsed / 1e6, 1)


def disk_round(directory: Path, index: int, rate_per_s: int, seconds: float) -> dict[str, Any]:
    """An A/B round's disk floor (``disk_sync_latency``) with the load average, printed."""
    disk = disk_sync_latency(directory, rate_per_s, seconds)
    disk["load_1m"] = round(os.getloadavg()[0], 2)
    print(f"r{index} disk", disk, flush=True)
    return disk


def disk_sync_latency(directory: Path, rate_per_s: int = 1000,
                      seconds: float = 10.0) -> dict[str, Any]:
    """The disk's own latency floor for the e2e aim: an append of 100 B (``pwrite`` at
    the end of a growing file) then ``fdatasync``, ``rate_per_s`` times a second for
    ``seconds``, as a log append under fsync=always; p50/p99/max of each write+sync
    in ms (a sync that outlasts its slot delays the next, never skips it)."""
    path = directory / "disk-latency-probe"
    record = b"x" * 100
    interval = 1.0 / rate_per_s
    samples: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        started = time.perf_counter()
        for slot in range(round(rate_per_s * seconds)):
            wait = started + slot * interval - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            began = time.perf_counter()
            os.pwrite(fd, record, slot * len(record))
            os.fdatasync(fd)
            samples.append((time.perf_counter() - began) * 1000)
        elapsed = max(seconds, time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    samples.sort()
    return {"syncs": len(samples), "rate_per_s": round(len(samples) / elapsed),
            "p50_ms": round(statistics.median(samples), 3),
            "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 3),
            "max_ms": round(samples[-1], 3)}


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
