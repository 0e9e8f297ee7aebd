"""py-spy profiles of the Conveyor broker during a benchmark phase, and their summary.

``record(pid, path)`` runs ``py-spy record --format raw`` (collapsed stacks: one line per
distinct stack, ``frame;frame;... count``) against the broker while the phase runs; idle
samples are not recorded (py-spy's default), so percentages are of the time the broker's
threads were busy. ``summarize(path)`` folds line numbers away and returns the functions with
the most samples: ``self`` (the function was the innermost frame; ``Runner.run`` self time is
uvloop's own C code: I/O and callbacks) and ``inclusive`` (the function was anywhere on the
stack), the latter without the entry frames every sample of a thread shares (runpy, the CLI,
the event loop's entry, threads' bootstrap).

Run alone:  .venv/bin/python -m bench.amqp.profile FILE [--top 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LINE_NUMBER = re.compile(r":\d+\)$")
# Frames every sample of a thread shares: the process's and the threads' entry points.
SKELETON = re.compile(
    r"^(<module> \(conveyor/cli\.py\)|_run_code |_run_module_as_main |main \(conveyor/cli\.py\)"
    r"|_serve \(conveyor/cli\.py\)|run \(conveyor/server/app\.py\)|run \(uvloop/|Runner\.run "
    r"|Thread\._bootstrap|Thread\.run )")


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else None


@contextmanager
def record(pid: int, path: Path, rate_hz: int = 250) -> Iterator[bool]:
    """Profile ``pid`` for the duration of the block; yields False when py-spy is missing."""
    executable = py_spy()
    if executable is None:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    recorder = subprocess.Popen(
        [executable, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate_hz),
         "--nonblocking", "--output", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield True
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            recorder.wait(30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()


def _function(frame: str) -> str:
    return LINE_NUMBER.sub(")", frame.strip())


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")
                  if not frame.startswith("process ") and not frame.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_samples[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        return {"samples": 0, "self": [], "inclusive": []}

    def share(counter: Counter[str], skip_skeleton: bool) -> list[list[Any]]:
        rows = [[name, round(100 * count / total, 1)] for name, count in counter.most_common()
                if not (skip_skeleton and SKELETON.match(name))]
        return rows[:top]

    return {"samples": total, "self": share(self_samples, False),
            "inclusive": share(inclusive, True)}


def format_summary(title: str, summary: dict[str, Any]) -> str:
    lines = [f"{title}: {summary['samples']} samples"]
    for kind in ("self", "inclusive"):
        lines.append(f"  top {kind}:")
        lines += [f"    {share:5.1f}%  {name}" for name, share in summary[kind]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=20)
    arguments = parser.parse_args()
    print(format_summary(os.fspath(arguments.path), summarize(arguments.path, arguments.top)))


if __name__ == "__main__":
    main()
