"""A light raw-HTTP load generator for the SQS benchmark (one process = one event loop).

boto3 tops out at a few thousand requests/s on this machine, so the load is plain
HTTP/1.1 keep-alive requests written from prebuilt bytes; every answer is still read
and parsed (JSON), so the messages counted are the messages the server said it
took or handed out. boto3 validates the same server separately (tests/integration).

Operations, each over ``connections`` keep-alive connections for ``seconds``:
- ``sqs-send``: SendMessageBatch of ``batch`` messages (AWS JSON 1.0);
- ``sqs-consume``: ReceiveMessage (MaxNumberOfMessages=batch, long poll 1 s), then
  DeleteMessageBatch of what came back;
- ``http-send``: Conveyor HTTP publish of ``batch`` messages;
- ``http-consume``: Conveyor HTTP acquire (limit=batch, wait 1 s), then ack.
A consumer that finds the queue empty stops; its rate is counted up to its last
message. ``run_worker`` returns counts plus this process's CPU seconds.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

SQS_TARGET = "AmazonSQS."
GRACE_S = 5.0  # a request may end this long after its phase; a slower one is abandoned


@dataclass(frozen=True)
class Job:
    operation: str  # sqs-send | sqs-consume | http-send | http-consume
    host: str
    port: int
    queue: str  # queue name
    queue_url: str  # SQS queue URL (sqs-* operations)
    batch: int
    seconds: float
    connections: int
    body_bytes: int


@dataclass
class Outcome:
    messages: int = 0
    requests: int = 0
    errors: int = 0
    last_message_s: float = 0.0  # since the start, when the last message was counted
    cpu_s: float = 0.0


class PhaseOver(Exception):
    """A request outlived its phase by GRACE_S (moto under load): the worker stops."""


class Connection:
    """One HTTP/1.1 connection, kept alive unless the server closes it (moto's werkzeug
    answers ``Connection: close`` every time): request bytes in, (status, body) out."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call_until(self, request: bytes, phase_end: float) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self.call(request),
                                          phase_end + GRACE_S - time.monotonic())
        except TimeoutError:
            self.close()
            raise PhaseOver from None

    async def call(self, request: bytes) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            name = line[:line.find(b":")].strip().lower()
            if name == b"content-length":
                length = int(line[15:])
            elif name == b"connection" and b"close" in line.lower():
                close = True
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def http_request(host: str, port: int, path: str, body: bytes,
                 headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def sqs_request(job: Job, action: str, payload: dict[str, Any]) -> bytes:
    headers = {"X-Amz-Target": SQS_TARGET + action,
               "Content-Type": "application/x-amz-json-1.0",
               # moto reads the region from the credential scope; Conveyor ignores it
               "Authorization": "AWS4-HMAC-SHA256 Credential=bench/20260101/us-east-1/sqs/"
                                "aws4_request, SignedHeaders=host, Signature=0"}
    return http_request(job.host, job.port, "/", json.dumps(payload).encode(), headers)


def json_request(job: Job, path: str, payload: dict[str, Any]) -> bytes:
    return http_request(job.host, job.port, path, json.dumps(payload).encode(),
                        {"Content-Type": "application/json"})


async def _send(job: Job, connection: Connection, outcome: Outcome, started: float) -> None:
    body = "x" * job.body_bytes
    if job.operation == "sqs-send":
        request = sqs_request(job, "SendMessageBatch", {"QueueUrl": job.queue_url, "Entries": [
            {"Id": str(index), "MessageBody": body} for index in range(job.batch)]})
    else:
        request = json_request(job, f"/topics/{job.queue}/messages",
                               {"messages": [{"value": body} for _ in range(job.batch)]})
    while time.monotonic() - started < job.seconds:
        status, answer = await connection.call_until(request, started + job.seconds)
        outcome.requests += 1
        if status != 200:
            outcome.errors += 1
            continue
        document = json.loads(answer)
        sent = (len(document.get("Successful", ())) if job.operation == "sqs-send"
                else len(document.get("results", document.get("offsets", ()))) or job.batch)
        outcome.messages += sent
        outcome.last_message_s = time.monotonic() - started


async def _consume(job: Job, connection: Connection, outcome: Outcome,
                   started: float) -> None:
    sqs = job.operation == "sqs-consume"
    if sqs:
        receive = sqs_request(job, "ReceiveMessage", {
            "QueueUrl": job.queue_url, "MaxNumberOfMessages": job.batch, "WaitTimeSeconds": 1})
    else:
        receive = json_request(job, f"/topics/{job.queue}/groups/{job.queue}/acquire",
                               {"limit": job.batch, "wait_ms": 1000})
    while time.monotonic() - started < job.seconds:
        status, answer = await connection.call_until(receive, started + job.seconds)
        outcome.requests += 1
        if status != 200:
            outcome.errors += 1
            continue
        document = json.loads(answer)
        messages = document.get("Messages" if sqs else "messages", [])
        if not messages:
            return  # drained
        if sqs:
            settle = sqs_request(job, "DeleteMessageBatch", {
                "QueueUrl": job.queue_url, "Entries": [
                    {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                    for index, message in enumerate(messages)]})
        else:
            settle = json_request(job, f"/topics/{job.queue}/groups/{job.queue}/ack",
                                  {"receipts": [message["receipt"] for message in messages]})
        status, answer = await connection.call_until(settle, started + job.seconds)
        outcome.requests += 1
        if status != 200:
            outcome.errors += 1
            continue
        settled = (len(json.loads(answer).get("Successful", ())) if sqs else len(messages))
        outcome.messages += settled
        outcome.last_message_s = time.monotonic() - started


async def _run(job: Job) -> Outcome:
    outcome = Outcome()
    connections = [Connection(job.host, job.port) for _ in range(job.connections)]
    loop_body = _send if job.operation.endswith("send") else _consume
    started = time.monotonic()

    async def guarded(connection: Connection) -> None:
        try:
            await loop_body(job, connection, outcome, started)
        except PhaseOver:
            outcome.errors += 1

    await asyncio.gather(*(guarded(connection) for connection in connections))
    for connection in connections:
        connection.close()
    return outcome


def run_worker(job_fields: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a worker process: run one job, return its Outcome as a dict."""
    import uvloop

    job = Job(**job_fields)
    before = resource.getrusage(resource.RUSAGE_SELF)
    outcome = uvloop.run(_run(job))
    after = resource.getrusage(resource.RUSAGE_SELF)
    outcome.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return asdict(outcome)
