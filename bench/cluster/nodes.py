"""The Conveyor nodes of one bench/cluster configuration, on one embedded PostgreSQL.

``start_cluster(root, dsn, nodes=N)``: N ``conveyor serve --storage DSN --node-id K``
processes (K = 1..N), each with Kafka, AMQP and HTTP on ports of its own.
``start_cluster(root, dsn, workers=N)``: one ``conveyor serve --workers N --node-id 1``
(conveyor/cluster/workers.py): worker 1 runs every listener, workers 2..N Kafka only,
each a node of its own (ids 1..N). Either way the answer is a ``Cluster``: the Kafka
bootstrap list, each node's AMQP port (None where a worker has no AMQP listener), and
CPU seconds per node process (the bench reads them before and after each phase).
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from conveyor.cluster.ownership import PARTITION, SHARED, choose_owner, item_name
from conveyor.testing.server import BrokerProcess

LIVE_TIMEOUT_S = 60.0


@dataclass
class Node:
    node_id: int
    pid: int
    kafka_port: int
    amqp_port: int | None

    def cpu_s(self) -> float:
        try:
            times = psutil.Process(self.pid).cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return float(times.user + times.system)


@dataclass
class Cluster:
    label: str
    nodes: list[Node]
    http_port: int

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{node.kafka_port}" for node in self.nodes)

    def cpu_s(self) -> float:
        """CPU seconds of every node process (what bench/kafka/timed.py reads)."""
        return sum(node.cpu_s() for node in self.nodes)

    def node_cpu_s(self) -> list[float]:
        return [node.cpu_s() for node in self.nodes]

    def balanced_topic(self, prefix: str, partitions: int) -> str:
        """A topic name whose partitions' leaders (rendezvous hashing over the node ids)
        are spread as evenly as ``partitions`` allows: with a handful of partitions the
        hash alone often gives one node most of them."""
        ids = [node.node_id for node in self.nodes]
        fair = -(-partitions // len(ids))  # no node leads more than its ceiling share
        for index in range(100_000):
            name = f"{prefix}-{index}"
            counts = dict.fromkeys(ids, 0)
            for partition in range(partitions):
                owner = choose_owner(PARTITION, item_name(PARTITION, name, partition), ids)
                assert owner is not None
                counts[owner] += 1
            if max(counts.values()) <= fair:
                return name
        raise RuntimeError(f"no balanced topic name for {partitions} partitions on {ids}")

    def queue_names(self, per_node: int) -> list[tuple[str, Node]]:
        """``per_node`` queue names owned by each node that has an AMQP port (rendezvous
        hashing over the live node ids, as the nodes compute it), with that node."""
        ids = [node.node_id for node in self.nodes]
        chosen: list[tuple[str, Node]] = []
        for node in self.nodes:
            if node.amqp_port is None:
                continue
            index = 0
            found = 0
            while found < per_node:
                name = f"bench-{node.node_id}-{index}"
                if choose_owner(SHARED, item_name(SHARED, name, name), ids) == node.node_id:
                    chosen.append((name, node))
                    found += 1
                index += 1
        return chosen

    def status(self) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/cluster",
                                    timeout=10) as response:
            return json.loads(response.read())

    def wait_live(self) -> None:
        """Until node 1 sees every node live (each registers at start)."""
        deadline = time.monotonic() + LIVE_TIMEOUT_S
        while True:
            live = [n for n in self.status()["nodes"] if n.get("live")]
            if len(live) >= len(self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: {len(live)} of {len(self.nodes)} nodes live")
            time.sleep(0.2)  # another process's state: polled, no event to await


def _serve_args(dsn: str) -> tuple[str, ...]:
    return ("--storage", dsn, "--log-level", "warning")


@contextlib.contextmanager
def start_cluster(root: Path, dsn: str, nodes: int = 1, workers: int = 0
                  ) -> Iterator[Cluster]:
    """``nodes`` separate processes, or (``workers`` > 0) one ``--workers`` server."""
    processes: list[BrokerProcess] = []
    try:
        if workers:
            server = BrokerProcess(root / "workers", listeners=("kafka", "amqp", "http"),
                                   extra_args=(*_serve_args(dsn), "--workers", str(workers),
                                               "--node-id", "1"))
            server.data_dir.mkdir(parents=True)
            processes.append(server)
            server.start()
            assert server.process is not None
            children = sorted(psutil.Process(server.process.pid).children(),
                              key=lambda child: child.create_time())
            if len(children) != workers:
                raise RuntimeError(f"--workers {workers} started {len(children)} processes")
            members = [Node(index + 1, child.pid, server.ports["kafka"] + index,
                            server.ports["amqp"] if index == 0 else None)
                       for index, child in enumerate(children)]
            cluster = Cluster(f"workers{workers}", members, server.ports["http"])
        else:
            members = []
            for index in range(1, nodes + 1):
                node = BrokerProcess(root / f"node{index}", listeners=("kafka", "amqp", "http"),
                                     extra_args=(*_serve_args(dsn), "--node-id", str(index)))
                node.data_dir.mkdir(parents=True)
                processes.append(node)
                node.start()
                assert node.process is not None
                members.append(Node(index, node.process.pid, node.ports["kafka"],
                                    node.ports["amqp"]))
            cluster = Cluster(f"nodes{nodes}", members, processes[0].ports["http"])
        cluster.wait_live()
        yield cluster
    finally:
        for process in processes:
            if process.process is not None and process.process.poll() is None:
                try:
                    process.stop()
                except Exception:  # a node that does not drain in time is killed
                    process.kill()
