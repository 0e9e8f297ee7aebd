"""bench/cluster and bench/pgmeter work: the choices the harness makes (which node leads
and owns what), its CPU model, and one short real run of two nodes on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.cluster.nodes import Cluster, Node
from bench.cluster.run import cpu_model, scaling
from bench.pgmeter import PostgresMeter
from conveyor.cluster.ownership import PARTITION, SHARED, choose_owner, item_name
from conveyor.testing.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]


def _cluster(amqp_on: tuple[bool, ...]) -> Cluster:
    nodes = [Node(index + 1, 0, 9000 + index, 5600 + index if amqp else None)
             for index, amqp in enumerate(amqp_on)]
    return Cluster("test", nodes, 0)


def test_the_topic_spreads_partition_leaders_evenly() -> None:
    for nodes in (2, 3):
        cluster = _cluster((True,) * nodes)
        topic = cluster.balanced_topic("bench-1024", 6)
        leaders = Counter(choose_owner(PARTITION, item_name(PARTITION, topic, p),
                                       list(range(1, nodes + 1))) for p in range(6))
        assert sorted(leaders.values()) == [6 // nodes] * nodes


def test_queues_are_owned_by_the_node_the_clients_use() -> None:
    cluster = _cluster((True, True, True))
    queues = cluster.queue_names(2)
    assert Counter(node.node_id for _, node in queues) == {1: 2, 2: 2, 3: 2}
    for name, node in queues:
        assert choose_owner(SHARED, item_name(SHARED, name, name), [1, 2, 3]) == node.node_id
    # --workers: only worker 1 has an AMQP listener, so only its queues are used
    workers = _cluster((True, False))
    assert {node.node_id for _, node in workers.queue_names(2)} == {1}


def test_cpu_model_names_the_bound() -> None:
    summary = {"nodes1": {"kafka_produce": {"node_cpu_us_per_record": 10.0,
                                            "postgres_cpu_us_per_record": 30.0}}}
    model = cpu_model(summary, cores=16)["kafka_produce"]
    # n nodes give n * 100k/s, 16 - n PostgreSQL cores give (16 - n) * 33k/s: best n = 4
    assert model["best_nodes"] == 4
    assert model["predicted_records_per_s"] == 400_000
    assert model["bound_by"] == "nodes"
    summary["nodes1"]["kafka_produce"]["postgres_cpu_us_per_record"] = 100.0
    assert cpu_model(summary, cores=16)["kafka_produce"]["bound_by"] == "postgres"


def test_scaling_is_against_one_node_per_round() -> None:
    phases = ("kafka_produce", "kafka_consume", "amqp_publish", "amqp_consume")
    one = {phase: {"records_per_s": 100} for phase in phases}
    two = {phase: {"records_per_s": 170} for phase in phases}
    ratios = scaling({"nodes1": [one, one], "nodes2": [two, two]})
    assert ratios["nodes2/nodes1"]["kafka_produce"]["median"] == 1.7


def test_postgres_meter_counts_wal_and_cpu(postgres_session_server: PostgresServer) -> None:
    meter = PostgresMeter(postgres_session_server)
    snapshot = meter.start()
    postgres_session_server.sql(
        "CREATE TEMP TABLE t AS SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
    result = meter.stop(snapshot, records=2000)
    # psql's backend has ended; its CPU is counted once the postmaster reaped it, which
    # happens a moment after psql returns (no event to await across processes)
    deadline = time.monotonic() + 10
    while result["postgres_cpu_s"] <= 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        result = meter.stop(snapshot, records=2000)
    assert result["postgres_cpu_s"] > 0
    assert result["wal_bytes"] > 0
    assert result["wal_bytes_per_record"] == round(result["wal_bytes"] / 2000, 1)


@pytest.mark.timeout(240)  # a PostgreSQL, two nodes and eight client processes start
def test_a_short_run_of_two_nodes_writes_every_figure(tmp_path: Path) -> None:
    output = tmp_path / "cluster.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--smoke", "--nodes", "2", "--seconds", "0.5",
         "--output", str(output)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=220)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    document = json.loads(output.read_text())
    assert document["commit"] and document["machine"]["cpus"]
    nodes2 = document["configurations"]["nodes2"]
    for phase in ("kafka_produce", "kafka_consume", "amqp_publish", "amqp_consume"):
        assert nodes2[phase]["records_per_s"]["median"] > 0, phase
        assert len(nodes2[phase]["node_cpu_pct"]) == 2
        assert "postgres_cpu_pct" in nodes2[phase]
    assert nodes2["kafka_produce"]["wal_bytes_per_record"] > 1024  # the record and more
    (run,) = document["rounds"]["nodes2"]
    assert run["amqp_consume"]["complete"]
    # the consume phase reads the log from offset 0 again and again until --seconds have
    # passed (bench/kafka/timed.py): every consumer read its share whole at least once
    consume = run["kafka_consume"]
    assert min(consume["passes"]) >= 1, consume["passes"]
    assert consume["records"] >= run["kafka_produce"]["records"]
    assert set(run["amqp_publish"]["queues"].values()) == {1, 2}
