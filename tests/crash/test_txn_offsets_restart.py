"""send_offsets_to_transaction right after a kill -9 and restart of the broker: the
transaction's consumer offsets reach the group and commit with it.

The call that ended two long runs of ctp_checker.py: the previous transaction put the
group's coordinator in librdkafka's coordinator cache; the kill leaves every broker down,
so librdkafka (with its default ``metadata.recovery.strategy=rebootstrap``) retires the
broker handle it had learned, and the cache keeps pointing at the retired handle. The
AddOffsetsToTxn of the next transaction is answered NO_ERROR, and the TxnOffsetCommit
that should follow is never sent: the call waits for the retired handle to come up and
ignores its own timeout (docs/kafka.md, "librdkafka and a restarted broker"). The client
settings the checker uses (``TXN_CLIENT``: no re-bootstrap, pointless with one broker)
must keep the call working; this test fails (the call is still blocked) without them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from ctp_checker import TXN_CLIENT

from conveyor.testing.server import BrokerProcess

TOPIC, GROUP = "txn-restart", "txn-restart-group"
WAIT_S = 30
CALL_TIMEOUT_S = 10
CLIENT = {"log_level": 0, "socket.connection.setup.timeout.ms": 3000,
          "reconnect.backoff.max.ms": 200, "topic.metadata.refresh.interval.ms": 1000,
          # the coordinator cache lives metadata.max.age.ms unused (900 s by default);
          # the checker's short refresh interval makes it 3 s, longer than a restart here
          "metadata.max.age.ms": 60_000}


def await_all_brokers_down(producer: Producer, down: threading.Event) -> None:
    """Serve the producer's callbacks until its error callback reported that every broker
    is down (the moment librdkafka starts its re-bootstrap, when that is on)."""
    for _ in range(WAIT_S * 10):
        if down.is_set():
            return
        producer.poll(0.1)
    raise AssertionError("the producer never reported every broker down")


def send_offsets(producer: Producer, offsets: list[TopicPartition], metadata: Any,
                 ) -> str:
    """send_offsets_to_transaction in a thread: its answer, or "blocked" when it did not
    return long after its own timeout (the thread is left behind)."""
    outcome: list[str] = []

    def call() -> None:
        try:
            producer.send_offsets_to_transaction(offsets, metadata, CALL_TIMEOUT_S)
            outcome.append("ok")
        except KafkaException as exception:
            outcome.append(f"error {exception.args[0]}")

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(CALL_TIMEOUT_S * 3)
    return outcome[0] if outcome else "blocked"


def test_send_offsets_after_kill9_and_restart(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", listeners=("kafka",))
    broker.start()
    try:
        bootstrap = f"127.0.0.1:{broker.ports['kafka']}"
        admin = AdminClient({"bootstrap.servers": bootstrap, **CLIENT})
        admin.create_topics([NewTopic(TOPIC, 1, 1)])[TOPIC].result(WAIT_S)
        down = threading.Event()

        def on_error(error: KafkaError) -> None:
            if error.code() == KafkaError._ALL_BROKERS_DOWN:
                down.set()

        producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": "restart",
                             "error_cb": on_error, **TXN_CLIENT, **CLIENT})
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP,
                             "enable.auto.commit": False, **CLIENT})
        metadata = consumer.consumer_group_metadata()
        producer.init_transactions(WAIT_S)
        producer.begin_transaction()
        producer.produce(TOPIC, b"first", partition=0)
        assert send_offsets(producer, [TopicPartition(TOPIC, 0, 1)], metadata) == "ok"
        producer.commit_transaction(WAIT_S)

        broker.kill()
        await_all_brokers_down(producer, down)
        broker.start()
        producer.begin_transaction()
        producer.produce(TOPIC, b"second", partition=0)
        assert producer.flush(WAIT_S) == 0  # reconnected: the produce was accepted

        assert send_offsets(producer, [TopicPartition(TOPIC, 0, 2)], metadata) == "ok"
        producer.commit_transaction(WAIT_S)
        committed = consumer.committed([TopicPartition(TOPIC, 0)], WAIT_S)
        assert [(tp.partition, tp.offset) for tp in committed] == [(0, 2)]
        consumer.close()
    finally:
        if broker.process is not None and broker.process.poll() is None:
            broker.stop()
