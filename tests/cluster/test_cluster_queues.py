"""A queue on two nodes: deliveries come from its owner node only (no message handed to
consumers on two nodes); the other node answers 503; when the owner dies, the next one
claims the queue, reloads its state and delivers what was never acked (docs/cluster.md)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import cluster, http_json, wait_for


def acquire(node: BrokerProcess, limit: int) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.ports['http']}/topics/jobs/groups/jobs/acquire",
        data=json.dumps({"limit": limit, "lock_ms": 4_000}).encode(),
        headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None


def test_a_queue_is_delivered_by_its_owner_only(tmp_path: Path, postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        http_json(nodes[0], "/queues", {"name": "jobs"})
        wait_for(lambda: all(any(q["name"] == "jobs" for q in http_json(n, "/topics")["topics"])
                             for n in nodes), 10, "the queue on both nodes")
        http_json(nodes[1], "/topics/jobs/messages",
                  {"messages": [{"value": f"m{index}"} for index in range(20)]})
        answers = [acquire(node, 5) for node in nodes]
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200, 503], answers
        owner = nodes[[status for status, _ in answers].index(200)]
        other = nodes[1 - nodes.index(owner)]
        taken = {m["value"] for _, body in answers if body for m in body["messages"]}
        wait_for(lambda: len(taken | {m["value"] for m in acquire(owner, 20)[1]["messages"]})
                 == 20, 10, "the owner delivering every message once")
        # the owner dies holding 20 unacked deliveries (locked 4 s): the other node claims
        # the queue after the lease, reloads it, and delivers them again once their locks
        # expire (they were never acked)
        owner.kill()
        redelivered: set[str] = set()
        wait_for(lambda: _add(redelivered, other), 30, "every unacked message again")
        assert redelivered == {f"m{index}" for index in range(20)}


def _add(found: set[str], node: BrokerProcess) -> bool:
    status, body = acquire(node, 20)
    if status == 200 and body:
        found.update(m["value"] for m in body["messages"])
    return len(found) == 20
