"""Security over real sockets: HTTP Basic and Bearer, 401/403, guest, binds, the CLI.

Goal: with ``auth = "required"`` every HTTP route but the probes demands credentials
and answers 401 (with WWW-Authenticate) or 403 in Conveyor's JSON error shape; a
permission that allows queue ``a`` refuses ``b``; forged tokens are refused; the
Python client and the CLI take credentials from arguments, the URL and the
environment; a non-loopback bind without auth refuses to start unless insecure; the
guest works from loopback and not from the machine's own non-loopback address; bound to
all addresses, Kafka advertises that address. Method: a real server, curl, the asyncio
client, ``python -m conveyor.cli`` subprocesses, confluent-kafka's metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.client import AsyncClient
from conveyor.errors import AuthenticationError, AuthorizationError, InvalidConfigError
from conveyor.server.app import Server
from conveyor.server.security_setup import own_address
from conveyor.testing.server import test_config as server_config

ADMIN = {"CONVEYOR_ADMIN_USER": "admin", "CONVEYOR_ADMIN_PASSWORD": "admin-pw"}
ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, auth: str = "required", host: str = "127.0.0.1",
                  insecure: bool = False, listeners: tuple[str, ...] = ("http",),
                  environ: dict[str, str] | None = None) -> AsyncIterator[Server]:
    config = dataclasses.replace(server_config(tmp_path, listeners), auth=auth, host=host,
                                 insecure=insecure)
    server = Server(config, environ=ADMIN if environ is None else environ)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def curl(url: str, *arguments: str) -> tuple[int, str, Any]:
    """(status, headers text, JSON body (None when empty) or text) from a real curl."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-s", "-D", "-", "-o", "-", *arguments, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    output, _ = await process.communicate()
    head, _, body = output.decode().partition("\r\n\r\n")
    status = int(head.split()[1])
    if "application/json" not in head:
        return status, head, body  # text: /metrics, the web UI
    return status, head, json.loads(body) if body.strip() else None


async def cli(*arguments: str, environ: dict[str, str] | None = None,
              stdin: bytes = b"") -> tuple[int, str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONVEYOR_")}
    env.update(environ or {})
    env["PYTHONPATH"] = str(ROOT)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor.cli", *arguments, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _grant_alice(base: str) -> None:
    admin = ("-u", "admin:admin-pw", "-H", "Content-Type: application/json")
    status, _, _ = await curl(f"{base}/api/users/alice", *admin, "-X", "PUT",
                              "-d", '{"password": "alice-pw", "tags": ""}')
    assert status == 201
    status, _, _ = await curl(f"{base}/api/permissions/%2F/alice", *admin, "-X", "PUT",
                              "-d", '{"configure": "", "write": "^a$", "read": "^a$"}')
    assert status == 204
    for name in ("a", "b"):
        status, _, _ = await curl(f"{base}/queues", *admin, "-d", json.dumps({"name": name}))
        assert status == 201


async def test_auth_required_over_http_with_curl(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        base = f"http://127.0.0.1:{server.ports['http']}"
        status, head, body = await curl(f"{base}/queues")
        assert status == 401 and 'WWW-Authenticate: Basic realm="conveyor"' in head
        assert 'WWW-Authenticate: Bearer realm="conveyor"' in head
        assert body["error"]["code"] == "authentication_failed"
        status, _, body = await curl(f"{base}/queues", "-u", "admin:wrong")
        assert status == 401 and body["error"]["message"] == "invalid credentials"
        assert (await curl(f"{base}/health"))[0] == 200
        await _grant_alice(base)
        alice = ("-u", "alice:alice-pw", "-H", "Content-Type: application/json")
        status, _, body = await curl(f"{base}/topics/a/messages", *alice, "-d",
                                     '{"messages": [{"value": "hi"}]}')
        assert status == 200 and body["results"][0]["offset"] == 0
        status, _, body = await curl(f"{base}/topics/b/messages", *alice, "-d",
                                     '{"messages": [{"value": "hi"}]}')
        assert status == 403 and body["error"]["code"] == "access_refused"
        assert body["error"]["details"] == {"user": "alice", "action": "write",
                                            "resource": "topic", "name": "b", "vhost": "/"}
        status, _, body = await curl(f"{base}/queues/a", *alice, "-X", "DELETE")
        assert status == 403 and body["error"]["details"]["action"] == "configure"
        status, _, body = await curl(f"{base}/queues", *alice, "-d",
                                     '{"name": "a2", "dead_letter_topic": "b"}')
        assert status == 403  # configure on a2 is refused before the dead-letter check
        status, _, body = await curl(f"{base}/queues", *alice)
        assert status == 200 and [q["name"] for q in body["queues"]] == ["a"]  # b hidden
        status, _, body = await curl(f"{base}/api/users", *alice)
        assert status == 403 and body["error"]["code"] == "access_refused"
        assert (await curl(f"{base}/metrics", *alice))[0] == 403  # needs monitoring
        assert (await curl(f"{base}/metrics", "-u", "admin:admin-pw"))[0] == 200
        status, head, _ = await curl(f"{base}/")  # the web UI's files: no credentials
        assert status == 200 and "text/html" in head
        status, _, body = await curl(f"{base}/api/conveyor/tokens", *alice, "-d",
                                     '{"name": "ci"}')
        assert status == 201 and body["token"].startswith("cvt_")
        token = body["token"]
        status, _, body = await curl(f"{base}/api/whoami", "-H", f"Authorization: Bearer {token}")
        assert status == 200 and body["name"] == "alice"
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        status, _, body = await curl(f"{base}/api/whoami", "-H",
                                     f"Authorization: Bearer {forged}")
        assert status == 401 and body["error"]["code"] == "authentication_failed"


async def test_python_client_takes_credentials_from_arguments_url_and_env(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(tmp_path) as server:
        port = server.ports["http"]
        base = f"http://127.0.0.1:{port}"
        await _grant_alice(base)
        async with AsyncClient(base, user="alice", password="alice-pw") as client:
            await client.publish("a", "one")
            deliveries = await client.acquire("a", "workers", limit=1, wait_s=1)
            assert [m.value for m in deliveries] == [b"one"]
            await deliveries[0].ack()
            with pytest.raises(AuthorizationError):
                await client.publish("b", "nope")
        async with AsyncClient(f"http://alice:alice-pw@127.0.0.1:{port}") as client:
            assert [q["name"] for q in await client.list_queues()] == ["a"]
        monkeypatch.setenv("CONVEYOR_USER", "alice")
        monkeypatch.setenv("CONVEYOR_PASSWORD", "wrong")
        async with AsyncClient(base) as client:
            with pytest.raises(AuthenticationError):
                await client.list_queues()
        monkeypatch.delenv("CONVEYOR_USER")
        monkeypatch.delenv("CONVEYOR_PASSWORD")
        async with AsyncClient(base) as client:
            with pytest.raises(AuthenticationError):
                await client.list_queues()


async def test_cli_round_trip_and_offline_first_admin(tmp_path: Path) -> None:
    code, out, _ = await cli("users", "add", "root", "--tags", "administrator",
                             "--data-dir", str(tmp_path), "--json", stdin=b"root-pw\n")
    assert code == 0 and json.loads(out) == {"name": "root", "tags": ["administrator"]}
    async with serving(tmp_path, environ={}) as server:  # no CONVEYOR_ADMIN_*: root exists
        url = f"http://127.0.0.1:{server.ports['http']}"
        root = {"CONVEYOR_URL": url, "CONVEYOR_USER": "root", "CONVEYOR_PASSWORD": "root-pw"}
        assert (await cli("users", "add", "erin", "erin-pw", environ=root))[0] == 0
        assert (await cli("vhosts", "add", "dev", environ=root))[0] == 0
        code, out, _ = await cli("vhosts", "list", "--json", environ=root)
        assert json.loads(out) == [{"name": "/"}, {"name": "dev"}]
        assert (await cli("permissions", "set", "erin", "--read", "^e", "--write", "^e",
                          environ=root))[0] == 0
        code, out, _ = await cli("permissions", "list", "--for", "erin", "--json",
                                 environ=root)
        assert json.loads(out) == [{"configure": "", "read": "^e", "user": "erin",
                                    "vhost": "/", "write": "^e"}]
        code, out, _ = await cli("users", "keys", "create", "erin", "--json", environ=root)
        key = json.loads(out)
        assert code == 0 and key["id"].startswith("AKCV") and len(key["secret"]) == 40
        code, out, _ = await cli("users", "keys", "list", "erin", "--json", environ=root)
        assert [k["id"] for k in json.loads(out)] == [key["id"]]
        code, out, _ = await cli("users", "list", "--json", environ=root)
        assert [u["name"] for u in json.loads(out)] == ["erin", "root"]
        code, out, _ = await cli("acls", "list", "--json", environ=root)
        assert code == 0 and json.loads(out) == []
        erin = ["--url", url, "--user", "erin", "--password", "erin-pw"]
        code, _, err = await cli(*erin, "users", "list")
        assert code == 6 and "access_refused" in err
        code, _, err = await cli("--url", url, "users", "list")
        assert code == 6 and "authentication_failed" in err
        assert (await cli("users", "passwd", "erin", "new-pw", environ=root))[0] == 0
        assert (await cli(*erin, "queues", "list"))[0] == 6
        code, out, _ = await cli("--url", url, "--user", "erin", "--password", "new-pw",
                                 "queues", "list", "--json")
        assert code == 0
        assert (await cli("users", "delete", "erin", environ=root))[0] == 0
        code, _, err = await cli("users", "add", "x", "--data-dir", str(tmp_path),
                                 stdin=b"pw\n")
        assert code == 2 and "in use" in err  # offline mode refuses a running server


async def test_non_loopback_bind_without_auth_refuses_to_start(tmp_path: Path) -> None:
    config = dataclasses.replace(server_config(tmp_path, ("http",)), host="0.0.0.0")
    with pytest.raises(InvalidConfigError, match=r"--auth required.*--insecure"):
        await Server(config).start()
    code, _, err = await cli("serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0",
                             "--listeners", "http", "--http-port", "0")
    assert code == 2 and "refusing to listen on 0.0.0.0" in err and "--insecure" in err


async def test_guest_works_from_loopback_only_and_kafka_advertises_own_address(
        tmp_path: Path) -> None:
    address = own_address()
    assert address != "127.0.0.1", "this test needs a non-loopback address"
    async with serving(tmp_path, auth="off", host="0.0.0.0", insecure=True,
                       listeners=("http", "kafka"), environ={}) as server:
        port = server.ports["http"]
        status, _, body = await curl(f"http://127.0.0.1:{port}/api/whoami")
        assert status == 200 and body == {"name": "guest", "tags": ["administrator"],
                                          "anonymous": True}
        status, _, body = await curl(f"http://{address}:{port}/api/whoami")
        assert status == 401 and body["error"]["code"] == "authentication_failed"
        status, _, _ = await curl(f"http://{address}:{port}/queues", "-u", "guest:guest")
        assert status == 401
        await server.security.admin.add_user("remote", "remote-pw")
        await server.security.admin.set_permissions("remote", "/", ".*", ".*", ".*")
        status, _, body = await curl(f"http://{address}:{port}/queues", "-u",
                                     "remote:remote-pw")
        assert status == 200 and body == {"queues": []}
        brokers = await asyncio.to_thread(_kafka_brokers, f"{address}:{server.ports['kafka']}")
        assert brokers == [f"{address}:{server.ports['kafka']}"]


def _kafka_brokers(bootstrap: str) -> list[str]:
    from confluent_kafka.admin import AdminClient

    # from a non-loopback address nobody is guest: the Kafka client logs in too
    metadata = AdminClient({"bootstrap.servers": bootstrap,
                            "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                            "sasl.username": "remote", "sasl.password": "remote-pw"},
                           ).list_topics(timeout=10)
    return [f"{broker.host}:{broker.port}" for broker in metadata.brokers.values()]


async def test_vhosts_are_namespaces_over_http(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        base = f"http://127.0.0.1:{server.ports['http']}"
        admin = ("-u", "admin:admin-pw", "-H", "Content-Type: application/json")
        assert (await curl(f"{base}/api/vhosts/dev", *admin, "-X", "PUT"))[0] == 201
        assert (await curl(f"{base}/api/users/dave", *admin, "-X", "PUT",
                           "-d", '{"password": "dave-pw"}'))[0] == 201
        assert (await curl(f"{base}/api/permissions/dev/dave", *admin, "-X", "PUT", "-d",
                           '{"configure": ".*", "write": ".*", "read": ".*"}'))[0] == 204
        assert (await curl(f"{base}/queues", *admin, "-d", '{"name": "orders"}'))[0] == 201
        dave = ("-u", "dave:dave-pw", "-H", "Content-Type: application/json",
                "-H", "X-Conveyor-Vhost: dev")
        status, _, body = await curl(f"{base}/queues", *dave, "-d", '{"name": "orders"}')
        assert status == 201 and body["name"] == "dev~orders"  # its own, not /'s orders
        status, _, body = await curl(f"{base}/topics/orders/messages", *dave, "-d",
                                     '{"messages": [{"value": "in dev"}]}')
        assert status == 200
        status, _, body = await curl(f"{base}/queues", *dave)
        assert status == 200 and [q["name"] for q in body["queues"]] == ["orders"]
        status, _, body = await curl(f"{base}/queues", *admin)
        assert [(q["name"], q["ready"]) for q in body["queues"]] == [("orders", 0)]
        status, _, body = await curl(f"{base}/queues", "-u", "dave:dave-pw")  # vhost /
        assert status == 403 and body["error"]["details"]["vhost"] == "/"
        status, _, body = await curl(f"{base}/topics/dev~orders/messages", "-u", "dave:dave-pw",
                                     "-H", "X-Conveyor-Vhost: dev")
        assert status == 403  # a qualified name never reaches across vhosts
        status, _, body = await curl(f"{base}/queues", *dave, "-d",
                                     '{"name": "jobs", "dead_letter_topic": "dlq"}')
        assert status == 201 and body["config"]["dead_letter_topic"] == "dev~dlq"


async def test_a_receipt_is_bound_to_the_user_it_was_issued_to(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        base = f"http://127.0.0.1:{server.ports['http']}"
        await _grant_alice(base)
        await server.security.admin.add_user("mallory", "mallory-pw")
        await server.security.admin.set_permissions("mallory", "/", "", "", "^a$")
        alice = ("-u", "alice:alice-pw", "-H", "Content-Type: application/json")
        mallory = ("-u", "mallory:mallory-pw", "-H", "Content-Type: application/json")
        assert (await curl(f"{base}/topics/a/messages", *alice, "-d",
                           '{"messages": [{"value": "x"}]}'))[0] == 200
        status, _, body = await curl(f"{base}/topics/a/groups/a/acquire", *alice, "-d",
                                     '{"limit": 1}')
        [message] = body["messages"]
        receipt = json.dumps({"receipts": [message["receipt"]]})
        status, _, body = await curl(f"{base}/topics/a/groups/a/ack", *mallory, "-d", receipt)
        assert status == 409 and body["error"]["code"] == "unknown_delivery"
        assert body["error"]["message"] == "receipt was not issued to this user"
        status, _, body = await curl(f"{base}/topics/a/groups/a/ack", *alice, "-d", receipt)
        assert status == 200 and body["results"] == [{"receipt": message["receipt"],
                                                      "ok": True}]


async def test_conveyor_serve_with_auth_from_the_environment(tmp_path: Path) -> None:
    """``CONVEYOR_AUTH=required`` + the first administrator from the environment, through
    the real ``conveyor serve`` command."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONVEYOR_")}
    env.update(ADMIN, CONVEYOR_AUTH="required", PYTHONPATH=str(ROOT))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor.cli", "serve", "--data-dir", str(tmp_path),
        "--listeners", "http", "--http-port", "0", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        ready = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert ready.startswith("conveyor ready: http=127.0.0.1:"), ready
        base = "http://" + ready.split("http=", 1)[1].strip()
        assert (await curl(f"{base}/topics"))[0] == 401
        status, _, body = await curl(f"{base}/api/whoami", "-u", "admin:admin-pw")
        assert status == 200 and body["tags"] == ["administrator"]
    finally:
        process.terminate()
        await process.wait()


async def test_topic_permissions_restrict_routing_keys(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        base = f"http://127.0.0.1:{server.ports['http']}"
        admin = ("-u", "admin:admin-pw", "-H", "Content-Type: application/json")
        assert (await curl(f"{base}/api/users/frank", *admin, "-X", "PUT",
                           "-d", '{"password": "frank-pw"}'))[0] == 201
        assert (await curl(f"{base}/api/permissions/%2F/frank", *admin, "-X", "PUT", "-d",
                           '{"configure": "", "write": "^events$", "read": ""}'))[0] == 204
        assert (await curl(f"{base}/api/topic-permissions/%2F/frank", *admin, "-X", "PUT",
                           "-d", '{"exchange": "events", "write": "^eu\\\\.", "read": ""}')
                )[0] == 204
        assert (await curl(f"{base}/exchanges", *admin, "-d",
                           '{"name": "events", "type": "topic"}'))[0] == 201
        frank = ("-u", "frank:frank-pw", "-H", "Content-Type: application/json")
        status, _, _ = await curl(f"{base}/exchanges/events/messages", *frank, "-d",
                                  '{"routing_key": "eu.orders", "messages": [{"value": "x"}]}')
        assert status == 200
        status, _, body = await curl(f"{base}/exchanges/events/messages", *frank, "-d",
                                     '{"routing_key": "us.orders", "messages": [{"value": "x"}]}')
        assert status == 403 and body["error"]["details"]["resource"] == "routing key"
        status, _, body = await curl(f"{base}/api/topic-permissions", *admin)
        assert body == [{"user": "frank", "vhost": "/", "exchange": "events",
                         "write": "^eu\\.", "read": ""}]
