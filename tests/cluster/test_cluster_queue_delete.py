"""Deleting a queue through a node that does not own it (docs/cluster.md, "Queues").

The non-owner forwards the delete to the queue's owner over the internal channel: the
owner checks its window (``if_empty`` / ``if_unused``) and drops it, the queue's rows
and its topic; then the asking node drops its own copy. Before, the non-owner deleted
its copy and the topic while the owner kept answering from its in-memory window.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pika
import pika.exceptions
import pytest

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import cluster, http_json, wait_for
from tests.cluster.test_cluster_queues import acquire, declare, owner_of_jobs


def status_of(node: BrokerProcess, path: str, method: str = "GET") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{node.ports['http']}{path}",
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_a_delete_through_the_non_owner_reaches_the_owner(tmp_path: Path,
                                                         postgres_dsn: str) -> None:
    with cluster(tmp_path, postgres_dsn, 2, listeners=("amqp", "http")) as nodes:
        declare(nodes)
        owner, other = owner_of_jobs(nodes)
        http_json(other, "/topics/jobs/messages",
                  {"messages": [{"value": f"m{index}"} for index in range(5)]})
        wait_for(lambda: http_json(owner, "/queues/jobs")["ready"] == 5, 10, "5 ready")
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", other.ports["amqp"],
            credentials=pika.PlainCredentials("guest", "guest")))
        try:
            # AMQP queue.delete if-empty: the owner's window decides, and refuses
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                connection.channel().queue_delete("jobs", if_empty=True)
            assert refused.value.reply_code == 406
            assert http_json(owner, "/queues/jobs")["ready"] == 5  # nothing deleted
            # HTTP DELETE through the non-owner: gone at the owner too (its window,
            # its counts, its deliveries)
            assert status_of(other, "/queues/jobs", "DELETE") == 204
            for node in nodes:
                assert status_of(node, "/queues/jobs") == 404
                assert acquire(node, 5)[0] == 404
            # declared again: a new, empty queue, not the owner's old window
            declare(nodes)
            for node in nodes:
                info = http_json(node, "/queues/jobs")
                assert (info["ready"], info["in_flight"]) == (0, 0), info
            http_json(owner, "/topics/jobs/messages", {"messages": [{"value": "n"}]})
            wait_for(lambda: http_json(owner, "/queues/jobs")["ready"] == 1, 10, "1 ready")
            # AMQP queue.delete through the non-owner: counted and deleted by the owner
            deleted = connection.channel().queue_delete("jobs")
            assert deleted.method.message_count == 1
        finally:
            connection.close()
        assert status_of(owner, "/queues/jobs") == 404
