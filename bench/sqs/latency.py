"""End-to-end latency for the SQS benchmark: send at a fixed rate, one long-poll receiver.

The sender (one thread, one keep-alive connection) sends one message every
1/rate seconds whose body is its send time (time.monotonic_ns); the receiver (another
thread and connection) long-polls ReceiveMessage (10, WaitTimeSeconds=20) and deletes
what it got; latency = receive time - send time. Both run in this process, so the
numbers include Python's own cost on both sides, the same for every target.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

HEADERS = {"Content-Type": "application/x-amz-json-1.0",
           "Authorization": "AWS4-HMAC-SHA256 Credential=bench/20260101/us-east-1/sqs/"
                            "aws4_request, SignedHeaders=host, Signature=0"}


def _call(connection: http.client.HTTPConnection, action: str,
          payload: dict[str, Any]) -> dict[str, Any]:
    connection.request("POST", "/", json.dumps(payload),
                       {**HEADERS, "X-Amz-Target": f"AmazonSQS.{action}"})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"{action}: HTTP {response.status} {body[:200]!r}")
    answer: dict[str, Any] = json.loads(body or b"{}")
    return answer


def measure_latency(port: int, queue: str, rate_per_s: float, seconds: float,
                    sqs_call: Callable[[int, str, dict[str, Any]], dict[str, Any]]
                    ) -> dict[str, Any]:
    url = sqs_call(port, "CreateQueue", {"QueueName": queue})["QueueUrl"]
    samples_ms: list[float] = []
    done = threading.Event()
    total = int(rate_per_s * seconds)

    def receive() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while len(samples_ms) < total and not done.is_set():
            answer = _call(connection, "ReceiveMessage", {
                "QueueUrl": url, "MaxNumberOfMessages": 10, "WaitTimeSeconds": 20})
            now_ns = time.monotonic_ns()
            messages = answer.get("Messages", [])
            samples_ms.extend((now_ns - int(m["Body"])) / 1e6 for m in messages)
            if messages:
                _call(connection, "DeleteMessageBatch", {"QueueUrl": url, "Entries": [
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(messages)]})
        connection.close()

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    sender = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.monotonic()
    for index in range(total):
        pause_s = started + index / rate_per_s - time.monotonic()
        if pause_s > 0:
            time.sleep(pause_s)  # pacing the offered load is the point here
        _call(sender, "SendMessage", {"QueueUrl": url, "MessageBody": str(time.monotonic_ns())})
    sender.close()
    receiver.join(timeout=30)
    done.set()
    if len(samples_ms) < 2:
        return {"samples": len(samples_ms)}
    cuts = statistics.quantiles(samples_ms, n=100)
    return {"p50_ms": round(cuts[49], 2), "p99_ms": round(cuts[98], 2),
            "samples": len(samples_ms), "rate_per_s": rate_per_s,
            "offered_s": round(time.monotonic() - started, 1)}
