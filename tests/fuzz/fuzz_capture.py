"""Record the bytes real clients send in a typical session: the fuzzer's seed corpora.

Run once (``.venv/bin/python tests/fuzz/fuzz_capture.py``); it writes
``tests/fuzz/seeds/<listener>/<client>-<n>.bin``, one file per client connection
holding everything that client sent to the server on it (our own traffic, so it is
committed). Re-run it when a protocol gains requests worth fuzzing.

Method: a real ``conveyor serve`` listens on 127.0.0.1; a recording TCP proxy
listens on 127.0.0.2 at the same port numbers and forwards both ways, keeping the
client-to-server bytes of each connection. The broker advertises 127.0.0.2, so
Kafka clients that reconnect to the address in Metadata still pass the proxy.
Clients: confluent-kafka and kafka-python (admin, produce, group consume, commit),
pika (declare, bind, confirmed publish, get, consume, ack), Conveyor's own
HTTP client (topics, queues, publish, acquire, ack, fetch, commit), and for SQS boto3
(JSON protocol) plus form-encoded query-protocol requests.
Adding a listener: add a ``SESSIONS`` entry that drives a client at its port.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from conveyor.testing.server import BrokerProcess

SEEDS = Path(__file__).with_name("seeds")
PROXY_HOST = "127.0.0.2"
CLIENT_TIMEOUT_S = 30


class RecordingProxy:
    """Forwards PROXY_HOST:port to 127.0.0.1:port; keeps each connection's client bytes."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.recorded: dict[str, list[bytearray]] = {name: [] for name in ports}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[asyncio.Server] = []

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(CLIENT_TIMEOUT_S)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(CLIENT_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLIENT_TIMEOUT_S)

    async def _start(self) -> None:
        for name, port in self.ports.items():
            server = await asyncio.start_server(
                lambda r, w, name=name: self._relay(name, r, w), PROXY_HOST, port)
            self._servers.append(server)

    async def _stop(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()

    async def _relay(
        self, name: str, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        recording = bytearray()
        self.recorded[name].append(recording)
        server_reader, server_writer = await asyncio.open_connection(
            "127.0.0.1", self.ports[name])
        await asyncio.gather(
            _pump(client_reader, server_writer, recording),
            _pump(server_reader, client_writer, None),
        )


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, recording: bytearray | None
) -> None:
    try:
        while data := await reader.read(65536):
            if recording is not None:
                recording += data
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass  # the other side went away: the recording so far is what was sent
    finally:
        writer.close()


def confluent_session(port: int) -> None:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

    bootstrap = f"{PROXY_HOST}:{port}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"seed-confluent-{uuid.uuid4().hex[:6]}"
    for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        future.result(CLIENT_TIMEOUT_S)
    for future in admin.create_partitions([NewPartitions(topic, 3)]).values():
        future.result(CLIENT_TIMEOUT_S)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 5, "compression.type": "none"})
    for number in range(10):
        producer.produce(topic, value=b"value-%d" % number, key=b"key-%d" % (number % 3),
                         headers=[("h", b"v")])
    assert producer.flush(CLIENT_TIMEOUT_S) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    received = 0
    while received < 10:
        message = consumer.poll(CLIENT_TIMEOUT_S)
        assert message is not None and message.error() is None, message
        received += 1
    consumer.commit(asynchronous=False)
    consumer.list_topics(timeout=CLIENT_TIMEOUT_S)
    consumer.close()


def kafka_python_session(port: int) -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    bootstrap = f"{PROXY_HOST}:{port}"
    topic = f"seed-kafka-python-{uuid.uuid4().hex[:6]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    admin.describe_configs  # noqa: B018 - admin calls beyond create are version-fragile
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for number in range(10):
        producer.send(topic, value=b"value-%d" % number, key=b"k%d" % number,
                      headers=[("h", b"v")])
    producer.flush(CLIENT_TIMEOUT_S)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"g-{topic}",
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=CLIENT_TIMEOUT_S * 1000)
    received = 0
    for _message in consumer:
        received += 1
        if received == 10:
            break
    consumer.commit()
    consumer.close()


def pika_session(port: int) -> None:
    import pika

    parameters = pika.ConnectionParameters(host=PROXY_HOST, port=port, heartbeat=30)
    connection = pika.BlockingConnection(parameters)
    channel = connection.channel()
    channel.exchange_declare("seed-exchange", exchange_type="topic", durable=True)
    queue = channel.queue_declare("seed-queue", durable=True,
                                  arguments={"x-max-priority": 5}).method.queue
    channel.queue_bind(queue, "seed-exchange", routing_key="seed.#")
    channel.confirm_delivery()
    properties = pika.BasicProperties(content_type="text/plain", delivery_mode=2, priority=3,
                                      headers={"h": "v", "n": 1}, correlation_id="c1",
                                      reply_to="r", message_id="m1", expiration="60000")
    for number in range(5):
        channel.basic_publish("seed-exchange", "seed.key", b"body-%d" % number, properties)
    method, _header, _body = channel.basic_get(queue)
    assert method is not None
    channel.basic_ack(method.delivery_tag)
    channel.basic_qos(prefetch_count=10)
    received: list[int] = []

    def on_message(ch: object, deliver: object, _p: object, _b: bytes) -> None:
        received.append(deliver.delivery_tag)  # type: ignore[attr-defined]

    tag = channel.basic_consume(queue, on_message)
    connection.process_data_events(time_limit=1)
    for delivery_tag in received[:-1]:
        channel.basic_ack(delivery_tag)
    if received:
        channel.basic_nack(received[-1], requeue=True)
    channel.basic_cancel(tag)
    channel.queue_purge(queue)
    channel.close()
    connection.close()


def pika_large_session(port: int) -> None:
    """One message bigger than frame_max: a body split over several frames."""
    import pika

    connection = pika.BlockingConnection(pika.ConnectionParameters(host=PROXY_HOST, port=port))
    channel = connection.channel()
    channel.queue_declare("seed-large")
    channel.basic_publish("", "seed-large", b"x" * 140_000, pika.BasicProperties())
    method, _header, _body = channel.basic_get("seed-large", auto_ack=True)
    assert method is not None
    connection.close()


def http_session(port: int) -> None:
    from conveyor.client import Client

    with Client(f"http://{PROXY_HOST}:{port}", timeout_s=CLIENT_TIMEOUT_S) as client:
        topic = f"seed-http-{uuid.uuid4().hex[:6]}"
        client.create_topic(topic, partitions=2)
        client.publish(topic, b"raw-value", key="k", headers={"h": "v"})
        client.publish(topic, "text-value", priority=3, dedup_id="d1")
        client.publish_batch(topic, [b"a", b"b", "c"])
        client.fetch(topic)
        client.commit(topic, "ordered-group", {0: 1})
        client.committed(topic, "ordered-group")
        client.create_queue("seed-http-queue")
        client.publish("seed-http-queue", b"work", delay_s=0)
        for message in client.acquire("seed-http-queue", limit=5):
            message.ack()
        client.list_topics()
        client.describe_topic(topic)
        client.health()


def boto3_session(port: int) -> None:
    """boto3 speaks SQS's JSON protocol: queues, attributes, batches, receive, delete."""
    import boto3

    client = boto3.client("sqs", endpoint_url=f"http://{PROXY_HOST}:{port}",
                          region_name="us-east-1", aws_access_key_id="seed",
                          aws_secret_access_key="seed")
    url = client.create_queue(QueueName="seed-sqs", Attributes={
        "VisibilityTimeout": "30", "MessageRetentionPeriod": "3600"})["QueueUrl"]
    fifo = client.create_queue(QueueName="seed-sqs.fifo", Attributes={
        "FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
    client.send_message(QueueUrl=url, MessageBody="one", DelaySeconds=0, MessageAttributes={
        "kind": {"DataType": "String", "StringValue": "seed"},
        "size": {"DataType": "Number", "StringValue": "3"},
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"}})
    client.send_message_batch(QueueUrl=url, Entries=[
        {"Id": "a", "MessageBody": "two"}, {"Id": "b", "MessageBody": "three"}])
    client.send_message(QueueUrl=fifo, MessageBody="ordered", MessageGroupId="g")
    received = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                      AttributeNames=["All"], MessageAttributeNames=["All"],
                                      VisibilityTimeout=5, WaitTimeSeconds=1)
    handles = [m["ReceiptHandle"] for m in received.get("Messages", [])]
    if handles:
        client.change_message_visibility(QueueUrl=url, ReceiptHandle=handles[0],
                                         VisibilityTimeout=10)
        client.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(number), "ReceiptHandle": handle}
            for number, handle in enumerate(handles)])
    client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    client.set_queue_attributes(QueueUrl=url, Attributes={"DelaySeconds": "0"})
    client.get_queue_url(QueueName="seed-sqs")
    client.list_queues(QueueNamePrefix="seed")
    client.tag_queue(QueueUrl=url, Tags={"team": "seed"})
    client.purge_queue(QueueUrl=url)
    client.delete_queue(QueueUrl=fifo)


def sqs_query_session(port: int) -> None:
    """The older query protocol (form-encoded, XML answers), as the aws CLI v1 and
    older SDKs send it."""
    import urllib.parse
    import urllib.request

    def call(**params: str) -> None:
        body = urllib.parse.urlencode({**params, "Version": "2012-11-05"}).encode()
        request = urllib.request.Request(
            f"http://{PROXY_HOST}:{port}/", data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            response.read()

    call(Action="CreateQueue", QueueName="seed-query", **{
        "Attribute.1.Name": "VisibilityTimeout", "Attribute.1.Value": "20"})
    url = f"http://{PROXY_HOST}:{port}/000000000000/seed-query"
    call(Action="SendMessage", QueueUrl=url, MessageBody="query", **{
        "MessageAttribute.1.Name": "kind", "MessageAttribute.1.Value.DataType": "String",
        "MessageAttribute.1.Value.StringValue": "seed"})
    call(Action="SendMessageBatch", QueueUrl=url, **{
        "SendMessageBatchRequestEntry.1.Id": "x",
        "SendMessageBatchRequestEntry.1.MessageBody": "batched"})
    call(Action="ReceiveMessage", QueueUrl=url, MaxNumberOfMessages="5",
         **{"AttributeName.1": "All"})
    call(Action="GetQueueAttributes", QueueUrl=url, **{"AttributeName.1": "All"})
    call(Action="ListQueues")


SESSIONS: dict[str, list[tuple[str, Callable[[int], None]]]] = {
    "kafka": [("confluent", confluent_session), ("kafka-python", kafka_python_session)],
    "amqp": [("pika", pika_session), ("pika-large", pika_large_session)],
    "http": [("conveyor-client", http_session)],
    "sqs": [("boto3", boto3_session), ("query", sqs_query_session)],
}


def capture(seeds: Path = SEEDS, only: tuple[str, ...] = ()) -> dict[str, int]:
    """Run every session (of the ``only`` listeners, if given) through the proxy; write
    the seeds; return files per listener."""
    written: dict[str, int] = {}
    spans: list[tuple[str, str, int, int]] = []  # listener, client, first, end connection
    chosen = {name: sessions for name, sessions in SESSIONS.items()
              if not only or name in only}
    with tempfile.TemporaryDirectory() as scratch:
        broker = BrokerProcess(Path(scratch) / "data", listeners=tuple(SESSIONS),
                               extra_args=("--advertised-host", PROXY_HOST))
        with broker, RecordingProxy(broker.ports) as proxy:
            for listener, sessions in chosen.items():
                for client_name, session in sessions:
                    before = len(proxy.recorded[listener])
                    session(broker.ports[listener])
                    spans.append((listener, client_name, before, len(proxy.recorded[listener])))
        # The broker has stopped, so every relay has seen its connection's last byte.
    for listener, client_name, first, end in spans:
        directory = seeds / listener
        directory.mkdir(parents=True, exist_ok=True)
        connections = [c for c in proxy.recorded[listener][first:end] if c]
        for number, data in enumerate(connections):
            (directory / f"{client_name}-{number}.bin").write_bytes(bytes(data))
            written[listener] = written.get(listener, 0) + 1
    return written


if __name__ == "__main__":
    # fuzz_capture.py [SEEDS_DIR [LISTENER...]]
    print(capture(Path(sys.argv[1]) if len(sys.argv) > 1 else SEEDS, tuple(sys.argv[2:])))
