"""boto3 against a real Conveyor SQS listener on a free port (AWS JSON 1.0 protocol).

Goal: every action and the documented semantics answer as AWS does, as botocore
parses them. Method: one broker per module in a background thread; each test uses
its own queue names; waits are the server's own long polls, never sleeps.
"""

from __future__ import annotations

import hashlib
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
    data_dir: Path = tmp_path_factory.mktemp("sqs-boto3")
    with BrokerThread(data_dir, listeners=("sqs",)) as thread:
        yield thread


@pytest.fixture(scope="module")
def sqs(broker: BrokerThread) -> Any:
    return boto3.client(
        "sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}", region_name="us-east-1",
        aws_access_key_id="any", aws_secret_access_key="any",
        config=Config(retries={"max_attempts": 1}),
    )


def unique(prefix: str = "q") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def error_code(error: pytest.ExceptionInfo[ClientError]) -> str:
    code: str = error.value.response["Error"]["Code"]
    return code


def test_create_send_receive_delete_round_trip(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sent = sqs.send_message(QueueUrl=url, MessageBody="hello", MessageAttributes={
        "color": {"DataType": "String", "StringValue": "blue"},
        "count": {"DataType": "Number", "StringValue": "3"},
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00\xff"},
    })
    assert sent["MD5OfMessageBody"] == hashlib.md5(b"hello").hexdigest()
    received = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"],
                                   AttributeNames=["All"], WaitTimeSeconds=1)["Messages"]
    assert len(received) == 1
    message = received[0]
    assert message["Body"] == "hello"
    assert message["MessageId"] == sent["MessageId"]
    assert message["MD5OfMessageAttributes"] == sent["MD5OfMessageAttributes"]
    assert message["MessageAttributes"]["blob"]["BinaryValue"] == b"\x00\xff"
    assert message["MessageAttributes"]["count"] == {"DataType": "Number", "StringValue": "3"}
    assert message["Attributes"]["ApproximateReceiveCount"] == "1"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert "Messages" not in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)


def test_md5_of_message_attributes_matches_aws_reference(sqs: Any) -> None:
    # AWS's digest of one String attribute computed by hand from the documented layout.
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sent = sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes={
        "a": {"DataType": "String", "StringValue": "b"}})
    expected = hashlib.md5(b"\x00\x00\x00\x01a\x00\x00\x00\x06String\x01\x00\x00\x00\x01b")
    assert sent["MD5OfMessageAttributes"] == expected.hexdigest()


def test_create_queue_is_idempotent_only_with_equal_attributes(sqs: Any) -> None:
    name = unique()
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "40"})["QueueUrl"]
    again = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "40"})
    assert again["QueueUrl"] == url
    with pytest.raises(ClientError) as error:
        sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "41"})
    assert error_code(error) == "QueueAlreadyExists"
    assert sqs.get_queue_url(QueueName=name)["QueueUrl"] == url


def test_unknown_queue_and_bad_input_answer_aws_errors(sqs: Any) -> None:
    with pytest.raises(sqs.exceptions.QueueDoesNotExist) as missing:
        sqs.get_queue_url(QueueName=unique())
    assert error_code(missing) == "AWS.SimpleQueueService.NonExistentQueue"
    with pytest.raises(ClientError) as bad_name:
        sqs.create_queue(QueueName="bad name!")
    assert error_code(bad_name) == "InvalidParameterValue"
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    with pytest.raises(ClientError) as garbage:
        sqs.delete_message(QueueUrl=url, ReceiptHandle="garbage")
    assert error_code(garbage) == "ReceiptHandleIsInvalid"
    with pytest.raises(ClientError) as too_many:
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=11)
    assert error_code(too_many) == "InvalidParameterValue"
    with pytest.raises(ClientError) as invalid_body:
        sqs.send_message(QueueUrl=url, MessageBody="\x01")
    assert error_code(invalid_body) == "InvalidMessageContents"


def test_list_queues_prefix_and_pagination(sqs: Any) -> None:
    prefix = unique("list")
    for index in range(3):
        sqs.create_queue(QueueName=f"{prefix}-{index}")
    first = sqs.list_queues(QueueNamePrefix=prefix, MaxResults=2)
    assert len(first["QueueUrls"]) == 2
    second = sqs.list_queues(QueueNamePrefix=prefix, MaxResults=2, NextToken=first["NextToken"])
    assert [url.rsplit("/", 1)[1] for url in second["QueueUrls"]] == [f"{prefix}-2"]
    assert "NextToken" not in second


def test_queue_attributes_counts_and_set(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="a")
    sqs.send_message(QueueUrl=url, MessageBody="b")
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=900)
    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1)
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "1"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "1"
    assert attributes["ApproximateNumberOfMessagesDelayed"] == "1"
    assert attributes["QueueArn"].startswith("arn:aws:sqs:us-east-1:000000000000:")
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "5"})
    one = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout"])
    assert one["Attributes"] == {"VisibilityTimeout": "5"}
    with pytest.raises(ClientError) as error:
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Nope"])
    assert error_code(error) == "InvalidAttributeName"


def test_purge_queue_once_per_minute(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="a")
    sqs.purge_queue(QueueUrl=url)
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
    with pytest.raises(ClientError) as error:
        sqs.purge_queue(QueueUrl=url)
    assert error_code(error) == "AWS.SimpleQueueService.PurgeQueueInProgress"


def test_batches_send_delete_and_change_visibility(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sent = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": str(index), "MessageBody": f"m{index}"} for index in range(10)])
    assert len(sent["Successful"]) == 10 and not sent.get("Failed")
    received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert sorted(m["Body"] for m in received) == sorted(f"m{i}" for i in range(10))
    changed = sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
        {"Id": "a", "ReceiptHandle": received[0]["ReceiptHandle"], "VisibilityTimeout": 0},
        {"Id": "b", "ReceiptHandle": "garbage", "VisibilityTimeout": 10}])
    assert [e["Id"] for e in changed["Successful"]] == ["a"]
    assert changed["Failed"][0]["Code"] == "ReceiptHandleIsInvalid"
    deleted = sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": f"d{i}", "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(received[1:])])
    assert len(deleted["Successful"]) == 9
    again = sqs.receive_message(QueueUrl=url, AttributeNames=["ApproximateReceiveCount"])
    assert again["Messages"][0]["Body"] == received[0]["Body"]
    assert again["Messages"][0]["Attributes"]["ApproximateReceiveCount"] == "2"
    with pytest.raises(ClientError) as error:
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": "x", "MessageBody": "1"}, {"Id": "x", "MessageBody": "2"}])
    assert error_code(error) == "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"
    with pytest.raises(ClientError) as error:
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "MessageBody": "1"} for i in range(11)])
    assert error_code(error) == "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"


def test_receipt_handles_change_and_expire_with_the_lock(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="a")
    first = sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)["Messages"][0]
    second = sqs.receive_message(QueueUrl=url, VisibilityTimeout=30)["Messages"][0]
    assert first["ReceiptHandle"] != second["ReceiptHandle"]
    with pytest.raises(ClientError) as error:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    assert error_code(error) == "ReceiptHandleIsInvalid"
    other = sqs.create_queue(QueueName=unique())["QueueUrl"]
    with pytest.raises(ClientError) as error:
        sqs.delete_message(QueueUrl=other, ReceiptHandle=second["ReceiptHandle"])
    assert error_code(error) == "ReceiptHandleIsInvalid"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=second["ReceiptHandle"])


def test_long_poll_is_woken_by_a_send(sqs: Any, broker: BrokerThread) -> None:
    import threading

    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sender = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}",
                          region_name="us-east-1", aws_access_key_id="a",
                          aws_secret_access_key="a")
    result: dict[str, Any] = {}
    poller = threading.Thread(target=lambda: result.update(
        sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20)))
    started = time.monotonic()
    poller.start()
    sender.send_message(QueueUrl=url, MessageBody="wake")
    poller.join(timeout=25)
    assert result["Messages"][0]["Body"] == "wake"
    assert time.monotonic() - started < 10


def test_fifo_order_dedup_and_group_in_flight(sqs: Any) -> None:
    name = unique("fifo") + ".fifo"
    url = sqs.create_queue(QueueName=name, Attributes={
        "FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
    for body in ("1", "2", "3"):
        sent = sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId="g")
        assert sent["SequenceNumber"].isdigit()
    sqs.send_message(QueueUrl=url, MessageBody="1", MessageGroupId="g")  # duplicate
    first = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1,
                                AttributeNames=["All"])["Messages"]
    assert [m["Body"] for m in first] == ["1"]
    assert first[0]["Attributes"]["MessageGroupId"] == "g"
    assert "Messages" not in sqs.receive_message(QueueUrl=url)  # the group is in flight
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first[0]["ReceiptHandle"])
    for expected in ("2", "3"):  # Conveyor hands out one message of a group at a time
        rest = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        assert [m["Body"] for m in rest] == [expected]
        sqs.delete_message(QueueUrl=url, ReceiptHandle=rest[0]["ReceiptHandle"])
    with pytest.raises(ClientError) as error:
        sqs.send_message(QueueUrl=url, MessageBody="x")
    assert error_code(error) == "MissingParameter"


def test_redrive_policy_moves_to_dlq_and_move_task_brings_back(sqs: Any) -> None:
    dlq = sqs.create_queue(QueueName=unique("dlq"))["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq,
                                       AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    source = sqs.create_queue(QueueName=unique("src"), Attributes={
        "RedrivePolicy": f'{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"1"}}'})[
        "QueueUrl"]
    sqs.send_message(QueueUrl=source, MessageBody="poison")
    sqs.receive_message(QueueUrl=source, VisibilityTimeout=0)
    assert "Messages" not in sqs.receive_message(QueueUrl=source)
    dead = sqs.receive_message(QueueUrl=dlq, VisibilityTimeout=0, WaitTimeSeconds=2)
    assert dead["Messages"][0]["Body"] == "poison"
    sources = sqs.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"]
    assert sources == [source]
    handle = sqs.start_message_move_task(SourceArn=dlq_arn)["TaskHandle"]
    tasks = sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"]
    assert tasks[0]["TaskHandle"] == handle and tasks[0]["Status"] == "COMPLETED"
    back = sqs.receive_message(QueueUrl=source, WaitTimeSeconds=2)["Messages"]
    assert back[0]["Body"] == "poison"


def test_tags_and_permissions(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique(), tags={"team": "a"})["QueueUrl"]
    sqs.tag_queue(QueueUrl=url, Tags={"env": "ci"})
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "a", "env": "ci"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["team"])
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"env": "ci"}
    sqs.add_permission(QueueUrl=url, Label="l", AWSAccountIds=["111122223333"],
                       Actions=["SendMessage"])
    sqs.remove_permission(QueueUrl=url, Label="l")
    with pytest.raises(ClientError):
        sqs.remove_permission(QueueUrl=url, Label="l")


def test_delete_queue(sqs: Any) -> None:
    url = sqs.create_queue(QueueName=unique())["QueueUrl"]
    sqs.delete_queue(QueueUrl=url)
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
