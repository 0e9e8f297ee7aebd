"""Goal: AMQP clients reach Conveyor over amqps:// on a port of its own (RabbitMQ's 5671
beside 5672), the plain port keeps working beside it, a verified client certificate's
CN reaches the connection (for EXTERNAL), and a client on the wrong port is refused.

Method: a BrokerThread with TLS (certificates made by the test; client certificates
optional); pika with SSLOptions and aio-pika with an amqps:// URL (cafile, certfile,
keyfile in its query) publish and get; raw sockets speak plaintext to the amqps port
and TLS to the plain one, and must see the connection closed with the refusal counted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pika
import pytest

from conveyor.protocols.amqp.adapter import AmqpConnection
from conveyor.testing.server import BrokerThread
from conveyor.testing.tls import TestPki, refused_after_plaintext, tls_hello_to_plain_port

WAIT_S = 30
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: TestPki) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("amqps") / "data", listeners=("amqp",),
                      tls=pki.tls_config(verify="optional")) as running:
        yield running


def refusals(server: BrokerThread) -> dict[str, int]:
    return server.call_sync(lambda: dict(server.server.refusals.counts))


def certificate_users(server: BrokerThread) -> list[str | None]:
    def read() -> list[str | None]:
        state = server.server.listener("amqp").state  # type: ignore[attr-defined]
        return [connection.certificate_user for connection in state.connections
                if isinstance(connection, AmqpConnection)]

    return server.call_sync(read)


def test_amqps_port_is_separate_from_the_plain_port(server: BrokerThread) -> None:
    assert server.ports["amqp_tls"] != server.ports["amqp"]


def test_pika_over_amqps(server: BrokerThread, pki: TestPki) -> None:
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    parameters = pika.ConnectionParameters(
        host="localhost", port=server.ports["amqp_tls"],
        ssl_options=pika.SSLOptions(pki.client_context(), "localhost"))
    with pika.BlockingConnection(parameters) as connection:
        channel = connection.channel()
        channel.queue_declare(queue)
        channel.basic_publish("", queue, b"over amqps")
        method, _properties, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None and body == b"over amqps"
        assert certificate_users(server) == [None]  # no client certificate sent
    # the plain port serves the same queues
    with pika.BlockingConnection(
            pika.ConnectionParameters("127.0.0.1", server.ports["amqp"])) as connection:
        channel = connection.channel()
        channel.basic_publish("", queue, b"over amqp")
        method, _properties, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None and body == b"over amqp"


def test_aio_pika_over_amqps_url_with_client_certificate(server: BrokerThread,
                                                         pki: TestPki) -> None:
    issued = pki.client("carol")
    url = (f"amqps://guest:guest@localhost:{server.ports['amqp_tls']}/"
           f"?cafile={quote(str(pki.ca_file))}&certfile={quote(str(issued.cert_file))}"
           f"&keyfile={quote(str(issued.key_file))}")
    queue_name = f"tls-aio-{uuid.uuid4().hex[:8]}"

    async def exchange() -> bytes:
        connection = await aio_pika.connect(url, timeout=WAIT_S)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name)
            await channel.default_exchange.publish(aio_pika.Message(b"aio over amqps"),
                                                   routing_key=queue_name)
            assert certificate_users(server) == ["carol"]  # the CN EXTERNAL will use
            message = await queue.get(timeout=WAIT_S)
            assert message is not None
            await message.ack()
            return message.body

    assert asyncio.run(exchange()) == b"aio over amqps"


def test_plaintext_client_on_amqps_port_is_refused(server: BrokerThread) -> None:
    before = refusals(server).get("plaintext on a TLS port", 0)
    assert refused_after_plaintext(server.ports["amqp_tls"], AMQP_HEADER) == b""
    assert refusals(server)["plaintext on a TLS port"] == before + 1


def test_tls_client_on_plain_amqp_port_is_refused(server: BrokerThread) -> None:
    before = refusals(server).get("TLS handshake on a plaintext port", 0)
    tls_hello_to_plain_port(server.ports["amqp"])
    assert refusals(server)["TLS handshake on a plaintext port"] == before + 1


def test_plain_port_can_be_turned_off(tmp_path: Path, pki: TestPki) -> None:
    from conveyor.config import ListenerConfig, ServerConfig
    from conveyor.server.app import Server

    config = ServerConfig(data_dir=tmp_path / "data", listeners=(ListenerConfig(
        "amqp", port=0, tls=pki.tls_config(), tls_port=0, plaintext=False),))

    async def ports() -> dict[str, int]:
        running = Server(config)
        await running.start()
        try:
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", running.ports["amqp"], ssl=pki.client_context(),
                server_hostname="localhost")  # the one port speaks TLS
            writer.close()
            await writer.wait_closed()
            return dict(running.ports)
        finally:
            await running.stop()

    found = asyncio.run(ports())
    assert list(found) == ["amqp"]  # one port, and it is the amqps one
