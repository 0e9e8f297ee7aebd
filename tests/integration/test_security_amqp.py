"""AMQP security with real clients: logins, vhosts and per-operation permissions.

Goal: with ``--auth required``, pika and aio-pika log in with PLAIN / AMQPLAIN against
the security model; a vhost the user may not use is refused with 530 NOT_ALLOWED on
connection.open; an operation the user's permissions do not cover is refused with
403 ACCESS_REFUSED (channel closed, connection kept), as RabbitMQ does; a wrong
password is 403 on connection.start-ok and the connection is closed.
Method: one broker thread (amqp listener) with the users of security_support.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
import aiormq
import pika
import pika.exceptions
import pytest
from security_support import ALICE, ROOT, WRITER, SecureBroker


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with SecureBroker(tmp_path_factory.mktemp("amqp-security"), ("amqp",)) as thread:
        thread.setup_users()
        yield thread


def _connect(broker: SecureBroker, user: tuple[str, str], vhost: str = "/",
             ) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", broker.ports["amqp"], vhost,
        credentials=pika.PlainCredentials(*user), connection_attempts=1))


def test_pika_reads_the_allowed_queue_and_is_refused_the_other(broker: SecureBroker) -> None:
    connection = _connect(broker, ALICE)
    try:
        channel = connection.channel()
        method, _, body = channel.basic_get("a", auto_ack=False)
        assert method is not None and body.startswith(b"a-")
        channel.basic_reject(method.delivery_tag, requeue=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_consume("b", lambda *args: None)
            connection.process_data_events(time_limit=5)
        assert refused.value.reply_code == 403
        assert "access to queue 'b' in vhost '/' refused for user 'alice'" in \
            refused.value.reply_text
        channel = connection.channel()  # the connection survives a channel error
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as declare:
            channel.queue_declare("a-new")
        assert declare.value.reply_code == 403
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as purge:
            channel.queue_purge("b")
        assert purge.value.reply_code == 403
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises((pika.exceptions.ChannelClosedByBroker,
                            pika.exceptions.UnroutableError)) as publish:
            channel.basic_publish("", "a", b"not allowed to write")
        if isinstance(publish.value, pika.exceptions.ChannelClosedByBroker):
            assert publish.value.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()


def test_publish_and_bind_need_write(broker: SecureBroker) -> None:
    connection = _connect(broker, WRITER)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", "b", b"from writer")  # write on amq.default: allowed
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as bind:
            channel.queue_bind("a", "amq.topic", "x")  # no read on amq.topic
        assert bind.value.reply_code == 403
        assert "exchange 'amq.topic'" in bind.value.reply_text
    finally:
        if connection.is_open:
            connection.close()


def test_vhost_not_allowed_is_530(broker: SecureBroker) -> None:
    # pika reports a close during connection.open as ProbableAccessDeniedError, quoting it
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as refused:
        _connect(broker, ALICE, vhost="other")
    assert "(530)" in str(refused.value)
    assert "access to vhost 'other' refused for user 'alice'" in str(refused.value)
    _connect(broker, ROOT, vhost="other").close()  # the administrator may


def test_wrong_password_and_unknown_user_are_403(broker: SecureBroker) -> None:
    for user in ((ALICE[0], "wrong"), ("nobody", "x"), ("guest", "guest")):
        with pytest.raises((pika.exceptions.ProbableAuthenticationError,
                            pika.exceptions.ConnectionClosedByBroker)) as refused:
            _connect(broker, user)
        error = refused.value
        if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
            assert error.reply_code == 403
        else:
            assert "ACCESS_REFUSED" in str(error)


def test_aio_pika_amqplain_permissions(broker: SecureBroker) -> None:
    async def scenario() -> None:
        url = f"amqp://{ALICE[0]}:{ALICE[1]}@127.0.0.1:{broker.ports['amqp']}/"
        connection = await aio_pika.connect(url, login_method="AMQPLAIN")
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue("a", ensure=False)
            message = await queue.get(timeout=5, fail=True)
            assert message is not None and message.body.startswith(b"a-")
            await message.reject(requeue=True)
            refused_channel = await connection.channel()
            other = await refused_channel.get_queue("b", ensure=False)
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await other.get(timeout=5)
        # aiormq reads a Connection.Close (530) where it awaits Open-Ok as an unexpected
        # frame (the 530 text itself is asserted with pika above)
        with pytest.raises((aiormq.exceptions.ConnectionNotAllowed,
                            aiormq.exceptions.InvalidFrameError)) as refused:
            await aio_pika.connect(url + "other")
        assert "Connection.Close" in str(refused.value) or isinstance(
            refused.value, aiormq.exceptions.ConnectionNotAllowed)

    asyncio.run(scenario())
