"""One queue, every protocol: SQS messages and attributes cross to AMQP, Kafka and HTTP.

Goal: a message sent with boto3 is consumed with pika with its attributes as AMQP
headers; records produced with confluent-kafka and published over the HTTP API are
received with boto3 with their headers as message attributes (and a digest botocore
accepts). Method: one broker thread with the sqs, amqp, kafka and http listeners; one
fresh queue per test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pika
import pytest
from confluent_kafka import Producer

from conveyor import Client
from conveyor.testing.server import BrokerThread


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("sqs-cross"),
                      listeners=("sqs", "amqp", "kafka", "http")) as thread:
        yield thread


@pytest.fixture(scope="module")
def sqs(broker: BrokerThread) -> Any:
    return boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}",
                        region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x")


def new_queue(sqs: Any) -> tuple[str, str]:
    name = f"cross-{uuid.uuid4().hex[:8]}"
    return name, sqs.create_queue(QueueName=name)["QueueUrl"]


def test_boto3_to_pika_keeps_body_and_attributes(broker: BrokerThread, sqs: Any) -> None:
    name, url = new_queue(sqs)
    sqs.send_message(QueueUrl=url, MessageBody='{"order": 7}', MessageAttributes={
        "color": {"DataType": "String", "StringValue": "blue"},
        "count": {"DataType": "Number", "StringValue": "3"}})
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", broker.ports["amqp"], credentials=pika.PlainCredentials("guest", "guest")))
    try:
        channel = connection.channel()
        method, properties, body = next(channel.consume(name, inactivity_timeout=10))
        assert method is not None and properties is not None, "no message over AMQP"
        assert body == b'{"order": 7}'
        headers = {key: (value.decode() if isinstance(value, bytes) else value)
                   for key, value in (properties.headers or {}).items()}
        assert headers["color"] == "blue" and headers["count"] == "3"
        channel.basic_ack(method.delivery_tag)
        channel.cancel()
    finally:
        connection.close()
    assert "Messages" not in sqs.receive_message(QueueUrl=url)


def test_kafka_to_boto3_headers_become_attributes(broker: BrokerThread, sqs: Any) -> None:
    name, url = new_queue(sqs)
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{broker.ports['kafka']}",
                         "acks": "all"})
    producer.produce(name, value=b"from kafka", key=b"k1",
                     headers=[("source", b"kafka"), ("blob", b"\xff\x00")])
    assert producer.flush(10) == 0
    got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5, MessageAttributeNames=["All"],
                              AttributeNames=["All"])["Messages"][0]
    assert got["Body"] == "from kafka"
    assert got["MessageAttributes"]["source"] == {"DataType": "String",
                                                 "StringValue": "kafka"}
    assert got["MessageAttributes"]["blob"] == {"DataType": "Binary",
                                               "BinaryValue": b"\xff\x00"}
    assert got["Attributes"]["ApproximateReceiveCount"] == "1"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=got["ReceiptHandle"])


def test_http_to_boto3_and_back(broker: BrokerThread, sqs: Any) -> None:
    name, url = new_queue(sqs)
    client = Client(f"http://127.0.0.1:{broker.ports['http']}")
    try:
        client.publish(name, b"from http", headers={"team": "web"})
        got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5,
                                  MessageAttributeNames=["team"])["Messages"][0]
        assert got["Body"] == "from http"
        assert got["MessageAttributes"] == {"team": {"DataType": "String",
                                                     "StringValue": "web"}}
        sqs.delete_message(QueueUrl=url, ReceiptHandle=got["ReceiptHandle"])
        sqs.send_message(QueueUrl=url, MessageBody="to http", MessageAttributes={
            "lang": {"DataType": "String", "StringValue": "en"}})
        messages = client.acquire(name, wait_s=5)
        assert [m.value for m in messages] == [b"to http"]
        assert messages[0].headers["lang"] == b"en"
        messages[0].ack()
    finally:
        client.close()
