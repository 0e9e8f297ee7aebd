"""Readiness: the checks behind ``GET /ready`` (``GET /health`` needs none: it answers).

Owns: what "ready" means for a load balancer or a Kubernetes readiness probe —
the broker is open and not shutting down, every configured listener is listening,
and storage takes writes (the data directory accepts a file write, and no partition
has stopped after an fdatasync failure). Each check is "ok" or says what is wrong.

Must not know: HTTP; the HTTP listener turns the checks into 200 or 503.

Not a readiness failure: the disk alarm (publishers are pushed back, consumers are
served, so taking the node out of a load balancer would only stop the consumers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

PROBE_FILE = ".ready-probe"


def readiness_checks(broker: Broker | None, data_dir: Path, expected: Iterable[str],
                     running: set[str], stopping: bool) -> dict[str, str]:
    checks = {"broker": "ok" if broker is not None and not stopping else "stopping"}
    missing = sorted(set(expected) - running)
    checks["listeners"] = "stopping" if stopping else (
        "ok" if not missing else "not listening: " + ", ".join(missing))
    checks["storage"] = _storage_check(broker, data_dir)
    return checks


def _storage_check(broker: Broker | None, data_dir: Path) -> str:
    try:  # a small write, no fsync: a read-only or vanished directory fails here
        descriptor = os.open(data_dir / PROBE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             0o644)
        try:
            os.write(descriptor, b"ok\n")
        finally:
            os.close(descriptor)
    except OSError as error:
        return f"data directory not writable: {error.strerror}"
    if broker is not None:
        for topic, partition in broker.log_store.partitions():
            if broker.log_store.usage(topic, partition).failed:
                return f"partition {topic}/{partition} stopped after an fsync failure"
    return "ok"
