"""bench/kafka works: a phase shorter than its --seconds is marked, the consume phase
re-reads the log until its seconds have passed (counting what it read), and the disk
latency ceiling measures what it says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from bench.kafka import timed
from bench.kafka.throughput import (
    RunningBroker,
    create_topic_partitions,
    start_broker,
    summarise_rounds,
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """One real Conveyor (``conveyor serve``, file storage) for the phases below."""
    with start_broker("conveyor", tmp_path_factory.mktemp("kafka-harness")) as running:
        yield running


def _worker(wall_s: float, records: int = 1000) -> dict[str, float]:
    return {"records": records, "wall_s": wall_s, "cpu_s": wall_s * 0.5}


def test_a_phase_shorter_than_its_seconds_is_marked() -> None:
    short = timed._phase([_worker(6.04), _worker(5.9)], 1024, 2.0, 6.04, 10.0)
    assert short["short_phase"] is True
    full = timed._phase([_worker(10.3), _worker(10.1)], 1024, 2.0, 10.3, 10.0)
    assert full["short_phase"] is False
    cases = {"produce_100B_acks_all": full, "consume_100B": full,
             "produce_1024B_acks_all": full, "consume_1024B": short}
    summary = summarise_rounds([cases, {**cases, "consume_1024B": full}, cases])
    assert summary["consume_1024B"]["short_phase_rounds"] == 2
    assert summary["produce_1024B_acks_all"]["short_phase_rounds"] == 0


def test_a_produce_phase_tells_its_flush_apart(broker: RunningBroker) -> None:
    create_topic_partitions(broker, "flushed", 2)
    phase = timed.produce_phase(broker, "flushed", 100, 1.0, 1, max_buffered=20_000)
    assert phase["short_phase"] is False
    assert phase["records"] > 0
    assert 0 <= phase["flush_s"] <= phase["wall_s"] - 1.0 + 0.05
    # what was acknowledged while producing is part of what was acknowledged in all
    assert 0 <= phase["records_per_s_while_producing"] * 1.0 <= phase["records"] * 1.05


def test_the_consume_phase_rereads_the_log_until_its_seconds(broker: RunningBroker) -> None:
    create_topic_partitions(broker, "reread", 2)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for index in range(2000):
        producer.produce("reread", b"x" * 100, partition=index % 2)
    assert producer.flush(30) == 0
    ends = timed.log_ends(broker, "reread", 2)
    assert sum(ends.values()) == 2000
    phase = timed.consume_phase(broker, "reread", 100, 2, 2, ends, seconds=2.0)
    assert phase["wall_s"] >= 2.0
    assert phase["short_phase"] is False
    assert phase["complete"] is True
    passes = phase["passes"]
    assert min(passes) >= 2  # 1,000 records a consumer: read many times in 2 s
    # every pass counted whole, the last one cut by the clock counted in part
    assert min(passes) * 1000 * 2 <= phase["records"] <= (max(passes) + 1) * 1000 * 2


def test_the_disk_latency_ceiling_times_every_write_and_sync(tmp_path: Path) -> None:
    result = timed.disk_sync_latency(tmp_path, rate_per_s=200, seconds=0.25)
    assert result["syncs"] == 50  # one per slot, none skipped
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_the_sustained_disk_ceiling_writes_and_cleans_up(tmp_path: Path) -> None:
    assert timed.disk_log_write_mb_per_s(tmp_path, files=2, megabytes_per_sync=1,
                                         seconds=0.2) > 0
    assert list(tmp_path.iterdir()) == []
