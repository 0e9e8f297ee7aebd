"""bench/cluster: 1, 2 and 3 Conveyor nodes over one PostgreSQL, and ``--workers 2``.

Run:  .venv/bin/python -m bench.cluster [--seconds 10] [--rounds 3] [--nodes 1,2,3]
      [--workers 2] [--partitions 6] [--producers 2] [--consumers 2]
      [--queues-per-node 2] [--smoke] [--output FILE]

One embedded PostgreSQL (bench/pgmeter.py: fsync on, synchronous_commit on, the same
cores and disk) for the whole run; every configuration of every round gets a fresh
database and fresh nodes (bench/cluster/nodes.py). Configurations: ``nodes1``..``nodesN``
(separate ``conveyor serve --node-id K`` processes, each with Kafka, AMQP and HTTP) and
``workers2`` (one ``conveyor serve --workers 2``). Rounds interleave the configurations.
Phases per configuration, all on 1 KiB records:

- Kafka produce: ``--producers`` confluent-kafka processes (acks=all, linger 5 ms, at
  most ``--max-buffered`` records unacknowledged each, so the final flush stays short;
  bootstrap list of every node) for ``--seconds`` into a topic of ``--partitions``
  partitions, whose leaders spread evenly over the nodes (a topic name chosen so the
  rendezvous hash gives each node its share: bench/cluster/nodes.py); then consume:
  ``--consumers`` processes read it all back from offset 0 (bench/kafka/timed.py).
- AMQP publish: ``--queues-per-node`` durable queues owned by each node that has an AMQP
  listener (names chosen by the same rendezvous hash the nodes use), one pika publisher
  process per queue (confirms, window 1000, persistent) connected to the queue's owner
  node for ``--seconds``; then consume: one consumer per queue on that node (prefetch
  1000, ack each) drains it (bench/amqp/runner.py's phase machinery). Clients connect to
  the queue's node: cross-node forwarding is not used. Under ``--workers`` only worker 1
  has an AMQP listener, so every queue is one that worker 1 owns.

Each phase records records/s, the CPU of every node process and of PostgreSQL (all its
processes; % of one core), client CPU per process and ``client_bound`` (one client
process >= 90 % of a core), the host's CPU, and WAL bytes per record. The summary has
medians over rounds, the scaling ratio of each configuration to ``nodes1`` (per round and
median), and a CPU-cost model per record (node, PostgreSQL, client µs) from which
bench/README.md reasons about a 16-core machine. Results: bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from bench.amqp.clients import WorkerSpec
from bench.amqp.runner import run_phase
from bench.cluster.nodes import Cluster, start_cluster
from bench.kafka import timed
from bench.measure import summarise
from bench.pgmeter import PostgresMeter, embedded_postgres
from conveyor.testing.postgres import PostgresServer

RESULTS = Path(__file__).resolve().parents[1] / "results" / "cluster.json"
RECORD_BYTES = 1024
PHASES = ("kafka_produce", "kafka_consume", "amqp_publish", "amqp_consume")


def _busy_s() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def measured(cluster: Cluster, postgres: PostgresMeter,
             run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one phase; add every node's CPU, PostgreSQL's CPU and WAL, the host's CPU."""
    nodes_before, host_before = cluster.node_cpu_s(), _busy_s()
    snapshot = postgres.start()
    result = run()
    wall_s = time.perf_counter() - snapshot.started
    nodes_s = [after - before for after, before in
               zip(cluster.node_cpu_s(), nodes_before, strict=True)]
    records = int(result.get("records") or 0)
    result.update(postgres.stop(snapshot, records))
    result["node_cpu_pct"] = [round(100 * s / wall_s, 1) for s in nodes_s]
    result["nodes_cpu_pct"] = round(100 * sum(nodes_s) / wall_s, 1)
    result["host_cpu_pct"] = round(100 * (_busy_s() - host_before) / wall_s, 1)
    if records:
        result["node_cpu_us_per_record"] = round(1e6 * sum(nodes_s) / records, 2)
    return result


def kafka_phases(cluster: Cluster, postgres: PostgresMeter, options: argparse.Namespace
                 ) -> dict[str, Any]:
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    topic = cluster.balanced_topic("bench-1024", options.partitions)
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    topics = [NewTopic(topic, options.partitions, 1)]
    for future in admin.create_topics(topics).values():
        future.result(60)
    produce = measured(cluster, postgres, lambda: timed.produce_phase(
        cluster, topic, RECORD_BYTES, options.seconds, options.producers,
        options.max_buffered))
    ends = timed.log_ends(cluster, topic, options.partitions)
    consume = measured(cluster, postgres, lambda: timed.consume_phase(
        cluster, topic, RECORD_BYTES, options.partitions, options.consumers, ends,
        options.seconds))
    for phase in (produce, consume):
        phase["client_cpu_us_per_record"] = round(
            1e6 * sum(pct / 100 * phase["wall_s"] for pct in phase["client_cpu_pct"])
            / max(1, phase["records"]), 2)
    leaders = {row.get("owner") for row in cluster.status().get("owners", [])
               if row.get("kind") == "partition"}
    produce["partition_leaders"] = len(leaders)
    produce["topic"] = topic
    return {"kafka_produce": produce, "kafka_consume": consume}


def _amqp_phase(workers: list[dict[str, Any]], count_field: str, wall_s: float,
                phase: dict[str, Any]) -> dict[str, Any]:
    records = sum(int(w[count_field]) for w in workers)
    elapsed = max(w["ended"] for w in workers) - min(w["started"] for w in workers)
    client_pct = [round(100 * w["cpu_s"] / max(wall_s, 1e-9), 1) for w in workers]
    return {"records": records, "records_per_s": round(records / max(elapsed, 1e-9)),
            "wall_s": round(elapsed, 2), "processes": len(workers),
            "client_cpu_pct": client_pct, "client_bound": phase["client_bound"],
            "client_cpu_us_per_record": round(
                1e6 * sum(w["cpu_s"] for w in workers) / max(1, records), 2)}


def amqp_phases(cluster: Cluster, postgres: PostgresMeter, options: argparse.Namespace
                ) -> dict[str, Any]:
    queues = cluster.queue_names(options.queues_per_node)
    base = WorkerSpec(role="publisher", client="pika", host="127.0.0.1", port=0, queue="",
                      message_bytes=RECORD_BYTES, window=1000, prefetch=1000, ack_every=1)
    publishers = [replace(base, port=node.amqp_port or 0, queue=name, seconds=options.seconds)
                  for name, node in queues]

    def publish() -> dict[str, Any]:
        phase = run_phase(cluster, publishers)
        return _amqp_phase(phase["workers"], "confirmed", phase["wall_s"], phase)

    published = measured(cluster, postgres, publish)
    consumers = [replace(spec, role="consumer") for spec in publishers]

    def consume() -> dict[str, Any]:
        phase = run_phase(cluster, consumers,
                          expected=published["records"])
        result = _amqp_phase(phase["workers"], "received", phase["wall_s"], phase)
        result["complete"] = result["records"] >= published["records"]
        return result

    consumed = measured(cluster, postgres, consume)
    published["queues"] = {name: node.node_id for name, node in queues}
    return {"amqp_publish": published, "amqp_consume": consumed}


def bench_configuration(label: str, server: PostgresServer, postgres: PostgresMeter,
                        options: argparse.Namespace, root: Path) -> dict[str, Any]:
    dsn = server.create_database("cluster")
    nodes = int(label.removeprefix("nodes")) if label.startswith("nodes") else 1
    workers = int(label.removeprefix("workers")) if label.startswith("workers") else 0
    root.mkdir(parents=True)
    result: dict[str, Any] = {}
    with start_cluster(root, dsn, nodes=nodes, workers=workers) as cluster:
        result["node_processes"] = len(cluster.nodes)
        result.update(kafka_phases(cluster, postgres, options))
        print(label, "kafka", _brief(result, "kafka_produce"), _brief(result, "kafka_consume"),
              flush=True)
        result.update(amqp_phases(cluster, postgres, options))
        print(label, "amqp", _brief(result, "amqp_publish"), _brief(result, "amqp_consume"),
              flush=True)
    server.drop_database(dsn)
    return result


def _brief(result: dict[str, Any], phase: str) -> str:
    one = result[phase]
    return (f"{phase} {one['records_per_s']:,}/s nodes {one['node_cpu_pct']} "
            f"pg {one['postgres_cpu_pct']} host {one['host_cpu_pct']}"
            f"{' CLIENT-BOUND' if one['client_bound'] else ''}")


def summarise_configuration(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: medians of the rates and CPU figures over rounds, spread of the rate."""
    out: dict[str, Any] = {"node_processes": rounds[0]["node_processes"]}
    for phase in PHASES:
        values = [one[phase] for one in rounds if phase in one]
        summary: dict[str, Any] = {
            "records_per_s": summarise([float(v["records_per_s"]) for v in values]),
            "client_bound_rounds": sum(bool(v["client_bound"]) for v in values),
        }
        for field in ("nodes_cpu_pct", "postgres_cpu_pct", "host_cpu_pct",
                      "node_cpu_us_per_record", "postgres_cpu_us_per_record",
                      "client_cpu_us_per_record", "wal_bytes_per_record"):
            numbers = [float(v[field]) for v in values if v.get(field) is not None]
            if numbers:
                summary[field] = round(statistics.median(numbers), 2)
        per_node = [v["node_cpu_pct"] for v in values]
        summary["node_cpu_pct"] = [round(statistics.median(column), 1)
                                   for column in zip(*per_node, strict=True)]
        summary["client_cpu_pct_max"] = round(statistics.median(
            max(v["client_cpu_pct"], default=0.0) for v in values), 1)
        out[phase] = summary
    return out


def scaling(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """records/s of each configuration over ``nodes1``'s, per round and median."""
    base = rounds.get("nodes1", [])
    out: dict[str, Any] = {}
    for label, results in rounds.items():
        if label == "nodes1" or not base:
            continue
        out[f"{label}/nodes1"] = {
            phase: summarise([ours[phase]["records_per_s"]
                              / max(1, theirs[phase]["records_per_s"])
                              for ours, theirs in zip(results, base, strict=False)])
            for phase in PHASES}
    return out


def cpu_model(summary: dict[str, Any], cores: int = 16) -> dict[str, Any]:
    """What the measured CPU per record predicts for ``cores`` cores, clients elsewhere.

    A node is one Python event loop (at most one core); PostgreSQL spreads over the
    cores it gets. With n nodes and the rest of the cores for PostgreSQL, the rate is
    bounded by min(n * 1e6 / node_us, (cores - n) * 1e6 / pg_us); the best n is given.
    A CPU-only bound: it ignores the commit's WAL flush (one per transaction, shared by
    every append of a node's loop turn) and lock waits on a partition's head row.
    """
    base = summary.get("nodes1") or {}
    model = (cpu_model.__doc__ or "").split("\n\n")[1]
    out: dict[str, Any] = {"cores": cores, "model": " ".join(model.split())}
    for phase in PHASES:
        node_us = (base.get(phase) or {}).get("node_cpu_us_per_record")
        pg_us = (base.get(phase) or {}).get("postgres_cpu_us_per_record")
        if not node_us or not pg_us:
            continue
        n, rate = max(((n, min(n * 1e6 / node_us, (cores - n) * 1e6 / pg_us))
                       for n in range(1, cores)), key=lambda pair: pair[1])
        out[phase] = {"node_us_per_record": node_us, "postgres_us_per_record": pg_us,
                      "one_node_ceiling_per_s": round(1e6 / node_us),
                      "best_nodes": n, "predicted_records_per_s": round(rate),
                      "bound_by": "postgres" if (cores - n) * node_us < n * pg_us
                      else "nodes"}
    return out


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per produce/publish phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", default="1,2,3", help="node counts to run")
    parser.add_argument("--workers", type=int, default=2, help="--workers N (0: skip)")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--producers", type=int, default=2, help="Kafka producer processes")
    parser.add_argument("--consumers", type=int, default=2, help="Kafka consumer processes")
    parser.add_argument("--max-buffered", type=int, default=20_000,
                        help="records each Kafka producer holds unacknowledged (20 MiB)")
    parser.add_argument("--queues-per-node", type=int, default=2,
                        help="AMQP queues owned by each node (one publisher + consumer each)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, not minutes: 1 and 2 nodes, 1 s phases, one round")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    if options.smoke:
        options.seconds, options.rounds, options.nodes, options.workers = 1.0, 1, "1,2", 0
        options.partitions, options.queues_per_node = 2, 1
        options.producers = options.consumers = 1
    return options


def main(argv: list[str] | None = None) -> int:
    from bench.measure import provenance

    options = parse_arguments(argv)
    argv = sys.argv[1:] if argv is None else argv
    labels = [f"nodes{int(n)}" for n in options.nodes.split(",")]
    if options.workers:
        labels.append(f"workers{options.workers}")
    document: dict[str, Any] = {
        **provenance([sys.executable, "-m", "bench.cluster", *argv]),
        "settings": {key: (str(value) if isinstance(value, Path) else value)
                     for key, value in vars(options).items()},
        "notes": "every node, PostgreSQL and every client process share this machine's "
                 "cores; CPU % is of one core; node_cpu_pct lists the node processes in "
                 "node-id order; records are 1 KiB; Kafka acks=all, AMQP persistent with "
                 "confirms; PostgreSQL fsync=on, synchronous_commit=on",
    }
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    workdir = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        server = stack.enter_context(embedded_postgres())
        postgres = PostgresMeter(server)
        for index in range(options.rounds):
            for label in labels:
                print(f"--- round {index + 1}/{options.rounds}: {label}", flush=True)
                rounds[label].append(bench_configuration(
                    label, server, postgres, options, workdir / f"r{index}-{label}"))
    summary = {label: summarise_configuration(results) for label, results in rounds.items()}
    document.update({"load_avg_at_end": [round(x, 2) for x in psutil.getloadavg()],
                     "configurations": summary, "scaling": scaling(rounds),
                     "cpu_model": cpu_model(summary), "rounds": rounds})
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(document, indent=2) + "\n")
    print(table(summary, document["scaling"]))
    print(f"wrote {options.output}")
    return 0


def table(summary: dict[str, Any], ratios: dict[str, Any]) -> str:
    lines = [f"{'configuration':<14}{'phase':<15}{'records/s':>11}{'x nodes1':>9}"
             f"{'nodes CPU%':>12}{'PG CPU%':>9}{'host CPU%':>10}{'WAL B/rec':>10}  per node"]
    for label, one in summary.items():
        for phase in PHASES:
            figures = one[phase]
            ratio = (ratios.get(f"{label}/nodes1") or {}).get(phase, {}).get("median")
            lines.append(
                f"{label:<14}{phase:<15}{figures['records_per_s']['median'] or 0:>11,.0f}"
                f"{ratio if ratio is not None else 1.0:>9.2f}"
                f"{figures.get('nodes_cpu_pct', 0):>12.0f}"
                f"{figures.get('postgres_cpu_pct', 0):>9.0f}"
                f"{figures.get('host_cpu_pct', 0):>10.0f}"
                f"{figures.get('wal_bytes_per_record', 0):>10.0f}  {figures['node_cpu_pct']}"
                f"{' client-bound' if figures['client_bound_rounds'] else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
