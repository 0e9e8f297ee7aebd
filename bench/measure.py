"""What every suite needs to be trusted: CPU per process, rounds, median and spread.

- ``CpuMeter``: CPU seconds of the broker process (with its children) and of each
  client process over one phase, as % of one core; ``client_bound`` marks a phase
  where one client process used >= ``CLIENT_BOUND_PCT`` of a core, so the number
  says more about the client than about the broker.
- ``summarise``: the median of a list of rounds with its spread (min, max, and
  (max - min) / median in %).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable
from typing import Any

import psutil

CLIENT_BOUND_PCT = 90.0


def _cpu_s(process: psutil.Process, children: bool) -> float:
    try:
        times = process.cpu_times()
        total = float(times.user + times.system)
        if children:
            for child in process.children(recursive=True):
                try:
                    child_times = child.cpu_times()
                    total += float(child_times.user + child_times.system)
                except psutil.Error:
                    pass
        return total
    except psutil.Error:
        return 0.0


class CpuMeter:
    """Start before a phase, ``stop()`` after it: the CPU figures of that phase."""

    def __init__(self, broker_pid: int | None, client_pids: Iterable[int] = ()) -> None:
        self.broker = psutil.Process(broker_pid) if broker_pid else None
        self.clients = [psutil.Process(pid) for pid in (client_pids or [os.getpid()])]
        self.started = time.perf_counter()
        self.broker_before = _cpu_s(self.broker, True) if self.broker else 0.0
        self.clients_before = [_cpu_s(client, False) for client in self.clients]

    def stop(self) -> dict[str, Any]:
        wall_s = max(1e-9, time.perf_counter() - self.started)
        broker_s = (_cpu_s(self.broker, True) - self.broker_before) if self.broker else 0.0
        client_s = [_cpu_s(client, False) - before
                    for client, before in zip(self.clients, self.clients_before, strict=True)]
        busiest = 100 * max(client_s, default=0.0) / wall_s
        return {
            "wall_s": round(wall_s, 2),
            "broker_cpu_pct": round(100 * broker_s / wall_s, 1),
            "client_cpu_pct": [round(100 * s / wall_s, 1) for s in client_s],
            "client_bound": busiest >= CLIENT_BOUND_PCT,
        }


def summarise(values: list[float]) -> dict[str, Any]:
    """Median of the rounds and their spread."""
    if not values:
        return {"median": None, "rounds": []}
    median = statistics.median(values)
    spread = 100 * (max(values) - min(values)) / median if median else 0.0
    return {"median": round(median, 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "spread_pct": round(spread, 1),
            "rounds": [round(value, 3) for value in values]}


def provenance(command: list[str]) -> dict[str, Any]:
    """date, commit, command and machine for a results file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join(command),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
    }
