"""``conveyor serve --workers N``: N node processes on one PostgreSQL, one machine.

Owns: starting the workers, waiting for each to be ready, passing SIGTERM / SIGINT on
(each worker drains), and exiting when they have. Every worker is a full cluster node
(``--node-id auto``, a data directory of its own under ``<data_dir>/worker-K``).
Every worker runs every configured listener. AMQP, HTTP and SQS bind with SO_REUSEPORT
(``--reuse-port``): the workers share those ports and the kernel spreads connections
over them; a queue's consumers on any worker are served through the queue's owner
(cluster/remote_queues.py). Kafka clients are sent to one node's own address by
Metadata, so each worker's Kafka listener has its own port (kafka port + K - 1; 0
stays "any free port") and advertises it: Kafka clients spread over all of them by
partition leadership.
Must not know: protocols.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from conveyor.config import ServerConfig


def worker_arguments(argv: Sequence[str], config: ServerConfig, index: int) -> list[str]:
    """The ``conveyor serve`` arguments of worker ``index`` (0-based): the parent's own,
    then overrides (argparse keeps the last of a repeated flag)."""
    arguments = [sys.executable, "-m", "conveyor.cli", "serve", *argv, "--workers", "1",
                 "--data-dir", str(config.data_dir / f"worker-{index + 1}"), "--reuse-port"]
    if config.node_id is None:
        arguments += ["--node-id", "auto"]
    else:
        base = config.node_id
        arguments += ["--node-id", "auto" if base == "auto" else str(int(base) + index)]
    kafka = config.listener("kafka")
    if index > 0 and kafka is not None and kafka.enabled:
        port = kafka.port
        arguments += ["--kafka-port", str(port + index if port else 0)]
    return arguments


def run_workers(argv: Sequence[str], config: ServerConfig) -> int:
    """Start the workers, print one ready line, wait; SIGTERM/SIGINT drain them all."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen[str]] = []

    def forward(number: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    ready: list[str] = []
    for index in range(config.workers):
        child = subprocess.Popen(worker_arguments(argv, config, index),
                                 stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("conveyor ready"):
                ready.append(f"worker {index + 1}: {line.removeprefix('conveyor ready: ').strip()}")
                break
        else:
            forward(signal.SIGTERM, None)
            for other in children:
                other.wait()
            print(f"conveyor: worker {index + 1} exited with {child.wait()}", file=sys.stderr)
            return 2
    print("conveyor ready: " + "; ".join(ready), flush=True)
    codes = [child.wait() for child in children]
    for child in children:
        if child.stdout is not None:
            child.stdout.close()
    return max(codes, key=abs)
