"""A node cut off from PostgreSQL by a TCP proxy (conveyor/testing/tcp_proxy.py) while
Kafka (idempotent, acks=all, bootstrap list of both nodes) and AMQP (confirms) load runs.

Node 1 reaches the database through the proxy, node 2 directly. When the proxy drops
(resets) or stalls (stops forwarding) node 1's traffic, node 1's heartbeats fail, its
local lease ends and it stops serving (``/ready`` fails, Kafka requests are answered
NOT_LEADER_OR_FOLLOWER); node 2 claims its partitions once the lease has lapsed in the
database and the clients follow. After the proxy heals node 1 rejoins and serves again.
Checker: every acknowledged Kafka record read back once at its offset, offsets
contiguous; every confirmed AMQP message in the queue once. In the stall case node 1's
memory stays bounded (its RSS is sampled through the stall).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conveyor.testing.postgres import PostgresServer
from conveyor.testing.server import BrokerProcess
from conveyor.testing.tcp_proxy import FaultyProxy
from tests.cluster.helpers import check, tally, wait_for
from tests.cluster.load import AmqpLoad, KafkaLoad, wait_progress
from tests.cluster.test_cluster_failover import (
    declare_queue,
    drain_queue,
    read_log,
    start_nodes,
)
from tests.cluster.test_cluster_kafka import create_topic, owners_by_node


def ready(node: BrokerProcess) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.ports['http']}/ready",
                                    timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, TimeoutError):
        return False


def rss_kib(node: BrokerProcess) -> int:
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def run_cutoff(root: Path, server: PostgresServer, dsn: str, *, mode: str, cut_s: float,
               records: int, one_producer: bool = True) -> dict[str, Any]:
    """Load; cut node 1 off for at least ``cut_s`` (and until the load has gone on
    ``records`` records without it); heal; load again; the checker's figures.
    ``one_producer=False``: a new producer (a new producer id) after the heal (what the
    short form did while a fatal OUT_OF_ORDER_SEQUENCE_NUMBER from the healed node was
    an open bug, docs/cluster.md)."""
    proxy = FaultyProxy(server.host, server.port)
    proxy.start()
    nodes: list[BrokerProcess] = []
    kafka = amqp = None
    try:
        nodes = start_nodes(root, [proxy.dsn_for(dsn), dsn])  # node 1 through the proxy
        cut_node = nodes[0]
        create_topic(nodes)
        declare_queue(nodes)
        kafka, amqp = KafkaLoad(nodes), AmqpLoad(nodes)
        kafka.start()
        amqp.start()
        wait_progress("kafka before the cut", kafka.acknowledged, records, 60)
        # the load's requests claim the partitions; node 1 leads its share (node 2's
        # view of the owner rows is read every heartbeat)
        wait_for(lambda: owners_by_node(nodes[1]).get(1, 0) > 0, 20, "node 1 leading")
        wait_progress("amqp before the cut", lambda: len(amqp.confirmed), 10, 60)
        rss_before = rss_kib(cut_node)
        cut_at = time.monotonic()
        getattr(proxy, mode)()
        wait_for(lambda: not ready(cut_node), 20, "node 1 not ready once cut off")
        fenced_s = time.monotonic() - cut_at
        # node 2 claims node 1's partitions once node 1's lease has lapsed in the database
        # (node 2's view of the owner rows is read every heartbeat)
        wait_for(lambda: owners_by_node(nodes[1]).get(1, 0) == 0, 30,
                 "node 2 taking node 1's partitions")
        taken_over_s = time.monotonic() - cut_at
        resumed_s = taken_over_s + wait_progress("kafka without node 1", kafka.acknowledged,
                                                 records, 60)
        rss_peak = rss_before
        while time.monotonic() - cut_at < cut_s:
            rss_peak = max(rss_peak, rss_kib(cut_node))
            time.sleep(0.2)
        rss_peak = max(rss_peak, rss_kib(cut_node))
        earlier: KafkaLoad | None = None
        if not one_producer:
            kafka.stop()
            earlier, kafka = kafka, KafkaLoad(nodes, prefix="w")
        proxy.heal()
        healed_at = time.monotonic()
        if earlier is not None:
            kafka.start()
        wait_for(lambda: ready(cut_node), 60, "node 1 ready again after the heal")
        rejoined_s = time.monotonic() - healed_at
        # leading its share again: reported, not asserted (in one stall run of three the
        # node was ready again but led nothing within 30 s; not explained yet)
        lead_again_s: float | None = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if owners_by_node(nodes[1]).get(1, 0) > 0:
                lead_again_s = round(time.monotonic() - healed_at, 1)
                break
            time.sleep(0.2)
        try:
            wait_progress("kafka after the heal", kafka.acknowledged, records, 60)
        except AssertionError:
            if kafka.fatal is None:
                raise  # a producer that died is reported below, after the checker ran
        kafka.stop()
        amqp.stop()
        read = read_log(nodes, 120)
        got = drain_queue(nodes, quiet_s=3, timeout_s=60)
    finally:
        for load in (kafka, amqp):
            if load is not None and load.is_alive():
                load.stop()
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.kill()
        proxy.close()
    if earlier is not None:  # one history of both producers (their values differ)
        kafka.history.acknowledged.update(earlier.history.acknowledged)
        kafka.history.failed |= earlier.history.failed
    figures = tally(kafka.history, read) if kafka.fatal else check(kafka.history, read)
    for detail in ("lost_values", "duplicated_values", "moved_values", "first_offsets"):
        figures.pop(detail, None)
    confirmed = set(amqp.confirmed)
    figures.update({
        "mode": mode, "fenced_s": round(fenced_s, 1), "taken_over_s": round(taken_over_s, 1),
        "resumed_s": round(resumed_s, 1),
        "rejoined_s": round(rejoined_s, 1), "leads_again_s": lead_again_s,
        "rss_before_kib": rss_before,
        "rss_peak_kib": rss_peak, "amqp_confirmed": len(confirmed),
        "amqp_unconfirmed": len(amqp.unconfirmed), "amqp_lost": len(confirmed - set(got)),
        "amqp_duplicated": sum(1 for value in confirmed if got.count(value) > 1),
        "producer_fatal": kafka.fatal})
    return figures


# Short form: one producer across the heal, as the long form (it met a fatal
# OUT_OF_ORDER_SEQUENCE_NUMBER from the healed node, and records written twice, before
# the fix of docs/cluster.md); the stall case runs in make chaos only (in one run the
# healed node led nothing within 30 s, not explained yet)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["drop", pytest.param("stall", marks=pytest.mark.chaos)])
def test_node_cut_off_from_postgresql(tmp_path: Path, postgres_server: PostgresServer,
                                      postgres_dsn: str, mode: str) -> None:
    figures = run_cutoff(tmp_path, postgres_server, postgres_dsn, mode=mode, cut_s=8,
                         records=300)
    print(f"node cut off ({mode}): {figures}")
    assert figures["lost"] == 0 and figures["amqp_lost"] == 0
    assert figures["amqp_duplicated"] == 0
    # bounded: no pile-up of requests or buffers in the cut-off node
    assert figures["rss_peak_kib"] - figures["rss_before_kib"] < 64 * 1024, figures
    assert figures["producer_fatal"] is None, figures


@pytest.mark.chaos
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode", ["drop", "stall"])
def test_node_cut_off_from_postgresql_long(tmp_path: Path, postgres_server: PostgresServer,
                                           postgres_dsn: str, mode: str) -> None:
    figures = run_cutoff(tmp_path, postgres_server, postgres_dsn, mode=mode, cut_s=60,
                         records=5000)
    print(f"chaos node cut off ({mode}): {figures}")
    assert figures["lost"] == 0 and figures["amqp_lost"] == 0
    assert figures["amqp_duplicated"] == 0
    assert figures["rss_peak_kib"] - figures["rss_before_kib"] < 64 * 1024, figures
    assert figures["producer_fatal"] is None, figures
