"""SQS security with boto3: SigV4 against per-user access keys, permissions per action.

Goal: with ``--auth required``, boto3 signing with alice's access key may receive from
queue ``a`` and gets AccessDenied (403) for ``b`` and for sending (alice may only
read); a wrong secret is SignatureDoesNotMatch, an unknown key InvalidClientTokenId,
no signature MissingAuthenticationToken, in the JSON protocol (boto3's default) and
the query protocol (XML) alike. ListQueues shows only what the user may see.
Method: one broker thread (sqs listener) with the users of security_support; the
query-protocol requests are signed with botocore's SigV4Auth and sent with urllib.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from security_support import SecureBroker


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path_factory.mktemp("sqs-security"), ("sqs",)) as thread:
        thread.setup_users()
        yield thread


def _client(broker: SecureBroker, key: str, secret: str) -> Any:
    return boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}",
                        region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret)


def _code(error: botocore.exceptions.ClientError) -> tuple[str, int]:
    return error.response["Error"]["Code"], error.response["ResponseMetadata"][
        "HTTPStatusCode"]


def test_allowed_queue_and_refused_actions(broker: SecureBroker) -> None:
    sqs = _client(broker, *broker.alice_key)
    url_a = sqs.get_queue_url(QueueName="a")["QueueUrl"]
    received = sqs.receive_message(QueueUrl=url_a, WaitTimeSeconds=1)
    assert received["Messages"][0]["Body"].startswith("a-")
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        sqs.receive_message(QueueUrl=url_a.rsplit("/", 1)[0] + "/b")
    assert _code(refused.value) == ("AccessDenied", 403)
    assert "sqs:ReceiveMessage" in refused.value.response["Error"]["Message"]
    with pytest.raises(botocore.exceptions.ClientError) as send:
        sqs.send_message(QueueUrl=url_a, MessageBody="no write permission")
    assert _code(send.value) == ("AccessDenied", 403)
    assert [url.rsplit("/", 1)[-1] for url in sqs.list_queues().get("QueueUrls", [])] == ["a"]


def test_wrong_secret_and_unknown_key(broker: SecureBroker) -> None:
    key, _ = broker.alice_key
    with pytest.raises(botocore.exceptions.ClientError) as wrong:
        _client(broker, key, "not-the-secret").list_queues()
    assert _code(wrong.value) == ("SignatureDoesNotMatch", 403)
    with pytest.raises(botocore.exceptions.ClientError) as unknown:
        _client(broker, "AKIDNOBODY", "x").list_queues()
    assert _code(unknown.value) == ("InvalidClientTokenId", 403)


def _query(broker: SecureBroker, body: bytes, key: str | None, secret: str = "") -> tuple[
        int, str]:
    url = f"http://127.0.0.1:{broker.ports['sqs']}/"
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if key is not None:
        request = AWSRequest(method="POST", url=url, data=body, headers=headers)
        SigV4Auth(Credentials(key, secret), "sqs", "us-east-1").add_auth(request)
        headers = dict(request.headers.items())
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers)) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_query_protocol_errors_are_xml(broker: SecureBroker) -> None:
    key, secret = broker.alice_key
    body = b"Action=ListQueues&Version=2012-11-05"
    status, text = _query(broker, body, key, secret)
    assert status == 200 and "/a</QueueUrl>" in text and "/b</QueueUrl>" not in text
    status, text = _query(broker, body, key, "wrong")
    assert status == 403 and "<Code>SignatureDoesNotMatch</Code>" in text
    status, text = _query(broker, body, None)
    assert status == 403 and "<Code>MissingAuthenticationToken</Code>" in text
    status, text = _query(broker, b"Action=PurgeQueue&QueueUrl=b", key, secret)
    assert status == 403 and "<Code>AccessDenied</Code>" in text
