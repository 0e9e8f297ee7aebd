"""The disk alone: does an fdatasync have to wait for the one before it? (issue 17)

Run:  .venv/bin/python -m bench.kafka.sync_overlap [--seconds 5] [--rate 1000]
      [--rounds 4] [--in-flight 4] [--dir DIR] [--output FILE]

One thread appends 100 B to one file ``--rate`` times a second (a partition under the
e2e phase) and each append waits until an fdatasync that started after it has
returned. Two ways of syncing, alternated ABBA over ``--rounds``:
- ``serial``: one syncer thread; each fdatasync covers every append made before it
  started, the next starts when it returns (Conveyor's barrier: one pass at a time,
  so an append made during a pass waits for that pass and then its own);
- ``overlap``: every append starts its own fdatasync at once, up to ``--in-flight``
  running together (an append never waits for a sync that started before it).
Per way: p50/p99/max of append -> durable in ms, and fdatasyncs per append.
Results: bench/results/kafka_sync_overlap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.measure import provenance, summarise

RESULTS = Path(__file__).resolve().parent.parent / "results" / "kafka_sync_overlap.json"
RECORD = b"x" * 100


class _SerialSyncer:
    """One thread: fdatasync whatever was appended before the sync started, again."""

    def __init__(self, fd: int, latencies: list[float]) -> None:
        self._fd = fd
        self._latencies = latencies
        self._appended: list[float] = []
        self._synced = 0
        self._stop = False
        self._changed = threading.Condition()
        self.syncs = 0
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def appended(self, at: float) -> None:
        with self._changed:
            self._appended.append(at)
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while len(self._appended) == self._synced and not self._stop:
                    self._changed.wait()
                if len(self._appended) == self._synced:
                    return
                upto = len(self._appended)
            os.fdatasync(self._fd)
            self.syncs += 1
            done = time.perf_counter()
            with self._changed:
                self._latencies.extend((done - at) * 1000
                                       for at in self._appended[self._synced:upto])
                self._synced = upto

    def close(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify()
        self._thread.join()


def run_once(mode: str, directory: Path, rate: int, seconds: float,
             in_flight: int) -> dict[str, Any]:
    path = directory / f"sync-overlap-{mode}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    latencies: list[float] = []
    appends = round(rate * seconds)
    serial = _SerialSyncer(fd, latencies) if mode == "serial" else None
    pool = ThreadPoolExecutor(in_flight) if mode == "overlap" else None

    def sync_one(at: float) -> None:
        os.fdatasync(fd)
        latencies.append((time.perf_counter() - at) * 1000)  # list.append: GIL-safe

    try:
        started = time.perf_counter()
        for slot in range(appends):
            wait = started + slot / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            os.pwrite(fd, RECORD, slot * len(RECORD))
            at = time.perf_counter()
            if serial is not None:
                serial.appended(at)
            elif pool is not None:
                pool.submit(sync_one, at)
    finally:
        if serial is not None:
            serial.close()
        if pool is not None:
            pool.shutdown(wait=True)
        os.close(fd)
        path.unlink()
    ordered = sorted(latencies)
    syncs = serial.syncs if serial is not None else appends
    return {"mode": mode, "appends": len(ordered),
            "p50_ms": round(statistics.median(ordered), 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
            "max_ms": round(ordered[-1], 3),
            "fdatasyncs_per_append": round(syncs / max(1, appends), 3),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    directory = options.dir or Path(tempfile.mkdtemp(prefix="sync-overlap-"))
    runs: dict[str, list[dict[str, Any]]] = {"serial": [], "overlap": []}
    try:
        for index in range(options.rounds):  # ABBA: neither way always goes first
            for mode in ("serial", "overlap") if index % 2 == 0 else ("overlap", "serial"):
                result = run_once(mode, directory, options.rate, options.seconds,
                                  options.in_flight)
                runs[mode].append(result)
                print(json.dumps(result), flush=True)
    finally:
        if options.dir is None:
            directory.rmdir()
    summary = {mode: {key: summarise([float(r[key]) for r in results])
                      for key in ("p50_ms", "p99_ms", "max_ms", "fdatasyncs_per_append")}
               for mode, results in runs.items()}
    report = {**provenance([sys.executable, "-m", "bench.kafka.sync_overlap",
                            *(sys.argv[1:] if argv is None else argv)]),
              "settings": {"seconds": options.seconds, "rate": options.rate,
                           "rounds": options.rounds, "in_flight": options.in_flight},
              "summary": summary, "runs": runs}
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({mode: {key: value["median"] for key, value in figures.items()}
                      for mode, figures in summary.items()}, indent=2))


if __name__ == "__main__":
    main()
