"""Does a bad e2e round come with slow fdatasyncs? Kafka e2e rounds (1,000 msg/s, 100 B,
fsync=always, the suite's e2e phase, 10 s a round) on one broker, its fdatasync histogram
(``conveyor_storage_fsync_seconds`` on ``/metrics``) scraped before and after each: per
round p50/p99/max and how many fdatasyncs took longer than each bucket from 10 ms up.

Run:  .venv/bin/python -m bench.kafka.e2e_fsyncs [--rounds 8] [--seconds 10]
      [--output bench/results/kafka_e2e_fsyncs.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from bench.kafka.throughput import (
    create_topic,
    free_port,
    latency,
    measured,
    start_broker,
    wait_for_port,
)
from bench.measure import provenance

RESULTS = Path(__file__).resolve().parents[1] / "results" / "kafka_e2e_fsyncs.json"
BUCKET = re.compile(r'conveyor_storage_fsync_seconds_bucket\{le="([^"]+)"\} (\S+)')
SLOW_FROM_S = 0.01


def fsync_buckets(url: str) -> dict[str, float]:
    """The cumulative fdatasync histogram: upper bound (seconds, as text) -> count."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {match.group(1): float(match.group(2))
            for match in map(BUCKET.match, text.splitlines()) if match}


def slower_than(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """fdatasyncs between the scrapes that took longer than each bound from 10 ms."""
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    return {bound: round(total - (count - before.get(bound, 0.0)))
            for bound, count in after.items()
            if bound != "+Inf" and float(bound) >= SLOW_FROM_S}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    rounds: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="kafka-e2e-fsyncs-"))
    try:
        http_port = free_port()
        with start_broker("conveyor", work, http_port) as broker:
            wait_for_port(http_port, broker.process)
            url = f"http://127.0.0.1:{http_port}/metrics"
            for index in range(options.rounds):
                topic = f"latency-{index}"
                create_topic(broker, topic)
                before = fsync_buckets(url)
                result = measured(broker, functools.partial(latency, broker, topic, 1000,
                                                            options.seconds))
                after = fsync_buckets(url)
                row = {"round": index, "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                       "max_ms": result["max_ms"],
                       "fdatasyncs": round(after.get("+Inf", 0.0) - before.get("+Inf", 0.0)),
                       "fdatasyncs_slower_than_s": slower_than(before, after)}
                rounds.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {**provenance([sys.executable, "-m", "bench.kafka.e2e_fsyncs", *argv]),
              "settings": {"rounds": options.rounds, "seconds": options.seconds,
                           "rate_per_s": 1000, "record_bytes": 100, "fsync": "always"},
              "rounds": rounds}
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
