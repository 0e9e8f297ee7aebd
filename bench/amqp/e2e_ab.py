"""AMQP end-to-end latency at a fixed rate, alone, A/B over checkouts, runs interleaved.

Run: ``python bench/amqp/e2e_ab.py --sources A,B [--rounds 4] [--seconds 8]
[--rate 2000] [--strace] [--profile DIR]`` (a plain script). Each run is a child
process of this script with ``PYTHONPATH`` at one checkout: it starts that checkout's
plain ``conveyor serve`` (no hooks, unlike ``stages.py``: nothing wraps the broker's
calls) and the suite's clients (``bench/amqp/clients.py``: one pika publisher paced at
``--rate`` with confirms, 1 KiB persistent; one consumer, prefetch 1000, an ack per
message), i.e. the e2e phase of ``python -m bench.amqp`` and nothing else. Per run:
e2e p50/p99 (ms), the broker's CPU µs per message and the load average.

``--strace``: ``strace -f -c``-style counts of the syscalls named in ``SYSCALLS`` made
by the broker during the phase, per message, with fdatasync/fsync split by file (log
segment, SQLite WAL, database, other), from ``strace -f -e trace=... -y`` (``-y``
names each descriptor's file). strace slows every syscall it traces, so read its runs'
latency as strace's; the counts are what it is for.
``--profile DIR``: a py-spy profile (raw, 250 Hz) of the broker per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

SYSCALLS = ("fdatasync", "fsync", "pwrite64", "write", "sendto", "writev")
STRACE_LINE = re.compile(r"^(?:\d+\s+|\[pid\s+\d+\]\s+)?(\w+)\((\d+)(?:<([^>]*)>)?")


def _file_kind(path: str) -> str:
    if path.endswith("-wal"):
        return "wal"
    if path.endswith(".db") or path.endswith(".sqlite") or path.endswith(".sqlite3"):
        return "database"
    if path.endswith(".log"):
        return "log"
    if path.startswith(("socket:", "TCP", "UNIX")):
        return "socket"
    return "other:" + Path(path).name


def strace_counts(path: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        found = STRACE_LINE.match(line)
        if found is None or found.group(1) not in SYSCALLS:
            continue
        name, target = found.group(1), found.group(3) or ""
        counts[name] += 1
        if name in ("fdatasync", "fsync"):
            counts[f"{name}:{_file_kind(target)}"] += 1
    return dict(counts)


def one_run(options: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    import psutil

    from bench.amqp.clients import WorkerSpec
    from bench.amqp.profile import record
    from bench.amqp.runner import LATENCY_QUEUE, run_phase
    from conveyor.testing.server import BrokerProcess

    source = os.environ["PYTHONPATH"]
    with tempfile.TemporaryDirectory(prefix="conveyor-e2e-") as work:
        broker = BrokerProcess(Path(work) / "data", listeners=("amqp",),
                               extra_args=("--log-level", "warning"), cwd=Path(source))
        broker.start()
        tracer = None
        trace_path = Path(work) / "strace.txt"
        try:
            assert broker.process is not None
            pid = broker.process.pid
            server = psutil.Process(pid)

            class Cpu:
                @staticmethod
                def cpu_s() -> float:
                    times = server.cpu_times()
                    return float(times.user + times.system)

            base = WorkerSpec(role="publisher", client="pika", host="127.0.0.1",
                              port=broker.ports["amqp"], queue=LATENCY_QUEUE)
            # warm-up: declare the queue and run the path once before measuring
            run_phase(Cpu(), [replace(base, role="consumer"),
                              replace(base, seconds=1.0, rate_per_s=options.rate)])
            if options.strace:
                tracer = subprocess.Popen(
                    ["strace", "-f", "-y", "-qq", "-e", "trace=" + ",".join(SYSCALLS),
                     "-o", str(trace_path), "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)  # attached to every thread before the phase starts
            publisher = replace(base, seconds=options.seconds, rate_per_s=options.rate)
            consumer = replace(base, role="consumer", record_latency=True)
            profile = (Path(options.profile) / f"{Path(source).name}-{time.time():.0f}.txt"
                       if options.profile else None)
            if profile is not None:
                with record(pid, profile):
                    phase = run_phase(Cpu(), [consumer, publisher])
            else:
                phase = run_phase(Cpu(), [consumer, publisher])
        finally:
            if tracer is not None:
                tracer.terminate()
                tracer.wait(10)
            broker.stop()
        counts = strace_counts(trace_path) if tracer is not None else {}
    received = next(r for r in phase["workers"] if r["role"] == "consumer")
    count = max(1, received["received"])
    ordered = sorted(received["latency_ms"])

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))], 3)

    return {
        "source": source, "received": received["received"],
        "e2e_p50_ms": at(0.5), "e2e_p99_ms": at(0.99), "e2e_max_ms": round(ordered[-1], 3),
        "broker_cpu_us_per_msg": round(phase["broker_cpu_pct"] / 100 * phase["wall_s"]
                                       / count * 1e6, 1),
        "host_cpu_pct": phase["host_cpu_pct"],
        "per_msg": {name: round(value / count, 3) for name, value in sorted(counts.items())},
        "load": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sources", help="checkouts, comma-separated (runs alternate)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(one_run(options)), flush=True)
        return
    sources = [str(Path(source).resolve()) for source in options.sources.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {source: [] for source in sources}
    extra = (["--strace"] if options.strace else []) + (
        ["--profile", str(Path(options.profile).resolve())] if options.profile else [])
    for _ in range(options.rounds):
        for source in sources:
            output = subprocess.run(
                [sys.executable, __file__, "--one", "--seconds", str(options.seconds),
                 "--rate", str(options.rate), *extra],
                env={**os.environ, "PYTHONPATH": source}, cwd=source, check=True,
                capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            runs[source].append(result)
            print(json.dumps(result), flush=True)
    print(f"{'median of runs':<24}" + "".join(f"{Path(s).name:>20}" for s in sources))
    for field in ("e2e_p50_ms", "e2e_p99_ms", "broker_cpu_us_per_msg", "load"):
        print(f"{field:<24}" + "".join(
            f"{statistics.median(r[field] for r in runs[s]):>20}" for s in sources))


if __name__ == "__main__":
    main()
