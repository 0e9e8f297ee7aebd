"""The node-to-node channel over TLS between two real ``conveyor serve`` processes on one
embedded PostgreSQL (docs/cluster.md, "The internal channel"): a queue consumer on the
node that does not own the queue is served through the owner over TLS; a node whose
certificate comes from another CA is refused (its consumers get 503, the owner logs
the failed handshake) while the public listeners keep working; the internal port speaks
TLS only (a plain peer is closed at its first bytes)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conveyor.testing.server import BrokerProcess, free_port
from conveyor.testing.tls import Issued, TestPki
from tests.cluster.helpers import FAST_LEASES, http_json, wait_for


def node_config(directory: Path, issued: Issued, ca_file: Path) -> Path:
    """TLS on the internal channel only: the public listeners stay plain for the test."""
    path = directory / f"{issued.cert_file.stem}.toml"
    path.write_text(f'[listeners.internal.tls]\ncert_file = "{issued.cert_file}"\n'
                    f'key_file = "{issued.key_file}"\nca_file = "{ca_file}"\n')
    return path


@contextmanager
def two_nodes(root: Path, dsn: str, configs: list[Path]) -> Iterator[list[BrokerProcess]]:
    nodes: list[BrokerProcess] = []
    try:
        for index, config in enumerate(configs, start=1):
            node = BrokerProcess(root / f"node{index}", listeners=("http",), extra_args=(
                "--storage", dsn, "--node-id", str(index), "--config", str(config),
                "--internal-port", str(free_port())), environ=FAST_LEASES)
            node.data_dir.mkdir(parents=True)
            nodes.append(node)
            node.start()
        yield nodes
    finally:
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.kill()


def acquire(node: BrokerProcess, limit: int) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.ports['http']}/topics/jobs/groups/jobs/acquire",
        data=json.dumps({"limit": limit, "lock_ms": 60_000}).encode(),
        headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None


def owner_and_other(nodes: list[BrokerProcess]) -> tuple[BrokerProcess, BrokerProcess]:
    for node in nodes:
        http_json(node, "/queues", {"name": "jobs"})
    acquire(nodes[0], 1)  # the owner claims the queue at its first acquire (either node)
    acquire(nodes[1], 1)

    def owner_id() -> int | None:
        rows = http_json(nodes[0], "/cluster")["owners"]
        return next((row["owner"] for row in rows
                     if row["kind"] == "shared" and row["name"] == "jobs"), None)

    wait_for(lambda: owner_id() is not None, 15, "the queue's owner row")
    index = int(owner_id() or 0) - 1
    return nodes[index], nodes[1 - index]


def internal_port(node: BrokerProcess) -> int:
    return int(node.extra_args[node.extra_args.index("--internal-port") + 1])


def test_a_cross_node_consumer_over_tls(tmp_path: Path, postgres_dsn: str) -> None:
    pki = TestPki(tmp_path / "pki")
    configs = [node_config(tmp_path, pki.node(f"node{index}"), pki.ca_file)
               for index in (1, 2)]
    with two_nodes(tmp_path, postgres_dsn, configs) as nodes:
        owner, other = owner_and_other(nodes)
        http_json(owner, "/topics/jobs/messages",
                  {"messages": [{"value": f"m{index}"} for index in range(5)]})
        wait_for(lambda: http_json(owner, "/queues/jobs")["ready"] == 5, 10, "5 ready")
        status, body = acquire(other, 5)  # through the owner, over TLS
        assert status == 200, status
        assert sorted(m["value"] for m in body["messages"]) == [f"m{i}" for i in range(5)]
        http_json(other, "/topics/jobs/groups/jobs/ack",
                  {"receipts": [m["receipt"] for m in body["messages"]]})
        info = http_json(owner, "/queues/jobs")
        assert (info["ready"], info["in_flight"]) == (0, 0), info  # acked at the owner
        # the port speaks TLS only: a plain peer's preamble is refused at once
        with socket.create_connection(("127.0.0.1", internal_port(owner)), timeout=5) as raw:
            raw.sendall(b"CVI1")
            assert raw.recv(100) == b""
        assert "plaintext on a TLS port" in owner.log_path.read_text()


def test_a_node_with_a_certificate_of_another_ca_is_refused(tmp_path: Path,
                                                             postgres_dsn: str) -> None:
    ours, theirs = TestPki(tmp_path / "ours"), TestPki(tmp_path / "theirs")
    configs = [node_config(tmp_path, ours.node("node1"), ours.ca_file),
               node_config(tmp_path, theirs.node("node2"), theirs.ca_file)]
    with two_nodes(tmp_path, postgres_dsn, configs) as nodes:
        for node in nodes:
            http_json(node, "/queues", {"name": "jobs"})
        http_json(nodes[0], "/topics/jobs/messages", {"messages": [{"value": "m"}]})
        # the owner serves its own consumer; the other node cannot reach it: unavailable
        answers = [acquire(node, 1) for node in nodes]
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200, 503], answers
        owner = nodes[[status for status, _ in answers].index(200)]
        assert [m["value"] for m in answers[nodes.index(owner)][1]["messages"]] == ["m"]
        log = owner.log_path.read_text()
        assert "internal listener refused" in log and "TLS handshake failed" in log
