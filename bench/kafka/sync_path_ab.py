"""Conveyor's fsync path alone, A/B of two trees: append -> durable at 1,000 appends/s.

The e2e figure on a shared 2-core machine is mostly CPU starvation (clients, broker and
neighbours); this isolates what the brief calls Conveyor's share of the e2e tail: one
partition of a ``FileLogStore`` on the real disk (``OsFileSystem``, fsync=always), in
a uvloop loop, an append of one 100 B record started every 1 ms (each in its own task,
as pipelined produces are), timed from the call to the answer (write, the barrier's
passes, the executor hand-offs, the fdatasyncs). No sockets, no clients.

Each round: the disk's own floor (``timed.disk_sync_latency``, 100 B ``pwrite`` +
``fdatasync`` paced at 1,000/s), then both trees, order alternating (ABBA), each in a
fresh process with its own ``PYTHONPATH``. Per run: p50/p99/max ms, fdatasyncs per
append, process CPU µs per append, overlapped passes, the load average.

Run:  .venv/bin/python -m bench.kafka.sync_path_ab --base DIR [--rounds 6]
      [--seconds 5] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[2]
RESULTS = HERE / "bench" / "results" / "kafka_sync_path_ab.json"
RATE_PER_S = 1000


async def _appends(directory: str, seconds: float) -> dict[str, Any]:
    from conveyor.clock import SystemClock
    from conveyor.storage.durability import barrier_for_loop
    from conveyor.storage.fs import OsFileSystem
    from conveyor.storage.log_store import FileLogStore, LogConfig
    from conveyor.storage.record_batch import RecordData, build_batch

    store = FileLogStore(directory, OsFileSystem(), SystemClock())
    await store.open()
    log = await store.create_partition("t", 0, LogConfig(fsync="always"))
    batch = build_batch([RecordData(None, b"x" * 100, (), 1_700_000_000_000)])
    for _ in range(100):  # warm-up: the segment's first pages, the executor's threads
        await log.append(batch)
    barrier = barrier_for_loop()
    passes, jobs = barrier.pass_count, barrier.job_count
    overlaps = getattr(barrier, "overlap_count", 0)
    samples: list[float] = []

    async def one() -> None:
        began = time.perf_counter()
        await log.append(batch)
        samples.append((time.perf_counter() - began) * 1000)

    cpu = time.process_time()
    tasks = []
    started = time.perf_counter()
    for slot in range(int(RATE_PER_S * seconds)):
        wait = started + slot / RATE_PER_S - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.get_running_loop().create_task(one()))
    await asyncio.gather(*tasks)
    cpu = time.process_time() - cpu
    count = len(samples)
    samples.sort()
    result = {
        "appends": count, "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[min(count - 1, int(count * 0.99))], 3),
        "max_ms": round(samples[-1], 3),
        "passes_per_append": round((barrier.pass_count - passes) / count, 3),
        "fdatasyncs_per_append": round((barrier.job_count - jobs) / count, 3),
        "overlapped_passes": getattr(barrier, "overlap_count", 0) - overlaps,
        "cpu_us_per_append": round(cpu / count * 1e6, 1),
    }
    await store.close()
    return result


def child(directory: str, seconds: float) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_appends(directory, seconds))))


def run_tree(tree: Path, directory: Path, seconds: float) -> dict[str, Any]:
    from bench.ab import run_child

    code = ("import sys; from bench.kafka.sync_path_ab import child; "
            f"child({str(directory)!r}, {seconds})")
    load = os.getloadavg()[0]
    result = run_child(tree, code, with_bench=True)
    result["load_1m"] = round(load, 2)
    return result

def main(argv: list[str] | None = None) -> None:
    from bench.ab import medians, rotated, write_report
    from bench.kafka import timed

    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    trees = {"base": options.base.resolve(), "this": HERE}
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "this": [], "disk": []}
    with tempfile.TemporaryDirectory(prefix="kafka-sync-path-") as directory:
        for index in range(options.rounds):
            runs["disk"].append(timed.disk_round(Path(directory), index, RATE_PER_S,
                                                 options.seconds))
            for name in rotated(("base", "this"), index):
                data = Path(directory) / f"{name}-r{index}"
                data.mkdir()
                result = run_tree(trees[name], data, options.seconds)
                runs[name].append(result)
                print(f"r{index} {name}", result, flush=True)
    fields = ("p50_ms", "p99_ms", "max_ms")
    of_trees = {name: values for name, values in runs.items() if name != "disk"}
    summary = {**medians(of_trees, (*fields, "fdatasyncs_per_append", "cpu_us_per_append")),
               **medians({"disk": runs["disk"]}, fields)}
    write_report(options.output, "bench.kafka.sync_path_ab", argv,
                 {"rounds": options.rounds, "seconds": options.seconds,
                  "rate_per_s": RATE_PER_S, "base": str(options.base)}, summary, runs)

if __name__ == "__main__":
    main()
