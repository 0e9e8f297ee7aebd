"""The SQS codec without sockets: both protocols decode to one shape; answers and errors
come out in each protocol's own form.

Method: build HttpRequest values by hand, decode, and check the structure; encode
results and errors and parse the bytes back with json / ElementTree.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode
from xml.etree import ElementTree

import pytest

from conveyor.protocols.sqs.attributes import md5_of_attributes, parse_message_attributes
from conveyor.protocols.sqs.codec import decode_request, encode_error, encode_result
from conveyor.protocols.sqs.errors import (
    InvalidAction,
    InvalidParameterValue,
    MissingParameter,
    QueueDoesNotExist,
)
from conveyor.protocols.sqs.framing import HttpRequest, RequestFramer

NS = "{http://queue.amazonaws.com/doc/2012-11-05/}"


def form(**fields: str) -> HttpRequest:
    body = urlencode(fields).encode()
    return HttpRequest("POST", "/000000000000/q", {
        "content-type": "application/x-www-form-urlencoded"}, body, True)


def json_request(action: str, body: bytes) -> HttpRequest:
    return HttpRequest("POST", "/", {"x-amz-target": f"AmazonSQS.{action}",
                                     "content-type": "application/x-amz-json-1.0"}, body, True)


def test_query_flattened_lists_and_maps_become_the_json_shape() -> None:
    request = decode_request(form(**{
        "Action": "SendMessageBatch", "Version": "2012-11-05",
        "SendMessageBatchRequestEntry.2.Id": "b",
        "SendMessageBatchRequestEntry.2.MessageBody": "two",
        "SendMessageBatchRequestEntry.1.Id": "a",
        "SendMessageBatchRequestEntry.1.MessageBody": "one",
        "SendMessageBatchRequestEntry.1.DelaySeconds": "5",
        "SendMessageBatchRequestEntry.1.MessageAttribute.1.Name": "k",
        "SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.DataType": "String",
        "SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.StringValue": "v",
    }))
    assert request.protocol == "query" and request.path == "/000000000000/q"
    assert request.params == {"Entries": [
        {"Id": "a", "MessageBody": "one", "DelaySeconds": 5, "MessageAttributes": {
            "k": {"DataType": "String", "StringValue": "v"}}},
        {"Id": "b", "MessageBody": "two"},
    ]}
    attributes = decode_request(form(**{
        "Action": "ReceiveMessage", "AttributeName.1": "All", "MaxNumberOfMessages": "10",
        "Attribute.1.Name": "VisibilityTimeout", "Attribute.1.Value": "3"}))
    assert attributes.params == {"AttributeNames": ["All"], "MaxNumberOfMessages": 10,
                                 "Attributes": {"VisibilityTimeout": "3"}}


def test_query_without_action_or_with_conflicting_keys_is_rejected() -> None:
    with pytest.raises(MissingParameter):
        decode_request(form(QueueName="q"))
    with pytest.raises(InvalidParameterValue):
        decode_request(form(**{"Action": "X", "Attribute.1": "a", "Attribute.1.Name": "b"}))


def test_json_target_and_body_are_checked() -> None:
    request = decode_request(json_request("ListQueues", b'{"MaxResults": 2}'))
    assert (request.protocol, request.action, request.params) == (
        "json", "ListQueues", {"MaxResults": 2})
    with pytest.raises(InvalidParameterValue):
        decode_request(json_request("ListQueues", b"{not json"))
    with pytest.raises(InvalidParameterValue):
        decode_request(json_request("ListQueues", b"[1]"))
    bad_target = HttpRequest("POST", "/", {"x-amz-target": "Other.X"}, b"{}", True)
    with pytest.raises(InvalidAction):
        decode_request(bad_target)


def test_xml_result_uses_aws_element_names() -> None:
    request = decode_request(form(Action="ReceiveMessage"))
    response = encode_result(request, {"Messages": [{
        "MessageId": "m", "Body": "<b>", "Attributes": {"SentTimestamp": "1"},
        "MessageAttributes": {"k": {"DataType": "String", "StringValue": "v"}}}]})
    root = ElementTree.fromstring(response.body)
    message = root.find(f"{NS}ReceiveMessageResult/{NS}Message")
    assert message is not None
    assert message.findtext(f"{NS}Body") == "<b>"
    assert message.findtext(f"{NS}Attribute/{NS}Name") == "SentTimestamp"
    assert message.findtext(f"{NS}MessageAttribute/{NS}Value/{NS}StringValue") == "v"
    batch = encode_result(decode_request(form(Action="DeleteMessageBatch")),
                          {"Successful": [{"Id": "a"}], "Failed": []})
    assert b"<DeleteMessageBatchResultEntry><Id>a</Id>" in batch.body


def test_errors_in_each_protocol() -> None:
    error = QueueDoesNotExist("The specified queue does not exist.")
    as_json = encode_error("json", error, "rid")
    assert as_json.status == 400
    assert json.loads(as_json.body)["__type"] == "com.amazonaws.sqs#QueueDoesNotExist"
    assert ("x-amzn-query-error", "AWS.SimpleQueueService.NonExistentQueue;Sender") in (
        as_json.headers)
    as_xml = encode_error("query", error, "rid")
    root = ElementTree.fromstring(as_xml.body)
    assert root.findtext(f"{NS}Error/{NS}Code") == "AWS.SimpleQueueService.NonExistentQueue"
    assert root.findtext(f"{NS}Error/{NS}Type") == "Sender"


def test_md5_of_attributes_follows_the_documented_layout() -> None:
    attributes = parse_message_attributes({
        "b": {"DataType": "Binary", "BinaryValue": "AP8="},
        "a": {"DataType": "Number", "StringValue": "1"}})
    import hashlib

    expected = hashlib.md5(
        b"\x00\x00\x00\x01a\x00\x00\x00\x06Number\x01\x00\x00\x00\x011"
        b"\x00\x00\x00\x01b\x00\x00\x00\x06Binary\x02\x00\x00\x00\x02\x00\xff").hexdigest()
    assert md5_of_attributes(attributes) == expected
    with pytest.raises(InvalidParameterValue):
        parse_message_attributes({"a": {"DataType": "Number", "StringValue": "x"}})
    with pytest.raises(InvalidParameterValue):
        parse_message_attributes({f"a{i}": {"DataType": "String", "StringValue": "v"}
                                  for i in range(11)})


def test_framer_splits_pipelined_requests_byte_by_byte() -> None:
    raw = (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nAction=Xy"
           b"GET /?Action=ListQueues HTTP/1.1\r\nHost: h\r\n\r\n")
    framer = RequestFramer()
    requests = []
    for index in range(len(raw)):
        requests.extend(framer.receive_data(raw[index:index + 1])[0])
    assert [(r.method, r.body) for r in requests] == [("POST", b"Action=Xy"), ("GET", b"")]
    assert decode_request(requests[1]).action == "ListQueues"
