"""AMQP 0-9-1 benchmark: Conveyor beside RabbitMQ (classic and quorum queues), one run.

Run:  .venv/bin/python -m bench.amqp [--quick] [--systems rabbitmq-classic,rabbitmq-quorum,conveyor]
      [--publishers 2] [--consumers 2] [--client pika|aio-pika] [--profile DIR] [--perf]

System ``conveyor-pg`` (not in the default list; bench/postgres.py runs it beside
``conveyor``): Conveyor with ``--storage postgresql://`` on an embedded PostgreSQL started
for the run (fsync on, synchronous_commit on, a fresh database per round); every phase
then also reports PostgreSQL's CPU (all its processes) and WAL bytes per message.

Each system gets a fresh broker (fresh data directory, free loopback ports) and three phases,
all driven by the same client code (``bench.amqp.clients``) in separate worker processes:

1. end-to-end latency: one publisher paced at ``--rate`` msg/s (confirms on, window
   ``--window``) and one consumer (prefetch, manual acks) on an empty queue, first, on the
   fresh broker; p50/p99/max of receive time minus the send time stamped into the body;
2. publish: ``--publishers`` processes publish persistent 1 KiB messages with confirms for
   ``--seconds``; confirmed msg/s = all confirmed / (last confirm - start);
3. consume: ``--consumers`` processes drain what phase 2 left in the queue, topped up
   first by an untimed 0.6 x ``--seconds`` of publishing so the drain lasts past
   ``--seconds`` (``short_phase`` marks one that did not), with prefetch ``--prefetch``
   and manual acks (each one, or ``multiple`` every ``--ack-every``);
   msg/s = delivered / (last delivery - start).

The queue is durable and every message is persistent (delivery_mode 2): RabbitMQ confirms a
persistent message once it is written and fsynced (classic: message store; quorum: Raft WAL),
Conveyor with its default fsync=always. For each phase: broker CPU % (broker process and its
children), client CPU % (sum over the worker processes; 100 % = one core) and host CPU %
(all processes; the machine's ceiling is 100 % x cores), from which to judge whether the
broker or the client was the bottleneck. Results: bench/results/amqp.json and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import psutil

from bench.amqp import profile
from bench.amqp.brokers import RunningBroker, conveyor_node, rabbitmq_available, rabbitmq_node
from bench.amqp.clients import Coordination, WorkerSpec, worker_main
from bench.measure import CLIENT_BOUND_PCT, summarise
from bench.perf_split import format_split, perf_split
from bench.pgmeter import PostgresMeter, embedded_postgres

RESULTS = Path(__file__).resolve().parents[1] / "results" / "amqp.json"
SYSTEMS = ("rabbitmq-classic", "rabbitmq-quorum", "conveyor")
KNOWN_SYSTEMS = (*SYSTEMS, "conveyor-pg")
READY_TIMEOUT_S = 60.0
STALL_S = 5.0  # a consumer phase ends when nothing more arrived for this long
PHASE_TIMEOUT_S = 120.0
LATENCY_QUEUE = "bench-latency"
THROUGHPUT_QUEUE = "bench-throughput"


class Measured(Protocol):
    """What a phase needs of the broker: its CPU seconds so far (a ``RunningBroker``, or
    the nodes of a cluster summed, bench/cluster/nodes.py)."""

    def cpu_s(self) -> float: ...


# --- one phase: N worker processes against one broker ---------------------------------------
def run_phase(broker: Measured, specs: list[WorkerSpec],
              expected: int | None = None) -> dict[str, Any]:
    """Start the workers, release them together, stop consumers once everything arrived.

    ``expected``: messages the consumers should receive (None: what the publishers of this
    phase confirm). Returns the per-worker results plus the phase's CPU figures.
    """
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(len(specs) + 1)
    start, stop, results = context.Event(), context.Event(), context.Queue()
    counters = [context.RawValue("q", 0) if spec.role == "consumer" else None for spec in specs]
    processes = [
        context.Process(target=worker_main, daemon=True,
                        args=(spec, Coordination(ready, start, stop, results, counter)))
        for spec, counter in zip(specs, counters, strict=True)
    ]
    for process in processes:
        process.start()
    worker_results: list[dict[str, Any]] = []
    try:
        try:
            ready.wait(READY_TIMEOUT_S)
        except threading.BrokenBarrierError as error:  # a worker failed to connect
            raise RuntimeError(f"workers not ready: {_drain_errors(results)}") from error
        host_before = psutil.cpu_times()
        broker_before = broker.cpu_s()
        started = time.monotonic()
        start.set()
        publishers = sum(spec.role == "publisher" for spec in specs)
        consumer_counters = [counter for counter in counters if counter is not None]
        deadline = started + PHASE_TIMEOUT_S + max(spec.seconds for spec in specs)
        last_count, last_progress = -1, time.monotonic()
        stopped_at = None
        while len(worker_results) < len(specs):
            if time.monotonic() > deadline:
                raise RuntimeError("phase timed out")
            try:
                result = results.get(timeout=0.02)
            except queue.Empty:
                result = None
            if result is not None:
                if "error" in result:
                    raise RuntimeError(f"{result['role']} failed: {result['error']}")
                worker_results.append(result)
            if stop.is_set() or not consumer_counters:
                continue
            published = [r for r in worker_results if r["role"] == "publisher"]
            if len(published) < publishers:
                continue
            target = expected if expected is not None else sum(r["confirmed"] for r in published)
            count = sum(counter.value for counter in consumer_counters)
            if count != last_count:
                last_count, last_progress = count, time.monotonic()
            if count >= target or time.monotonic() - last_progress > STALL_S:
                stopped_at = time.monotonic()
                stop.set()
        wall_s = time.monotonic() - started
        broker_cpu_s = broker.cpu_s() - broker_before
        host_after = psutil.cpu_times()
    finally:
        stop.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
    host_busy_s = _busy(host_after) - _busy(host_before)
    client_cpu = [result["cpu_s"] for result in worker_results]
    return {
        "workers": worker_results,
        "wall_s": wall_s,
        "started": started,
        "stopped_at": stopped_at,
        "broker_cpu_pct": round(100 * broker_cpu_s / wall_s, 1),
        "client_cpu_pct": round(100 * sum(client_cpu) / wall_s, 1),
        "client_cpu_pct_busiest_process": round(100 * max(client_cpu) / wall_s, 1),
        "client_bound": 100 * max(client_cpu) / wall_s >= CLIENT_BOUND_PCT,
        "host_cpu_pct": round(100 * host_busy_s / wall_s, 1),
    }


def _busy(times: Any) -> float:
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _drain_errors(results: Any) -> list[str]:
    errors: list[str] = []
    while True:
        try:
            item = results.get(timeout=0.5)
        except queue.Empty:
            return errors
        errors.append(str(item.get("error", item)))


def _cpu_fields(phase: dict[str, Any]) -> dict[str, Any]:
    return {key: phase[key] for key in ("broker_cpu_pct", "client_cpu_pct",
                                        "client_cpu_pct_busiest_process", "host_cpu_pct")}


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * fraction + 0.5) - 1))]


# --- the three phases ---------------------------------------------------------------------------
def latency_phase(broker: RunningBroker, base: WorkerSpec, options: argparse.Namespace
                  ) -> dict[str, Any]:
    queue = replace(base, queue=LATENCY_QUEUE)
    publisher = replace(queue, role="publisher", seconds=options.latency_seconds,
                        rate_per_s=options.rate)
    consumer = replace(queue, role="consumer", record_latency=True)
    phase = run_phase(broker, [consumer, publisher])
    sent = next(r for r in phase["workers"] if r["role"] == "publisher")
    received = next(r for r in phase["workers"] if r["role"] == "consumer")
    ordered = sorted(received["latency_ms"])
    result: dict[str, Any] = {
        "rate_per_s": options.rate, "seconds": options.latency_seconds,
        "confirmed": sent["confirmed"], "received": received["received"],
    }
    if ordered:
        result.update({"p50_ms": round(percentile(ordered, 0.50), 3),
                       "p99_ms": round(percentile(ordered, 0.99), 3),
                       "max_ms": round(ordered[-1], 3)})
    result.update(_cpu_fields(phase))
    return result


def publish_phase(broker: RunningBroker, base: WorkerSpec, options: argparse.Namespace
                  ) -> dict[str, Any]:
    spec = replace(base, role="publisher", queue=THROUGHPUT_QUEUE, seconds=options.seconds)
    phase = run_phase(broker, [spec] * options.publishers)
    workers = phase["workers"]
    confirmed = sum(r["confirmed"] for r in workers)
    elapsed = max(r["ended"] for r in workers) - min(r["started"] for r in workers)
    return {
        "msg_per_s": round(confirmed / elapsed), "confirmed": confirmed,
        "rejected": sum(r["rejected"] for r in workers), "seconds": round(elapsed, 3),
        "publishers": options.publishers, "window_per_publisher": options.window,
        "per_publisher_msg_per_s": [round(r["confirmed"] / (r["ended"] - r["started"]))
                                    for r in workers],
        **_cpu_fields(phase),
    }


# The consume phase drains what the publish phase left, and every system consumes faster
# than it publishes (1.3-1.4x in the 2026-12-07 runs), so a backlog of --seconds of
# publishing drained in 7-8 s: shorter than the phase length the suite promises. An
# untimed top-up of this fraction of --seconds more publishing (same publishers) makes
# the backlog last past --seconds; a phase still shorter is marked short_phase.
TOP_UP_FRACTION = 0.6


def top_up(broker: RunningBroker, base: WorkerSpec, options: argparse.Namespace) -> int:
    """Publish more onto the throughput queue, untimed; returns how many were confirmed."""
    spec = replace(base, role="publisher", queue=THROUGHPUT_QUEUE,
                   seconds=options.seconds * TOP_UP_FRACTION)
    phase = run_phase(broker, [spec] * options.publishers)
    return sum(int(r["confirmed"]) for r in phase["workers"])


def consume_phase(broker: RunningBroker, base: WorkerSpec, options: argparse.Namespace,
                  expected: int) -> dict[str, Any]:
    spec = replace(base, role="consumer", queue=THROUGHPUT_QUEUE)
    phase = run_phase(broker, [spec] * options.consumers, expected=expected)
    workers = phase["workers"]
    received = sum(r["received"] for r in workers)
    complete = received >= expected
    if complete:
        elapsed = max(r["ended"] for r in workers) - min(r["started"] for r in workers)
    else:  # a stall counts: the rate is over the time until the phase gave up
        elapsed = (phase["stopped_at"] or phase["started"] + phase["wall_s"]) - phase["started"]
    return {
        "msg_per_s": round(received / elapsed) if elapsed > 0 else 0,
        "received": received, "expected": expected, "complete": complete,
        "seconds": round(elapsed, 3), "short_phase": elapsed < options.seconds,
        "consumers": options.consumers, "prefetch": options.prefetch,
        "ack": "each" if options.ack_every <= 1 else f"multiple every {options.ack_every}",
        **_cpu_fields(phase),
    }


def bench_system(system: str, options: argparse.Namespace, workdir: Path,
                 postgres: PostgresMeter | None = None) -> dict[str, Any]:
    """``postgres``: the server ``conveyor-pg`` keeps its state in (a fresh database)."""
    arguments: dict[str, Any] = {}
    if system == "rabbitmq-quorum":
        arguments = {"x-queue-type": "quorum"}
    elif system == "rabbitmq-classic":
        arguments = {"x-queue-type": "classic"}
    storage = postgres.server.create_database("amqp") if postgres is not None else None
    with start_system(system, workdir / system, storage) as broker:
        base = WorkerSpec(role="publisher", client=options.client, host="127.0.0.1",
                          port=broker.port, queue=THROUGHPUT_QUEUE, queue_arguments=arguments,
                          message_bytes=options.message_bytes, window=options.window,
                          prefetch=options.prefetch, ack_every=options.ack_every)
        result: dict[str, Any] = {"broker": broker.name, "version": broker.version,
                                  "queue_arguments": arguments}
        with profiling(broker, options, system, "e2e_latency", result):
            snapshot = postgres.start() if postgres is not None else None
            result["e2e_latency"] = latency_phase(broker, base, options)
            _add_postgres(result["e2e_latency"], postgres, snapshot, "received")
        print(f"{system}: latency {result['e2e_latency']}", flush=True)
        with profiling(broker, options, system, "publish", result):
            snapshot = postgres.start() if postgres is not None else None
            result["publish"] = publish_phase(broker, base, options)
            _add_postgres(result["publish"], postgres, snapshot, "confirmed")
        print(f"{system}: publish {result['publish']}", flush=True)
        topped_up = top_up(broker, base, options)
        with profiling(broker, options, system, "consume", result):
            snapshot = postgres.start() if postgres is not None else None
            result["consume"] = consume_phase(broker, base, options,
                                              result["publish"]["confirmed"] + topped_up)
            result["consume"]["topped_up"] = topped_up
            _add_postgres(result["consume"], postgres, snapshot, "received")
        print(f"{system}: consume {result['consume']}", flush=True)
    return result


def _add_postgres(phase: dict[str, Any], postgres: PostgresMeter | None,
                  snapshot: Any, count_field: str) -> None:
    """PostgreSQL's CPU and WAL over the phase, per message (``phase[count_field]``);
    the broker's CPU per message too, comparable with the file backend's."""
    if postgres is not None and snapshot is not None:
        phase.update(postgres.stop(snapshot, int(phase.get(count_field) or 0)))


@contextmanager
def start_system(system: str, workdir: Path, storage: str | None = None
                 ) -> Iterator[RunningBroker]:
    if system.startswith("rabbitmq-"):
        with rabbitmq_node(workdir, system.removeprefix("rabbitmq-")) as broker:
            yield broker
    elif system in ("conveyor", "conveyor-pg"):
        with conveyor_node(workdir, storage, system) as broker:
            yield broker
    else:
        raise ValueError(f"unknown system {system!r}")


@contextmanager
def profiling(broker: RunningBroker, options: argparse.Namespace, system: str, phase: str,
              result: dict[str, Any]) -> Iterator[None]:
    """With ``--profile DIR``: py-spy the Conveyor broker during ``phase``; the summary goes
    into ``result["profile"][phase]`` and the collapsed stacks to DIR. With ``--perf``
    instead: its CPU by thread and library (bench/perf_split.py) into
    ``result["perf"][phase]``."""
    directory: Path | None = options.profile
    if not system.startswith("conveyor") or (directory is None and not options.perf):
        yield
        return
    if options.perf:
        with perf_split(broker.pid) as split:
            yield
        result.setdefault("perf", {})[phase] = split.summary
        print(format_split(f"{system} {phase} perf", split.summary), flush=True)
        return
    assert directory is not None
    path = directory / f"{system}-{phase}.collapsed.txt"
    with profile.record(broker.pid, path) as recording:
        yield
    if recording and path.exists():
        summary = profile.summarize(path)
        result.setdefault("profile", {})[phase] = summary
        print(profile.format_summary(f"{system} {phase} profile ({path})", summary), flush=True)


# --- report ------------------------------------------------------------------------------------
def ratios(systems: dict[str, Any]) -> dict[str, Any]:
    """conveyor / rabbitmq per peer: >= 1 is better for msg/s, <= 1 is better for p99."""
    conveyor = systems.get("conveyor", {})
    out: dict[str, Any] = {}
    if "publish" not in conveyor:
        return out
    for peer in ("rabbitmq-classic", "rabbitmq-quorum"):
        other = systems.get(peer, {})
        if "publish" not in other:
            continue
        out[f"conveyor/{peer}"] = {
            "publish_msg_per_s": _ratio(conveyor["publish"]["msg_per_s"],
                                        other["publish"]["msg_per_s"]),
            "consume_msg_per_s": _ratio(conveyor["consume"]["msg_per_s"],
                                        other["consume"]["msg_per_s"]),
            "e2e_p99_ms": _ratio(conveyor["e2e_latency"].get("p99_ms"),
                                 other["e2e_latency"].get("p99_ms")),
        }
    return out


def ratios_per_round(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """conveyor / peer within each round (same minute of the same machine), summarised:
    steadier than the ratio of medians on a shared machine."""
    out: dict[str, Any] = {}
    for peer in ("rabbitmq-classic", "rabbitmq-quorum"):
        pairs = [(ours, theirs) for ours, theirs in zip(rounds.get("conveyor", []),
                                                         rounds.get(peer, []), strict=False)
                 if "publish" in ours and "publish" in theirs]
        if not pairs:
            continue
        out[f"conveyor/{peer}"] = {
            f"{phase}_msg_per_s": summarise([
                ours[phase]["msg_per_s"] / max(1, theirs[phase]["msg_per_s"])
                for ours, theirs in pairs]) for phase in ("publish", "consume")}
    return out


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def table(systems: dict[str, Any]) -> str:
    header = ("system", "publish/s", "consume/s", "p50 ms", "p99 ms",
              "broker CPU% pub/con", "client CPU% pub/con", "host CPU% pub/con",
              "PostgreSQL CPU% pub/con", "WAL B/msg pub/con")
    rows = [header]
    for name, result in systems.items():
        if "publish" not in result:
            reason = str(result.get("skipped") or result.get("error", "?"))
            rows.append((name, reason[:60], "", "", "", "", "", "", "", ""))
            continue
        publish, consume, latency = result["publish"], result["consume"], result["e2e_latency"]
        rows.append((
            name, f"{publish['msg_per_s']:,}",
            f"{consume['msg_per_s']:,}" + ("" if consume.get("complete", True) else
                                           f" ({consume['received']:,} of "
                                           f"{consume['expected']:,}, stalled)"),
            f"{latency.get('p50_ms', float('nan')):.2f}",
            f"{latency.get('p99_ms', float('nan')):.2f}",
            f"{publish['broker_cpu_pct']:.0f} / {consume['broker_cpu_pct']:.0f}",
            f"{publish['client_cpu_pct']:.0f} / {consume['client_cpu_pct']:.0f}",
            f"{publish['host_cpu_pct']:.0f} / {consume['host_cpu_pct']:.0f}",
            f"{publish['postgres_cpu_pct']:.0f} / {consume['postgres_cpu_pct']:.0f}"
            if "postgres_cpu_pct" in publish else "-",
            f"{publish.get('wal_bytes_per_record', 0):,.0f} / "
            f"{consume.get('wal_bytes_per_record', 0):,.0f}"
            if "postgres_cpu_pct" in publish else "-",
        ))
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _client_versions(client: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("pika",) if client == "pika" else ("aio-pika", "aiormq", "pamqp", "uvloop")
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.amqp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--quick", action="store_true", help="smoke run: a few seconds each")
    parser.add_argument("--client", choices=("pika", "aio-pika"), default="pika")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--consumers", type=int, default=2, help="consumer processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="publish phase length")
    parser.add_argument("--window", type=int, default=1000,
                        help="unconfirmed publishes in flight per publisher")
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--ack-every", type=int, default=1,
                        help="1: ack each delivery; k: basic.ack multiple=True every k")
    parser.add_argument("--rate", type=float, default=2000.0, help="latency run msg/s")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--message-bytes", type=int, default=1024)
    parser.add_argument("--profile", type=Path, default=None,
                        help="directory for a py-spy profile of the Conveyor broker")
    parser.add_argument("--perf", action="store_true",
                        help="the Conveyor broker's CPU by thread and library (perf)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat every system, interleaved; report medians")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    if options.quick:
        options.seconds, options.latency_seconds, options.rounds = 1.5, 1.0, 1
    return options


PHASES = ("e2e_latency", "publish", "consume")


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's rounds: the median of every numeric field, each round's headline kept."""
    good = [result for result in rounds if "publish" in result]
    if not good:
        return rounds[0]
    if len(rounds) == 1:
        return good[0]
    merged = dict(good[0])
    for phase in PHASES:
        fields = good[0][phase]
        merged[phase] = {}
        for key, value in fields.items():
            values = [r[phase][key] for r in good if isinstance(r[phase].get(key), int | float)]
            if isinstance(value, bool) or not isinstance(value, int | float) or not values:
                merged[phase][key] = value
            elif isinstance(value, int):
                merged[phase][key] = round(statistics.median(values))
            else:
                merged[phase][key] = round(statistics.median(values), 3)
        if "complete" in fields:
            merged[phase]["complete"] = all(r[phase]["complete"] for r in good)
    for phase in ("publish", "consume"):
        merged[phase]["rate_rounds"] = summarise([float(r[phase]["msg_per_s"]) for r in good])
        merged[phase]["client_bound_rounds"] = sum(
            bool(r[phase].get("client_bound")) for r in good)
    merged["rounds"] = [
        {"publish_msg_per_s": r["publish"]["msg_per_s"],
         "consume_msg_per_s": r["consume"]["msg_per_s"],
         "e2e_p50_ms": r["e2e_latency"].get("p50_ms"),
         "e2e_p99_ms": r["e2e_latency"].get("p99_ms")} if "publish" in r else r
        for r in rounds
    ]
    return merged


def main(argv: list[str] | None = None) -> None:
    options = parse_arguments(argv)
    commit_at_start = _commit()
    workdir = Path(tempfile.mkdtemp(prefix="amqp-bench-"))
    names = options.systems.split(",")
    unknown = [name for name in names if name not in KNOWN_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {KNOWN_SYSTEMS}")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        postgres = (PostgresMeter(stack.enter_context(embedded_postgres()))
                    if "conveyor-pg" in names else None)
        for round_number in range(options.rounds):
            for system in names:  # interleaved, so machine noise spreads over every system
                if system.startswith("rabbitmq-") and not rabbitmq_available():
                    rounds[system].append(
                        {"skipped": "rabbitmq-server not installed (bench/peers.sh)"})
                    print(f"PEER MISSING: {system}: rabbitmq-server not installed "
                          "(apt-get install -y rabbitmq-server); the others run", flush=True)
                    continue
                if options.rounds > 1:
                    print(f"--- round {round_number + 1}/{options.rounds}: {system}", flush=True)
                try:
                    rounds[system].append(bench_system(
                        system, options, workdir / f"round{round_number}",
                        postgres if system == "conveyor-pg" else None))
                except Exception as error:  # keep the other systems' numbers
                    rounds[system].append({"error": f"{type(error).__name__}: {error}"})
                    print(f"{system}: FAILED {error}", flush=True)
    systems = {name: merge_rounds(results) for name, results in rounds.items()}
    document: dict[str, Any] = {
        "benchmark": "bench/amqp (python -m bench.amqp)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit_at_start,
        "commit_at_end": _commit(),  # differs when the tree moved during the run
        "command": "python -m bench.amqp " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {
            "client": options.client, "client_versions": _client_versions(options.client),
            "message_bytes": options.message_bytes, "persistent": True, "durable_queue": True,
            "publisher_confirms": True, "publish_seconds": options.seconds,
            "publishers": options.publishers, "window_per_publisher": options.window,
            "consumers": options.consumers, "prefetch": options.prefetch,
            "ack": "each" if options.ack_every <= 1 else f"multiple every {options.ack_every}",
            "latency_rate_per_s": options.rate, "latency_seconds": options.latency_seconds,
            "rounds": options.rounds, "quick": options.quick,
            "profiled": options.profile is not None or options.perf,
            "durability": "rabbitmq confirms persistent messages after fsync (classic: message "
                          "store, quorum: WAL); conveyor default fsync=always",
            "cpu_pct": "100 = one core; broker includes its child processes; client is the "
                       "sum over worker processes; host is every process on the machine",
        },
        "systems": systems,
        "ratios": ratios(systems),
        "ratios_per_round": ratios_per_round(rounds),
    }
    pairs = [(pg, file) for pg, file in zip(rounds.get("conveyor-pg", []),
                                            rounds.get("conveyor", []), strict=False)
             if "publish" in pg and "publish" in file]
    if pairs:
        document["ratios_postgresql_over_file_per_round"] = {
            f"{phase}_msg_per_s": summarise([pg[phase]["msg_per_s"]
                                             / max(1, file[phase]["msg_per_s"])
                                             for pg, file in pairs])
            for phase in ("publish", "consume")}
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(document, indent=2) + "\n")
    print()
    print(table(systems))
    peer_ratios = ratios(systems)
    if peer_ratios:
        print()
        for pair, values in peer_ratios.items():
            print(f"{pair}: {values}")
    print(f"\nwrote {options.output}")
