"""A/B of Conveyor checkouts on the AMQP suite, runs interleaved, per message costs.

Run: ``python bench/amqp/ab.py --sources A,B[,C...] [--rounds 2] [--seconds 8]
[--latency-seconds 6]`` (a plain script). Each run is ``python -m bench.amqp --systems
conveyor --rounds 1`` with ``PYTHONPATH`` and the working directory at one checkout (its
server and its clients), the checkouts taking turns (A, B, A, B, ...) so the machine's
neighbours load every side alike. Per run it keeps publish and consume msg/s, the
broker's CPU per message (µs: the figure a shared machine disturbs least) and the
end-to-end p50/p99 at the suite's 2,000 msg/s; prints every run as a JSON line and
then the medians per checkout. A checkout built with compiled modules (mypyc, see
bench/README.md) is just another source.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

FIELDS = ("publish_msg_per_s", "publish_cpu_us_per_msg", "consume_msg_per_s",
          "consume_cpu_us_per_msg", "e2e_p50_ms", "e2e_p99_ms", "e2e_cpu_us_per_msg")


def one_run(source: str, options: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="amqp-ab-") as scratch:
        command = [sys.executable, "-m", "bench.amqp", "--systems", "conveyor",
                   "--rounds", "1", "--seconds", str(options.seconds),
                   "--latency-seconds", str(options.latency_seconds),
                   "--output", str(Path(scratch) / "amqp.json")]
        output = subprocess.run(command, env={**os.environ, "PYTHONPATH": source},
                                cwd=source, check=True, capture_output=True, text=True).stdout
    phases: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        for phase in ("latency", "publish", "consume"):
            prefix = f"conveyor: {phase} "
            if line.startswith(prefix):
                phases[phase] = ast.literal_eval(line[len(prefix):])
    publish, consume, latency = phases["publish"], phases["consume"], phases["latency"]

    def cpu_us(phase: dict[str, Any], count: int) -> float:
        seconds = phase.get("seconds") or latency.get("seconds")
        return round(phase["broker_cpu_pct"] / 100 * float(seconds) / max(1, count) * 1e6, 1)

    return {
        "source": source, "load": round(os.getloadavg()[0], 2),
        "publish_msg_per_s": publish["msg_per_s"],
        "publish_cpu_us_per_msg": cpu_us(publish, publish["confirmed"]),
        "consume_msg_per_s": consume["msg_per_s"],
        "consume_cpu_us_per_msg": cpu_us(consume, consume["received"]),
        "e2e_p50_ms": latency.get("p50_ms"), "e2e_p99_ms": latency.get("p99_ms"),
        "e2e_cpu_us_per_msg": cpu_us(latency, latency["received"]),
        "host_cpu_pct": [publish["host_cpu_pct"], consume["host_cpu_pct"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sources", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--latency-seconds", type=float, default=6.0)
    options = parser.parse_args()
    sources = [str(Path(source).resolve()) for source in options.sources.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {source: [] for source in sources}
    for _ in range(options.rounds):
        for source in sources:
            result = one_run(source, options)
            runs[source].append(result)
            print(json.dumps(result), flush=True)
    print(f"{'median of runs':<24}" + "".join(f"{Path(s).name:>16}" for s in sources))
    for field in FIELDS:
        cells = [statistics.median(r[field] for r in runs[s] if r[field] is not None)
                 for s in sources]
        print(f"{field:<24}" + "".join(f"{cell:>16}" for cell in cells))


if __name__ == "__main__":
    main()
