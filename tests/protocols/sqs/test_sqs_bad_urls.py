"""A QueueUrl or request target that urllib cannot split (found by the SQS fuzz run).

Goal: an unbalanced "[" (urllib reads it as a malformed IPv6 host and raises
ValueError) is answered in SQS's own terms, never as InternalError with a traceback.
Method: the sans-IO codec for the request target; a real listener and boto3-free raw
query requests for the QueueUrl.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from conveyor.protocols.sqs.codec import decode_request
from conveyor.protocols.sqs.errors import InvalidParameterValue
from conveyor.protocols.sqs.framing import HttpRequest
from conveyor.testing.server import run_broker


def test_request_target_that_is_not_a_url_is_invalid_parameter() -> None:
    request = HttpRequest("POST", "http://[bad/?Action=ListQueues",
                          {"content-type": "application/x-www-form-urlencoded"}, b"", True)
    with pytest.raises(InvalidParameterValue):
        decode_request(request)


async def test_queue_url_that_is_not_a_url_is_queue_does_not_exist(tmp_path: Path) -> None:
    async with run_broker(tmp_path / "data", listeners=("sqs",)) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports['sqs']}") as http:
            body = urlencode({"Action": "SendMessage", "MessageBody": "x",
                              "QueueUrl": "http://127[.0.0.1:1/000000000000/q"})
            answer = await http.post("/", content=body, headers={
                "Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 400, answer.text
    assert b"NonExistentQueue" in answer.content, answer.text
