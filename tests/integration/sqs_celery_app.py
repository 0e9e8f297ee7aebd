"""A small Celery app for test_sqs_celery.py: its broker is Conveyor's SQS listener
(``sqs://`` with ``predefined_queues``), and each task reports what it did by sending
a message to a second SQS queue (the SQS transport has no result backend of its own).

The worker subprocess imports this module (``celery -A sqs_celery_app worker``) and reads
the listener's port and the two queue URLs from the environment.
"""

from __future__ import annotations

import json
import os

import boto3
from celery import Celery, Task

FLAKY = "conveyor_sqs_tests.flaky"
ADD = "conveyor_sqs_tests.add"
CREDENTIALS = {"aws_access_key_id": "celery", "aws_secret_access_key": "celery"}


def make_app(port: int, queue: str, queue_url: str) -> Celery:
    app = Celery("conveyor_sqs_tests", broker=f"sqs://celery:celery@127.0.0.1:{port}")
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options={
            "region": "us-east-1",
            "is_secure": False,
            "wait_time_seconds": 1,  # the worker's long poll (its shutdown waits for it)
            "predefined_queues": {queue: {"url": queue_url, "access_key_id": "celery",
                                          "secret_access_key": "celery"}},
        },
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    def report(payload: dict[str, object]) -> None:
        client = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{port}",
                              region_name="us-east-1", **CREDENTIALS)
        client.send_message(QueueUrl=os.environ["CONVEYOR_SQS_REPORT_URL"],
                            MessageBody=json.dumps(payload))

    @app.task(name=ADD)
    def add(left: int, right: int) -> None:
        report({"task": "add", "result": left + right})

    @app.task(name=FLAKY, bind=True, max_retries=2)
    def flaky(self: Task, label: str) -> None:
        attempt = self.request.retries + 1
        if attempt < 3:
            raise self.retry(countdown=0, max_retries=2, exc=RuntimeError(f"attempt {attempt}"))
        report({"task": "flaky", "label": label, "attempts": attempt})

    return app


app = make_app(
    int(os.environ.get("CONVEYOR_SQS_PORT", "9324")),
    os.environ.get("CONVEYOR_SQS_QUEUE", "celery"),
    os.environ.get("CONVEYOR_SQS_QUEUE_URL", "http://127.0.0.1:9324/000000000000/celery"),
)
