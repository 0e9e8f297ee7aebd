"""py-spy profiles of Conveyor's Kafka paths, one fresh broker per phase (issue 17).

Run:  .venv/bin/python -m bench.kafka.profile [--phases latency,produce,consume]
      [--seconds 10] [--size 1024] [--partitions 4] [--producers 2] [--consumers 2]
      [--out DIR] [--top 25] [--perf]

``latency``: the e2e phase of bench/kafka/throughput.py (1,000 msg/s, 100 B, acks=all);
``produce``: the timed produce phase (acks=all, ``--size`` B records, linger.ms=5);
``consume``: a produce phase (not profiled), then the consume phase, profiled.
Each phase prints the broker's CPU per record beside the top functions (self and
inclusive, bench/amqp/profile.py) and leaves ``conveyor-<phase>.collapsed.txt`` in DIR.
Sampling slows the broker: read the shares, not the rates. ``--perf``: instead of
py-spy, the broker's CPU by thread, library and symbol (bench/perf_split.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.amqp.profile import format_summary, record, summarize
from bench.kafka import timed
from bench.kafka.throughput import (
    create_topic,
    create_topic_partitions,
    latency,
    measured,
    start_broker,
)
from bench.perf_split import format_split, perf_split


def _sampler(options: argparse.Namespace, pid: int, collapsed: Path,
             result: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
    """py-spy into ``collapsed``, or with ``--perf`` perf's split into ``result``."""
    if not options.perf:
        return record(pid, collapsed)

    @contextlib.contextmanager
    def sampled() -> Iterator[None]:
        with perf_split(pid) as split:
            yield
        result["perf"] = split.summary

    return sampled()


def profile_phase(phase: str, options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    directory = workdir / phase
    split: dict[str, Any] = {}
    directory.mkdir(parents=True)
    collapsed = options.out / f"conveyor-{phase}.collapsed.txt"
    with start_broker("conveyor", directory) as broker:
        pid = broker.process.pid
        if phase == "latency":
            create_topic(broker, "latency")
            with _sampler(options, pid, collapsed, split):
                result = measured(broker, lambda: latency(broker, "latency", 1000,
                                                          options.seconds))
            records = result["records"]
            cpu_s = result["broker_cpu_s"]
        else:
            topic = "profiled"
            create_topic_partitions(broker, topic, options.partitions)
            if phase == "produce":
                with _sampler(options, pid, collapsed, split):
                    result = timed.produce_phase(broker, topic, options.size, options.seconds,
                                                 options.producers)
            else:
                timed.produce_phase(broker, topic, options.size, options.seconds,
                                    options.producers)
                ends = timed.log_ends(broker, topic, options.partitions)
                with _sampler(options, pid, collapsed, split):
                    result = timed.consume_phase(broker, topic, options.size,
                                                 options.partitions, options.consumers, ends,
                                                 options.seconds)
            records = result["records"]
            cpu_s = result["broker_cpu_pct"] / 100 * result["wall_s"]
    result["broker_cpu_us_per_record"] = round(cpu_s / max(1, records) * 1e6, 2)
    result["profile"] = (summarize(collapsed, options.top)
                         if collapsed.exists() and not options.perf else None)
    result["perf"] = split.get("perf")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phases", default="latency,produce,consume")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kafka-profile"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--perf", action="store_true", help="perf's split instead of py-spy")
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kafka-profile-"))
    try:
        for phase in options.phases.split(","):
            result = profile_phase(phase, options, workdir)
            summary, split = result.pop("profile"), result.pop("perf")
            print(phase, json.dumps(result), flush=True)
            if summary is not None:
                print(format_summary(f"conveyor {phase}", summary), flush=True)
            if split is not None:
                print(format_split(f"conveyor {phase} perf", split), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
