"""A queue on two nodes over HTTP: consumers on either node share its deliveries (the
non-owner forwards to the queue's owner), each message is delivered once, a receipt
settles through any node; a dead node's held deliveries come back after its lease, a
dead owner's after the next owner reloads the queue (docs/cluster.md, "Queues")."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import cluster, http_json, wait_for


def acquire(node: BrokerProcess, limit: int, lock_ms: int = 4_000) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.ports['http']}/topics/jobs/groups/jobs/acquire",
        data=json.dumps({"limit": limit, "lock_ms": lock_ms}).encode(),
        headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None


def declare(nodes: list[BrokerProcess]) -> None:
    """On each node, as AMQP clients do (a queue declared on another node is not
    re-read while a node runs: docs/cluster.md, "Not built yet")."""
    for node in nodes:
        http_json(node, "/queues", {"name": "jobs"})


def owner_of_jobs(nodes: list[BrokerProcess]) -> tuple[BrokerProcess, BrokerProcess]:
    """(owner, the other): an empty acquire on each node makes the owner claim it."""
    for node in nodes:
        assert acquire(node, 1)[0] == 200

    def owner_id() -> int | None:
        rows = http_json(nodes[0], "/cluster")["owners"]
        return next((row["owner"] for row in rows
                     if row["kind"] == "shared" and row["name"] == "jobs"), None)

    wait_for(lambda: owner_id() is not None, 10, "the queue's owner row")
    index = int(owner_id() or 0) - 1  # node ids are 1, 2 (helpers.start_nodes)
    return nodes[index], nodes[1 - index]


def test_consumers_on_both_nodes_share_a_queue(tmp_path: Path, postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        declare(nodes)
        owner, other = owner_of_jobs(nodes)
        for node, first in ((other, 0), (owner, 15)):  # publishing works on every node
            http_json(node, "/topics/jobs/messages",
                      {"messages": [{"value": f"m{index}"} for index in range(first, first + 15)]})
        # the owner learns of the other node's appends by a notification (or its poll)
        wait_for(lambda: http_json(owner, "/queues/jobs")["ready"] == 30, 10, "30 ready")
        got: dict[str, list[str]] = {"owner": [], "other": []}
        for name, node in (("owner", owner), ("other", other)):
            status, body = acquire(node, 5, lock_ms=60_000)
            assert status == 200 and len(body["messages"]) == 5, (name, status, body)
            got[name] += [m["value"] for m in body["messages"]]
            # settled through the other node: the receipt names its queue, not a node
            peer = other if node is owner else owner
            http_json(peer, "/topics/jobs/groups/jobs/ack",
                      {"receipts": [m["receipt"] for m in body["messages"]]})

        def drain() -> bool:
            for name, node in (("owner", owner), ("other", other)):
                status, body = acquire(node, 7, lock_ms=60_000)
                assert status == 200, (name, status)
                got[name] += [m["value"] for m in body["messages"]]
                if body["messages"]:
                    http_json(node, "/topics/jobs/groups/jobs/ack",
                              {"receipts": [m["receipt"] for m in body["messages"]]})
            return len(got["owner"]) + len(got["other"]) >= 30

        wait_for(drain, 20, "30 deliveries")
        every = got["owner"] + got["other"]
        assert sorted(every) == sorted(f"m{index}" for index in range(30)), "each once"
        assert got["owner"] and got["other"]
        assert acquire(other, 10)[1]["messages"] == []  # every ack applied at the owner

        # the non-owner dies holding 10 deliveries locked for a minute: the owner gives
        # them back once the dead node's lease lapses (3 s here), not after the lock
        http_json(owner, "/topics/jobs/messages",
                  {"messages": [{"value": f"k{index}"} for index in range(10)]})
        wait_for(lambda: http_json(owner, "/queues/jobs")["ready"] == 10, 10, "10 ready")
        status, body = acquire(other, 10, lock_ms=60_000)
        assert status == 200 and len(body["messages"]) == 10
        for node in nodes:  # the owner's counts, asked through either node
            info = http_json(node, "/queues/jobs")
            assert (info["ready"], info["in_flight"]) == (0, 10), info
        other.kill()
        killed = time.monotonic()
        again: set[str] = set()

        def redelivered() -> bool:
            status, body = acquire(owner, 10, lock_ms=60_000)
            if status == 200:
                again.update(m["value"] for m in body["messages"])
            return len(again) == 10

        wait_for(redelivered, 30, "the dead node's deliveries again")
        assert again == {f"k{index}" for index in range(10)}
        assert time.monotonic() - killed < 30  # well before the 60 s lock


def test_a_dead_owners_deliveries_come_back(tmp_path: Path, postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        # declared on the first node only: the owner (either) reads it from the store
        http_json(nodes[0], "/queues", {"name": "jobs"})
        wait_for(lambda: all(any(q["name"] == "jobs" for q in http_json(n, "/topics")["topics"])
                             for n in nodes), 10, "the queue's topic on both nodes")
        owner, other = owner_of_jobs(nodes)
        http_json(other, "/topics/jobs/messages",
                  {"messages": [{"value": f"m{index}"} for index in range(20)]})
        wait_for(lambda: http_json(nodes[0], "/queues/jobs")["ready"] == 20, 10, "20 ready")
        status, body = acquire(other, 20)  # through the owner (locked 4 s there)
        assert status == 200 and len(body["messages"]) == 20
        # the owner dies: the other node claims the queue after the lease, reloads it
        # and delivers what was never acked; the old receipts are refused, not lost
        owner.kill()
        redelivered: set[str] = set()

        def again() -> bool:
            status, found = acquire(other, 20)
            if status == 200:
                redelivered.update(m["value"] for m in found["messages"])
            return len(redelivered) == 20

        wait_for(again, 30, "every unacked message again")
        assert redelivered == {f"m{index}" for index in range(20)}
        request = urllib.request.Request(
            f"http://127.0.0.1:{other.ports['http']}/topics/jobs/groups/jobs/ack",
            data=json.dumps({"receipts": [body["messages"][0]["receipt"]]}).encode(),
            headers={"content-type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(request, timeout=20).close()
            raise AssertionError("an ack of a delivery that was given back succeeded")
        except urllib.error.HTTPError as error:
            assert 400 <= error.code < 500, error.code


def test_a_forwarded_request_for_no_topic_claims_no_owner_row(
        tmp_path: Path, postgres_dsn: str) -> None:
    """A peer (holding the cluster secret) that names a queue or shared group of no topic
    gets NotFound, and the node claims no owner row for the name."""
    import asyncio

    import asyncpg

    from conveyor.cluster.internal_api import InternalClient, cluster_secret
    from conveyor.errors import NotFoundError

    async def forward() -> tuple[list[str], list[str]]:
        secret = await cluster_secret(postgres_dsn)
        connection = await asyncpg.connect(postgres_dsn, timeout=10)
        try:
            [row] = await connection.fetch("SELECT addresses FROM conveyor_nodes")
            address = json.loads(row["addresses"])["internal"]
            client = InternalClient(address, secret, 999_997, 1)
            codes: list[str] = []
            try:
                for op, args in (
                        ("acquire", {"topic": "no-such", "group": "g", "records_max": 1,
                                     "wait_ms": 0}),
                        ("counts", {"queue": "no-such-queue"}),
                        ("settle", {"op": "ack", "receipts": ["no-such:0:0:1:g"], "arg": 0})):
                    try:
                        answer = await client.call(op, args, 10)
                    except NotFoundError as error:
                        codes.append(error.code)
                    else:  # a settle answers per receipt: [error, deadline]
                        codes.append(answer[0][0]["type"] if op == "settle" else "answered")
            finally:
                await client.close()
            names = [r["name"] for r in await connection.fetch(
                "SELECT name FROM conveyor_owners WHERE kind = 'shared'")]
            return codes, names
        finally:
            await connection.close()

    with cluster(tmp_path, postgres_dsn, 1):
        codes, names = asyncio.run(forward())
    assert codes == ["unknown_group", "unknown_queue", "UnknownGroupError"], codes
    assert names == []
