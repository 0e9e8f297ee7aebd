"""boto3 against a real Conveyor SQS listener: the semantics beyond the round trip.

Goal: FIFO retries (ReceiveRequestAttemptId), per-group deduplication, delays, system
attribute digests, size/count limits and a long poll whose client vanishes behave as
AWS documents them, as botocore parses (and MD5-verifies) them. Method: one broker per
module in a background thread; each test uses its own queues; every wait is a server
long poll, never a sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conveyor.testing.server import BrokerThread


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data_dir: Path = tmp_path_factory.mktemp("sqs-semantics")
    with BrokerThread(data_dir, listeners=("sqs",)) as thread:
        yield thread


@pytest.fixture(scope="module")
def sqs(broker: BrokerThread) -> Any:
    return boto3.client(
        "sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}", region_name="eu-west-1",
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
        config=Config(retries={"max_attempts": 1}),
    )


def unique(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def code_of(error: pytest.ExceptionInfo[ClientError]) -> str:
    code: str = error.value.response["Error"]["Code"]
    return code


def fifo_queue(sqs: Any, **attributes: str) -> str:
    url: str = sqs.create_queue(QueueName=unique("fifo") + ".fifo",
                                Attributes={"FifoQueue": "true", **attributes})["QueueUrl"]
    return url


def test_receive_request_attempt_id_replays_until_a_message_is_touched(sqs: Any) -> None:
    url = fifo_queue(sqs, ContentBasedDeduplication="true")
    for body in ("a", "b"):
        sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId=body)
    first = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                ReceiveRequestAttemptId="try-1")["Messages"]
    assert sorted(m["Body"] for m in first) == ["a", "b"]
    retried = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                  ReceiveRequestAttemptId="try-1")["Messages"]
    assert [m["ReceiptHandle"] for m in retried] == [m["ReceiptHandle"] for m in first]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first[0]["ReceiptHandle"])
    # one message of the answer is gone: the attempt id no longer replays
    assert "Messages" not in sqs.receive_message(QueueUrl=url, ReceiveRequestAttemptId="try-1")
    with pytest.raises(ClientError) as error:
        sqs.receive_message(QueueUrl=url, ReceiveRequestAttemptId="bad id with spaces")
    assert code_of(error) == "InvalidParameterValue"


def test_fifo_dedup_ids_and_message_group_scope(sqs: Any) -> None:
    per_queue = fifo_queue(sqs)
    sqs.send_message(QueueUrl=per_queue, MessageBody="1", MessageGroupId="g1",
                     MessageDeduplicationId="same")
    sqs.send_message(QueueUrl=per_queue, MessageBody="2", MessageGroupId="g2",
                     MessageDeduplicationId="same")  # duplicate across groups: dropped
    got = sqs.receive_message(QueueUrl=per_queue, MaxNumberOfMessages=10,
                              AttributeNames=["All"])["Messages"]
    assert [m["Body"] for m in got] == ["1"]
    assert got[0]["Attributes"]["MessageDeduplicationId"] == "same"

    per_group = fifo_queue(sqs, DeduplicationScope="messageGroup",
                           FifoThroughputLimit="perMessageGroupId")
    for body, group in (("1", "g1"), ("2", "g2"), ("3", "g1")):
        sqs.send_message(QueueUrl=per_group, MessageBody=body, MessageGroupId=group,
                         MessageDeduplicationId="same")
    got = sqs.receive_message(QueueUrl=per_group, MaxNumberOfMessages=10,
                              AttributeNames=["All"])["Messages"]
    assert sorted(m["Body"] for m in got) == ["1", "2"]  # "3" repeats g1's id
    assert {m["Attributes"]["MessageDeduplicationId"] for m in got} == {"same"}


def test_fifo_refuses_message_delay_and_standard_refuses_group_fields(sqs: Any) -> None:
    url = fifo_queue(sqs, ContentBasedDeduplication="true")
    with pytest.raises(ClientError) as error:
        sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="g", DelaySeconds=5)
    assert code_of(error) == "InvalidParameterValue"
    standard = sqs.create_queue(QueueName=unique())["QueueUrl"]
    with pytest.raises(ClientError) as error:
        sqs.send_message(QueueUrl=standard, MessageBody="x", MessageDeduplicationId="d")
    assert code_of(error) == "InvalidParameterValue"


def test_message_delay_holds_the_message_back(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sent_at = time.monotonic()
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=1)
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesDelayed"])["Attributes"]
    assert attributes["ApproximateNumberOfMessagesDelayed"] == "1"
    got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5)["Messages"]
    assert got[0]["Body"] == "later"
    assert time.monotonic() - sent_at >= 0.9
    with pytest.raises(ClientError) as error:
        sqs.send_message(QueueUrl=url, MessageBody="x", DelaySeconds=901)
    assert code_of(error) == "InvalidParameterValue"


def test_trace_header_and_its_system_attribute_digest(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"
    sent = sqs.send_message(QueueUrl=url, MessageBody="traced", MessageSystemAttributes={
        "AWSTraceHeader": {"DataType": "String", "StringValue": trace}})
    name, kind, value = b"AWSTraceHeader", b"String", trace.encode()
    expected = hashlib.md5(b"".join(
        [struct.pack(">I", len(name)), name, struct.pack(">I", len(kind)), kind, b"\x01",
         struct.pack(">I", len(value)), value])).hexdigest()
    assert sent["MD5OfMessageSystemAttributes"] == expected
    got = sqs.receive_message(QueueUrl=url, MessageSystemAttributeNames=["AWSTraceHeader",
                                                                         "SentTimestamp"])
    attributes = got["Messages"][0]["Attributes"]
    assert attributes["AWSTraceHeader"] == trace
    assert abs(int(attributes["SentTimestamp"]) - time.time() * 1000) < 60_000


def test_custom_attribute_types_keep_their_names_and_digests(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    attributes = {
        "price": {"DataType": "Number.float", "StringValue": "1.50"},
        "image": {"DataType": "Binary.png", "BinaryValue": b"\x89PNG"},
        "who": {"DataType": "String.name", "StringValue": "ada"},
    }
    sent = sqs.send_message(QueueUrl=url, MessageBody="typed", MessageAttributes=attributes)
    got = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"])["Messages"][0]
    assert got["MessageAttributes"] == attributes
    assert got["MD5OfMessageAttributes"] == sent["MD5OfMessageAttributes"]
    only = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["pri.*"],
                               VisibilityTimeout=0)
    assert "Messages" not in only  # still locked by the first receive


def test_size_and_count_limits_answer_aws_codes(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    with pytest.raises(ClientError) as error:
        sqs.send_message(QueueUrl=url, MessageBody="x" * (256 * 1024 + 1))
    assert code_of(error) == "InvalidParameterValue"
    too_many = {f"a{i}": {"DataType": "String", "StringValue": "v"} for i in range(11)}
    with pytest.raises(ClientError) as error:
        sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=too_many)
    assert code_of(error) == "InvalidParameterValue"
    with pytest.raises(ClientError) as error:
        sqs.receive_message(QueueUrl=url, VisibilityTimeout=43_201)
    assert code_of(error) == "InvalidParameterValue"
    with pytest.raises(ClientError) as error:
        sqs.receive_message(QueueUrl=url, WaitTimeSeconds=21)
    assert code_of(error) == "InvalidParameterValue"
    with pytest.raises(ClientError) as error:
        sqs.create_queue(QueueName="x" * 81)
    assert code_of(error) == "InvalidParameterValue"
    with pytest.raises(ClientError) as error:
        sqs.send_message_batch(QueueUrl=url, Entries=[])
    assert code_of(error) == "AWS.SimpleQueueService.EmptyBatchRequest"
    big = sqs.create_queue(QueueName=unique(), Attributes={
        "MaximumMessageSize": str(1 << 20)})["QueueUrl"]
    body = "y" * (1 << 20)
    sqs.send_message(QueueUrl=big, MessageBody=body)
    assert sqs.receive_message(QueueUrl=big)["Messages"][0]["Body"] == body


def test_visibility_timeout_of_queue_and_change_visibility(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique(), Attributes={"VisibilityTimeout": "0"})[
        "QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="v")
    first = sqs.receive_message(QueueUrl=url)["Messages"][0]  # visible again at once
    second = sqs.receive_message(QueueUrl=url, VisibilityTimeout=600)["Messages"][0]
    assert second["MessageId"] == first["MessageId"]
    with pytest.raises(ClientError) as error:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"],
                                      VisibilityTimeout=10)
    assert code_of(error) == "AWS.SimpleQueueService.MessageNotInflight"
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=second["ReceiptHandle"],
                                  VisibilityTimeout=0)
    third = sqs.receive_message(QueueUrl=url, AttributeNames=["ApproximateReceiveCount"])
    assert third["Messages"][0]["Attributes"]["ApproximateReceiveCount"] == "3"


def _raw_long_poll(port: int, queue_url: str) -> socket.socket:
    body = json.dumps({"QueueUrl": queue_url, "WaitTimeSeconds": 20}).encode()
    request = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "X-Amz-Target: AmazonSQS.ReceiveMessage\r\n"
               "Content-Type: application/x-amz-json-1.0\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(request)
    return connection


async def _parked(broker: BrokerThread, name: str) -> bool:
    """True once a long poll waits on ``name`` (the broker has no event for it: poll the
    waiter table once a millisecond, at most five seconds)."""
    shared = broker.server.broker.shared_groups
    assert shared is not None
    for _ in range(5000):
        if (name, name) in shared.polls.waiters:
            return True
        await asyncio.sleep(0.001)
    return False


def test_a_vanished_long_poll_keeps_nothing(sqs: Any, broker: BrokerThread) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    waiting = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)  # queue exists, empty
    assert "Messages" not in waiting
    name = url.rsplit("/", 1)[1]
    connection = _raw_long_poll(broker.ports["sqs"], url)
    # the poll is parked on the broker (a waiter on the queue) before the client goes
    assert broker.call(_parked, broker, name)
    connection.close()
    sqs.send_message(QueueUrl=url, MessageBody="for the next one")
    got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5,
                              AttributeNames=["ApproximateReceiveCount"])["Messages"]
    assert got[0]["Body"] == "for the next one"
    assert got[0]["Attributes"]["ApproximateReceiveCount"] == "1"


def test_rate_limited_move_task_runs_in_background_and_cancels(sqs: Any) -> None:
    dlq = sqs.create_queue(QueueName=unique("dlq"))["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq,
                                       AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    source = sqs.create_queue(QueueName=unique("src"), Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 1})})[
        "QueueUrl"]
    sqs.send_message_batch(QueueUrl=source, Entries=[
        {"Id": str(i), "MessageBody": f"poison {i}"} for i in range(5)])
    sqs.receive_message(QueueUrl=source, MaxNumberOfMessages=10, VisibilityTimeout=0)
    assert "Messages" not in sqs.receive_message(QueueUrl=source)  # all dead-lettered
    handle = sqs.start_message_move_task(SourceArn=dlq_arn,
                                         MaxNumberOfMessagesPerSecond=1)["TaskHandle"]
    task = sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"][0]
    assert task["TaskHandle"] == handle and task["Status"] == "RUNNING"
    assert task["MaxNumberOfMessagesPerSecond"] == 1
    with pytest.raises(ClientError) as error:  # one running task per source queue
        sqs.start_message_move_task(SourceArn=dlq_arn)
    assert code_of(error) == "AWS.SimpleQueueService.UnsupportedOperation"
    moved_first = sqs.receive_message(QueueUrl=source, WaitTimeSeconds=5)["Messages"]
    assert moved_first[0]["Body"].startswith("poison")  # the first chunk (1 message)
    cancelled = sqs.cancel_message_move_task(TaskHandle=handle)
    assert cancelled["ApproximateNumberOfMessagesMoved"] in range(5)
    # the runner stops between chunks: CANCELLING while a chunk is still being moved,
    # then CANCELLED (the SQS API offers no event to wait on, so the test asks again)
    deadline = time.monotonic() + 10
    task = sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"][0]
    while task["Status"] == "CANCELLING" and time.monotonic() < deadline:
        time.sleep(0.05)
        task = sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"][0]
    assert task["Status"] == "CANCELLED"
    # what it did not move stayed in the DLQ, whole
    left = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                               VisibilityTimeout=0).get("Messages", [])
    assert 1 <= len(left) <= 4
    assert task["ApproximateNumberOfMessagesMoved"] + len(left) == 5
    with pytest.raises(ClientError) as error:
        sqs.cancel_message_move_task(TaskHandle="bm8tc3VjaC10YXNr")
    assert code_of(error) == "ResourceNotFoundException"


def test_fifo_long_poll_wakes_when_the_group_is_freed(sqs: Any, broker: BrokerThread) -> None:
    import threading

    url = fifo_queue(sqs, ContentBasedDeduplication="true")
    name = url.rsplit("/", 1)[1]
    for body in ("1", "2"):
        sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId="g")
    first = sqs.receive_message(QueueUrl=url)["Messages"][0]
    other = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}",
                         region_name="us-east-1", aws_access_key_id="a",
                         aws_secret_access_key="a")
    result: dict[str, Any] = {}
    poller = threading.Thread(target=lambda: result.update(
        other.receive_message(QueueUrl=url, WaitTimeSeconds=20)))
    poller.start()
    assert broker.call(_parked, broker, name)  # "2" waits behind "1" of its group
    deleted_at = time.monotonic()
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    poller.join(timeout=25)
    assert result["Messages"][0]["Body"] == "2"
    assert time.monotonic() - deleted_at < 5  # woken by the delete, not by the timeout
