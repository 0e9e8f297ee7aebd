"""``conveyor cluster status`` with lag: two ``conveyor serve`` processes on one
PostgreSQL; a group's lag read from the committed offsets and the partitions' heads,
a queue's backlog (ready + unacked) counted by its owner, both alike through either
node (the non-owner's own window copy is stale: it never acquired anything)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from tests.cluster.helpers import bootstrap, cluster, http_json, wait_for

TOPIC, GROUP, QUEUE = "lagged", "readers", "backlog"


def _lag(status: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    lag = status["lag"]
    group = next(g for g in lag["groups"] if g["group"] == GROUP)
    queue = next(q for q in lag["queues"] if q["queue"] == QUEUE)
    return group, queue


def test_cluster_status_shows_group_lag_and_queue_backlog(tmp_path: Path,
                                                          postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        http_json(nodes[0], "/topics", {"name": TOPIC, "partitions": 2})
        http_json(nodes[0], "/queues", {"name": QUEUE})
        for node in nodes:
            wait_for(lambda node=node: {TOPIC, QUEUE} <= {
                t["name"] for t in http_json(node, "/topics")["topics"]}, 10,
                "the topic and queue on every node")
        for partition, count in ((0, 7), (1, 5)):
            http_json(nodes[0], f"/topics/{TOPIC}/messages", {"messages": [
                {"value": f"m{index}", "partition": partition} for index in range(count)]})
        committer = Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": GROUP,
                              "enable.auto.commit": False})
        try:  # lag 4 on partition 0, none on 1
            committer.commit(offsets=[TopicPartition(TOPIC, 0, 3), TopicPartition(TOPIC, 1, 5)],
                             asynchronous=False)
        finally:
            committer.close()
        http_json(nodes[0], f"/topics/{QUEUE}/messages",
                  {"messages": [{"value": f"q{index}"} for index in range(10)]})
        acquired: list[Any] = []  # the owner learns of the publish by a wake-up
        wait_for(lambda: len(acquired) == 3 or bool(acquired.extend(http_json(
            nodes[0], f"/topics/{QUEUE}/groups/{QUEUE}/acquire",
            {"limit": 3 - len(acquired), "lock_ms": 60_000, "wait_ms": 1000})["messages"])),
            20, "3 messages acquired")

        def queue_owner() -> int | None:  # node 1's view of the rows: read every heartbeat
            return next((row["owner"] for row in http_json(nodes[0], "/cluster")["owners"]
                         if row["kind"] == "shared" and row["name"] == QUEUE), None)

        wait_for(lambda: queue_owner() is not None, 10, "the queue's owner row")
        owner_of_queue = queue_owner()

        def owners_seen(node: Any) -> bool:  # each node's view is read every heartbeat
            group, queue = _lag(http_json(node, "/cluster?lag=true"))
            return group["owner"] is not None and queue["owner"] == owner_of_queue

        wait_for(lambda: all(owners_seen(node) for node in nodes), 10,
                 "every node's view of the group's and the queue's owner rows")
        for node in nodes:  # the owner and the other node answer alike
            group, queue = _lag(http_json(node, "/cluster?lag=true"))
            assert group["lag"] == 4
            assert sorted((p["partition"], p["committed"], p["end"], p["lag"])
                          for p in group["partitions"]) == [(0, 3, 7, 4), (1, 5, 5, 0)]
            assert group["owner"] in (1, 2)
            assert (queue["ready"], queue["unacked"], queue["backlog"]) == (7, 3, 10)
            assert queue["owner"] == owner_of_queue
        assert "lag" not in http_json(nodes[0], "/cluster")  # only when asked

        other = nodes[0] if owner_of_queue == 2 else nodes[1]  # node ids 1 and 2
        shown = subprocess.run(
            [sys.executable, "-m", "conveyor.cli", "--url",
             f"http://127.0.0.1:{other.ports['http']}", "cluster", "status", "--partitions"],
            capture_output=True, text=True, timeout=30, check=True,
            env={**os.environ, "COLUMNS": "160"}).stdout
        lines = shown.splitlines()
        assert any(GROUP in line and line.split("│")[-2].strip() == "4" for line in lines
                   if line.count("│") == 4), shown  # group, coordinator, lag
        assert any(QUEUE in line and [cell.strip() for cell in line.split("│")[3:7]]
                   == ["7", "3", "0", "10"] for line in lines), shown
        assert any(GROUP in line and [cell.strip() for cell in line.split("│")[3:7]]
                   == ["0", "3", "7", "4"] for line in lines), shown
