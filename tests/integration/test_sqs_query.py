"""The SQS query/XML protocol (older SDKs): raw form-encoded requests against a real listener.

Goal: every action answers in the query protocol's XML shapes, flattened lists and
maps are read as AWS writes them, the MD5 digests match, and errors carry the legacy
codes in ``<ErrorResponse>``. Method: one broker per module in a background thread,
POSTs with httpx; queues addressed by QueueUrl and by the request path as old SDKs do.
"""

from __future__ import annotations

import hashlib
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conveyor.testing.server import BrokerThread

NS = {"sqs": "http://queue.amazonaws.com/doc/2012-11-05/"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data_dir: Path = tmp_path_factory.mktemp("sqs-query")
    with BrokerThread(data_dir, listeners=("sqs",)) as thread:
        yield thread


@pytest.fixture(scope="module")
def http(broker: BrokerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{broker.ports['sqs']}", timeout=30) as client:
        yield client


def call(http: httpx.Client, action: str, path: str = "/",
         **params: str) -> tuple[int, ElementTree.Element]:
    form = {"Action": action, "Version": "2012-11-05", **params}
    response = http.post(path, data=form)
    assert response.headers["content-type"] == "text/xml"
    return response.status_code, ElementTree.fromstring(response.content)


def ok(http: httpx.Client, action: str, path: str = "/", **params: str) -> ElementTree.Element:
    status, root = call(http, action, path, **params)
    assert status == 200, ElementTree.tostring(root)
    assert root.tag == f"{{{NS['sqs']}}}{action}Response"
    result = root.find(f"sqs:{action}Result", NS)
    assert result is not None
    return result


def text(node: ElementTree.Element, path: str) -> str:
    found = node.findtext(path, namespaces=NS)
    assert found is not None, path
    return found


def error(http: httpx.Client, action: str, **params: str) -> tuple[int, str]:
    status, root = call(http, action, **params)
    assert root.tag == f"{{{NS['sqs']}}}ErrorResponse"
    return status, text(root, "sqs:Error/sqs:Code")


def test_round_trip_with_attributes_in_xml(http: httpx.Client) -> None:
    name = f"query-{uuid.uuid4().hex[:8]}"
    url = text(ok(http, "CreateQueue", QueueName=name, **{
        "Attribute.1.Name": "VisibilityTimeout", "Attribute.1.Value": "45"}), "sqs:QueueUrl")
    assert url.endswith(f"/000000000000/{name}")
    sent = ok(http, "SendMessage", QueueUrl=url, MessageBody="héllo <xml> & co", **{
        "MessageAttribute.1.Name": "color", "MessageAttribute.1.Value.DataType": "String",
        "MessageAttribute.1.Value.StringValue": "blue",
        "MessageAttribute.2.Name": "raw", "MessageAttribute.2.Value.DataType": "Binary",
        "MessageAttribute.2.Value.BinaryValue": "AP8=",
    })
    assert text(sent, "sqs:MD5OfMessageBody") == hashlib.md5(
        "héllo <xml> & co".encode()).hexdigest()
    received = ok(http, "ReceiveMessage", QueueUrl=url, **{
        "AttributeName.1": "All", "MessageAttributeName.1": "All",
        "MaxNumberOfMessages": "10", "WaitTimeSeconds": "1"})
    messages = received.findall("sqs:Message", NS)
    assert len(messages) == 1
    message = messages[0]
    assert text(message, "sqs:Body") == "héllo <xml> & co"
    assert text(message, "sqs:MessageId") == text(sent, "sqs:MessageId")
    assert text(message, "sqs:MD5OfMessageAttributes") == text(
        sent, "sqs:MD5OfMessageAttributes")
    attributes = {text(a, "sqs:Name"): a for a in message.findall("sqs:MessageAttribute", NS)}
    assert text(attributes["color"], "sqs:Value/sqs:StringValue") == "blue"
    assert text(attributes["raw"], "sqs:Value/sqs:BinaryValue") == "AP8="
    system = {text(a, "sqs:Name"): text(a, "sqs:Value")
              for a in message.findall("sqs:Attribute", NS)}
    assert system["ApproximateReceiveCount"] == "1"
    ok(http, "DeleteMessage", QueueUrl=url, ReceiptHandle=text(message, "sqs:ReceiptHandle"))
    queue_attributes = ok(http, "GetQueueAttributes", QueueUrl=url, **{
        "AttributeName.1": "VisibilityTimeout", "AttributeName.2": "ApproximateNumberOfMessages"})
    values = {text(a, "sqs:Name"): text(a, "sqs:Value")
              for a in queue_attributes.findall("sqs:Attribute", NS)}
    assert values == {"VisibilityTimeout": "45", "ApproximateNumberOfMessages": "0"}


def test_queue_named_by_request_path_and_batches(http: httpx.Client) -> None:
    name = f"query-{uuid.uuid4().hex[:8]}"
    url = text(ok(http, "CreateQueue", QueueName=name), "sqs:QueueUrl")
    path = httpx.URL(url).path
    batch = ok(http, "SendMessageBatch", path, **{
        f"SendMessageBatchRequestEntry.{i}.{field}": value
        for i in range(1, 4)
        for field, value in (("Id", f"e{i}"), ("MessageBody", f"body {i}"))})
    assert [text(e, "sqs:Id") for e in batch.findall(
        "sqs:SendMessageBatchResultEntry", NS)] == ["e1", "e2", "e3"]
    received = ok(http, "ReceiveMessage", path, MaxNumberOfMessages="10")
    handles = [text(m, "sqs:ReceiptHandle") for m in received.findall("sqs:Message", NS)]
    assert len(handles) == 3
    changed = ok(http, "ChangeMessageVisibilityBatch", path, **{
        "ChangeMessageVisibilityBatchRequestEntry.1.Id": "c1",
        "ChangeMessageVisibilityBatchRequestEntry.1.ReceiptHandle": handles[0],
        "ChangeMessageVisibilityBatchRequestEntry.1.VisibilityTimeout": "60",
        "ChangeMessageVisibilityBatchRequestEntry.2.Id": "c2",
        "ChangeMessageVisibilityBatchRequestEntry.2.ReceiptHandle": "not-a-handle",
        "ChangeMessageVisibilityBatchRequestEntry.2.VisibilityTimeout": "60"})
    assert [text(e, "sqs:Id") for e in changed.findall(
        "sqs:ChangeMessageVisibilityBatchResultEntry", NS)] == ["c1"]
    failed = changed.findall("sqs:BatchResultErrorEntry", NS)
    assert [text(e, "sqs:Code") for e in failed] == ["ReceiptHandleIsInvalid"]
    assert text(failed[0], "sqs:SenderFault") == "true"
    deleted = ok(http, "DeleteMessageBatch", path, **{
        f"DeleteMessageBatchRequestEntry.{i}.{field}": value
        for i, handle in enumerate(handles, 1)
        for field, value in (("Id", f"d{i}"), ("ReceiptHandle", handle))})
    assert len(deleted.findall("sqs:DeleteMessageBatchResultEntry", NS)) == 3


def test_listing_tags_and_queue_management(http: httpx.Client) -> None:
    prefix = f"qlist-{uuid.uuid4().hex[:8]}"
    urls = [text(ok(http, "CreateQueue", QueueName=f"{prefix}-{i}", **{
        "Tag.1.Key": "team", "Tag.1.Value": "ops"}), "sqs:QueueUrl") for i in range(3)]
    listed = ok(http, "ListQueues", QueueNamePrefix=prefix, MaxResults="2")
    assert [u.text for u in listed.findall("sqs:QueueUrl", NS)] == urls[:2]
    rest = ok(http, "ListQueues", QueueNamePrefix=prefix,
              NextToken=text(listed, "sqs:NextToken"))
    assert [u.text for u in rest.findall("sqs:QueueUrl", NS)] == urls[2:]
    ok(http, "TagQueue", QueueUrl=urls[0], **{"Tag.1.Key": "env", "Tag.1.Value": "ci"})
    ok(http, "UntagQueue", QueueUrl=urls[0], **{"TagKey.1": "team"})
    tags = ok(http, "ListQueueTags", QueueUrl=urls[0])
    assert {text(t, "sqs:Key"): text(t, "sqs:Value")
            for t in tags.findall("sqs:Tag", NS)} == {"env": "ci"}
    ok(http, "SetQueueAttributes", QueueUrl=urls[0], **{
        "Attribute.1.Name": "DelaySeconds", "Attribute.1.Value": "3"})
    ok(http, "AddPermission", QueueUrl=urls[0], Label="l", **{
        "AWSAccountId.1": "111122223333", "ActionName.1": "SendMessage"})
    ok(http, "RemovePermission", QueueUrl=urls[0], Label="l")
    ok(http, "PurgeQueue", QueueUrl=urls[0])
    assert text(ok(http, "GetQueueUrl", QueueName=f"{prefix}-1"), "sqs:QueueUrl") == urls[1]
    ok(http, "DeleteQueue", QueueUrl=urls[1])
    assert error(http, "GetQueueUrl", QueueName=f"{prefix}-1") == (
        400, "AWS.SimpleQueueService.NonExistentQueue")


def test_errors_in_the_query_shape(http: httpx.Client) -> None:
    assert error(http, "NoSuchAction") == (400, "InvalidAction")
    assert error(http, "CreateQueue") == (400, "MissingParameter")
    assert error(http, "CreateQueue", QueueName="bad/name") == (400, "InvalidParameterValue")
    url = text(ok(http, "CreateQueue", QueueName=f"qerr-{uuid.uuid4().hex[:8]}"),
               "sqs:QueueUrl")
    assert error(http, "ReceiveMessage", QueueUrl=url, MaxNumberOfMessages="eleven") == (
        400, "InvalidParameterValue")
    assert error(http, "DeleteMessage", QueueUrl=url, ReceiptHandle="x") == (
        400, "ReceiptHandleIsInvalid")
    assert error(http, "SendMessage", QueueUrl=url, MessageBody="\x00") == (
        400, "InvalidMessageContents")
    assert error(http, "SendMessageBatch", QueueUrl=url, **{
        "SendMessageBatchRequestEntry.1.Id": "same",
        "SendMessageBatchRequestEntry.1.MessageBody": "a",
        "SendMessageBatchRequestEntry.2.Id": "same",
        "SendMessageBatchRequestEntry.2.MessageBody": "b"}) == (
        400, "AWS.SimpleQueueService.BatchEntryIdsNotDistinct")
    ok(http, "PurgeQueue", QueueUrl=url)
    assert error(http, "PurgeQueue", QueueUrl=url) == (
        403, "AWS.SimpleQueueService.PurgeQueueInProgress")
    malformed = http.post("/", content=b"Action=SendMessage&%zz",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert malformed.status_code == 400


def test_an_oversized_request_is_refused_in_its_own_protocol(broker: BrokerThread) -> None:
    import json
    import socket

    def send_oversized(headers: str) -> bytes:
        with socket.create_connection(("127.0.0.1", broker.ports["sqs"])) as connection:
            connection.sendall((f"POST / HTTP/1.1\r\nHost: x\r\n{headers}"
                                f"Content-Length: {17 << 20}\r\n\r\n").encode())
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
            return answer

    query = send_oversized("Content-Type: application/x-www-form-urlencoded\r\n")
    assert query.startswith(b"HTTP/1.1 413") and b"<ErrorResponse" in query
    json_answer = send_oversized("X-Amz-Target: AmazonSQS.SendMessage\r\n"
                                 "Content-Type: application/x-amz-json-1.0\r\n")
    head, _, body = json_answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["__type"] == "com.amazonaws.sqs#InvalidParameterValue"


def test_dead_letter_actions_and_visibility_in_xml(http: httpx.Client) -> None:
    suffix = uuid.uuid4().hex[:8]
    dlq = text(ok(http, "CreateQueue", QueueName=f"qdlq-{suffix}"), "sqs:QueueUrl")
    dlq_arn = text(ok(http, "GetQueueAttributes", QueueUrl=dlq, **{
        "AttributeName.1": "QueueArn"}), "sqs:Attribute/sqs:Value")
    policy = f'{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"1"}}'
    source = text(ok(http, "CreateQueue", QueueName=f"qsrc-{suffix}", **{
        "Attribute.1.Name": "RedrivePolicy", "Attribute.1.Value": policy}), "sqs:QueueUrl")
    ok(http, "SendMessage", QueueUrl=source, MessageBody="poison")
    handle = text(ok(http, "ReceiveMessage", QueueUrl=source), "sqs:Message/sqs:ReceiptHandle")
    ok(http, "ChangeMessageVisibility", QueueUrl=source, ReceiptHandle=handle,
       VisibilityTimeout="0")  # released after its one allowed receive: dead-lettered
    assert ok(http, "ReceiveMessage", QueueUrl=source).find("sqs:Message", NS) is None
    sources = ok(http, "ListDeadLetterSourceQueues", QueueUrl=dlq)
    assert [u.text for u in sources.findall("sqs:QueueUrl", NS)] == [source]
    task = text(ok(http, "StartMessageMoveTask", SourceArn=dlq_arn), "sqs:TaskHandle")
    tasks = ok(http, "ListMessageMoveTasks", SourceArn=dlq_arn).findall(
        "sqs:ListMessageMoveTasksResultEntry", NS)
    assert [(text(t, "sqs:TaskHandle"), text(t, "sqs:Status")) for t in tasks] == [
        (task, "COMPLETED")]
    assert text(tasks[0], "sqs:ApproximateNumberOfMessagesMoved") == "1"
    assert error(http, "CancelMessageMoveTask", TaskHandle=task) == (
        400, "InvalidParameterValue")
    back = ok(http, "ReceiveMessage", QueueUrl=source, WaitTimeSeconds="2")
    assert text(back, "sqs:Message/sqs:Body") == "poison"
