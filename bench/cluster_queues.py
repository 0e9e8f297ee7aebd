"""The cost of the extra hop: a queue consumed over HTTP through its owner node and
through the other node of a two-node cluster on one embedded PostgreSQL.

    PYTHONPATH=. python bench/cluster_queues.py [messages]

Each round publishes the messages (through the owner), then one HTTP client acquires
batches of 100 and acks each batch through the node under test. Prints messages per
second for each path and the machine load (shared machines: compare the two figures
of one run, not across runs).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from conveyor.testing.postgres import PostgresServer
from conveyor.testing.server import BrokerProcess

BATCH = 100
FAST_LEASES = {"CONVEYOR_BROKER__CLUSTER_HEARTBEAT_MS": "500",
               "CONVEYOR_BROKER__CLUSTER_LEASE_MS": "3000"}


def call(node: BrokerProcess, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.ports['http']}{path}", data=data,
        headers={"content-type": "application/json"}, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
        return json.loads(raw) if raw else None


def consume(node: BrokerProcess, count: int) -> float:
    """Seconds to acquire and ack ``count`` messages through ``node``."""
    started = time.perf_counter()
    done = 0
    while done < count:
        found = call(node, "/topics/q/groups/q/acquire", {"limit": BATCH, "wait_ms": 1000})
        messages = found["messages"]
        if messages:
            call(node, "/topics/q/groups/q/ack", {"receipts": [m["receipt"] for m in messages]})
            done += len(messages)
    return time.perf_counter() - started


def main() -> None:
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    with tempfile.TemporaryDirectory() as scratch, PostgresServer() as pg:
        dsn = pg.create_database()
        nodes = []
        for index in (1, 2):
            node = BrokerProcess(Path(scratch) / f"node{index}", listeners=("http",),
                                 extra_args=("--storage", dsn, "--node-id", str(index)),
                                 environ=FAST_LEASES)
            node.data_dir.mkdir(parents=True)
            node.start()
            nodes.append(node)
        try:
            for node in nodes:
                call(node, "/queues", {"name": "q"})
                call(node, "/topics/q/groups/q/acquire", {"limit": 1})
            owner_id = None
            deadline = time.monotonic() + 10
            while owner_id is None and time.monotonic() < deadline:  # read by a heartbeat
                owner_id = next((row["owner"] for row in call(nodes[0], "/cluster")["owners"]
                                 if row["kind"] == "shared" and row["name"] == "q"), None)
            assert owner_id is not None, "no owner row for the queue"
            owner = nodes[owner_id - 1]
            other = nodes[2 - owner_id]
            results = {}
            for name, node in (("through the owner", owner), ("through the other node", other),
                               ("through the owner again", owner)):
                for first in range(0, messages, 500):
                    call(owner, "/topics/q/messages", {"messages": [
                        {"value": f"m{index}"} for index in range(first,
                                                                   min(messages, first + 500))]})
                seconds = consume(node, messages)
                results[name] = messages / seconds
            load = os.getloadavg()
            for name, rate in results.items():
                print(f"{name:26s} {rate:8.0f} msg/s (acquire {BATCH} + ack, one HTTP client)")
            print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} "
                  "cores")
        finally:
            for node in nodes:
                node.stop()


if __name__ == "__main__":
    main()
