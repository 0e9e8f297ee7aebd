"""AMQP vhosts are tenants: queue and exchange names are per vhost (issue 10).

Goal: two users in two vhosts declaring the same queue name get two queues; publishing
through the default exchange by queue name, the built-in exchanges and dead-lettering all
stay inside the vhost; the client sees its own (unqualified) names in declare-ok,
deliver, get-ok and x-death; permissions are checked on the unqualified name in the
vhost; the HTTP API with ``X-Conveyor-Vhost: dev`` sees what an AMQP client made in
``dev`` (both protocols qualify names the same way).
Method: one broker thread with ``--auth required`` (amqp + http listeners), users made
through the model's admin; pika and aio-pika over real sockets, urllib for HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aio_pika
import pika
import pika.exceptions
import pytest
from security_support import ROOT, SecureBroker, unique

HOME = ("home", "home-password")  # every permission in "/"
TENANT = ("tenant", "tenant-password")  # every permission in "dev"
NARROW = ("narrow", "narrow-password")  # in "dev": may configure and read "^mine$" only


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path_factory.mktemp("amqp-vhosts"), ("amqp", "http")) as thread:
        thread.call(_setup, thread)
        yield thread


async def _setup(thread: SecureBroker) -> None:
    admin = thread.server.security.admin
    await admin.add_vhost("dev")
    await admin.add_user(HOME[0], HOME[1])
    await admin.set_permissions(HOME[0], "/", ".*", ".*", ".*")
    await admin.add_user(TENANT[0], TENANT[1])
    await admin.set_permissions(TENANT[0], "dev", ".*", ".*", ".*")
    await admin.add_user(NARROW[0], NARROW[1])
    await admin.set_permissions(NARROW[0], "dev", "^mine$", "^amq\\.default$", "^mine$")


def _connect(broker: SecureBroker, user: tuple[str, str], vhost: str
             ) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", broker.ports["amqp"], vhost,
        credentials=pika.PlainCredentials(*user), connection_attempts=1))


def _url(broker: SecureBroker, user: tuple[str, str], vhost: str) -> str:
    path = "%2F" if vhost == "/" else vhost
    return f"amqp://{user[0]}:{user[1]}@127.0.0.1:{broker.ports['amqp']}/{path}"


def test_the_same_queue_name_in_two_vhosts_is_two_queues(broker: SecureBroker) -> None:
    name = unique("orders")
    home, tenant = _connect(broker, HOME, "/"), _connect(broker, TENANT, "dev")
    try:
        in_home, in_dev = home.channel(), tenant.channel()
        in_home.queue_declare(name)
        declared = in_dev.queue_declare(name)
        assert declared.method.queue == name and declared.method.message_count == 0
        in_home.confirm_delivery()
        in_dev.confirm_delivery()
        in_home.basic_publish("", name, b"in /")
        in_dev.basic_publish("", name, b"in dev")
        in_dev.basic_publish("", name, b"in dev again")
        assert in_dev.queue_declare(name, passive=True).method.message_count == 2
        assert in_home.queue_declare(name, passive=True).method.message_count == 1
        method, _, body = in_dev.basic_get(name, auto_ack=True)
        assert body == b"in dev"
        assert method is not None and method.exchange == "" and method.routing_key == name
        method, _, body = in_home.basic_get(name, auto_ack=True)
        assert body == b"in /" and in_home.basic_get(name)[0] is None
        in_dev.queue_purge(name)
        in_dev.queue_delete(name)
        # deleting dev's queue left /'s alone
        assert in_home.queue_declare(name, passive=True).method.message_count == 0
    finally:
        home.close()
        tenant.close()


def test_default_exchange_routing_stays_in_the_vhost(broker: SecureBroker) -> None:
    only_home, only_dev = unique("home-only"), unique("dev-only")
    home, tenant = _connect(broker, HOME, "/"), _connect(broker, TENANT, "dev")
    try:
        in_home, in_dev = home.channel(), tenant.channel()
        in_home.queue_declare(only_home)
        in_dev.queue_declare(only_dev)
        in_home.confirm_delivery()
        in_dev.confirm_delivery()
        with pytest.raises(pika.exceptions.UnroutableError):  # no such queue in dev
            in_dev.basic_publish("", only_home, b"lost", mandatory=True)
        with pytest.raises(pika.exceptions.UnroutableError):  # a queue of dev is not in /
            in_home.basic_publish("", only_dev, b"lost", mandatory=True)
        with pytest.raises(pika.exceptions.UnroutableError):  # nor by its broker name
            in_home.basic_publish("", f"dev~{only_dev}", b"lost", mandatory=True)
        assert in_home.queue_declare(only_home, passive=True).method.message_count == 0
        assert in_dev.queue_declare(only_dev, passive=True).method.message_count == 0
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as missing:
            in_dev.queue_declare(only_home, passive=True)
        assert missing.value.reply_code == 404
        assert f"no queue '{only_home}' in vhost 'dev'" in missing.value.reply_text
    finally:
        home.close()
        tenant.close()


def test_built_in_exchanges_are_per_vhost(broker: SecureBroker) -> None:
    name = unique("events")
    home, tenant = _connect(broker, HOME, "/"), _connect(broker, TENANT, "dev")
    try:
        in_home, in_dev = home.channel(), tenant.channel()
        for channel in (in_home, in_dev):
            channel.queue_declare(name)
            channel.queue_bind(name, "amq.topic", "audit.#")
            channel.exchange_declare("amq.fanout", "fanout", passive=True)
            channel.confirm_delivery()
        in_dev.basic_publish("amq.topic", "audit.login", b"dev event")
        assert in_home.queue_declare(name, passive=True).method.message_count == 0
        assert in_dev.queue_declare(name, passive=True).method.message_count == 1
        method, _, body = in_dev.basic_get(name, auto_ack=True)
        assert body == b"dev event"
        assert method is not None and method.exchange == "amq.topic"
        assert method.routing_key == "audit.login"
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as reserved:
            in_dev.exchange_delete("amq.topic")
        assert reserved.value.reply_code == 403
    finally:
        home.close()
        tenant.close()


def test_permissions_apply_to_the_unqualified_name_in_the_vhost(broker: SecureBroker) -> None:
    connection = _connect(broker, NARROW, "dev")
    try:
        channel = connection.channel()
        assert channel.queue_declare("mine").method.queue == "mine"
        channel.confirm_delivery()
        channel.basic_publish("", "mine", b"for me")
        method, _, body = channel.basic_get("mine", auto_ack=True)
        assert body == b"for me" and method is not None and method.routing_key == "mine"
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.queue_declare("dev~mine")
        assert refused.value.reply_code == 403
        assert "queue 'dev~mine' in vhost 'dev' refused for user 'narrow'" in \
            refused.value.reply_text
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as other:
            channel.queue_declare("theirs")
        assert other.value.reply_code == 403
        assert "queue 'theirs' in vhost 'dev'" in other.value.reply_text
    finally:
        connection.close()


def test_an_exchange_name_cannot_reach_into_another_vhost(broker: SecureBroker) -> None:
    tenant, root = _connect(broker, TENANT, "dev"), _connect(broker, ROOT, "/")
    try:
        tenant.channel().exchange_declare("private", "fanout")
        for attempt in (lambda channel: channel.exchange_declare("dev~private", "fanout",
                                                                 passive=True),
                        lambda channel: channel.basic_publish("dev~private", "", b"x"),
                        lambda channel: channel.queue_declare("q", arguments={
                            "x-dead-letter-exchange": "dev~private"})):
            channel = root.channel()  # an administrator passes every permission check
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                attempt(channel)
                channel.queue_declare("", passive=False, exclusive=True)  # a round trip
            assert refused.value.reply_code == 403
            assert "exchange name 'dev~private' may not contain '~'" in \
                refused.value.reply_text
    finally:
        tenant.close()
        root.close()


async def _next_message(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async with queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            return message
    raise AssertionError("the queue iterator ended")


def test_dead_letters_stay_in_the_vhost(broker: SecureBroker) -> None:
    work, dead, dead_by_name = unique("work"), unique("dead"), unique("dead-by-name")

    async def declare(channel: aio_pika.abc.AbstractChannel) -> dict[str, Any]:
        dlx = await channel.declare_exchange("dlx", aio_pika.ExchangeType.FANOUT)
        queues = {name: await channel.declare_queue(name) for name in (dead, dead_by_name)}
        await queues[dead].bind(dlx)
        queues[work] = await channel.declare_queue(work, arguments={
            "x-dead-letter-exchange": "dlx"})
        queues["by-name"] = await channel.declare_queue(work + "-2", arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_by_name})
        return queues

    async def scenario() -> None:
        home = await aio_pika.connect(_url(broker, HOME, "/"))
        tenant = await aio_pika.connect(_url(broker, TENANT, "dev"))
        async with home, tenant:
            in_home = await declare(await home.channel())
            in_dev = await declare(await tenant.channel())
            for connection, queues, tag in ((home, in_home, b"home "), (tenant, in_dev, b"dev ")):
                channel = await connection.channel()
                for queue_name in (work, work + "-2"):
                    await channel.default_exchange.publish(
                        aio_pika.Message(tag + queue_name.encode()), routing_key=queue_name)
                for key in (work, "by-name"):
                    message = await queues[key].get(timeout=5, fail=True)
                    assert message is not None
                    await message.reject(requeue=False)
            for queues, tag in ((in_dev, b"dev "), (in_home, b"home ")):
                letter = await asyncio.wait_for(_next_message(queues[dead]), 10)
                assert letter.body == tag + work.encode()  # its own vhost's dead letter
                assert letter.exchange == "dlx"  # the client's name, not the broker's
                headers = letter.headers
                assert headers["x-first-death-queue"] == work
                assert headers["x-first-death-exchange"] == ""
                death = headers["x-death"][0]
                assert death["queue"] == work
                assert death["reason"] == "rejected"
                letter = await asyncio.wait_for(_next_message(queues[dead_by_name]), 10)
                assert letter.body == tag + (work + "-2").encode()
                assert letter.exchange == "" and letter.routing_key == dead_by_name

    asyncio.run(scenario())


def _http(broker: SecureBroker, user: tuple[str, str], vhost: str, path: str,
          body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{broker.ports['http']}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(
            f"{user[0]}:{user[1]}".encode()).decode(), "X-Conveyor-Vhost": vhost,
            "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_http_sees_the_queue_an_amqp_client_declared_in_the_vhost(
        broker: SecureBroker) -> None:
    name = unique("shared")
    connection = _connect(broker, TENANT, "dev")
    try:
        channel = connection.channel()
        channel.queue_declare(name)
        channel.confirm_delivery()
        channel.basic_publish("", name, b"over amqp")
        status, document = _http(broker, TENANT, "dev", f"/queues/{name}")
        assert status == 200 and document["ready"] == 1
        status, document = _http(broker, TENANT, "dev", "/queues")
        assert status == 200 and name in [queue["name"] for queue in document["queues"]]
        status, document = _http(broker, HOME, "/", "/queues")
        assert status == 200 and name not in [queue["name"] for queue in document["queues"]]
        assert _http(broker, HOME, "/", f"/queues/{name}")[0] == 404
        status, _ = _http(broker, TENANT, "dev", f"/topics/{name}/messages",
                          {"messages": [{"value": "over http"}]})
        assert status == 200
        bodies = []
        for _ in range(2):
            _, _, body = channel.basic_get(name, auto_ack=True)
            bodies.append(body)
        assert bodies == [b"over amqp", b"over http"]
        # an exchange declared over HTTP in dev, with dev's amq.fanout as its alternate
        fallback = unique("fallback")
        status, _ = _http(broker, TENANT, "dev", "/exchanges", {
            "name": fallback, "type": "direct", "alternate_exchange": "amq.fanout"})
        assert status == 201
        channel.queue_bind(name, "amq.fanout")
        channel.basic_publish(fallback, "unbound-key", b"via the alternate")
        method, _, body = channel.basic_get(name, auto_ack=True)
        assert body == b"via the alternate" and method is not None
        assert method.exchange == fallback
    finally:
        connection.close()
