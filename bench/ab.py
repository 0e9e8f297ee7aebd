"""What the interleaved A/B scripts share (bench/*/e2e_ab.py, sync_path_ab.py,
cycle_cost.py, window_cost.py, stages.py, ab_acks.py).

On a shared 2-core machine only a comparison within the same minutes can be trusted, so
each script runs two or more source trees in turn, round after round, and reports the
median of every field with each round's value. The pieces:

- ``rotated(names, index)``: the order of round ``index`` (ABBA: forward on even
  rounds, backward on odd ones, so neither tree always runs first);
- ``run_child(source, code, ...)``: ``python -c code`` with ``source`` first on
  ``PYTHONPATH`` and as its working directory; its last stdout line is a JSON object;
- ``ProcessCpu(pid)``: a process's CPU seconds so far (the meter
  ``bench.amqp.runner.run_phase`` takes);
- ``medians`` / ``print_medians``: per tree, the median of each field over its rounds;
- ``write_report``: the JSON file with provenance (date, commit, command, machine).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.measure import provenance

HERE = Path(__file__).resolve().parents[1]


def rotated(names: Sequence[str], index: int) -> list[str]:
    """The order of round ``index``: ``names`` forward on even rounds, backward on odd."""
    return list(names) if index % 2 == 0 else list(reversed(names))


def run_child(source: str | Path, code: str, *arguments: str,
              with_bench: bool = False) -> dict[str, Any]:
    """``python -c code *arguments`` with ``source`` first on ``PYTHONPATH`` (then this
    checkout when ``with_bench``: the child imports bench modules ``source`` may lack);
    the child prints its result as JSON on its last line."""
    path = f"{source}:{HERE}" if with_bench else str(source)
    output = subprocess.run([sys.executable, "-c", code, *arguments],
                            env={**os.environ, "PYTHONPATH": path}, cwd=source,
                            check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


class ProcessCpu:
    """User + system CPU seconds of one process so far."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)

    def cpu_s(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)


def _median(values: Iterable[Any]) -> float | None:
    present = [float(value) for value in values if value is not None]
    return round(statistics.median(present), 3) if present else None


def medians(runs: Mapping[str, Sequence[Mapping[str, Any]]],
            fields: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Per name, the median of each field over its runs (runs without it left out)."""
    return {name: {field: _median(run.get(field) for run in values) for field in fields}
            for name, values in runs.items() if values}


def print_medians(runs: Mapping[str, Sequence[Mapping[str, Any]]],
                  fields: Sequence[str]) -> None:
    """One line per name and field: the median and every run's value."""
    for name, values in runs.items():
        for field in fields:
            each = [run.get(field) for run in values]
            shown = ", ".join("-" if value is None else f"{float(value):g}" for value in each)
            print(f"{Path(name).name} {field}: median {_median(each)} (runs {shown})",
                  flush=True)


def write_report(output: Path, module: str, argv: Sequence[str], settings: Mapping[str, Any],
                 summary: Mapping[str, Any], runs: Mapping[str, Any]) -> None:
    """Print ``summary`` and write the report: provenance, settings, medians, every run."""
    report = {**provenance([sys.executable, "-m", module, *argv]), "settings": dict(settings),
              "median": summary, "runs": runs}
    print(json.dumps(summary), flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
