"""What bounds Kafka produce: short probes over client settings, with the broker's
structural counts (issue 17).

Run:  .venv/bin/python -m bench.kafka.produce_probe [--seconds 6] [--rounds 1] [--size 1024]
      [--variant "producers=2 partitions=4"] [--variant "producers=4 partitions=4
      linger.ms=20 batch.size=4194304"] ... [--no-probes] [--output FILE]

Each ``--variant`` is ``producers=N partitions=N`` plus librdkafka settings laid over
the throughput bench's producer (bench/kafka/timed.py: acks=all, linger.ms=5,
batch.size=1 MiB). Every variant gets a fresh Conveyor (defaults: file storage,
fsync=always) under bench/kafka/stage_probes.py, one timed produce phase, and, besides
records/s and the CPU of broker and clients: the broker CPU per MB stored, the
barrier's passes and fdatasyncs per second, bytes per fdatasync, a produce request's
time in the broker (frame read -> answer encoded) and its fdatasync and pass times.
Rounds interleave the variants. The figures that survive a shared machine are the
counts and the CPU per MB; read the rates beside the load average printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.kafka import timed
from bench.kafka.throughput import create_topic_partitions, start_broker
from bench.measure import provenance

RESULTS = Path(__file__).resolve().parent.parent / "results" / "kafka_produce_probe.json"


def parse_variant(text: str) -> tuple[int, int, dict[str, Any]]:
    """``producers=2 partitions=4 linger.ms=20``: (producers, partitions, client settings)."""
    settings: dict[str, Any] = {}
    producers, partitions = 2, 4
    for item in text.split():
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"not key=value: {item!r}")
        if key == "producers":
            producers = int(value)
        elif key == "partitions":
            partitions = int(value)
        else:
            settings[key] = int(value) if value.isdigit() else value
    return producers, partitions, settings


def probe(variant: str, options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    producers, partitions, settings = parse_variant(variant)
    stats = workdir / "stats.json"
    load = os.getloadavg()[0]
    with start_broker("conveyor", workdir,
                      probe_stats=None if options.no_probes else stats) as broker:
        create_topic_partitions(broker, "probe", partitions)
        if not options.no_probes:
            os.kill(broker.process.pid, signal.SIGUSR1)  # the phase starts: clear
        result = timed.produce_phase(broker, "probe", options.size, options.seconds,
                                     producers, config=settings)
    result.update({"variant": variant, "load_avg_1m": round(load, 2)})
    megabytes = result["records"] * options.size / 1e6
    broker_cpu_s = result["broker_cpu_pct"] / 100 * result["wall_s"]
    result["broker_cpu_ms_per_mb"] = round(broker_cpu_s * 1000 / max(1e-9, megabytes), 3)
    if stats.exists():
        summary = json.loads(stats.read_text())
        counts, stages = summary["counts"], summary["stages_us"]
        wall = result["wall_s"]
        syncs = stages.get("fs.fdatasync", {}).get("count", 0)
        passes = counts.get("barrier.passes", 0)
        written = counts.get("bytes.written", 0)
        result["broker"] = {
            "passes_per_s": round(passes / wall, 1),
            "fdatasyncs_per_s": round(syncs / wall, 1),
            "kib_per_fdatasync": round(written / max(1, syncs) / 1024, 1),
            "kib_per_pass": round(written / max(1, passes) / 1024, 1),
            "produce_requests": stages.get("produce.handler", {}).get("count", 0),
            "barrier_busy_pct": round(counts.get("barrier.busy_us", 0) / 1e4 / wall, 1),
            "counts": counts,
            "stages_us": stages,
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--no-probes", action="store_true",
                        help="plain conveyor serve (no stage timers, no counts)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    variants = options.variant or ["producers=2 partitions=4"]
    for variant in variants:
        parse_variant(variant)  # refuse a typo before anything starts
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
    workdir = Path(tempfile.mkdtemp(prefix="kafka-produce-probe-"))
    try:
        for index in range(options.rounds):
            for number, variant in enumerate(variants):
                directory = workdir / f"r{index}-v{number}"
                directory.mkdir()
                result = probe(variant, options, directory)
                runs[variant].append(result)
                print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {variant: {
        "records_per_s": statistics.median(r["records_per_s"] for r in results),
        "mb_per_s": statistics.median(r["mb_per_s"] for r in results),
        "broker_cpu_ms_per_mb": statistics.median(r["broker_cpu_ms_per_mb"] for r in results),
        "broker_cpu_pct": statistics.median(r["broker_cpu_pct"] for r in results),
    } for variant, results in runs.items()}
    report = {**provenance([sys.executable, "-m", "bench.kafka.produce_probe",
                            *(sys.argv[1:] if argv is None else argv)]),
              "settings": {"seconds": options.seconds, "rounds": options.rounds,
                           "size": options.size},
              "medians": medians, "runs": runs}
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
