"""The protocol-free security model (conveyor/security/), against a real SQLite StateStore.

Goal: passwords are stored only as scrypt hashes, SCRAM credentials follow RFC 5802,
permissions follow RabbitMQ's regex semantics, Kafka ACLs refine them (DENY wins,
ALLOW adds), everything survives a reopen, and failed logins are slowed per peer.
Method: call the model directly; recompute what the RFC says independently.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import pytest

from conveyor.errors import (
    InvalidConfigError,
    InvalidNameError,
    InvalidRequestError,
    PreconditionFailedError,
)
from conveyor.security.api import AclBinding, AclFilter, qualify, unqualify
from conveyor.security.model import Security, open_model
from conveyor.security.throttle import DELAY_MS_MAX
from conveyor.storage.state_store import SqliteStateStore


async def _model(path: Path, auth_required: bool = False) -> tuple[Security, SqliteStateStore]:
    store = SqliteStateStore(str(path / "state.sqlite3"))
    await store.open()
    security = Security(store, auth_required=auth_required)
    security.load()
    return security, store


async def test_passwords_are_hashed_and_credentials_follow_rfc5802(tmp_path: Path) -> None:
    security, store = await _model(tmp_path)
    await security.admin.bootstrap(False, None, None)
    await security.admin.add_user("alice", "s3cret-pw")
    await store.close()
    raw = (tmp_path / "state.sqlite3").read_bytes()
    assert b"s3cret-pw" not in raw
    security, store = await _model(tmp_path)
    stored_hash = security.state.users["alice"].password_hash
    assert stored_hash.startswith("scrypt$16384$8$1$")
    assert security.verify_password("alice", "s3cret-pw") is not None
    assert security.verify_password("alice", "wrong") is None
    assert security.verify_password("nobody", "s3cret-pw") is None
    credential = security.scram_credential("alice", "SCRAM-SHA-512")
    assert credential is not None and credential.iterations == 4096
    salted = hashlib.pbkdf2_hmac("sha512", b"s3cret-pw", credential.salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha512").digest()
    assert credential.stored_key == hashlib.sha512(client_key).digest()
    assert credential.server_key == hmac.new(salted, b"Server Key", "sha512").digest()
    assert security.scram_mechanisms("alice") == [("SCRAM-SHA-256", 4096),
                                                  ("SCRAM-SHA-512", 4096)]
    await store.close()


async def test_permissions_use_rabbitmq_regex_semantics(tmp_path: Path) -> None:
    security, store = await _model(tmp_path)
    await security.admin.bootstrap(False, None, None)
    await security.admin.add_user("bob", "pw")
    await security.admin.add_vhost("dev")
    await security.admin.set_permissions("bob", "/", "", "^out-", "in")
    bob = security.principal("bob")
    assert bob is not None
    assert security.check(bob, "/", "write", "exchange", "out-1")
    assert not security.check(bob, "/", "write", "exchange", "x-out-1")
    assert security.check(bob, "/", "read", "queue", "main-in-box")  # unanchored search
    assert not security.check(bob, "/", "configure", "queue", "anything")  # "" = nothing
    assert security.check(bob, "/", "describe", "topic", "in")  # any of the three
    assert security.check(bob, "/", "read", "group", "any-group")  # vhost access suffices
    assert not security.may_use_vhost(bob, "dev") and security.may_use_vhost(bob, "/")
    assert not security.check(bob, "dev", "read", "queue", "in")
    with pytest.raises(InvalidRequestError):
        await security.admin.set_permissions("bob", "/", "(", "", "")
    with pytest.raises(InvalidNameError):
        await security.admin.add_vhost("a~b")
    await store.close()


async def test_kafka_acls_deny_wins_and_allow_adds(tmp_path: Path) -> None:
    security, store = await _model(tmp_path)
    await security.admin.bootstrap(False, None, None)
    await security.admin.add_user("carol", "pw")
    await security.admin.set_permissions("carol", "/", "", "", "^orders")
    carol = security.principal("carol")
    assert carol is not None
    assert not security.check(carol, "/", "read", "topic", "payments")
    await security.create_acls([
        AclBinding("User:carol", "TOPIC", "pay", "PREFIXED", "READ", "ALLOW"),
        AclBinding("User:carol", "TOPIC", "orders-secret", "LITERAL", "ALL", "DENY")])
    assert security.check(carol, "/", "read", "topic", "payments")
    assert security.check(carol, "/", "describe", "topic", "payments")  # READ implies it
    assert not security.check(carol, "/", "write", "topic", "payments")
    assert security.check(carol, "/", "read", "queue", "orders")
    assert not security.check(carol, "/", "read", "queue", "orders-secret")
    with pytest.raises(InvalidRequestError):
        await security.create_acls([AclBinding("carol", "TOPIC", "x", "LITERAL", "READ",
                                               "ALLOW")])
    await store.close()
    security, store = await _model(tmp_path)
    assert len(security.describe_acls(AclFilter(principal="User:carol"))) == 2
    deleted = await security.delete_acls(AclFilter(pattern_type="MATCH",
                                                   resource_name="payments"))
    assert [b.resource_name for b in deleted] == ["pay"]
    reloaded = security.principal("carol")
    assert reloaded is not None and not security.check(reloaded, "/", "read", "topic",
                                                       "payments")
    await store.close()


async def test_tokens_and_access_keys_survive_a_reopen(tmp_path: Path) -> None:
    security, store = await _model(tmp_path)
    await security.admin.bootstrap(False, None, None)
    await security.admin.add_user("dave", "pw")
    token_id, token = await security.admin.create_token("dave", "ci")
    key_id, secret = await security.admin.create_access_key("dave")
    await store.close()
    assert token.encode() not in (tmp_path / "state.sqlite3").read_bytes()
    security, store = await _model(tmp_path)
    principal = security.verify_token(token)
    assert principal is not None and principal.name == "dave"
    assert security.verify_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    found = security.access_key(key_id)
    assert found is not None and found[1] == secret and found[0].name == "dave"
    await security.admin.delete_token(token_id)
    with pytest.raises(PreconditionFailedError, match="last administrator"):
        await security.admin.delete_user("guest")  # guest is the only administrator
    with pytest.raises(PreconditionFailedError):
        await security.admin.set_tags("guest", ("monitoring",))
    await security.admin.delete_user("dave")
    assert security.verify_token(token) is None and security.access_key(key_id) is None
    await store.close()


async def test_guest_only_from_loopback_and_never_with_auth_required(tmp_path: Path) -> None:
    model = open_model()
    assert model.anonymous("127.0.0.1") is not None and model.anonymous("::1") is not None
    assert model.anonymous("192.0.2.7") is None
    assert model.verify_password("guest", "guest", "127.0.0.1") is not None
    assert model.verify_password("guest", "guest", "192.0.2.7") is None
    security, store = await _model(tmp_path, auth_required=True)
    with pytest.raises(Exception, match="no users"):
        await security.admin.bootstrap(True, None, None)
    done = await security.admin.bootstrap(True, "root", "rootpw")
    assert "created administrator root" in done
    assert security.anonymous("127.0.0.1") is None and "guest" not in security.state.users
    await store.close()


async def test_failed_logins_back_off_per_peer() -> None:
    model = open_model()
    first = await model.login_failed("192.0.2.9", "x", "test")
    second = await model.login_failed("192.0.2.9", "x", "test")
    other = await model.login_failed("192.0.2.10", "x", "test")
    assert first.logged and not second.logged  # the log line is rate-limited
    assert second.delay_ms == 2 * first.delay_ms and other.delay_ms == first.delay_ms
    assert model.throttle.delay_ms(40) == DELAY_MS_MAX
    model.login_succeeded("192.0.2.9")
    started = time.monotonic()
    again = await model.login_failed("192.0.2.9", "x", "test")
    assert again.delay_ms == first.delay_ms and time.monotonic() - started >= 0.09


def test_vhost_names_map_to_prefixes_and_back() -> None:
    assert qualify("/", "orders") == "orders" and unqualify("orders") == ("/", "orders")
    assert qualify("dev", "orders") == "dev~orders"
    assert unqualify("dev~orders") == ("dev", "orders")


def test_auth_and_insecure_come_from_file_env_and_flags(tmp_path: Path) -> None:
    from conveyor.config import load_config

    assert load_config(environ={}).auth == "off"
    assert load_config(environ={"CONVEYOR_AUTH": "required"}).auth == "required"
    assert load_config(environ={"CONVEYOR_INSECURE": "1"}).insecure is True
    path = tmp_path / "conveyor.toml"
    path.write_text('auth = "required"\n')
    assert load_config(path, environ={}).auth == "required"
    assert load_config(path, environ={}, flags={"auth": "off"}).auth == "off"
    with pytest.raises(InvalidConfigError, match="auth must be required or off"):
        load_config(environ={"CONVEYOR_AUTH": "maybe"})
