"""/metrics against a real server after a workload with known counts, over every protocol.

Goal: the numbers a Prometheus scrape reads are the numbers of what happened —
messages published over SQS, AMQP, HTTP and Kafka, consumed and acked, a consumer
group's lag, errors by their protocol's own code after bad requests, connections
and bytes per listener — and the exposition is valid text format and OpenMetrics.
Method: one broker in a background thread with all four listeners; real clients
(boto3, pika, confluent-kafka, httpx) do the workload; the scrape is parsed with
prometheus_client's own parser and checked sample by sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import confluent_kafka
import httpx
import pika
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from conveyor.testing.server import BrokerThread

QUEUE = "jobs"
TOPIC = "events"
GROUP = "readers"
# published per protocol, consumed, and the Kafka workload
SQS_SENT, AMQP_SENT, HTTP_SENT = 3, 4, 5
PUBLISHED = SQS_SENT + AMQP_SENT + HTTP_SENT
CONSUMED = 7
KAFKA_PRODUCED, KAFKA_COMMITTED = 10, 6


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, accept: str = "") -> tuple[str, str]:
    response = httpx.get(url + "/metrics", headers={"accept": accept} if accept else {})
    assert response.status_code == 200, response.text
    return response.text, response.headers["content-type"]


def samples_of(text: str) -> Samples:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data_dir: Path = tmp_path_factory.mktemp("metrics")
    with BrokerThread(data_dir, listeners=("http", "kafka", "amqp", "sqs")) as thread:
        yield thread


@pytest.fixture(scope="module")
def url(broker: BrokerThread) -> str:
    return f"http://127.0.0.1:{broker.ports['http']}"


def sqs_client(broker: BrokerThread) -> Any:
    return boto3.client(
        "sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}", region_name="us-east-1",
        aws_access_key_id="any", aws_secret_access_key="any",
        config=Config(retries={"max_attempts": 1}))


def run_sqs(broker: BrokerThread) -> None:
    sqs = sqs_client(broker)
    queue_url = sqs.create_queue(QueueName=QUEUE)["QueueUrl"]
    for index in range(SQS_SENT):
        sqs.send_message(QueueUrl=queue_url, MessageBody=f"sqs {index}")
    with pytest.raises(ClientError):
        sqs.get_queue_url(QueueName="no-such-queue")


def run_amqp(broker: BrokerThread) -> None:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", broker.ports["amqp"]))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for index in range(AMQP_SENT):
            channel.basic_publish("", QUEUE, f"amqp {index}".encode(), mandatory=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
            channel.queue_declare("no-such-queue", passive=True)
        assert closed.value.reply_code == 404
    finally:
        connection.close()


def run_http(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        published = client.post(f"/topics/{QUEUE}/messages", json={
            "messages": [{"value": f"http {index}"} for index in range(HTTP_SENT)]})
        assert published.status_code == 200, published.text
        acquired = client.post(f"/topics/{QUEUE}/groups/{QUEUE}/acquire",
                               json={"limit": CONSUMED})
        receipts = [message["receipt"] for message in acquired.json()["messages"]]
        assert len(receipts) == CONSUMED
        assert client.post(f"/topics/{QUEUE}/groups/{QUEUE}/ack",
                           json={"receipts": receipts}).status_code == 200
        assert client.get("/queues/no-such-queue").status_code == 404


def run_kafka(broker: BrokerThread) -> None:
    bootstrap = f"127.0.0.1:{broker.ports['kafka']}"
    producer = confluent_kafka.Producer({
        "bootstrap.servers": bootstrap, "linger.ms": 0, "message.max.bytes": 8 << 20})
    for index in range(KAFKA_PRODUCED):
        producer.produce(TOPIC, f"kafka {index}".encode(), partition=0)
    producer.produce(TOPIC, b"x" * (2 << 20), partition=0)  # over max.message.bytes
    assert producer.flush(10) == 0
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap, "group.id": GROUP, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[confluent_kafka.TopicPartition(TOPIC, 0, KAFKA_COMMITTED)],
                        asynchronous=False)
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def after_workload(broker: BrokerThread, url: str) -> Samples:
    run_sqs(broker)
    run_amqp(broker)
    run_http(url)
    run_kafka(broker)
    text, content_type = scrape(url)
    assert content_type.startswith("text/plain; version=0.0.4")
    return samples_of(text)


def test_queue_counts_follow_the_workload(after_workload: Samples) -> None:
    samples = after_workload
    assert value(samples, "conveyor_queue_messages_published_total", queue=QUEUE) == PUBLISHED
    assert value(samples, "conveyor_queue_messages_ready", queue=QUEUE) == PUBLISHED - CONSUMED
    assert value(samples, "conveyor_queue_messages_unacked", queue=QUEUE) == 0
    assert value(samples, "conveyor_queue_messages_delivered_total", queue=QUEUE) == CONSUMED
    assert value(samples, "conveyor_queue_messages_acked_total", queue=QUEUE) == CONSUMED
    assert value(samples, "conveyor_queue_messages_redelivered_total", queue=QUEUE) == 0
    assert value(samples, "conveyor_queue_consumers", queue=QUEUE) == 1  # the HTTP consumer
    assert value(samples, "conveyor_partition_records_in_total", topic=QUEUE,
                 partition="0") == PUBLISHED
    assert value(samples, "conveyor_partition_records_out_total", topic=QUEUE,
                 partition="0") == CONSUMED


def test_topic_and_group_offsets_give_the_lag(after_workload: Samples) -> None:
    samples = after_workload
    assert value(samples, "conveyor_partition_log_end_offset", topic=TOPIC,
                 partition="0") == KAFKA_PRODUCED
    assert value(samples, "conveyor_partition_log_start_offset", topic=TOPIC,
                 partition="0") == 0
    assert value(samples, "conveyor_partition_records_in_total", topic=TOPIC,
                 partition="0") == KAFKA_PRODUCED
    assert value(samples, "conveyor_group_committed_offset", group=GROUP, topic=TOPIC,
                 partition="0") == KAFKA_COMMITTED
    assert value(samples, "conveyor_group_lag", group=GROUP, topic=TOPIC,
                 partition="0") == KAFKA_PRODUCED - KAFKA_COMMITTED
    assert value(samples, "conveyor_partition_bytes_in_total", topic=TOPIC, partition="0") > 0
    assert value(samples, "conveyor_partition_segments", topic=TOPIC, partition="0") == 1


def test_listeners_count_requests_errors_connections_and_bytes(after_workload: Samples
                                                              ) -> None:
    samples = after_workload
    errors = "conveyor_listener_errors_total"
    assert value(samples, errors, listener="http", code="unknown_queue") == 1
    assert value(samples, errors, listener="amqp", code="NOT_FOUND") == 1
    assert value(samples, errors, listener="sqs", code="QueueDoesNotExist") == 1
    assert value(samples, errors, listener="kafka", code="MESSAGE_TOO_LARGE") == 1
    requests = "conveyor_listener_requests_total"
    assert value(samples, requests, listener="sqs", request="SendMessage") == SQS_SENT
    assert value(samples, requests, listener="amqp", request="Basic.Publish") == AMQP_SENT
    assert value(samples, requests, listener="http", request="publish") == 1
    assert value(samples, requests, listener="kafka", request="produce") >= 2
    for listener in ("http", "kafka", "amqp", "sqs"):
        assert value(samples, "conveyor_listener_connections_opened_total",
                     listener=listener) >= 1
        assert value(samples, "conveyor_listener_received_bytes_total", listener=listener) > 0
        assert value(samples, "conveyor_listener_sent_bytes_total", listener=listener) > 0
    # every client above closed its connections (the scrape's own is the open one)
    assert value(samples, "conveyor_listener_connections", listener="amqp") == 0


@pytest.mark.file_storage  # fsync latency of the file LogStore's disk
def test_storage_and_process_metrics_are_present(after_workload: Samples) -> None:
    samples = after_workload
    assert value(samples, "conveyor_storage_fsync_seconds_count") >= 1
    assert value(samples, "conveyor_storage_group_commit_writes_count") >= 1
    assert value(samples, "conveyor_storage_segments") >= 2
    assert value(samples, "conveyor_storage_disk_free_bytes") > 0
    assert value(samples, "process_resident_memory_bytes") > 0
    assert ("conveyor_event_loop_lag_seconds_count", ()) in samples
    assert value(samples, "conveyor_metrics_series_omitted", family="queues") == 0


def test_openmetrics_when_the_accept_header_asks(after_workload: Samples, url: str) -> None:
    text, content_type = scrape(url, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    families = {family.name: family for family in parse_openmetrics(text)}
    published = families["conveyor_queue_messages_published"]
    assert published.type == "counter"
    assert {sample.labels["queue"]: sample.value for sample in published.samples
            if sample.name.endswith("_total")}[QUEUE] == PUBLISHED


def test_health_and_ready(url: str) -> None:
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    ready = httpx.get(url + "/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"http": "ok", "shared_groups": "ok", "broker": "ok",
                                      "listeners": "ok", "storage": "ok"}


def test_series_over_the_limit_are_omitted_and_counted(tmp_path: Path) -> None:
    settings = {"http": {"metrics_queues_max": 2, "metrics_partitions_max": 3}}
    with BrokerThread(tmp_path, listeners=("http",), settings=settings) as server:
        base = f"http://127.0.0.1:{server.ports['http']}"
        for name in ("a", "b", "c"):
            assert httpx.post(base + "/queues", json={"name": name}).status_code == 201
        assert httpx.post(base + "/topics", json={"name": "t", "partitions": 2}
                          ).status_code == 201
        samples = samples_of(scrape(base)[0])
    queues = {labels for name, labels in samples if name == "conveyor_queue_messages_ready"}
    assert queues == {(("queue", "a"),), (("queue", "b"),)}
    assert value(samples, "conveyor_metrics_series_omitted", family="queues") == 1
    assert value(samples, "conveyor_metrics_series_omitted", family="partitions") == 2
