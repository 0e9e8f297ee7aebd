"""Celery and kombu with their SQS transport against Conveyor, unchanged.

Goal: Celery's ``sqs://`` broker with ``predefined_queues`` pointing at Conveyor's queue
URLs runs tasks, including one that retries twice (``self.retry(countdown=0)``), and
kombu's SQS transport publishes and consumes (predefined and self-created queues).
Method: a real worker subprocess (``--pool=solo``, which drives kombu's asynchronous
SQS client: pycurl) against a broker thread; each task reports by sending a message to
a second queue that the test long-polls with boto3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from celery import Celery
from kombu import Connection
from sqs_celery_app import ADD, FLAKY, make_app

from conveyor.testing.server import BrokerThread

REPORT_TIMEOUT_S = 20
SHUTDOWN_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("sqs-celery"), listeners=("sqs",)) as thread:
        yield thread


@pytest.fixture(scope="module")
def sqs(broker: BrokerThread) -> Any:
    return boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}",
                        region_name="us-east-1", aws_access_key_id="t",
                        aws_secret_access_key="t")


@pytest.fixture(scope="module")
def worker(broker: BrokerThread, sqs: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    queue = f"celery-{uuid.uuid4().hex[:8]}"
    queue_url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    report_url = sqs.create_queue(QueueName=f"{queue}-report")["QueueUrl"]
    log_path = tmp_path_factory.mktemp("celery-sqs") / "worker.log"
    environment = {
        **os.environ,
        "CONVEYOR_SQS_PORT": str(broker.ports["sqs"]),
        "CONVEYOR_SQS_QUEUE": queue,
        "CONVEYOR_SQS_QUEUE_URL": queue_url,
        "CONVEYOR_SQS_REPORT_URL": report_url,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "sqs_celery_app", "worker",
             "--pool=solo", "-c", "1", "-Q", queue, "-n", f"{queue}@localhost",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
            stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    app = make_app(broker.ports["sqs"], queue, queue_url)
    try:
        yield {"app": app, "report_url": report_url, "log": log_path}
    finally:
        app.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=SHUTDOWN_TIMEOUT_S)


def next_report(sqs: Any, worker: dict[str, Any]) -> dict[str, Any]:
    """The next report a task sent, waiting with SQS long polls (never a sleep)."""
    for _ in range(REPORT_TIMEOUT_S // 5):
        answer = sqs.receive_message(QueueUrl=worker["report_url"], WaitTimeSeconds=5)
        for message in answer.get("Messages", []):
            sqs.delete_message(QueueUrl=worker["report_url"],
                               ReceiptHandle=message["ReceiptHandle"])
            report: dict[str, Any] = json.loads(message["Body"])
            return report
    raise AssertionError("no report from the worker; its log:\n" + worker["log"].read_text())


def test_celery_task_and_retry_over_sqs(sqs: Any, worker: dict[str, Any]) -> None:
    app: Celery = worker["app"]
    app.send_task(ADD, args=(2, 3))
    assert next_report(sqs, worker) == {"task": "add", "result": 5}
    app.send_task(FLAKY, args=("retry-me",))
    assert next_report(sqs, worker) == {"task": "flaky", "label": "retry-me", "attempts": 3}


def test_kombu_sqs_transport_with_predefined_and_created_queues(
        broker: BrokerThread, sqs: Any) -> None:
    port = broker.ports["sqs"]
    name = f"kombu-{uuid.uuid4().hex[:8]}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    options = {"region": "us-east-1", "is_secure": False, "wait_time_seconds": 1,
               "predefined_queues": {name: {"url": url, "access_key_id": "k",
                                            "secret_access_key": "k"}}}
    with Connection(f"sqs://k:k@127.0.0.1:{port}", transport_options=options) as connection:
        queue = connection.SimpleQueue(name)
        queue.put({"hello": "kombu"}, headers={"trace": "t-1"})
        message = queue.get(timeout=10)
        assert message.payload == {"hello": "kombu"}
        assert message.headers["trace"] == "t-1"
        message.ack()
        queue.close()
    assert "Messages" not in sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)
    # without predefined_queues kombu creates (and finds) its queues itself
    plain = {"region": "us-east-1", "is_secure": False, "wait_time_seconds": 1}
    created = f"kombu-made-{uuid.uuid4().hex[:8]}"
    with Connection(f"sqs://k:k@127.0.0.1:{port}", transport_options=plain) as connection:
        queue = connection.SimpleQueue(created)
        queue.put("plain text")
        assert queue.get(timeout=10).payload == "plain text"
        queue.close()
    assert sqs.get_queue_url(QueueName=created)["QueueUrl"].endswith("/" + created)
