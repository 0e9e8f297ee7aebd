"""`make bench`: run the benchmark suites and print one summary table.

Run:  .venv/bin/python -m bench.run [--quick] [storage] [kafka] [http] [amqp] [sqs]
      [postgres] [cluster]        (make bench ARGS="postgres cluster": those alone)

Each suite is its own module, started as a subprocess from the repository root (so one
suite's brokers, processes and imports never leak into the next) and writes
bench/results/<suite>.json; this runner then reads those files and prints the headline
figures side by side. With no names it runs every suite in the order below. ``--quick``
passes each suite its smoke-run arguments (a few seconds each; the numbers are not
meaningful, the plumbing is). Exit status: non-zero when a suite failed.
Peers (RabbitMQ, Redis, Tansu) are installed by bench/peers.sh; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# measure, unit, conveyor's value, peer, peer's value, "higher"/"lower" is better
Row = tuple[str, str, float | None, str, float | None, str]


@dataclass(frozen=True)
class Suite:
    module: str
    arguments: tuple[str, ...]
    quick_arguments: tuple[str, ...]
    summary: Callable[[dict[str, Any]], list[Row]]


def _get(document: Any, *path: str | int) -> Any:
    for key in path:
        if isinstance(document, dict):
            document = document.get(key)
        elif isinstance(document, list) and isinstance(key, int) and key < len(document):
            document = document[key]
        else:
            return None
    return document


def storage_rows(document: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    raw = document.get("raw_1kib_append_fdatasync_per_s")
    for case in document.get("cases", []):
        if case.get("fsync") == "always":
            rows.append((f"append 1 KiB, batch {case.get('batch_records')}, fsync=always",
                         "rec/s", case.get("records_per_s"), "disk: 1 KiB pwrite+fdatasync", raw,
                         "higher"))
    return rows


def kafka_rows(document: dict[str, Any]) -> list[Row]:
    ours, theirs = _get(document, "brokers", "conveyor"), _get(document, "brokers", "tansu")
    rows: list[Row] = []

    def marked(label: str, case: str) -> str:
        """A case any round of which ran shorter than --seconds says so."""
        short = any(_get(broker, case, "short_phase_rounds") for broker in (ours, theirs))
        return f"{label} [SHORT PHASE]" if short else label

    for case, label in (("produce_1024B_acks_all", "produce 1 KiB acks=all"),
                        ("consume_1024B", "consume 1 KiB"),
                        ("produce_100B_acks_all", "produce 100 B acks=all"),
                        ("consume_100B", "consume 100 B")):
        rows.append((marked(label, case), "rec/s", _get(ours, case, "records_per_s"),
                     "tansu (memory)", _get(theirs, case, "records_per_s"), "higher"))
    rows.append((marked("e2e latency p99, 100 B", "e2e_latency_100B"), "ms",
                 _get(ours, "e2e_latency_100B", "p99_ms"), "tansu (memory)",
                 _get(theirs, "e2e_latency_100B", "p99_ms"), "lower"))
    ceilings = document.get("machine_ceilings") or {}
    rows.append(("e2e latency p99, 100 B", "ms", _get(ours, "e2e_latency_100B", "p99_ms"),
                 "disk: 100 B pwrite+fdatasync p99 at 1k/s",
                 _get(ceilings, "disk_sync_100B_at_1k_per_s", "p99_ms"), "lower"))
    rows.append(("produce 1 KiB acks=all", "MB/s", _get(ours, "produce_1024B_acks_all",
                 "mb_per_s"), "disk: write + fdatasync", ceilings.get(
                 "disk_write_fdatasync_mb_per_s"), "higher"))
    rows.append(("produce 1 KiB acks=all", "MB/s", _get(ours, "produce_1024B_acks_all",
                 "mb_per_s"), "disk: 4 files, 4 MiB + fdatasync", ceilings.get(
                 "disk_log_write_fdatasync_mb_per_s"), "higher"))
    rows.append(("consume 1 KiB", "MB/s", _get(ours, "consume_1024B", "mb_per_s"),
                 "TCP loopback", ceilings.get("tcp_loopback_mb_per_s"), "higher"))
    return rows


def http_rows(document: dict[str, Any]) -> list[Row]:
    ours, theirs = document.get("conveyor_http") or {}, document.get("redis") or {}
    rows: list[Row] = []
    # since httpack: one request per cycle (the acquire carries the last batch's acks)
    # against Redis's XACK and next XREADGROUP pipelined (bench/http/run.py); a document
    # from before has only the two-request rows under the same names
    carried = "shared_acquire_then_ack_batch_100_msg_per_s" in ours
    for batch in (1, 100, 1000):
        rows.append((f"publish, batch {batch}", "msg/s",
                     ours.get(f"publish_batch_{batch}_msg_per_s"), "redis XADD",
                     theirs.get(f"stream_xadd_batch_{batch}_msg_per_s"), "higher"))
        rows.append((f"acquire+ack, batch {batch}", "msg/s",
                     ours.get(f"shared_acquire_ack_batch_{batch}_msg_per_s"),
                     "redis XACK+XREADGROUP pipelined" if carried else "redis XREADGROUP+XACK",
                     theirs.get(f"stream_xreadgroup_xack_batch_{batch}_msg_per_s"), "higher"))
        if f"shared_acquire_then_ack_batch_{batch}_msg_per_s" in ours:  # two requests
            rows.append((f"acquire, then ack (2 requests), batch {batch}", "msg/s",
                         ours.get(f"shared_acquire_then_ack_batch_{batch}_msg_per_s"),
                         "redis XREADGROUP, then XACK",
                         theirs.get(f"stream_xreadgroup_then_xack_batch_{batch}_msg_per_s"),
                         "higher"))
    if "publish_batch_1_clients_msg_per_s" in ours:  # bench.http.run --clients N
        clients = (document.get("settings") or {}).get("clients_of_publish_batch_1_clients")
        rows.append((f"publish, batch 1, {clients} clients", "msg/s",
                     ours.get("publish_batch_1_clients_msg_per_s"), "redis XADD",
                     theirs.get("stream_xadd_batch_1_clients_msg_per_s"), "higher"))
    rows.append(("e2e latency p99", "ms", _get(ours, "e2e_shared_acquire", "p99_ms"),
                 "redis stream", _get(theirs, "stream_e2e", "p99_ms"), "lower"))
    return rows


def amqp_rows(document: dict[str, Any]) -> list[Row]:
    systems = document.get("systems") or {}
    ours = systems.get("conveyor") or {}
    rows: list[Row] = []
    for peer in ("rabbitmq-classic", "rabbitmq-quorum"):
        theirs = systems.get(peer) or {}
        rows.append(("publish 1 KiB persistent, confirms", "msg/s",
                     _get(ours, "publish", "msg_per_s"), peer,
                     _get(theirs, "publish", "msg_per_s"), "higher"))
        rows.append(("consume, prefetch 1000, manual ack", "msg/s",
                     _get(ours, "consume", "msg_per_s"), peer,
                     _get(theirs, "consume", "msg_per_s"), "higher"))
        rows.append(("e2e latency p99", "ms", _get(ours, "e2e_latency", "p99_ms"), peer,
                     _get(theirs, "e2e_latency", "p99_ms"), "lower"))
    return rows


def sqs_rows(document: dict[str, Any]) -> list[Row]:
    summary = document.get("summary") or {}
    ours, moto, http = (summary.get(name) or {} for name in
                        ("conveyor_sqs", "moto", "conveyor_http"))
    rows: list[Row] = []
    for phase, label in (("send", "SendMessageBatch of 10, 1 KiB"),
                         ("receive_delete", "ReceiveMessage 10 + DeleteMessageBatch")):
        rows.append((label, "msg/s", _get(ours, phase, "msg_per_s"), "moto (memory)",
                     _get(moto, phase, "msg_per_s"), "higher"))
        rows.append((label, "msg/s", _get(ours, phase, "msg_per_s"),
                     "conveyor HTTP, batch 10", _get(http, phase, "msg_per_s"), "higher"))
    latency = document.get("latency") or {}
    rows.append(("e2e latency p99, long poll", "ms", _get(latency, "conveyor_sqs", "p99_ms"),
                 "moto (memory)", _get(latency, "moto", "p99_ms"), "lower"))
    return rows


def postgres_rows(document: dict[str, Any]) -> list[Row]:
    """Conveyor on PostgreSQL (the "conveyor" column) against Conveyor on files."""
    head = document.get("headline") or {}
    rows: list[Row] = []
    for key, label in (("kafka_produce_1KiB", "Kafka produce 1 KiB acks=all"),
                       ("kafka_consume_1KiB", "Kafka consume 1 KiB"),
                       ("amqp_publish_1KiB", "AMQP publish 1 KiB, confirms"),
                       ("amqp_consume_1KiB", "AMQP consume 1 KiB, ack each")):
        rows.append((f"{label} on PostgreSQL", "rec/s",
                     _get(head, "postgresql", key, "records_per_s"), "conveyor on files",
                     _get(head, "file", key, "records_per_s"), "higher"))
    for key, label in (("kafka_produce_1KiB", "Kafka produce 1 KiB"),
                       ("amqp_publish_1KiB", "AMQP publish 1 KiB")):
        rows.append((f"{label}: WAL per record", "bytes",
                     _get(head, "postgresql", key, "wal_bytes_per_record"), "record size",
                     1024.0, "lower"))
    return rows


def cluster_rows(document: dict[str, Any]) -> list[Row]:
    """Each configuration's rate against one node's, medians over rounds."""
    configurations = document.get("configurations") or {}
    base = configurations.get("nodes1") or {}
    rows: list[Row] = []
    for label, one in configurations.items():
        if label == "nodes1":
            continue
        for phase in ("kafka_produce", "kafka_consume", "amqp_publish", "amqp_consume"):
            rows.append((f"{label}: {phase.replace('_', ' ')} 1 KiB", "rec/s",
                         _get(one, phase, "records_per_s", "median"), "1 node",
                         _get(base, phase, "records_per_s", "median"), "higher"))
    return rows


SUITES: dict[str, Suite] = {
    "storage": Suite("bench.storage.bench_append", (), ("--seconds", "0.3"), storage_rows),
    "kafka": Suite("bench.kafka.throughput", (), ("--seconds", "2", "--rounds", "1"), kafka_rows),
    "http": Suite("bench.http.run", (), ("--seconds", "0.3", "--rounds", "1", "--rate", "100"),
                  http_rows),
    "amqp": Suite("bench.amqp", (), ("--quick",), amqp_rows),
    "sqs": Suite("bench.sqs", (), ("--seconds", "1", "--rounds", "1", "--latency-rate", "20"),
                 sqs_rows),
    "postgres": Suite("bench.postgres", (), ("--quick",), postgres_rows),
    "cluster": Suite("bench.cluster", (), ("--smoke",), cluster_rows),
}


def run_suite(name: str, quick: bool) -> tuple[int, float]:
    suite = SUITES[name]
    arguments = suite.quick_arguments if quick else suite.arguments
    command = [sys.executable, "-m", suite.module, *arguments]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT)
    return code, time.monotonic() - started


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def summary(names: list[str], outcomes: dict[str, tuple[int, float]],
            markdown: bool = False) -> str:
    header = ("suite", "measure", "unit", "conveyor", "peer", "peer value", "conveyor/peer",
              "better")
    rows: list[tuple[str, ...]] = [header]
    for name in names:
        code, seconds = outcomes[name]
        path = RESULTS / f"{name}.json"
        if code != 0:
            rows.append((name, f"FAILED (exit {code}, {seconds:.0f} s)", *[""] * 6))
            continue
        try:
            document = json.loads(path.read_text())
            suite_rows = SUITES[name].summary(document)
        except (OSError, ValueError) as error:
            reason = "no results file" if isinstance(error, OSError) else f"bad results: {error}"
            rows.append((name, reason, *[""] * 6))
            continue
        for measure, unit, ours, peer, theirs, better in suite_rows:
            ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
            rows.append((name, measure, unit, _format(ours), peer, _format(theirs), ratio,
                         better))
    if markdown:  # the README's table
        lines = [f"| {' | '.join(row)} |" for row in rows]
        lines.insert(1, "|" + "---|" * len(header))
        return "\n".join(lines)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="suite",
                        help=f"suites to run (default: all): {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="smoke run of each suite")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: print the table from the existing results")
    parser.add_argument("--markdown", action="store_true",
                        help="print the summary as a Markdown table (the README's)")
    options = parser.parse_args(argv)
    names = options.names or list(SUITES)
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    outcomes: dict[str, tuple[int, float]] = {}
    for name in names:
        outcomes[name] = (0, 0.0) if options.summary_only else run_suite(name, options.quick)
    print("\n=== summary (ratios are within one run; absolute numbers depend on the machine)")
    print(summary(names, outcomes, options.markdown))
    for name, (code, seconds) in outcomes.items():
        if not options.summary_only:
            print(f"{name}: {'ok' if code == 0 else f'exit {code}'} in {seconds:.0f} s")
    return 1 if any(code != 0 for code, _ in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
