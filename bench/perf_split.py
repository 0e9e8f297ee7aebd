"""Where a broker's CPU goes by thread and by library: ``perf record`` on its pid.

py-spy says which Python function runs; it cannot say how much of the process's CPU is
the kernel (socket calls, the wake-ups of a thread hand-off), uvloop's C or the
interpreter itself, nor split it by thread exactly. ``perf`` samples every thread of the
process on CPU (user and kernel), so its shares add up to the CPU the process used:

    with perf_split(pid) as split:
        ...  # the phase
    print(split.summary)   # {"threads": {...}, "libraries": {...}, "symbols": {...}}

Needs ``perf`` (Debian's ``linux-perf``) and the right to trace the pid (root, or
``kernel.perf_event_paranoid`` ≤ 1 for kernel samples); without them ``summary`` says
why instead. Percentages are of the process's samples.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FREQUENCY_HZ = 999


class PerfSplit:
    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}


def _report(data: Path, sort: str, top: int) -> dict[str, float]:
    """``perf report --sort KEY`` as {key: percent}, the ``top`` largest."""
    output = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio",
         "-g", "none"], capture_output=True, text=True, check=False).stdout
    shares: dict[str, float] = {}
    for line in output.splitlines():
        text = line.strip()
        if not text or text.startswith("#") or "%" not in text.split()[0]:
            continue
        percent, _, key = text.partition("%")
        shares[" ".join(key.split())] = float(percent)
        if len(shares) >= top:
            break
    return shares


@contextmanager
def perf_split(pid: int, top: int = 12) -> Iterator[PerfSplit]:
    """Sample ``pid`` (every thread) for the duration of the block."""
    split = PerfSplit()
    if shutil.which("perf") is None:
        split.summary = {"error": "perf not installed (apt-get install linux-perf)"}
        yield split
        return
    with tempfile.TemporaryDirectory(prefix="perf-split-") as directory:
        data = Path(directory) / "perf.data"
        recorder = subprocess.Popen(
            ["perf", "record", "-F", str(FREQUENCY_HZ), "-p", str(pid), "-o", str(data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)  # perf attaches to every thread before the phase starts
        try:
            yield split
        finally:
            recorder.send_signal(signal.SIGINT)  # perf writes its data on SIGINT
            _, error = recorder.communicate(timeout=60)
        if not data.exists():
            split.summary = {"error": error.decode(errors="replace").strip()[-300:]}
            return
        split.summary = {"threads": _report(data, "pid,comm", top),
                         "libraries": _report(data, "dso", top),
                         "symbols": _report(data, "sym", top)}


def format_split(title: str, summary: dict[str, Any]) -> str:
    if "error" in summary:
        return f"{title}: no perf profile ({summary['error']})"
    lines = [f"{title}:"]
    for part in ("threads", "libraries", "symbols"):
        lines.append(f"  {part}:")
        lines.extend(f"    {share:6.2f}%  {key}" for key, share in summary[part].items())
    return "\n".join(lines)
