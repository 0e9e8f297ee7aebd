"""A node killed with SIGKILL under mixed load (issue 12): three ``conveyor serve``
processes on one PostgreSQL, a Kafka idempotent producer (acks=all) with every node in
its bootstrap list, an AMQP publisher with confirms, an HTTP publisher and an HTTP
consumer of one queue, the two latter going round the nodes as a load balancer would
(tests/cluster/mixed.py). The victim is the queue's owner (it also leads a share of the
partitions, and the AMQP publisher is connected to it): its partitions are claimed by
the others once its lease lapses, its queue window is reloaded by the next owner, what
its consumer held comes back, and the publishers reconnect to another node.

Checker: every acknowledged Kafka record read back once at its offset, offsets
contiguous; every confirmed AMQP and acknowledged HTTP publish delivered, none
delivered again after its ack was confirmed, nothing delivered that was not published,
every delivery left unacked delivered again until acked. The long form with a kill
loop is tests/cluster/test_cluster_chaos.py (``make chaos``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conveyor.cluster.ownership import SHARED, choose_owner, item_name
from tests.cluster.helpers import wait_for
from tests.cluster.load import QUEUE
from tests.cluster.mixed import MixedLoad, queue_owner
from tests.cluster.test_cluster_failover import declare_queue, start_nodes
from tests.cluster.test_cluster_kafka import create_topic


@pytest.mark.timeout(240)
def test_a_node_killed_under_kafka_amqp_and_http_load(tmp_path: Path,
                                                      postgres_dsn: str) -> None:
    began = time.monotonic()
    nodes = start_nodes(tmp_path, [postgres_dsn] * 3)
    load = None
    try:
        create_topic(nodes)
        declare_queue(nodes)
        # the queue's owner as rendezvous hashing will choose it among the three: the
        # AMQP publisher starts there, so the kill breaks its connection too
        expected_owner = choose_owner(SHARED, item_name(SHARED, QUEUE, QUEUE), (1, 2, 3))
        assert expected_owner is not None
        load = MixedLoad(nodes, postgres_dsn, amqp_first=expected_owner - 1)
        load.start()
        load.progress("before the kill", kafka=300, amqp=10, http=30, acks=30, timeout_s=60)
        wait_for(lambda: queue_owner(nodes[0]) is not None, 10, "the queue's owner row")
        owner = queue_owner(nodes[0])
        assert owner is not None
        victim = nodes[owner - 1]  # node ids 1, 2, 3
        killed_at = time.monotonic()
        victim.kill()
        stalls = load.recovered(killed_at, timeout_s=60)
        figures = load.stop_and_check()
    finally:
        if load is not None:
            load.halt()
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.kill()
    print(f"sigkill under mixed load (node {owner}, the queue's owner, killed; "
          f"{time.monotonic() - began:.1f} s in all): {figures}")
    assert figures["queue"]["held"] > 0 and figures["queue"]["redelivered"] > 0
    assert figures["http"]["acknowledged"] >= 40 and figures["amqp"]["acknowledged"] >= 13
    assert figures["amqp"]["reconnects"] >= 2 or owner != expected_owner, figures["amqp"]
    assert max(stalls.values()) < 45, stalls
