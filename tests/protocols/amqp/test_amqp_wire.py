"""The AMQP 0-9-1 listener over real sockets, driven frame by frame with pamqp.

Goal: every way a client can break the protocol gets the answer the spec gives
(a wrong protocol header: ours, then the socket closes; framing errors: 501;
methods out of order: 503; unopened channels: 504; stray content: 505; a bad
login: 403; an unknown vhost: 530; soft errors: Channel.Close 406 while the
connection and its other channels keep working), and none of it disturbs a
well-behaved connection opened beforehand: it still publishes and gets, and
every message the broker confirmed is still there.

Method: a broker with the amqp listener in the test's event loop
(``run_broker``); raw asyncio streams; every frame written with pamqp and every
answer read with pamqp; each read is bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp import heartbeat as pamqp_heartbeat

from conveyor.server.app import Server
from conveyor.testing.server import run_broker

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
READ_TIMEOUT_S = 3.0
FRAME_MAX = 8192  # the listener's frame_bytes_max in these tests
MESSAGE_MAX = 1000  # its message_bytes_max
SETTINGS = {"amqp": {"frame_bytes_max": FRAME_MAX, "message_bytes_max": MESSAGE_MAX,
                     "close_timeout_ms": 300, "heartbeat_s": 0}}

Received = tuple[int, Any]  # (channel, pamqp frame object)


def marshal(channel: int, value: Any) -> bytes:
    return pamqp_frame.marshal(value, channel)


def content(channel: int, body: bytes, properties: commands.Basic.Properties | None = None
            ) -> bytes:
    header = pamqp_header.ContentHeader(0, len(body), properties or commands.Basic.Properties())
    frames = marshal(channel, header)
    if body:
        frames += marshal(channel, pamqp_body.ContentBody(body))
    return frames


class Wire:
    """One raw AMQP connection: write frames, read whole frames back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Wire:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def method(self, channel: int, method: Any) -> None:
        self.send(marshal(channel, method))

    async def read(self) -> Received:
        """The next frame other than a heartbeat."""
        while True:
            head = await asyncio.wait_for(self.reader.readexactly(7), READ_TIMEOUT_S)
            _, channel, size = struct.unpack(">BHI", head)
            rest = await asyncio.wait_for(self.reader.readexactly(size + 1), READ_TIMEOUT_S)
            _, channel, value = pamqp_frame.unmarshal(head + rest)
            if not isinstance(value, pamqp_heartbeat.Heartbeat):
                return channel, value

    async def expect(self, channel: int, kind: type) -> Any:
        got_channel, value = await self.read()
        assert (got_channel, type(value)) == (channel, kind), (got_channel, value)
        return value

    async def message(self, channel: int) -> tuple[Any, bytes]:
        """Content header + body frames after a Deliver / Get-Ok: (properties, body)."""
        header = await self.expect(channel, pamqp_header.ContentHeader)
        body = b""
        while len(body) < header.body_size:
            body += (await self.expect(channel, pamqp_body.ContentBody)).value
        return header.properties, body

    async def closed_by_server(self) -> bytes:
        """Everything up to end of file (the server closed the socket)."""
        return await asyncio.wait_for(self.reader.read(), READ_TIMEOUT_S)

    async def handshake(self, user: str = "guest", password: str = "guest",
                        vhost: str = "/") -> None:
        self.send(PROTOCOL_HEADER)
        start = await self.expect(0, commands.Connection.Start)
        assert "PLAIN" in start.mechanisms.split()
        self.method(0, commands.Connection.StartOk(
            client_properties={"product": "wire-test"}, mechanism="PLAIN",
            response=f"\0{user}\0{password}", locale="en_US"))
        tune = await self.expect(0, commands.Connection.Tune)
        assert tune.frame_max == FRAME_MAX
        self.method(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        self.method(0, commands.Connection.Open(vhost))

    async def open(self) -> None:
        await self.handshake()
        await self.expect(0, commands.Connection.OpenOk)

    async def open_channel(self, channel: int) -> None:
        self.method(channel, commands.Channel.Open())
        await self.expect(channel, commands.Channel.OpenOk)

    async def declare(self, channel: int, queue: str, arguments: dict[str, Any] | None = None
                      ) -> None:
        self.method(channel, commands.Queue.Declare(queue=queue, durable=True,
                                                    arguments=arguments))
        await self.expect(channel, commands.Queue.DeclareOk)

    async def connection_closed_with(self, reply_code: int) -> Any:
        """The server's Connection.Close: check the code, answer Close-Ok, see EOF."""
        close = await self.expect(0, commands.Connection.Close)
        assert close.reply_code == reply_code, close.reply_text
        self.method(0, commands.Connection.CloseOk())
        assert await self.closed_by_server() == b""
        return close

    async def channel_closed_with(self, channel: int, reply_code: int) -> Any:
        close = await self.expect(channel, commands.Channel.Close)
        assert close.reply_code == reply_code, close.reply_text
        self.method(channel, commands.Channel.CloseOk())
        return close

    async def close(self) -> None:
        if self.writer.is_closing():
            return
        self.method(0, commands.Connection.Close(200, "bye", 0, 0))
        await self.expect(0, commands.Connection.CloseOk)
        self.writer.close()
        await self.writer.wait_closed()


class Bystander:
    """A well-behaved connection: confirmed publishes, then proof they are all there."""

    def __init__(self, wire: Wire, queue: str) -> None:
        self.wire = wire
        self.queue = queue
        self.confirmed: list[bytes] = []
        self.tag = 0

    async def start(self) -> None:
        wire = self.wire
        await wire.open()
        await wire.open_channel(1)
        wire.method(1, commands.Confirm.Select())
        await wire.expect(1, commands.Confirm.SelectOk)
        await wire.declare(1, self.queue)
        await self.publish(b"before")

    async def publish(self, body: bytes) -> None:
        wire = self.wire
        wire.send(marshal(1, commands.Basic.Publish(exchange="", routing_key=self.queue))
                  + content(1, body))
        ack = await wire.expect(1, commands.Basic.Ack)
        self.tag += 1
        assert ack.delivery_tag == self.tag
        self.confirmed.append(body)

    async def check(self) -> None:
        """Publish once more, then get (and ack) every confirmed message, in order."""
        await self.publish(b"after")
        wire = self.wire
        for expected in self.confirmed:
            wire.method(1, commands.Basic.Get(queue=self.queue))
            get_ok = await wire.expect(1, commands.Basic.GetOk)
            _, body = await wire.message(1)
            assert body == expected
            wire.method(1, commands.Basic.Ack(get_ok.delivery_tag))
        wire.method(1, commands.Basic.Get(queue=self.queue))
        await wire.expect(1, commands.Basic.GetEmpty)
        await wire.close()


class Scene:
    """A broker with the amqp listener, a bystander, and every socket a test opened."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.wires: list[Wire] = []

    async def connect(self) -> Wire:
        wire = await Wire.connect(self.server.ports["amqp"])
        self.wires.append(wire)
        return wire

    async def misbehaving(self) -> Wire:
        """An open connection, about to break a rule."""
        wire = await self.connect()
        await wire.open()
        return wire

    async def queue_names(self) -> list[str]:
        return [queue.name for queue in await self.server.broker.list_queues()]

    async def close_sockets(self) -> None:
        for wire in self.wires:
            wire.writer.close()
            with contextlib.suppress(OSError):
                await wire.writer.wait_closed()


@asynccontextmanager
async def scene(tmp_path: Path) -> AsyncIterator[Scene]:
    """Yields once the bystander confirmed its first message; checks it afterwards."""
    async with run_broker(tmp_path, listeners=("amqp",), settings=SETTINGS) as server:
        result = Scene(server)
        try:
            bystander = Bystander(await result.connect(), "bystander")
            await bystander.start()
            yield result
            await bystander.check()
        finally:
            await result.close_sockets()


# --- the protocol header ----------------------------------------------------------------
async def test_wrong_protocol_header_gets_ours_then_the_socket_closes(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        for wrong in (b"AMQP\x00\x00\x08\x00", b"AMQP\x01\x01\x00\x09", b"GET / HTTP/1.1\r\n"):
            wire = await world.connect()
            wire.send(wrong)
            assert await wire.closed_by_server() == PROTOCOL_HEADER


# --- connection errors ------------------------------------------------------------------
async def test_frame_over_frame_max_is_501(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        # Queue.Declare with a padded arguments table: one frame of FRAME_MAX + 1 bytes.
        oversized = marshal(1, commands.Queue.Declare(
            queue="q", arguments={"x-pad": "p" * FRAME_MAX}))
        assert len(oversized) > FRAME_MAX
        wire.send(oversized)
        close = await wire.expect(0, commands.Connection.Close)
        assert close.reply_code == 501
        assert await wire.closed_by_server() == b""


async def test_frame_over_frame_max_is_refused_before_its_payload_arrives(
        tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        wire.send(struct.pack(">BHI", 1, 0, 1 << 30))  # announces 1 GiB, sends nothing more
        close = await wire.expect(0, commands.Connection.Close)
        assert close.reply_code == 501


async def test_missing_frame_end_is_501(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        frame = marshal(1, commands.Channel.Open())
        wire.send(frame[:-1] + b"\x00")
        close = await wire.expect(0, commands.Connection.Close)
        assert close.reply_code == 501
        assert await wire.closed_by_server() == b""


async def test_publish_ahead_of_a_malformed_frame_in_the_same_write_is_stored(
        tmp_path: Path) -> None:
    """Frames are handled in order: a whole publish that arrived before the broken frame
    is routed, however TCP cut the stream."""
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        await wire.declare(1, "ahead")
        broken = marshal(1, commands.Basic.Qos(prefetch_count=1))[:-1] + b"\x00"
        wire.send(marshal(1, commands.Basic.Publish(exchange="", routing_key="ahead"))
                  + content(1, b"made it") + broken)
        close = await wire.expect(0, commands.Connection.Close)
        assert close.reply_code == 501
        broker = world.server.broker
        stored = await asyncio.wait_for(
            broker.acquire("ahead", "ahead", wait_ms=2000), READ_TIMEOUT_S)
        assert [delivery.value for delivery in stored] == [b"made it"]
        await broker.ack([delivery.receipt for delivery in stored])


async def test_unknown_frame_type_is_501(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        wire.send(b"\x05\x00\x00\x00\x00\x00\x00\xce")
        close = await wire.expect(0, commands.Connection.Close)
        assert close.reply_code == 501


async def test_queue_declare_before_connection_open_is_503(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.connect()
        wire.send(PROTOCOL_HEADER)
        await wire.expect(0, commands.Connection.Start)
        wire.method(0, commands.Connection.StartOk(
            client_properties={}, mechanism="PLAIN", response="\0guest\0guest",
            locale="en_US"))
        tune = await wire.expect(0, commands.Connection.Tune)
        wire.method(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        wire.method(0, commands.Queue.Declare(queue="early"))  # instead of Connection.Open
        await wire.connection_closed_with(503)
        assert "early" not in await world.queue_names()


async def test_connection_open_before_start_ok_is_503(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.connect()
        wire.send(PROTOCOL_HEADER)
        await wire.expect(0, commands.Connection.Start)
        wire.method(0, commands.Connection.Open("/"))
        close = await wire.connection_closed_with(503)
        assert (close.class_id, close.method_id) == (10, 40)


async def test_basic_deliver_sent_by_the_client_is_503(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        wire.send(marshal(1, commands.Basic.Deliver("ctag", 1, False, "", "rk"))
                  + content(1, b"x"))
        close = await wire.connection_closed_with(503)
        assert (close.class_id, close.method_id) == (60, 60)


async def test_method_on_an_unopened_channel_is_504(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        wire.method(7, commands.Queue.Declare(queue="nowhere"))
        await wire.connection_closed_with(504)
        assert "nowhere" not in await world.queue_names()


async def test_second_channel_open_on_an_open_channel_is_504(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        wire.method(1, commands.Channel.Open())
        await wire.connection_closed_with(504)


async def test_content_header_without_publish_is_505(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        wire.send(content(1, b"stray"))
        await wire.connection_closed_with(505)


async def test_method_where_content_was_expected_is_505(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        wire.method(1, commands.Basic.Publish(exchange="", routing_key="bystander"))
        wire.method(1, commands.Basic.Qos(prefetch_count=1))
        await wire.connection_closed_with(505)


async def test_bad_login_is_403(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.connect()
        wire.send(PROTOCOL_HEADER)
        await wire.expect(0, commands.Connection.Start)
        wire.method(0, commands.Connection.StartOk(
            client_properties={}, mechanism="PLAIN", response="\0guest\0wrong",
            locale="en_US"))
        await wire.connection_closed_with(403)


async def test_unknown_vhost_is_530(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.connect()
        await wire.handshake(vhost="/elsewhere")
        close = await wire.connection_closed_with(530)
        assert (close.class_id, close.method_id) == (10, 40)


async def test_frames_after_connection_close_are_ignored_until_close_ok(
        tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        wire.send(content(1, b"stray"))  # 505
        close = await wire.expect(0, commands.Connection.Close)
        assert close.reply_code == 505
        # Everything but Close / Close-Ok is discarded now: no reply, no second Close.
        wire.method(1, commands.Queue.Declare(queue="late"))
        wire.method(2, commands.Channel.Open())
        wire.method(0, commands.Connection.CloseOk())
        assert await wire.closed_by_server() == b""
        assert "late" not in await world.queue_names()


async def test_garbage_on_channel_0_while_closing_gets_no_second_close(
        tmp_path: Path) -> None:
    """Spec 2.2.4 / the machine's own docstring: a closing connection discards every frame
    but Connection.Close / Close-Ok; here the client answers the server's Close with a
    Close of its own, so the next (and last) thing the server says must be Close-Ok."""
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        wire.method(3, commands.Basic.Qos(prefetch_count=1))  # channel 3 is not open: 504
        close = await wire.expect(0, commands.Connection.Close)
        assert close.reply_code == 504
        wire.send(b"\x01\x00\x00\x00\x00\x00\x04\x00\x63\x00\x63\xce")  # method 99.99
        wire.send(b"\x08\x00\x05\x00\x00\x00\x00\xce")  # a heartbeat on channel 5
        wire.method(0, commands.Connection.Close(200, "bye", 0, 0))
        channel, answer = await wire.read()
        assert (channel, type(answer)) == (0, commands.Connection.CloseOk), (
            channel, answer, getattr(answer, "reply_text", None))
        assert await wire.closed_by_server() == b""


# --- channel errors ---------------------------------------------------------------------
async def test_ack_of_an_unknown_delivery_tag_closes_only_that_channel(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        await wire.open_channel(2)
        wire.method(1, commands.Basic.Ack(delivery_tag=42))
        close = await wire.channel_closed_with(1, 406)
        assert (close.class_id, close.method_id) == (60, 80)
        await channel_works(wire, 2, "same-connection")
        await wire.open_channel(1)  # the closed channel number can be opened again
        await channel_works(wire, 1, "reopened")
        await wire.close()


async def test_a_run_of_acks_settles_up_to_an_unknown_tag_then_closes_the_channel(
        tmp_path: Path) -> None:
    """Acks written in one go reach the broker as one run (machine.AcksReceived): the
    acks before an unknown tag take effect, in order, as separate methods would (one of
    them multiple), then 406 closes the channel, and what the channel still held
    (the fourth and fifth message) is released: a second channel gets exactly those."""
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        await wire.declare(1, "acked-in-a-run")
        for body in (b"m1", b"m2", b"m3", b"m4", b"m5"):
            wire.send(marshal(1, commands.Basic.Publish(exchange="", routing_key="acked-in-a-run"))
                      + content(1, body))
        tags = []
        for _ in range(5):
            wire.method(1, commands.Basic.Get(queue="acked-in-a-run"))
            tags.append((await wire.expect(1, commands.Basic.GetOk)).delivery_tag)
            await wire.message(1)
        wire.send(marshal(1, commands.Basic.Ack(tags[1], multiple=True))  # m1, m2
                  + marshal(1, commands.Basic.Ack(tags[2]))  # m3
                  + marshal(1, commands.Basic.Ack(999))  # unknown: 406 from here
                  + marshal(1, commands.Basic.Ack(tags[3])))  # not applied
        close = await wire.channel_closed_with(1, 406)
        assert (close.class_id, close.method_id) == (60, 80)
        await wire.open_channel(2)
        left = []
        while True:
            wire.method(2, commands.Basic.Get(queue="acked-in-a-run"))
            channel, answer = await wire.read()
            if isinstance(answer, commands.Basic.GetEmpty):
                break
            assert (channel, type(answer)) == (2, commands.Basic.GetOk)
            assert answer.redelivered
            left.append((await wire.message(2))[1])
            wire.method(2, commands.Basic.Ack(answer.delivery_tag))
        assert left == [b"m4", b"m5"]
        await wire.close()


async def test_redeclaring_a_queue_with_other_arguments_is_406(tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        await wire.open_channel(2)
        await wire.declare(1, "limited", {"x-max-length": 10})
        wire.method(1, commands.Queue.Declare(queue="limited", durable=True,
                                              arguments={"x-max-length": 20}))
        close = await wire.channel_closed_with(1, 406)
        assert (close.class_id, close.method_id) == (50, 10)
        info = await world.server.broker.get_queue("limited")
        assert info.config.max_length == 10
        await channel_works(wire, 2, "limited", arguments={"x-max-length": 10})
        await wire.close()


async def test_message_over_message_bytes_max_is_406_and_the_next_channel_works(
        tmp_path: Path) -> None:
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        await wire.declare(1, "sizes")
        body = b"x" * (MESSAGE_MAX + 1)
        wire.send(marshal(1, commands.Basic.Publish(exchange="", routing_key="sizes"))
                  + content(1, body))
        close = await wire.channel_closed_with(1, 406)
        assert (close.class_id, close.method_id) == (60, 40)
        assert (await world.server.broker.get_queue("sizes")).ready == 0
        await wire.open_channel(2)
        await channel_works(wire, 2, "sizes", body=b"y" * MESSAGE_MAX)
        await wire.open_channel(1)
        await channel_works(wire, 1, "sizes")
        await wire.close()


async def test_exchange_declare_keeps_its_durable_flag(tmp_path: Path) -> None:
    """A non-durable exchange must be declared non-durable (it is not persisted and does
    not come back after a restart, as in RabbitMQ)."""
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        for name, durable in (("ex-transient", False), ("ex-durable", True)):
            wire.method(1, commands.Exchange.Declare(exchange=name, exchange_type="direct",
                                                     durable=durable))
            await wire.expect(1, commands.Exchange.DeclareOk)
        broker = world.server.broker
        assert broker.get_exchange("ex-durable").durable is True
        assert broker.get_exchange("ex-transient").durable is False
        await wire.close()


async def test_dead_letter_through_the_default_exchange_reaches_a_queue_of_any_name(
        tmp_path: Path) -> None:
    """x-dead-letter-exchange "" without a routing key: the dead letter goes to the queue
    named by its own routing key, also when that name is not a legal topic name."""
    async with scene(tmp_path) as world:
        wire = await world.misbehaving()
        await wire.open_channel(1)
        wire.method(1, commands.Exchange.Declare(exchange="ex", exchange_type="direct"))
        await wire.expect(1, commands.Exchange.DeclareOk)
        await wire.declare(1, "dead letters")
        await wire.declare(1, "work", {"x-dead-letter-exchange": ""})
        wire.method(1, commands.Queue.Bind(queue="work", exchange="ex",
                                           routing_key="dead letters"))
        await wire.expect(1, commands.Queue.BindOk)
        wire.send(marshal(1, commands.Basic.Publish(exchange="ex", routing_key="dead letters"))
                  + content(1, b"doomed"))
        wire.method(1, commands.Basic.Get(queue="work"))
        get_ok = await wire.expect(1, commands.Basic.GetOk)
        await wire.message(1)
        wire.method(1, commands.Basic.Reject(get_ok.delivery_tag, requeue=False))
        wire.method(1, commands.Basic.Get(queue="dead letters"))
        dead = await wire.expect(1, commands.Basic.GetOk)
        properties, body = await wire.message(1)
        assert body == b"doomed"
        assert (dead.exchange, dead.routing_key) == ("", "dead letters")
        assert [entry["queue"] for entry in properties.headers["x-death"]] == ["work"]
        await wire.close()


async def channel_works(wire: Wire, channel: int, queue: str, body: bytes = b"ok",
                        arguments: dict[str, Any] | None = None) -> None:
    """Declare, publish, get and ack on ``channel`` of ``wire``."""
    await wire.declare(channel, queue, arguments)
    wire.send(marshal(channel, commands.Basic.Publish(exchange="", routing_key=queue))
              + content(channel, body))
    wire.method(channel, commands.Basic.Get(queue=queue))
    get_ok = await wire.expect(channel, commands.Basic.GetOk)
    _, got = await wire.message(channel)
    assert got == body
    wire.method(channel, commands.Basic.Ack(get_ok.delivery_tag))
    wire.method(channel, commands.Basic.Get(queue=queue))
    await wire.expect(channel, commands.Basic.GetEmpty)
