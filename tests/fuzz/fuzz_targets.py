"""The fuzzed listeners: one ``Target`` entry each (framing, seeds, a normal client's probe).

Adding a listener is one entry in ``TARGETS``: its framing (``NO_FRAMING``
or HTTP_FRAMING for an HTTP-based API), and a probe that does a round trip with a
real client library within ``PROBE_TIMEOUT_S`` and raises if it cannot. Seeds come
from ``fuzz_capture.py`` (``tests/fuzz/seeds/<name>/``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from fuzz_mutators import (
    AMQP_FRAMING,
    HTTP_FRAMING,
    INTERNAL_AUTHENTICATED,
    INTERNAL_FRAMING,
    KAFKA_FRAMING,
    Framing,
)

# A normal client must be served within this after each batch (issue 9: "within a bound").
PROBE_TIMEOUT_S = 5.0
FUZZ_ROOT = Path(__file__).parent


class ProbeFailed(AssertionError):
    """A normal client was not served within the bound."""


# (reader, writer, input bytes) -> the bytes to send: what a connection says before the
# fuzzed bytes (the internal channel's authentication), and the input without its marker
Opener = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # the listener name in ``conveyor serve --listeners``
    framing: Framing
    probe: Callable[[int], None]  # port -> None, raises ProbeFailed
    opener: Opener | None = None
    made_seeds: Callable[[], list[bytes]] | None = None  # seeds built here, not recorded
    also_probed: tuple[Target, ...] = ()  # other listeners of the process, probed too

    @property
    def seeds_dir(self) -> Path:
        return FUZZ_ROOT / "seeds" / self.name

    @property
    def corpus_dir(self) -> Path:
        return FUZZ_ROOT / "corpus" / self.name

    def seeds(self) -> list[bytes]:
        made = self.made_seeds() if self.made_seeds is not None else []
        return [path.read_bytes() for path in sorted(self.seeds_dir.glob("*.bin"))] + made


def kafka_probe(port: int) -> None:
    """confluent-kafka: produce one record to partition 0, then fetch it back."""
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

    bootstrap = f"127.0.0.1:{port}"
    token = uuid.uuid4().bytes
    quick = {"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 2000,
             "reconnect.backoff.max.ms": 100, "log_level": 0}
    producer = Producer({**quick, "message.timeout.ms": int(PROBE_TIMEOUT_S * 1000)})
    offsets: list[int] = []
    errors: list[object] = []

    def delivered(error: object, message: object) -> None:
        if error is not None:
            errors.append(error)
        else:
            offsets.append(message.offset())  # type: ignore[attr-defined]

    producer.produce("fuzz-probe-kafka", value=token, partition=0, on_delivery=delivered)
    if producer.flush(PROBE_TIMEOUT_S) != 0 or errors or not offsets:
        raise ProbeFailed(f"kafka produce not acknowledged within {PROBE_TIMEOUT_S} s: {errors}")
    consumer = Consumer({**quick, "group.id": "fuzz-probe", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition("fuzz-probe-kafka", 0, offsets[0])])
        message = consumer.poll(PROBE_TIMEOUT_S)
        if message is None or message.error() is not None or message.value() != token:
            raise ProbeFailed(f"kafka fetch did not return the record: {message}")
    except KafkaException as error:
        raise ProbeFailed(f"kafka fetch failed: {error}") from error
    finally:
        consumer.close()


def amqp_probe(port: int) -> None:
    """pika: declare a queue, publish one message, basic.get it and ack."""
    import pika
    from pika.exceptions import AMQPError

    parameters = pika.ConnectionParameters(
        host="127.0.0.1", port=port, connection_attempts=1, socket_timeout=PROBE_TIMEOUT_S,
        stack_timeout=PROBE_TIMEOUT_S, blocked_connection_timeout=PROBE_TIMEOUT_S)
    token = uuid.uuid4().bytes
    try:
        connection = pika.BlockingConnection(parameters)
        try:
            channel = connection.channel()
            channel.queue_declare("fuzz-probe-amqp")
            channel.basic_publish("", "fuzz-probe-amqp", token)
            for _ in range(100):  # bounded by stack_timeout per call, not by count
                method, _properties, body = channel.basic_get("fuzz-probe-amqp")
                if method is not None:
                    channel.basic_ack(method.delivery_tag)
                    if body == token:
                        return
                else:
                    connection.process_data_events(time_limit=0.05)
            raise ProbeFailed("amqp basic.get never returned the published message")
        finally:
            connection.close()
    except (AMQPError, OSError) as error:
        raise ProbeFailed(f"amqp round trip failed: {error!r}") from error


def http_probe(port: int) -> None:
    """Conveyor's client: publish one message, fetch it from its offset."""
    from conveyor.client import Client
    from conveyor.client.core import RetryPolicy
    from conveyor.errors import ConveyorError

    token = uuid.uuid4().hex
    try:
        with Client(f"http://127.0.0.1:{port}", timeout_s=PROBE_TIMEOUT_S,
                    retry=RetryPolicy(attempts=1)) as client:
            result = client.publish("fuzz-probe-http", token.encode(), partition=0)
            fetched = client.fetch("fuzz-probe-http", offsets={0: result.offset}, limit=1)
    except (ConveyorError, OSError) as error:
        raise ProbeFailed(f"http round trip failed: {error!r}") from error
    if not fetched.messages or fetched.messages[0].value != token.encode():
        raise ProbeFailed(f"http fetch did not return the message: {fetched}")


def sqs_probe(port: int) -> None:
    """boto3: create a queue, send one message, receive it and delete it."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    token = uuid.uuid4().hex
    client = boto3.client(
        "sqs", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id="fuzz", aws_secret_access_key="fuzz",
        config=Config(retries={"max_attempts": 1}, connect_timeout=PROBE_TIMEOUT_S,
                      read_timeout=PROBE_TIMEOUT_S))
    bodies: list[str] = []
    try:
        url = client.create_queue(QueueName="fuzz-probe-sqs")["QueueUrl"]
        client.send_message(QueueUrl=url, MessageBody=token)
        for _ in range(3):  # earlier probes' leftovers may come first
            messages = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                              WaitTimeSeconds=1).get("Messages", [])
            for message in messages:
                bodies.append(message["Body"])
                client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            if token in bodies:
                return
    except (BotoCoreError, ClientError) as error:
        raise ProbeFailed(f"sqs round trip failed: {error!r}") from error
    raise ProbeFailed(f"sqs receive did not return the message: {bodies}")


TARGETS: dict[str, Target] = {
    "kafka": Target("kafka", KAFKA_FRAMING, kafka_probe),
    "amqp": Target("amqp", AMQP_FRAMING, amqp_probe),
    "http": Target("http", HTTP_FRAMING, http_probe),
    "sqs": Target("sqs", HTTP_FRAMING, sqs_probe),
}


# --- the node-to-node channel of a cluster node (conveyor/cluster/internal_api.py) ---------
# The harness writes this cluster secret into the node's database before it starts
# (seed_cluster_secret), so it can authenticate and fuzz past the handshake.
INTERNAL_SECRET = bytes(range(32))
INTERNAL_PEER = {"node": 999_999, "incarnation": 1}  # not a real node: nothing to sweep


def seed_cluster_secret(dsn: str) -> None:
    import asyncpg

    from conveyor.cluster.internal_api import SECRET_SCHEMA

    async def seed() -> None:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            await connection.execute(SECRET_SCHEMA)
            await connection.execute(
                "INSERT INTO conveyor_cluster_secret (id, secret) VALUES (1, $1) "
                "ON CONFLICT (id) DO UPDATE SET secret = excluded.secret", INTERNAL_SECRET.hex())
        finally:
            await connection.close()

    asyncio.run(seed())


async def internal_opener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          data: bytes) -> bytes:
    """Inputs marked authenticated: preamble, the server's nonce, the right MAC, then them."""
    from conveyor.cluster.internal_wire import HANDSHAKE_BYTES_MAX, PREAMBLE, frame, mac, read_frame

    if not data.startswith(INTERNAL_AUTHENTICATED):
        return data
    writer.write(PREAMBLE)
    hello = await asyncio.wait_for(read_frame(reader, HANDSHAKE_BYTES_MAX), 2)
    nonce = bytes.fromhex(str(hello["nonce"]))
    writer.write(frame({**INTERNAL_PEER, "mac": mac(INTERNAL_SECRET, nonce).hex()}))
    return data[len(INTERNAL_AUTHENTICATED):]


def internal_seeds() -> list[bytes]:
    """Hellos before authentication, and the requests one node sends another after it."""
    from conveyor.cluster.internal_wire import PREAMBLE, frame

    def frames(*messages: object) -> bytes:
        return b"".join(frame(message) for message in messages)  # type: ignore[arg-type]

    requests = [
        {"op": "acquire", "args": {"topic": "jobs", "group": "jobs", "records_max": 10,
                                   "lock_ms": 30_000, "wait_ms": 0, "consumer": "c1"}},
        {"op": "settle", "args": {"op": "ack", "receipts": ["jobs:0:0:1:jobs"], "arg": 0,
                                  "wait_durable": True}},
        {"op": "settle", "args": {"op": "extend", "receipts": ["jobs:0:1:2:jobs"],
                                  "arg": 5_000}},
        {"op": "counts", "args": {"queue": "jobs"}},
        {"op": "purge", "args": {"queue": "jobs"}},
        {"op": "delete", "args": {"queue": "jobs", "if_unused": False, "if_empty": True}},
        {"op": "release_consumer", "args": {"consumer": "c1"}},
        {"op": "txn_offsets_finish", "args": {"group": "g", "transactional_id": "tx",
                                              "producer_id": 7, "epoch": 0, "commit": True}},
        {"op": "txn_add_group", "args": {"group": "g", "transactional_id": "tx",
                                         "producer_id": 7, "epoch": 0}},
        {"op": "nope", "args": {}},
    ]
    authenticated = [INTERNAL_AUTHENTICATED + frames({"id": index + 1, **request})
                     for index, request in enumerate(requests)]
    authenticated.append(INTERNAL_AUTHENTICATED + frames(
        *({"id": index + 1, **request} for index, request in enumerate(requests))))
    hellos = [PREAMBLE + frames({**INTERNAL_PEER, "mac": "00" * 32}),
              PREAMBLE + frames({**INTERNAL_PEER, "mac": "00" * 32}, requests[0]),
              PREAMBLE]
    return hellos + authenticated


def internal_probe(port: int) -> None:
    """An authenticated node-to-node call (a queue's counts) answered within the bound."""
    from conveyor.cluster.internal_api import InternalClient
    from conveyor.errors import OperatingError

    async def call() -> object:
        client = InternalClient(f"127.0.0.1:{port}", INTERNAL_SECRET, 999_998, 1)
        try:
            return await client.call("counts", {"queue": "fuzz-probe-internal"},
                                     PROBE_TIMEOUT_S)
        except OperatingError as error:  # answered (the queue need not exist)
            return error.code
        finally:
            await client.close()

    try:
        json.dumps(asyncio.run(call()))
    except (ConnectionError, TimeoutError) as error:
        raise ProbeFailed(f"internal call not answered: {error!r}") from error


# Listeners of a cluster node (``--node-id``, PostgreSQL); fuzzed by a server of their own.
CLUSTER_TARGETS: dict[str, Target] = {
    "internal": Target("internal", INTERNAL_FRAMING, internal_probe, internal_opener,
                       internal_seeds, (TARGETS["http"], TARGETS["amqp"])),
}
