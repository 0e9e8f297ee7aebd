"""Interleaved A/B of two source trees on the Kafka e2e phase (1,000 msg/s, 100 B,
fsync=always), Conveyor alone, with the disk's own floor measured in the same rounds.

For a shared machine: the figure to trust is the comparison within the same minutes.
Each round runs the disk probe (``timed.disk_sync_latency``: 100 B ``pwrite`` +
``fdatasync`` paced at 1,000/s), then ``--base`` and this tree in turn (the order
alternates per round: ABBA), each on a fresh broker started from its own tree
(``PYTHONPATH`` and working directory), with the same client: ``throughput.latency``,
the e2e phase of the Kafka suite. Per run: p50/p99/max ms, broker CPU per record (µs),
the load average. ``--phase produce``: instead, the suite's produce phase (1 KiB,
acks=all, ``--producers`` producers, 4 partitions) for ``--seconds``: MB/s, broker CPU
ms per MB and the fdatasyncs from ``/metrics`` (the produce 1 KiB aim of issue 17: does
the change cost it). ``--strace DIR``: the broker runs under ``strace -f -T -tt -e
trace=fdatasync,fsync`` (one file per run in DIR; slows every syscall it traces).

Run:  .venv/bin/python -m bench.kafka.e2e_ab --base DIR [--rounds 4] [--seconds 10]
      [--phase e2e|produce] [--producers 2] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ab import medians, rotated, write_report
from bench.kafka import timed
from bench.kafka.throughput import (
    RunningBroker,
    create_topic,
    create_topic_partitions,
    free_port,
    latency,
    measured,
    wait_for_port,
)

HERE = Path(__file__).resolve().parents[2]
RESULTS = HERE / "bench" / "results" / "kafka_e2e_ab.json"
RATE_PER_S = 1000
FIELDS = {"e2e": ("p50_ms", "p99_ms", "max_ms"),
          "produce": ("mb_per_s", "broker_cpu_ms_per_mb", "broker_cpu_pct")}


def run_tree(tree: Path, workdir: Path, seconds: float, strace_file: Path | None,
             phase: str = "e2e", producers: int = 2) -> dict[str, Any]:
    """One fresh broker from ``tree``: the e2e phase on a fsync=always topic (or the
    produce phase)."""
    port, http_port = free_port(), free_port()
    data = workdir / "data"
    command = [sys.executable, "-m", "conveyor.cli", "serve", "--data-dir", str(data),
               "--listeners", "kafka,http", "--kafka-port", str(port),
               "--http-port", str(http_port), "--log-level", "warning"]
    if strace_file is not None:
        command = ["strace", "-f", "-T", "-tt", "-e", "trace=fdatasync,fsync",
                   "-o", str(strace_file), *command]
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    with open(workdir / "broker.log", "wb") as log:
        process = subprocess.Popen(command, cwd=tree, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT)
        traced: Any = None  # under strace: the broker (strace's child), stopped first
        try:
            wait_for_port(port, process)
            if strace_file is not None:  # the traced process is strace's child
                import psutil

                traced = psutil.Process(process.pid).children()[0]
                broker = RunningBroker("conveyor", port, traced)
            else:
                broker = RunningBroker("conveyor", port, process)
            wait_for_port(http_port, process)
            load = os.getloadavg()[0]
            if phase == "produce":
                result = _produce(broker, f"http://127.0.0.1:{http_port}/metrics",
                                  seconds, producers)
            else:
                create_topic(broker, "latency")
                result = measured(broker, lambda: latency(broker, "latency", RATE_PER_S,
                                                          seconds))
        finally:
            if traced is not None:  # strace passes SIGTERM on, but not if it dies first
                traced.terminate()
                traced.wait(10)
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    result["load_1m"] = round(load, 2)
    if phase == "e2e":
        result["broker_cpu_us_per_record"] = round(
            result["broker_cpu_s"] / max(1, result["records"]) * 1e6, 1)
    return result


def _produce(broker: RunningBroker, metrics: str, seconds: float,
             producers: int) -> dict[str, Any]:
    size = 1024
    create_topic_partitions(broker, "produce", 4)
    before = timed.fsync_counters(metrics)
    result = timed.produce_phase(broker, "produce", size, seconds, producers)
    stored = result["records"] * size
    result["fsync"] = timed.fsync_figures(before, timed.fsync_counters(metrics), stored,
                                          result["wall_s"])
    result["broker_cpu_ms_per_mb"] = round(
        result["broker_cpu_pct"] / 100 * result["wall_s"] / (stored / 1e6) * 1000, 3)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--disk-seconds", type=float, default=5.0)
    parser.add_argument("--strace", type=Path, default=None)
    parser.add_argument("--phase", choices=("e2e", "produce"), default="e2e")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    trees = {"base": options.base.resolve(), "this": HERE}
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "this": [], "disk": []}
    with tempfile.TemporaryDirectory(prefix="kafka-e2e-ab-") as directory:
        for index in range(options.rounds):
            runs["disk"].append(timed.disk_round(Path(directory), index, RATE_PER_S,
                                                 options.disk_seconds))
            for name in rotated(("base", "this"), index):
                workdir = Path(directory) / f"{name}-r{index}"
                workdir.mkdir()
                trace = None
                if options.strace is not None:
                    options.strace.mkdir(parents=True, exist_ok=True)
                    trace = options.strace / f"{name}-r{index}.strace"
                result = run_tree(trees[name], workdir, options.seconds, trace,
                                  options.phase, options.producers)
                runs[name].append(result)
                print(f"r{index} {name}", {key: result.get(key) for key in (
                    *FIELDS[options.phase], "broker_cpu_us_per_record", "fsync",
                    "load_1m")}, flush=True)
                time.sleep(0.5)
    of_trees = {name: values for name, values in runs.items() if name != "disk"}
    summary = {**medians(of_trees, FIELDS[options.phase]),
               **medians({"disk": runs["disk"]}, FIELDS["e2e"])}
    write_report(options.output, "bench.kafka.e2e_ab", argv,
                 {"rounds": options.rounds, "seconds": options.seconds,
                  "rate_per_s": RATE_PER_S, "base": str(options.base),
                  "phase": options.phase, "producers": options.producers}, summary, runs)

if __name__ == "__main__":
    main()
