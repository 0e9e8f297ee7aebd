"""The HTTP API's ordered-group operations through either node of a cluster
(docs/cluster.md, "Ordered groups over HTTP").

Goal: a commit, a read of the commits, a describe and a delete answer alike through
either node: on the group's owner it is claimed on demand (before, a group no Kafka
request had claimed was refused there with 503), on the other node the call is
forwarded to the owner. Kafka's OffsetFetch (confluent-kafka ``committed()``) sees
what HTTP committed, and HTTP reads what Kafka's OffsetCommit wrote.
Method: two ``conveyor serve`` processes on one PostgreSQL; two groups, one owned by
each node (rendezvous hashing over nodes 1 and 2, computed as the nodes do); the first
group is first touched through its owner, the second through the other node.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from conveyor.cluster.ownership import GROUP, choose_owner
from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import bootstrap, cluster, http_json, wait_for

TOPIC = "ledger"
OFFSET_INVALID = -1001  # confluent-kafka: nothing committed


def call(node: BrokerProcess, path: str, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{node.ports['http']}{path}",
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            raw = response.read()
            return int(response.status), json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read() or b"null")


def kafka_committed(nodes: list[BrokerProcess], group: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": group,
                         "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)],
                                   timeout=15)
    finally:
        consumer.close()
    return [item.offset for item in found]


def kafka_commit(nodes: list[BrokerProcess], group: str, partition: int, offset: int) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": group,
                         "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(TOPIC, partition, offset)],
                        asynchronous=False)
    finally:
        consumer.close()


def group_owned_by(node_id: int) -> str:
    return next(name for name in (f"ledger-readers-{index}" for index in range(100))
                if choose_owner(GROUP, name, [1, 2]) == node_id)


def test_group_operations_answer_alike_through_either_node(tmp_path: Path,
                                                          postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 2) as nodes:
        for node in nodes:  # each node's view has both (the owner choice depends on it)
            wait_for(lambda node=node: sum(row["live"] for row in http_json(
                node, "/cluster")["nodes"]) == 2, 15, "both nodes live in each view")
        http_json(nodes[0], "/topics", {"name": TOPIC, "partitions": 2})
        for node in nodes:
            wait_for(lambda node=node: call(node, f"/topics/{TOPIC}")[0] == 200, 10,
                     "the topic on every node")
        http_json(nodes[0], f"/topics/{TOPIC}/messages", {"messages": [
            {"value": f"m{index}", "partition": index % 2} for index in range(20)]})
        for node in nodes:  # each node learns the heads by a wake-up (lag and fetch use them)
            wait_for(lambda node=node: [p["high_watermark"] for p in http_json(
                node, f"/topics/{TOPIC}")["partition_offsets"]] == [10, 10], 10,
                "the heads on every node")
        for owner_id, first_through_owner in ((1, True), (2, False)):
            group = group_owned_by(owner_id)
            owner, other = nodes[owner_id - 1], nodes[2 - owner_id]
            first, second = (owner, other) if first_through_owner else (other, owner)
            offsets = f"/topics/{TOPIC}/groups/{group}/offsets"
            assert http_json(first, offsets, {"offsets": {"0": 3}})["offsets"] == {"0": 3}
            assert http_json(second, offsets)["offsets"] == {"0": 3}
            assert http_json(second, offsets, {"offsets": {"0": 4, "1": 6}})["offsets"] == {
                "0": 4, "1": 6}
            assert http_json(first, offsets)["offsets"] == {"0": 4, "1": 6}
            assert kafka_committed(nodes, group) == [4, 6]
            kafka_commit(nodes, group, 1, 8)  # Kafka's OffsetCommit, read over HTTP
            for node in nodes:
                assert http_json(node, offsets)["offsets"] == {"0": 4, "1": 8}
                described = http_json(node, f"/groups/{group}")
                assert (described["state"], described["members"],
                        described["total_lag"]) == ("Empty", 0, 8)
                assert [(p["partition"], p["committed_offset"], p["high_watermark"])
                        for p in described["partitions"]] == [(0, 4, 10), (1, 8, 10)]
            # the fetch route starts from the group's commits on either node too
            fetched = http_json(other, f"/topics/{TOPIC}/fetch", {"group": group,
                                                                 "limit": 100})
            assert fetched["next_offsets"] == {"0": 10, "1": 10}
            assert len(fetched["messages"]) == 8
            # delete through the node that does not own the group
            assert call(other, f"/groups/{group}", "DELETE") == (204, None)
            for node in nodes:
                status, error = call(node, f"/groups/{group}")
                assert (status, error["error"]["code"]) == (404, "unknown_group")
                assert http_json(node, offsets)["offsets"] == {}
            assert kafka_committed(nodes, group) == [OFFSET_INVALID, OFFSET_INVALID]
