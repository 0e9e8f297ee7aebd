"""SQS queues are durable: a kill -9 loses no sent message, revives no deleted one, and
keeps the queue's SQS attributes and tags.

Method: a real ``conveyor serve`` child (BrokerProcess) on fixed free ports; boto3
sends, receives and deletes; SIGKILL; the same process starts again on the same data
directory and ports; boto3 reads everything back.
"""

from __future__ import annotations

from pathlib import Path

import boto3
from botocore.config import Config

from conveyor.testing.server import BrokerProcess


def test_sent_and_deleted_messages_survive_kill_9(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    broker = BrokerProcess(data_dir, listeners=("sqs",))
    broker.start()
    try:
        sqs = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{broker.ports['sqs']}",
                           region_name="us-east-1", aws_access_key_id="k",
                           aws_secret_access_key="k", config=Config(retries={"max_attempts": 1}))
        url = sqs.create_queue(QueueName="durable", Attributes={"VisibilityTimeout": "7"},
                               tags={"team": "ops"})["QueueUrl"]
        for start in (0, 10):
            sqs.send_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "MessageBody": f"m{i}", "MessageAttributes": {
                    "n": {"DataType": "Number", "StringValue": str(i)}}}
                for i in range(start, start + 10)])
        taken = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=5)["Messages"]
        deleted = sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(taken)])
        assert len(deleted["Successful"]) == 5
        broker.kill()
        broker.start()
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attributes["VisibilityTimeout"] == "7"
        assert attributes["ApproximateNumberOfMessages"] == "15"
        assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "ops"}
        bodies: list[str] = []
        while answer := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                            MessageAttributeNames=["All"]).get("Messages"):
            bodies.extend(m["Body"] for m in answer)
            assert all(m["MessageAttributes"]["n"]["DataType"] == "Number" for m in answer)
        assert sorted(bodies) == sorted({f"m{i}" for i in range(20)}
                                        - {m["Body"] for m in taken})
    finally:
        broker.kill()
