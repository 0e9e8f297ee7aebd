"""Kafka security with real clients: SASL PLAIN / SCRAM, ACLs, KIP-554, authorization errors.

Goal: with ``--auth required`` on a SASL_PLAINTEXT listener, confluent-kafka
(SCRAM-SHA-512), kafka-python (SCRAM-SHA-256) and aiokafka (PLAIN) authenticate
against the security model; a user may read the topic its permissions allow and gets
TOPIC_AUTHORIZATION_FAILED for another; ACLs made with CreateAcls are enforced (a DENY
overrides a permission) and listed and deleted; a non-administrator gets
CLUSTER_AUTHORIZATION_FAILED from the ACL APIs; KIP-554 lists and changes SCRAM
credentials; wrong passwords are refused with SASL_AUTHENTICATION_FAILED. The raw wire
part checks a replayed SCRAM client-final and a request before authentication: each
refused with the protocol's error and the connection closed.
Method: one broker thread (kafka listener) with the users of security_support.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import struct
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from kio.schema.sasl_authenticate.v2.request import SaslAuthenticateRequest
from kio.schema.sasl_handshake.v1.request import SaslHandshakeRequest
from security_support import ALICE, ROOT, WRITER, SecureBroker, unique

from conveyor.protocols.kafka.messages import request_class

# kafka-python 3 reads its schemas with a deprecated importlib call (see test_kafka_python)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer

from tests.protocols.kafka.kafka_wire import parse_response, request_frame, split_frames


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path_factory.mktemp("kafka-security"), ("kafka",)) as thread:
        thread.setup_users()
        yield thread


def _confluent(broker: SecureBroker, user: tuple[str, str], mechanism: str = "SCRAM-SHA-512",
               **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": f"127.0.0.1:{broker.ports['kafka']}",
            "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism,
            "sasl.username": user[0], "sasl.password": user[1], **extra}


def _consume_one(config: dict[str, Any], topic: str) -> Any:
    consumer = Consumer({**config, "group.id": unique("g"), "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic])
        for _ in range(40):
            message = consumer.poll(0.5)
            if message is not None:
                return message
        return None
    finally:
        consumer.close()


def test_confluent_scram_sha512_reads_a_and_is_refused_b(broker: SecureBroker) -> None:
    message = _consume_one(_confluent(broker, ALICE), "a")
    assert message is not None and message.error() is None
    assert message.value().startswith(b"a-")
    refused = _consume_one(_confluent(broker, ALICE), "b")
    assert refused is not None and refused.error() is not None
    assert refused.error().code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_produce_without_write_is_refused(broker: SecureBroker) -> None:
    from confluent_kafka import Producer

    outcomes: list[Any] = []
    producer = Producer(_confluent(broker, ALICE, **{"message.send.max.retries": 0}))
    producer.produce("a", b"alice may only read", on_delivery=lambda error, _: outcomes.append(
        error))
    producer.flush(10)
    assert len(outcomes) == 1 and outcomes[0] is not None
    assert outcomes[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    writer = Producer(_confluent(broker, WRITER))
    writer.produce("b", b"writer may", on_delivery=lambda error, _: outcomes.append(error))
    writer.flush(10)
    assert outcomes[1] is None


def test_confluent_wrong_password_is_refused(broker: SecureBroker) -> None:
    errors: list[KafkaError] = []
    admin = AdminClient(_confluent(broker, (ALICE[0], "wrong"), error_cb=errors.append))
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
    admin.poll(1)  # error callbacks are served from poll
    assert any(error.code() == KafkaError._AUTHENTICATION for error in errors)
    assert any("Authentication failed" in error.str() for error in errors)


def test_kafka_python_scram_sha256(broker: SecureBroker) -> None:
    consumer = KafkaConsumer(
        bootstrap_servers=f"127.0.0.1:{broker.ports['kafka']}",
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
        sasl_plain_username=ALICE[0], sasl_plain_password=ALICE[1],
        auto_offset_reset="earliest", group_id=unique("g"), consumer_timeout_ms=10_000)
    try:
        consumer.subscribe(["a"])
        record = next(iter(consumer))
        assert record.value.startswith(b"a-")
    finally:
        consumer.close()


def test_aiokafka_plain(broker: SecureBroker) -> None:
    async def scenario() -> bytes:
        consumer = AIOKafkaConsumer(
            "a", bootstrap_servers=f"127.0.0.1:{broker.ports['kafka']}",
            security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
            sasl_plain_username=ALICE[0], sasl_plain_password=ALICE[1],
            auto_offset_reset="earliest", group_id=unique("g"))
        await consumer.start()
        try:
            record = await asyncio.wait_for(consumer.getone(), 20)
            return bytes(record.value)
        finally:
            await consumer.stop()

    assert asyncio.run(scenario()).startswith(b"a-")


def test_acls_are_enforced_listed_and_deleted(broker: SecureBroker) -> None:
    root = AdminClient(_confluent(broker, ROOT))
    deny = AclBinding(ResourceType.TOPIC, "a", ResourcePatternType.LITERAL, "User:alice", "*",
                      AclOperation.READ, AclPermissionType.DENY)
    root.create_acls([deny])[deny].result(timeout=10)
    try:
        refused = _consume_one(_confluent(broker, ALICE), "a")
        assert refused is not None and refused.error() is not None
        assert refused.error().code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
        described = root.describe_acls(AclBindingFilter(
            ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY,
            AclPermissionType.ANY)).result(timeout=10)
        assert deny in described
    finally:
        deleted = root.delete_acls([AclBindingFilter(
            ResourceType.TOPIC, "a", ResourcePatternType.LITERAL, "User:alice", None,
            AclOperation.ANY, AclPermissionType.ANY)])
        assert next(iter(deleted.values())).result(timeout=10) == [deny]
    allowed = _consume_one(_confluent(broker, ALICE), "a")
    assert allowed is not None and allowed.error() is None
    alice = AdminClient(_confluent(broker, ALICE))
    with pytest.raises(KafkaException) as caught:
        alice.create_acls([deny])[deny].result(timeout=10)
    assert caught.value.args[0].code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED


def test_non_admin_cannot_create_or_delete_topics(broker: SecureBroker) -> None:
    from confluent_kafka.admin import NewTopic

    alice = AdminClient(_confluent(broker, ALICE))
    name = unique("t")
    future = alice.create_topics([NewTopic(name, 1)])[name]
    with pytest.raises(KafkaException) as created:
        future.result(timeout=10)
    assert created.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    with pytest.raises(KafkaException) as deleted:
        alice.delete_topics(["b"])["b"].result(timeout=10)
    assert deleted.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_kip554_scram_credentials(broker: SecureBroker) -> None:
    root = AdminClient(_confluent(broker, ROOT))
    described = root.describe_user_scram_credentials(["alice"])["alice"].result(timeout=10)
    mechanisms = {info.mechanism for info in described.scram_credential_infos}
    assert mechanisms == {ScramMechanism.SCRAM_SHA_256, ScramMechanism.SCRAM_SHA_512}
    everyone = root.describe_user_scram_credentials().result(timeout=10)
    assert {"root", "alice", "writer"} <= set(everyone)
    upsert = UserScramCredentialUpsertion(
        "writer", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), b"new-password")
    for future in root.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=10)
    message = _consume_one(_confluent(broker, ("writer", "new-password")), "b")
    assert message is not None and message.error() is None


# --- the wire: replayed SCRAM nonces, requests before authentication ---------------------
def _exchange(sock: socket.socket, entity: Any, correlation_id: int) -> Any:
    sock.sendall(request_frame(entity, correlation_id))
    size = struct.unpack(">i", _read(sock, 4))[0]
    payload = _read(sock, size)
    frames = split_frames(struct.pack(">i", size) + payload)
    return parse_response(frames[0], int(entity.__api_key__), int(entity.__version__))[1]


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _client_final(server_first: bytes, first_bare: str, password: str) -> bytes:
    fields = dict(part.split("=", 1) for part in server_first.decode().split(","))
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(fields["s"]),
                                 int(fields["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha512").digest()
    stored = hashlib.sha512(client_key).digest()
    without_proof = f"c=biws,r={fields['r']}"
    auth = f"{first_bare},{server_first.decode()},{without_proof}".encode()
    proof = bytes(a ^ b for a, b in zip(client_key, hmac.new(stored, auth, "sha512").digest(),
                                        strict=True))
    return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def _scram_round(sock: socket.socket, first_bare: str) -> bytes:
    handshake = _exchange(sock, SaslHandshakeRequest(mechanism="SCRAM-SHA-512"), 1)
    assert handshake.error_code == 0
    first = _exchange(sock, SaslAuthenticateRequest(auth_bytes=b"n,," + first_bare.encode()), 2)
    assert first.error_code == 0
    return bytes(first.auth_bytes)


def test_replayed_scram_client_final_is_refused(broker: SecureBroker) -> None:
    address = ("127.0.0.1", broker.ports["kafka"])
    first_bare = f"n={ALICE[0]},r=fixed-client-nonce"
    with socket.create_connection(address) as sock:
        final = _client_final(_scram_round(sock, first_bare), first_bare, ALICE[1])
        answer = _exchange(sock, SaslAuthenticateRequest(auth_bytes=final), 3)
        assert answer.error_code == 0 and bytes(answer.auth_bytes).startswith(b"v=")
    with socket.create_connection(address) as sock:
        _scram_round(sock, first_bare)
        replayed = _exchange(sock, SaslAuthenticateRequest(auth_bytes=final), 3)
        assert replayed.error_code == 58  # SASL_AUTHENTICATION_FAILED
        assert _closed(sock)


def test_request_before_authentication_closes(broker: SecureBroker) -> None:
    metadata = request_class(3, 12)(topics=None, allow_auto_topic_creation=False,
                                    include_topic_authorized_operations=False)
    with socket.create_connection(("127.0.0.1", broker.ports["kafka"])) as sock:
        sock.sendall(request_frame(metadata, 1))
        assert _closed(sock)


# --- KIP-368: session lifetime and re-authentication ---------------------------------------
LIFETIME_MS = 400


@pytest.fixture(scope="module")
def short_sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path_factory.mktemp("kafka-reauth"), ("kafka",),
                      {"kafka": {"sasl_session_lifetime_ms": LIFETIME_MS}}) as thread:
        thread.setup_users(messages=1)
        yield thread


def _plain_login(sock: socket.socket, user: tuple[str, str], correlation_id: int) -> Any:
    handshake = _exchange(sock, SaslHandshakeRequest(mechanism="PLAIN"), correlation_id)
    assert handshake.error_code == 0
    token = f"\x00{user[0]}\x00{user[1]}".encode()
    return _exchange(sock, SaslAuthenticateRequest(auth_bytes=token), correlation_id + 1)


def test_session_lifetime_and_reauthentication(short_sessions: SecureBroker) -> None:
    metadata = request_class(3, 12)(topics=None, allow_auto_topic_creation=False,
                                    include_topic_authorized_operations=False)
    address = ("127.0.0.1", short_sessions.ports["kafka"])
    with socket.create_connection(address) as sock:
        answer = _plain_login(sock, ALICE, 1)
        assert answer.error_code == 0
        assert answer.session_lifetime.total_seconds() * 1000 == LIFETIME_MS
        assert _exchange(sock, metadata, 3).topics is not None
        again = _plain_login(sock, ALICE, 4)  # re-authentication on the same connection
        assert again.error_code == 0
        other = _plain_login(sock, ROOT, 6)  # a re-authentication may not change principal
        assert other.error_code == 58 and "change principals" in other.error_message
        assert _closed(sock)
    with socket.create_connection(address) as sock:
        assert _plain_login(sock, ALICE, 1).error_code == 0
        time.sleep(LIFETIME_MS * 1.5 / 1000)  # the session runs out: a clock, not an event
        sock.sendall(request_frame(metadata, 3))
        assert _closed(sock)


def test_confluent_keeps_working_across_reauthentication(short_sessions: SecureBroker) -> None:
    """A real client keeps consuming over several session lifetimes: librdkafka
    re-authenticates before the lifetime the broker announced (KIP-368); a connection it
    let expire would be closed by the broker and reopened, which this test also allows
    (the wire test above pins the broker's side)."""
    config = _confluent(short_sessions, ALICE)
    consumer = Consumer({**config, "group.id": unique("g"), "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe(["a"])
        deadline = time.monotonic() + LIFETIME_MS * 6 / 1000
        received = []
        while time.monotonic() < deadline:  # several lifetimes of polling and heartbeats
            message = consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            # a connection the broker closed at the lifetime's end is reported, then reopened
            assert error is None or error.code() in (KafkaError._TRANSPORT,
                                                     KafkaError._ALL_BROKERS_DOWN), error
            if error is None:
                received.append(message.value())
        assert received and received[0].startswith(b"a-")
        assert all(value.startswith(b"a-") for value in received)
    finally:
        consumer.close()
