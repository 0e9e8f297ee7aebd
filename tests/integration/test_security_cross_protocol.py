"""One grant, every protocol: a user allowed to read queue ``a`` only.

Goal: alice (read ``^a$`` in vhost ``/``, nothing else) consumes ``a`` over AMQP
(pika), Kafka (confluent-kafka, SCRAM-SHA-512, ``a`` read as a topic) and SQS (boto3,
SigV4 with her access key), and is refused ``b`` on each with that protocol's own
error: 403 ACCESS_REFUSED, TOPIC_AUTHORIZATION_FAILED, AccessDenied. Then one Kafka
ACL (DENY READ on ``a``) made with CreateAcls takes ``a`` away on all three.
Method: one broker thread with the amqp, kafka and sqs listeners.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
import pika
import pika.exceptions
import pytest
from confluent_kafka import Consumer, KafkaError
from security_support import ALICE, SecureBroker, unique

from conveyor.security.api import AclBinding, AclFilter


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path_factory.mktemp("cross-security"),
                      ("amqp", "kafka", "sqs")) as thread:
        thread.setup_users(messages=10)
        yield thread


def amqp_read(broker: SecureBroker, queue: str) -> bytes | int:
    """The body of one message of ``queue`` (left in it), or the channel error's code."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", broker.ports["amqp"], credentials=pika.PlainCredentials(*ALICE)))
    try:
        channel = connection.channel()
        try:
            method, _, body = channel.basic_get(queue)
        except pika.exceptions.ChannelClosedByBroker as error:
            return int(error.reply_code)
        assert method is not None
        channel.basic_reject(method.delivery_tag, requeue=True)
        return bytes(body)
    finally:
        connection.close()


def kafka_read(broker: SecureBroker, topic: str) -> bytes | int:
    consumer = Consumer({
        "bootstrap.servers": f"127.0.0.1:{broker.ports['kafka']}",
        "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": ALICE[0], "sasl.password": ALICE[1], "group.id": unique("g"),
        "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic])
        for _ in range(40):
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                return int(message.error().code())
            return bytes(message.value())
        raise AssertionError("nothing arrived")
    finally:
        consumer.close()


def sqs_read(broker: SecureBroker, queue: str) -> bytes | str:
    sqs: Any = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}",
                            region_name="us-east-1", aws_access_key_id=broker.alice_key[0],
                            aws_secret_access_key=broker.alice_key[1])
    url = f"http://127.0.0.1:{broker.ports['sqs']}/000000000000/{queue}"
    try:
        received = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1, VisibilityTimeout=0)
    except botocore.exceptions.ClientError as error:
        return str(error.response["Error"]["Code"])
    return str(received["Messages"][0]["Body"]).encode()


def test_read_a_everywhere_refused_b_everywhere(broker: SecureBroker) -> None:
    for read in (amqp_read, kafka_read, sqs_read):
        body = read(broker, "a")
        assert isinstance(body, bytes) and body.startswith(b"a-"), (read.__name__, body)
    assert amqp_read(broker, "b") == 403
    assert kafka_read(broker, "b") == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert sqs_read(broker, "b") == "AccessDenied"


def test_a_kafka_acl_holds_on_every_protocol(broker: SecureBroker) -> None:
    deny = AclBinding("User:alice", "TOPIC", "a", "LITERAL", "READ", "DENY")
    security = broker.server.security
    broker.call(security.create_acls, [deny])
    try:
        assert amqp_read(broker, "a") == 403
        assert kafka_read(broker, "a") == KafkaError.TOPIC_AUTHORIZATION_FAILED
        assert sqs_read(broker, "a") == "AccessDenied"
    finally:
        broker.call(security.delete_acls, AclFilter(principal="User:alice"))
    assert isinstance(amqp_read(broker, "a"), bytes)
