"""Goal: Kafka clients reach Conveyor over TLS (security_protocol SSL) and mTLS, and a
client on the wrong kind of port is refused cleanly.

Method: a BrokerThread whose Kafka listener is SSL with certificates made by the test
(client certificates optional, then required); confluent-kafka and kafka-python
produce and consume over it; a client with a certificate is seen as User:CN; one
without is refused when certificates are required; a plaintext client on the SSL port
and a TLS client on a PLAINTEXT port get a closed connection and a counted refusal.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from conveyor.testing.server import BrokerThread
from conveyor.testing.tls import TestPki, refused_after_plaintext, tls_hello_to_plain_port

# kafka-python 3 reads its schemas with importlib.resources.read_text, deprecated on 3.11
# (as in test_kafka_python.py).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer

WAIT_S = 30
FAST = {"socket.connection.setup.timeout.ms": 5000, "reconnect.backoff.max.ms": 500}
# An ApiVersions v0 request as a plaintext Kafka client opens with.
API_VERSIONS = bytes.fromhex("0000000e" "0012" "0000" "00000001" "0004" "74657374")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ssl_server(tmp_path_factory: pytest.TempPathFactory, pki: TestPki) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("kafka-ssl") / "data", listeners=("kafka",),
                      tls=pki.tls_config(verify="optional")) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: TestPki
                ) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("kafka-mtls") / "data", listeners=("kafka",),
                      tls=pki.tls_config(verify="required")) as server:
        yield server


def confluent_ssl(pki: TestPki, user: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"security.protocol": "SSL", "ssl.ca.location": str(pki.ca_file),
                              **FAST}
    if user is not None:
        issued = pki.client(user)
        config["ssl.certificate.location"] = str(issued.cert_file)
        config["ssl.key.location"] = str(issued.key_file)
    return config


def produce_and_consume(bootstrap: str, config: dict[str, Any], count: int = 20) -> list[bytes]:
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **config})
    for index in range(count):
        producer.produce(topic, f"record-{index}".encode())
    assert producer.flush(WAIT_S) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic,
                         "auto.offset.reset": "earliest", **config})
    consumer.subscribe([topic])
    values: list[bytes] = []
    try:
        while len(values) < count:
            message = consumer.poll(WAIT_S)
            assert message is not None, f"only {len(values)} records came back"
            assert message.error() is None, message.error()
            values.append(message.value() or b"")
    finally:
        consumer.close()
    return values


def refusals(server: BrokerThread) -> dict[str, int]:
    return server.call_sync(lambda: dict(server.server.refusals.counts))


def test_confluent_kafka_produces_and_consumes_over_ssl(ssl_server: BrokerThread,
                                                        pki: TestPki) -> None:
    bootstrap = f"localhost:{ssl_server.ports['kafka']}"
    values = produce_and_consume(bootstrap, confluent_ssl(pki))
    assert values == [f"record-{index}".encode() for index in range(20)]


def test_kafka_python_produces_and_consumes_over_ssl(ssl_server: BrokerThread,
                                                     pki: TestPki) -> None:
    bootstrap = f"localhost:{ssl_server.ports['kafka']}"
    topic = f"tls-py-{uuid.uuid4().hex[:8]}"
    ssl_options = {"security_protocol": "SSL", "ssl_cafile": str(pki.ca_file)}
    producer = KafkaProducer(bootstrap_servers=bootstrap, **ssl_options)
    for index in range(10):
        producer.send(topic, f"py-{index}".encode())
    producer.flush(WAIT_S)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=WAIT_S * 1000, **ssl_options)
    values = [record.value for _, record in zip(range(10), consumer, strict=False)]
    consumer.close()
    assert values == [f"py-{index}".encode() for index in range(10)]


def test_mtls_client_certificate_is_the_principal(mtls_server: BrokerThread,
                                                  pki: TestPki) -> None:
    bootstrap = f"localhost:{mtls_server.ports['kafka']}"
    config = confluent_ssl(pki, user="alice")
    producer = Producer({"bootstrap.servers": bootstrap, **config})
    producer.produce("mtls-topic", b"from alice")
    assert producer.flush(WAIT_S) == 0
    views = mtls_server.call_sync(mtls_server.server.connections.snapshot)
    assert {view.user for view in views if view.protocol == "kafka"} == {"alice"}
    del producer


def test_kafka_python_with_client_certificate(mtls_server: BrokerThread, pki: TestPki) -> None:
    issued = pki.client("bob")
    producer = KafkaProducer(
        bootstrap_servers=f"localhost:{mtls_server.ports['kafka']}", security_protocol="SSL",
        ssl_cafile=str(pki.ca_file), ssl_certfile=str(issued.cert_file),
        ssl_keyfile=str(issued.key_file))
    producer.send("mtls-python", b"from bob").get(timeout=WAIT_S)
    producer.close()


def test_mtls_refuses_a_client_without_certificate(mtls_server: BrokerThread,
                                                   pki: TestPki) -> None:
    failed = threading.Event()
    errors: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        errors.append(error)
        failed.set()

    before = refusals(mtls_server).get("TLS handshake failed", 0)
    producer = Producer({"bootstrap.servers": f"localhost:{mtls_server.ports['kafka']}",
                         "error_cb": on_error, "message.timeout.ms": WAIT_S * 1000,
                         **confluent_ssl(pki)})
    producer.produce("mtls-refused", b"nobody")
    while not failed.is_set():
        producer.poll(0.2)
    assert errors[0].code() in (KafkaError._TRANSPORT, KafkaError._SSL,
                                KafkaError._ALL_BROKERS_DOWN), errors[0]
    assert refusals(mtls_server).get("TLS handshake failed", 0) > before
    producer.purge()
    del producer


def test_plaintext_client_on_ssl_port_is_refused(ssl_server: BrokerThread) -> None:
    before = refusals(ssl_server).get("plaintext on a TLS port", 0)
    assert refused_after_plaintext(ssl_server.ports["kafka"], API_VERSIONS) == b""
    assert refusals(ssl_server)["plaintext on a TLS port"] == before + 1


def test_tls_client_on_plaintext_port_is_refused(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "plain", listeners=("kafka",)) as server:
        tls_hello_to_plain_port(server.ports["kafka"])
        assert refusals(server) == {"TLS handshake on a plaintext port": 1}
        errors = server.call_sync(lambda: dict(server.server.metrics.counters("kafka").errors))
        assert errors == {"tls_on_plaintext_port": 1}  # on /metrics as a listener error
        # the listener still serves plaintext clients afterwards
        values = produce_and_consume(f"127.0.0.1:{server.ports['kafka']}", dict(FAST), 3)
        assert len(values) == 3


def test_silent_and_stalled_clients_on_ssl_port_are_closed(tmp_path: Path, pki: TestPki) -> None:
    """Nobody holds a TLS port open: a client that sends nothing, and one that starts a
    handshake and stops, are closed after the listener's handshake_timeout_ms."""
    import socket

    settings = {"kafka": {"handshake_timeout_ms": 300}}
    with BrokerThread(tmp_path / "stall", listeners=("kafka",), settings=settings,
                      tls=pki.tls_config()) as server:
        port = server.ports["kafka"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            assert silent.recv(100) == b""  # closed, not hung (timeout would raise)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello record that never ends
            assert stalled.recv(100) == b""
        assert refusals(server) == {"TLS handshake failed": 1}


def test_sasl_ssl_listener_wants_sasl_over_tls(tmp_path: Path, pki: TestPki) -> None:
    settings = {"kafka": {"security_protocol": "SASL_SSL", "sasl_users": {"ann": "secret"}}}
    with BrokerThread(tmp_path / "sasl-ssl", listeners=("kafka",), settings=settings,
                      tls=pki.tls_config()) as server:
        bootstrap = f"localhost:{server.ports['kafka']}"
        sasl = {"security.protocol": "SASL_SSL", "ssl.ca.location": str(pki.ca_file),
                "sasl.mechanisms": "PLAIN", "sasl.username": "ann", "sasl.password": "secret",
                **FAST}
        assert len(produce_and_consume(bootstrap, sasl, 3)) == 3
        # TLS without SASL: the first request that is not SASL closes the connection
        failed = threading.Event()
        producer = Producer({"bootstrap.servers": bootstrap, **confluent_ssl(pki),
                             "error_cb": lambda _error: failed.set()})
        producer.produce("sasl-ssl-refused", b"anonymous")
        while not failed.is_set():
            producer.poll(0.2)
        assert producer.flush(0) == 1  # nothing was delivered
        producer.purge()
