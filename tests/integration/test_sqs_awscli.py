"""The aws CLI (``awscli`` from PyPI) against Conveyor's SQS listener, unchanged.

Goal: create-queue, send-message, receive-message and delete-message round-trip with
``--endpoint-url``, the output parsed as the CLI prints it (JSON). Method: one broker
thread; the CLI runs as a subprocess of this interpreter (``python -m awscli``) with
throw-away credentials in its environment and no config file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.testing.server import BrokerThread


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    home: Path = tmp_path_factory.mktemp("awscli-home")
    with BrokerThread(tmp_path_factory.mktemp("sqs-awscli"), listeners=("sqs",)) as broker:
        environment = {
            **os.environ, "HOME": str(home), "AWS_ACCESS_KEY_ID": "cli",
            "AWS_SECRET_ACCESS_KEY": "cli", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(home / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        }

        def run(*arguments: str) -> Any:
            completed = subprocess.run(
                [sys.executable, "-m", "awscli", "sqs", *arguments, "--endpoint-url",
                 f"http://127.0.0.1:{broker.ports['sqs']}", "--output", "json"],
                env=environment, capture_output=True, text=True, timeout=60)
            assert completed.returncode == 0, completed.stderr
            return json.loads(completed.stdout) if completed.stdout.strip() else None

        yield run


def test_create_send_receive_delete(aws: Callable[..., Any]) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    url = aws("create-queue", "--queue-name", name)["QueueUrl"]
    assert url.endswith("/" + name)
    sent = aws("send-message", "--queue-url", url, "--message-body", "from the cli",
               "--message-attributes", '{"who": {"DataType": "String", "StringValue": "cli"}}')
    assert sent["MD5OfMessageBody"] == hashlib.md5(b"from the cli").hexdigest()
    received = aws("receive-message", "--queue-url", url, "--wait-time-seconds", "2",
                   "--message-attribute-names", "All")["Messages"]
    assert [m["Body"] for m in received] == ["from the cli"]
    assert received[0]["MessageAttributes"]["who"]["StringValue"] == "cli"
    # "=": a handle may begin with "-", which the CLI's argparse would take for an option
    assert aws("delete-message", "--queue-url", url,
               f"--receipt-handle={received[0]['ReceiptHandle']}") is None
    assert aws("receive-message", "--queue-url", url) is None  # empty: the CLI prints nothing
    attributes = aws("get-queue-attributes", "--queue-url", url, "--attribute-names", "All")
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "0"
