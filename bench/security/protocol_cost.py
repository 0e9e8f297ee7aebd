"""The throughput cost of authentication and authorization checks (issue 10).

Method: two brokers in one run, alternating rounds: ``open`` (auth off; clients act as
the loopback guest, an administrator, so every check returns at its first line) and
``checked`` (``--auth required``; the client is a non-administrator with ``.*``
permissions, so every check goes through the model's decision cache: the full path a
restricted user takes). Kafka: confluent-kafka produces N records (acks=all, linger 5 ms)
and a consumer reads them back (SASL PLAIN on the checked broker). AMQP: pika publishes N
messages, then consumes them with prefetch 500, acking every 100 (PLAIN login on
both): the publish rate (unconfirmed: what the checks cost, not fsync) and the rate
from the first publish to the last delivery. Medians over rounds; results in
``bench/results/protocol_cost.json``; ``check_ns`` is one check of a non-administrator.

Run: ``python -m bench.security.protocol_cost [--records 20000] [--messages 10000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pika
from confluent_kafka import Consumer, Producer

from conveyor.server.app import Server
from conveyor.testing.server import BrokerThread, test_config

USER = ("bench", "bench-password")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "protocol_cost.json"


class Broker(BrokerThread):
    def __init__(self, data_dir: Path, checked: bool) -> None:
        super().__init__(data_dir, ("kafka", "amqp"))
        self.checked = checked

    def _start_server(self) -> None:
        config = test_config(self.data_dir, self.listener_names, self.settings, self.ports)
        if self.checked:
            config = dataclasses.replace(config, auth="required")
        # auth off: no first admin, so the model creates guest/guest (loopback only)
        environ = {"CONVEYOR_ADMIN_USER": "root", "CONVEYOR_ADMIN_PASSWORD": "root-password"}
        self._server = Server(config, environ=environ if self.checked else {})
        self._submit(self._server.start()).result(timeout=30)
        self.ports = dict(self._server.ports)
        if self.checked:
            self.call(self._user)

    async def _user(self) -> None:
        admin = self.server.security.admin
        await admin.add_user(*USER)
        await admin.set_permissions(USER[0], "/", ".*", ".*", ".*")


def _kafka_config(broker: Broker) -> dict[str, Any]:
    config: dict[str, Any] = {"bootstrap.servers": f"127.0.0.1:{broker.ports['kafka']}"}
    if broker.checked:
        config.update({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                       "sasl.username": USER[0], "sasl.password": USER[1]})
    return config


def kafka_round(broker: Broker, records: int) -> tuple[float, float]:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    producer = Producer({**_kafka_config(broker), "linger.ms": 5, "acks": "all"})
    payload = b"x" * 100
    started = time.perf_counter()
    for index in range(records):
        while True:
            try:
                producer.produce(topic, payload, key=str(index % 16).encode())
                break
            except BufferError:
                producer.poll(0.01)
    assert producer.flush(60) == 0
    produce_s = time.perf_counter() - started
    consumer = Consumer({**_kafka_config(broker), "group.id": topic,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    received = 0
    started = time.perf_counter()
    while received < records:
        batch = consumer.consume(1000, 1.0)
        received += sum(1 for message in batch if message.error() is None)
    consume_s = time.perf_counter() - started
    consumer.close()
    return records / produce_s, records / consume_s


def amqp_round(broker: Broker, messages: int) -> tuple[float, float]:
    user = USER if broker.checked else ("guest", "guest")
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", broker.ports["amqp"], credentials=pika.PlainCredentials(*user)))
    channel = connection.channel()
    channel.queue_declare(queue)
    payload = b"x" * 100
    started = time.perf_counter()
    for _ in range(messages):
        channel.basic_publish("", queue, payload)  # unconfirmed: the checks, not fsync
    connection.process_data_events(0)
    publish_s = time.perf_counter() - started
    channel.basic_qos(prefetch_count=500)
    started = time.perf_counter()
    received = 0
    for method, _properties, _body in channel.consume(queue, inactivity_timeout=10):
        assert method is not None, "consume stalled"
        received += 1
        if received % 100 == 0 or received == messages:
            channel.basic_ack(method.delivery_tag, multiple=True)
        if received == messages:
            break
    consume_s = time.perf_counter() - started
    channel.cancel()
    connection.close()
    return messages / publish_s, messages / (publish_s + consume_s)


def check_ns(calls: int = 200_000) -> float:
    """One ``check`` of a non-administrator (the decision cache's path), in ns."""
    import asyncio

    from conveyor.security.model import open_model

    model = open_model()

    async def user() -> None:
        await model.admin.add_user(*USER)
        await model.admin.set_permissions(USER[0], "/", ".*", ".*", ".*")

    asyncio.run(user())
    principal = model.principal(USER[0])
    assert principal is not None
    started = time.perf_counter()
    for _ in range(calls):
        model.check(principal, "/", "write", "topic", "bench-topic")
    return (time.perf_counter() - started) / calls * 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    samples: dict[str, dict[str, list[float]]] = {"open": {}, "checked": {}}
    with tempfile.TemporaryDirectory() as directory, \
            Broker(Path(directory) / "open", checked=False) as open_broker, \
            Broker(Path(directory) / "checked", checked=True) as checked_broker:
        for _ in range(arguments.rounds):
            for name, broker in (("open", open_broker), ("checked", checked_broker)):
                produce, fetch = kafka_round(broker, arguments.records)
                publish, consume = amqp_round(broker, arguments.messages)
                for measure, value in (("kafka_produce_per_s", produce),
                                       ("kafka_consume_per_s", fetch),
                                       ("amqp_publish_per_s", publish),
                                       ("amqp_publish_to_consumed_per_s", consume)):
                    samples[name].setdefault(measure, []).append(value)
    medians = {name: {measure: round(statistics.median(values))
                      for measure, values in measures.items()}
               for name, measures in samples.items()}
    ratios = {measure: round(medians["checked"][measure] / medians["open"][measure], 3)
              for measure in medians["open"]}
    document = {"method": __doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else "",
                "records": arguments.records, "messages": arguments.messages,
                "rounds": arguments.rounds, "median": medians, "checked_over_open": ratios,
                "samples": samples, "check_ns": round(check_ns())}
    RESULTS.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"median": medians, "checked_over_open": ratios,
                      "check_ns": document["check_ns"]}, indent=2))


if __name__ == "__main__":
    main()
