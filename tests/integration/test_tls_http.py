"""Goal: the HTTP API and the SQS endpoint speak HTTPS on their own ports when TLS is
configured; the Python client, curl and boto3 reach them with the test CA; a plain
request to an HTTPS port gets nginx's 400 "plain HTTP request was sent to HTTPS port";
a TLS client on a plain port is refused; SIGHUP makes new handshakes serve the new
certificate while open connections keep working.

Method: certificates made by the test; a BrokerThread with TLS on http and sqs; a
plain BrokerThread for the TLS-to-plain case; a real ``conveyor serve --tls-cert
--tls-key`` child for SIGHUP, whose stdout says when the reload is done.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from conveyor.client import Client
from conveyor.testing.server import BrokerProcess, BrokerThread
from conveyor.testing.tls import (
    TestPki,
    refused_after_plaintext,
    served_serial,
    tls_hello_to_plain_port,
)

WAIT_S = 30


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: TestPki) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("https") / "data", listeners=("http", "sqs"),
                      tls=pki.tls_config()) as running:
        yield running


def refusals(server: BrokerThread) -> dict[str, int]:
    return server.call_sync(lambda: dict(server.server.refusals.counts))


def curl(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "--silent", "--show-error", "--max-time", str(WAIT_S),
                           *arguments], capture_output=True, text=True, timeout=WAIT_S + 5)


def test_python_client_over_https(server: BrokerThread, pki: TestPki) -> None:
    queue = f"https-{uuid.uuid4().hex[:8]}"
    with Client(f"https://localhost:{server.ports['http']}", verify=str(pki.ca_file)) as client:
        client.create_queue(queue)
        client.publish(queue, b"over https")
        messages = list(client.consume(queue, wait_s=1, limit=1))
        assert [message.value for message in messages] == [b"over https"]
        messages[0].ack()


def test_python_client_takes_the_ca_from_the_environment(
        server: BrokerThread, pki: TestPki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_CA_FILE", str(pki.ca_file))
    with Client(f"https://localhost:{server.ports['http']}") as client:
        assert client.health()["status"] == "ok"


def test_curl_over_https_with_the_ca(server: BrokerThread, pki: TestPki) -> None:
    url = f"https://localhost:{server.ports['http']}/health"
    answered = curl("--cacert", str(pki.ca_file), url)
    assert answered.returncode == 0, answered.stderr
    assert '"ok"' in answered.stdout
    untrusted = curl(url)  # the system CAs do not know the test CA
    assert untrusted.returncode == 60, untrusted.stderr  # curl: peer certificate not trusted


def test_plain_http_to_the_https_port_gets_a_400(server: BrokerThread) -> None:
    before = refusals(server).get("plaintext on a TLS port", 0)
    answered = curl("--include", f"http://localhost:{server.ports['http']}/health")
    assert answered.stdout.startswith("HTTP/1.1 400"), answered
    assert "plain HTTP request was sent to an HTTPS port" in answered.stdout
    assert refusals(server)["plaintext on a TLS port"] == before + 1


def test_boto3_over_https_against_the_sqs_listener(server: BrokerThread, pki: TestPki) -> None:
    sqs = boto3.client(
        "sqs", endpoint_url=f"https://localhost:{server.ports['sqs']}", region_name="us-east-1",
        aws_access_key_id="any", aws_secret_access_key="any", verify=str(pki.ca_file),
        config=Config(retries={"max_attempts": 1}))
    url = sqs.create_queue(QueueName=f"tls-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    assert url.startswith("https://")  # queue URLs point back over TLS
    sqs.send_message(QueueUrl=url, MessageBody="over https")
    received = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1)["Messages"]
    assert [message["Body"] for message in received] == ["over https"]
    sqs.close()


def test_plaintext_to_sqs_https_port_is_refused(server: BrokerThread) -> None:
    answered = refused_after_plaintext(server.ports["sqs"], b"POST / HTTP/1.1\r\n\r\n")
    assert answered.startswith(b"HTTP/1.1 400")


def test_tls_client_on_plain_http_port_is_refused(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "plain", listeners=("http",)) as plain:
        tls_hello_to_plain_port(plain.ports["http"])
        assert refusals(plain) == {"TLS handshake on a plaintext port": 1}
        with Client(f"http://127.0.0.1:{plain.ports['http']}") as client:
            assert client.health()["status"] == "ok"  # still serving plain clients


def _get_health(connection: ssl.SSLSocket) -> bytes:
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = connection.recv(65536)
        assert chunk, "connection closed"
        answer += chunk
    return answer


def test_sighup_reloads_the_certificate_without_dropping_connections(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    first = pki.server(serial=1001)
    process = BrokerProcess(tmp_path / "data", listeners=("http",), extra_args=(
        "--tls-cert", str(first.cert_file), "--tls-key", str(first.key_file)))
    process.start()
    try:
        assert process.process is not None and process.process.stdout is not None
        port = process.ports["http"]
        assert served_serial(port, pki.ca_file) == 1001
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as held:
            assert _get_health(held).startswith(b"HTTP/1.1 200")
            pki.server(serial=2002)  # same file names, new certificate and key
            process.process.send_signal(signal.SIGHUP)
            assert process.process.stdout.readline().strip() == "conveyor tls reloaded"
            assert served_serial(port, pki.ca_file) == 2002  # new handshakes: new files
            assert _get_health(held).startswith(b"HTTP/1.1 200")  # the open one lives on
            # a broken key file: the reload fails and the last good certificate stays
            first.key_file.write_text("not a key")
            process.process.send_signal(signal.SIGHUP)
            assert process.process.stdout.readline().startswith("conveyor tls reload failed")
            assert served_serial(port, pki.ca_file) == 2002
    finally:
        assert process.stop() == 0


def test_http_tls_port_keeps_plain_http_beside_https(tmp_path: Path) -> None:
    """``[listeners.http] tls_port``: plain HTTP on the HTTP port, HTTPS on its own."""
    import asyncio

    from conveyor.config import ListenerConfig, ServerConfig
    from conveyor.server.app import Server

    pki = TestPki(tmp_path / "pki")
    config = ServerConfig(data_dir=tmp_path / "data", listeners=(ListenerConfig(
        "http", port=0, tls=pki.tls_config(), tls_port=0),))

    async def check() -> None:
        server = Server(config)
        await server.start()
        try:
            plain, secure = server.ports["http"], server.ports["http_tls"]
            answers = await asyncio.gather(
                asyncio.to_thread(curl, f"http://127.0.0.1:{plain}/health"),
                asyncio.to_thread(curl, "--cacert", str(pki.ca_file),
                                  f"https://localhost:{secure}/health"))
            assert all('"ok"' in answer.stdout for answer in answers), answers
        finally:
            await server.stop()

    asyncio.run(check())
