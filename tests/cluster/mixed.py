"""Mixed load for the SIGKILL tests (issue 12): a Kafka idempotent producer (acks=all),
an AMQP publisher with confirms and an HTTP publisher into one queue, an HTTP consumer
of that queue, all running at once over every node (tests/cluster/load.py); then the
checker (helpers.check for Kafka, helpers.check_queue for the queue) and per-protocol
figures: acknowledged, lost, duplicated, redelivered after a confirmed ack, and the
longest time without an acknowledgement around each kill (the recovery time).
"""

from __future__ import annotations

import time
from typing import Any

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import check, check_queue, http_json, stored_log, wait_for
from tests.cluster.load import (
    QUEUE,
    AmqpLoad,
    HttpLoad,
    KafkaLoad,
    QueueConsumer,
    longest_stall,
    wait_progress,
)
from tests.cluster.test_cluster_failover import read_log
from tests.cluster.test_cluster_kafka import PARTITIONS, TOPIC


class MixedLoad:
    def __init__(self, nodes: list[BrokerProcess], dsn: str, amqp_first: int = 0) -> None:
        """``dsn``: the nodes' database (the checker compares the topic read back with
        the batch rows there); ``amqp_first``: the index of the node the AMQP publisher
        connects to first (then the next ones in turn, whenever its connection dies)."""
        self.nodes, self.dsn = nodes, dsn
        self.kafka = KafkaLoad(nodes, rate_per_s=300)
        self.amqp = AmqpLoad(nodes[amqp_first:] + nodes[:amqp_first])
        self.http = HttpLoad(nodes)
        self.consumer = QueueConsumer(nodes)
        self.stalls: list[dict[str, float]] = []

    def start(self) -> None:
        for thread in (self.kafka, self.amqp, self.http, self.consumer):
            thread.start()

    def progress(self, what: str, kafka: int, amqp: int, http: int, acks: int,
                 timeout_s: float) -> None:
        """Wait until every protocol has made this much more progress."""
        wait_progress(f"kafka {what}", self.kafka.acknowledged, kafka, timeout_s)
        wait_progress(f"amqp {what}", lambda: len(self.amqp.confirmed), amqp, timeout_s)
        wait_progress(f"http {what}", lambda: len(self.http.acknowledged), http, timeout_s)
        wait_progress(f"queue acks {what}", self.consumer.acks, acks, timeout_s)

    def recovered(self, killed_at: float, timeout_s: float) -> dict[str, float]:
        """After a kill at ``killed_at``: wait until every Kafka partition (the dead
        node's too) and every other protocol has acknowledged again; the longest
        stall of each, in seconds."""
        times = self.kafka.history.ack_times

        def kafka_back() -> bool:
            return len(times) == PARTITIONS and all(
                any(t > killed_at for t in list(times[p])) for p in range(PARTITIONS))

        wait_for(kafka_back, timeout_s, "an acknowledgement on every partition after the kill")
        self.progress("after the kill", 50, 3, 10, 10, timeout_s)
        until = time.monotonic()
        stalls = {
            "kafka": max(longest_stall(list(times[p]), killed_at, until)
                         for p in range(PARTITIONS)),
            "amqp": longest_stall(list(self.amqp.confirm_times), killed_at, until),
            "http": longest_stall(list(self.http.ack_times), killed_at, until),
            "queue_acks": longest_stall(list(self.consumer.history.ack_times), killed_at, until),
        }
        self.stalls.append({name: round(value, 1) for name, value in stalls.items()})
        return stalls

    def stop_and_check(self, verify_s: float = 90) -> dict[str, Any]:
        """Stop the publishers, drain the queue, read the topic back; the checker's
        figures per protocol (asserting no loss, no duplicate, no delivery after a
        confirmed ack, nothing unpublished delivered, everything unacked redelivered)."""
        for load in (self.kafka, self.amqp, self.http):
            load.stop()
        published = set(self.amqp.confirmed) | set(self.http.acknowledged)
        self.consumer.finish(published, verify_s)
        queue = self.consumer.history
        figures: dict[str, Any] = {}
        kafka = check(self.kafka.history, read_log(self.nodes, verify_s),
                      stored_log(self.dsn, TOPIC))
        figures["kafka"] = {key: kafka[key] for key in
                            ("acknowledged", "failed", "lost", "duplicated", "gaps")}
        queue_figures = check_queue(published, [*self.amqp.unconfirmed, *self.http.unknown],
                                    queue.deliveries, queue.acked)
        for name, load_acked in (("amqp", self.amqp.confirmed), ("http", self.http.acknowledged)):
            delivered = {value for value, _ in queue.deliveries}
            figures[name] = {"acknowledged": len(load_acked),
                             "lost": len(set(load_acked) - delivered)}
        figures["amqp"]["unconfirmed"] = len(self.amqp.unconfirmed)
        figures["amqp"]["reconnects"] = self.amqp.reconnects  # the first connection counts
        figures["http"]["unknown"] = len(self.http.unknown)
        figures["http"]["errors"] = dict(self.http.errors)
        figures["queue"] = {**queue_figures, "held": queue.held,
                            "acks_refused": queue.acks_refused,
                            "acks_unanswered": queue.acks_unanswered}
        figures["stalls_s"] = self.stalls
        return figures

    def halt(self) -> None:
        """Stop every thread still running (after a failure)."""
        for load in (self.kafka, self.amqp, self.http):
            if load.is_alive():
                load.stop()
        if self.consumer.is_alive():
            self.consumer.finish(set(), 0)


def queue_owner(node: BrokerProcess) -> int | None:
    return next((row["owner"] for row in http_json(node, "/cluster")["owners"]
                 if row["kind"] == "shared" and row["name"] == QUEUE), None)
