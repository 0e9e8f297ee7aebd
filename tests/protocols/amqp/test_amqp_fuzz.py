"""Goal: no byte sequence makes the AMQP codec crash, and the hand-written codec agrees
with pamqp on every input pamqp can express.

Method (Hypothesis): random and mutated byte streams, cut into random chunks, go
into ``FrameReader.feed`` (frames or ``FrameError``, nothing else) and
``ConnectionMachine.receive`` (events only, never an exception); random bytes go
into ``decode_properties`` (``PropertiesError`` only); generated properties
round-trip through ``encode_properties`` / ``decode_properties`` and read the same
in pamqp; the hand-written Deliver / Get-Ok / Return / Ack / Nack encoders are
byte-equal to pamqp's marshal of the same method with its content frames;
``decode_publish`` agrees with pamqp; valid streams give the same events whole or
chunked.

Seeds: derandomized (the same examples every run, no example database); set
CONVEYOR_SEED to explore other examples reproducibly (the seed is printed).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp import heartbeat as pamqp_heartbeat

from conveyor.protocols.amqp import frames
from conveyor.protocols.amqp.frames import PROTOCOL_HEADER, AckRun, FrameError, FrameReader
from conveyor.protocols.amqp.machine import (
    AcksReceived,
    ChannelFault,
    ConnectionFault,
    ConnectionMachine,
    ConnectionState,
    Event,
    HeaderAccepted,
    HeaderRejected,
    HeartbeatReceived,
    MethodReceived,
    PublishReceived,
)
from conveyor.protocols.amqp.messages import (
    Properties,
    PropertiesError,
    decode_properties,
    encode_properties,
)

F = TypeVar("F", bound=Callable[..., Any])

_SEED_TEXT = os.environ.get("CONVEYOR_SEED")
SEED = int(_SEED_TEXT) if _SEED_TEXT else None
if SEED is not None:
    print(f"CONVEYOR_SEED={SEED}")


def fuzz(max_examples: int) -> Callable[[F], F]:
    """Hypothesis settings for this file: derandomized unless CONVEYOR_SEED is set."""
    def decorate(test: F) -> F:
        configured = settings(max_examples=max_examples, derandomize=SEED is None,
                              database=None, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])(test)
        return seed(SEED)(configured) if SEED is not None else configured
    return decorate


FRAME_MAX = 4096
CHANNEL_MAX = 8
MESSAGE_MAX = 20_000
EVENT_TYPES = (HeaderAccepted, HeaderRejected, MethodReceived, AcksReceived, PublishReceived,
               HeartbeatReceived, ConnectionFault, ChannelFault)


def method(channel: int, value: Any) -> bytes:
    return pamqp_frame.marshal(value, channel)


def content(channel: int, body: bytes, properties: commands.Basic.Properties | None = None,
            frame_max: int = FRAME_MAX) -> bytes:
    data = pamqp_frame.marshal(pamqp_header.ContentHeader(
        0, len(body), properties or commands.Basic.Properties()), channel)
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        data += pamqp_frame.marshal(pamqp_body.ContentBody(body[start : start + chunk]), channel)
    return data


HANDSHAKE = (
    PROTOCOL_HEADER
    + method(0, commands.Connection.StartOk(client_properties={"product": "fuzz"},
                                            mechanism="PLAIN", response="\0guest\0guest",
                                            locale="en_US"))
    + method(0, commands.Connection.TuneOk(CHANNEL_MAX, FRAME_MAX, 0))
    + method(0, commands.Connection.Open("/"))
)
HEARTBEAT = pamqp_frame.marshal(pamqp_heartbeat.Heartbeat(), 0)


# --- strategies ------------------------------------------------------------------------
exchange_names = st.from_regex(r"[a-zA-Z0-9_.:@#,/+ -]{0,127}", fullmatch=True)


def short_text(max_bytes: int = 255) -> st.SearchStrategy[str]:
    return st.text(max_size=max_bytes // 4)


routing_keys = short_text()
channels = st.integers(1, CHANNEL_MAX)
delivery_tags = st.integers(0, 2**63 - 1)  # pamqp packs a longlong signed


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


@st.composite
def valid_streams(draw: st.DrawFn) -> bytes:
    """An opened connection doing legal things on a few channels."""
    opened: list[int] = []
    parts = [HANDSHAKE]
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["open", "publish", "qos", "ack", "heartbeat", "close"]))
        if kind == "open" or not opened:
            number = draw(channels.filter(lambda n: n not in opened))
            opened.append(number)
            parts.append(method(number, commands.Channel.Open()))
            continue
        number = draw(st.sampled_from(opened))
        if kind == "publish":
            body = draw(st.binary(max_size=2 * FRAME_MAX))
            parts.append(method(number, commands.Basic.Publish(
                exchange=draw(exchange_names), routing_key=draw(routing_keys),
                mandatory=draw(st.booleans()))) + content(number, body))
        elif kind == "qos":
            parts.append(method(number, commands.Basic.Qos(
                prefetch_count=draw(st.integers(0, 65535)))))
        elif kind == "ack":
            parts.append(method(number, commands.Basic.Ack(
                delivery_tag=draw(delivery_tags), multiple=draw(st.booleans()))))
        elif kind == "heartbeat":
            parts.append(HEARTBEAT)
        else:
            opened.remove(number)
            parts.append(method(number, commands.Channel.Close(200, "bye", 0, 0)))
    return b"".join(parts)


@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:
            del data[position:]
    return bytes(data)


def describe(events: list[Event]) -> list[Any]:
    """Events as comparable values; a run of acks as the acks one by one (how reads cut
    a stream decides where runs end, not what they say)."""
    described: list[Any] = []
    for event in events:
        if isinstance(event, MethodReceived):
            described.append(("method", event.channel, type(event.method).__name__,
                              dict(event.method)))
        elif isinstance(event, AcksReceived):
            described += [("method", event.channel, "Ack",
                           dict(commands.Basic.Ack(tag, multiple)))
                          for tag, multiple in event.acks]
        else:
            described.append(event)
    return described


def feed_machine(pieces: list[bytes]) -> tuple[ConnectionMachine, list[Event]]:
    machine = ConnectionMachine(FRAME_MAX, CHANNEL_MAX, MESSAGE_MAX)
    events: list[Event] = []
    for piece in pieces:
        got = machine.receive(piece)  # must never raise
        assert all(isinstance(event, EVENT_TYPES) for event in got), got
        events += got
    return machine, events


def check_faults(machine: ConnectionMachine, events: list[Event]) -> None:
    if any(isinstance(event, ConnectionFault) for event in events):
        assert machine.state in (ConnectionState.CLOSING, ConnectionState.CLOSED)
    if any(isinstance(event, HeaderRejected) for event in events):
        assert events == [HeaderRejected()]


# --- the reader and the machine never crash --------------------------------------------
@fuzz(150)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_frame_reader_gives_frames_or_frame_error(data: bytes, cuts: list[int]) -> None:
    reader = FrameReader(FRAME_MAX)
    for piece in chunked(data, cuts):
        try:
            got = reader.feed(piece)
        except FrameError as error:
            assert error.reply_code == 501
            return
        for item in got:
            if isinstance(item, AckRun):
                assert item.acks and all(tag >= 0 for tag, _ in item.acks)
                continue
            assert item.type in (1, 2, 3, 8)
            assert len(item.payload) + 8 <= FRAME_MAX


@fuzz(150)
@given(st.binary(max_size=600), st.booleans(), st.lists(st.integers(0, 2000), max_size=8))
def test_machine_survives_random_bytes(data: bytes, after_header: bool,
                                       cuts: list[int]) -> None:
    stream = (HANDSHAKE if after_header else b"") + data
    machine, events = feed_machine(chunked(stream, cuts))
    check_faults(machine, events)


@fuzz(70)
@given(st.data(), st.lists(st.integers(0, 20_000), max_size=8))
def test_machine_survives_mutated_valid_streams(data: st.DataObject, cuts: list[int]) -> None:
    stream = data.draw(mutated(data.draw(valid_streams())))
    machine, events = feed_machine(chunked(stream, cuts))
    check_faults(machine, events)


@fuzz(60)
@given(valid_streams(), st.lists(st.integers(0, 20_000), max_size=10))
def test_valid_streams_give_the_same_events_whole_or_chunked(stream: bytes,
                                                             cuts: list[int]) -> None:
    _, whole = feed_machine([stream])
    assert not any(isinstance(event, ConnectionFault | ChannelFault) for event in whole), whole
    _, pieces = feed_machine(chunked(stream, cuts))
    assert describe(pieces) == describe(whole)


# --- properties ------------------------------------------------------------------------
@fuzz(250)
@given(st.binary(max_size=300))
def test_decode_properties_raises_only_properties_error(data: bytes) -> None:
    try:
        decode_properties(data)
    except PropertiesError:
        pass


@fuzz(150)
@given(st.binary(max_size=200))
def test_decode_properties_of_flagged_random_bytes(data: bytes) -> None:
    """Random property lists behind every flag combination (not only random flags)."""
    for flags in (b"\xff\xfc", b"\x20\x00", b"\x80\x00"):
        try:
            decode_properties(flags + data)
        except PropertiesError:
            pass


table_keys = st.text(max_size=30)
table_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(table_keys, inner,
                                                                 max_size=4),
    max_leaves=8,
)
optional_text = st.none() | short_text()


@st.composite
def properties(draw: st.DrawFn, timestamps: st.SearchStrategy[int] = st.integers(
        0, 2**64 - 1)) -> Properties:
    return Properties(
        content_type=draw(optional_text), content_encoding=draw(optional_text),
        headers=draw(st.none() | st.dictionaries(table_keys, table_values, max_size=5)),
        delivery_mode=draw(st.none() | st.integers(0, 255)),
        priority=draw(st.none() | st.integers(0, 255)),
        correlation_id=draw(optional_text), reply_to=draw(optional_text),
        expiration=draw(optional_text), message_id=draw(optional_text),
        timestamp=draw(st.none() | timestamps), type=draw(optional_text),
        user_id=draw(optional_text), app_id=draw(optional_text),
        cluster_id=draw(optional_text),
    )


@fuzz(70)
@given(properties())
def test_properties_round_trip(value: Properties) -> None:
    assert decode_properties(encode_properties(value)) == value


@fuzz(40)
@given(properties(timestamps=st.integers(0, 2**32 - 1)))  # pamqp reads larger ones as ms
def test_pamqp_reads_the_properties_we_write(value: Properties) -> None:
    raw = encode_properties(value)
    read = commands.Basic.Properties()
    read.unmarshal(int.from_bytes(raw[:2], "big"), raw[2:])
    for name in ("content_type", "content_encoding", "headers", "delivery_mode", "priority",
                 "correlation_id", "reply_to", "expiration", "message_id", "user_id",
                 "app_id"):
        assert getattr(read, name) == getattr(value, name), name
    assert (read.cluster_id or None) == (value.cluster_id or None)  # pamqp's default is ""
    assert read.message_type == value.type
    assert read.timestamp == (None if value.timestamp is None else
                              datetime.datetime.fromtimestamp(value.timestamp, tz=datetime.UTC))


# --- encoders against pamqp ------------------------------------------------------------
pamqp_property_values = st.builds(
    commands.Basic.Properties,
    content_type=st.none() | st.text(min_size=1, max_size=20),
    headers=st.none() | st.dictionaries(table_keys, table_values, max_size=3),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    message_id=st.none() | st.text(min_size=1, max_size=20),
)
bodies = st.binary(max_size=3 * FRAME_MAX)


def expected_content(channel: int, props: commands.Basic.Properties, body: bytes) -> bytes:
    return content(channel, body, props)


@fuzz(50)
@given(channels, short_text(), delivery_tags, st.booleans(), exchange_names,
       routing_keys, pamqp_property_values, bodies)
def test_deliver_frames_equal_pamqp(channel: int, consumer_tag: str, delivery_tag: int,
                                    redelivered: bool, exchange: str, routing_key: str,
                                    props: commands.Basic.Properties, body: bytes) -> None:
    got = b"".join(frames.deliver_frames(channel, consumer_tag, delivery_tag, redelivered,
                                         exchange, routing_key, props.marshal(), body,
                                         FRAME_MAX))
    expected = method(channel, commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered,
                                                      exchange, routing_key))
    assert got == expected + expected_content(channel, props, body)


@fuzz(40)
@given(channels, short_text(), delivery_tags, st.booleans(), exchange_names,
       routing_keys, pamqp_property_values, bodies)
def test_deliver_encoder_equals_pamqp(channel: int, consumer_tag: str, delivery_tag: int,
                                      redelivered: bool, exchange: str, routing_key: str,
                                      props: commands.Basic.Properties, body: bytes) -> None:
    encoder = frames.DeliverEncoder(channel, consumer_tag)
    parts: list[bytes] = []
    for _ in range(2):  # the second delivery uses the cached route
        encoder.add(parts, delivery_tag, redelivered, exchange, routing_key, props.marshal(),
                    body, FRAME_MAX)
    expected = method(channel, commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered,
                                                      exchange, routing_key))
    assert b"".join(parts) == 2 * (expected + expected_content(channel, props, body))


@fuzz(40)
@given(channels, delivery_tags, st.booleans(), exchange_names, routing_keys,
       st.integers(0, 2**32 - 1), pamqp_property_values, bodies)
def test_get_ok_frames_equal_pamqp(channel: int, delivery_tag: int, redelivered: bool,
                                   exchange: str, routing_key: str, message_count: int,
                                   props: commands.Basic.Properties, body: bytes) -> None:
    got = b"".join(frames.get_ok_frames(channel, delivery_tag, redelivered, exchange,
                                        routing_key, message_count, props.marshal(), body,
                                        FRAME_MAX))
    expected = method(channel, commands.Basic.GetOk(delivery_tag, redelivered, exchange,
                                                    routing_key, message_count))
    assert got == expected + expected_content(channel, props, body)


@fuzz(40)
@given(channels, st.integers(0, 65535), short_text(), exchange_names, routing_keys,
       pamqp_property_values, bodies)
def test_return_frames_equal_pamqp(channel: int, reply_code: int, reply_text: str,
                                   exchange: str, routing_key: str,
                                   props: commands.Basic.Properties, body: bytes) -> None:
    got = b"".join(frames.return_frames(channel, reply_code, reply_text, exchange, routing_key,
                                        props.marshal(), body, FRAME_MAX))
    expected = method(channel, commands.Basic.Return(reply_code, reply_text, exchange,
                                                     routing_key))
    assert got == expected + expected_content(channel, props, body)


@fuzz(100)
@given(st.integers(0, 65535), delivery_tags, st.booleans())
def test_ack_and_nack_frames_equal_pamqp(channel: int, delivery_tag: int,
                                         multiple: bool) -> None:
    assert frames.ack_frame(channel, delivery_tag, multiple) == method(
        channel, commands.Basic.Ack(delivery_tag, multiple))
    assert frames.nack_frame(channel, delivery_tag, multiple) == method(
        channel, commands.Basic.Nack(delivery_tag, multiple, requeue=False))


# --- decode_publish against pamqp ------------------------------------------------------
@fuzz(80)
@given(exchange_names, routing_keys, st.booleans(), st.booleans())
def test_decode_publish_equals_pamqp(exchange: str, routing_key: str, mandatory: bool,
                                     immediate: bool) -> None:
    data = method(1, commands.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                            mandatory=mandatory, immediate=immediate))
    _, _, decoded = pamqp_frame.unmarshal(data)
    assert isinstance(decoded, commands.Basic.Publish)
    assert frames.decode_publish(data[7:-1]) == frames.PublishMethod(
        decoded.exchange, decoded.routing_key, decoded.mandatory, decoded.immediate)


@fuzz(100)
@given(st.data())
def test_decode_publish_of_mutated_payloads_agrees_with_pamqp_or_is_502(
        data: st.DataObject) -> None:
    payload = method(1, commands.Basic.Publish(
        exchange=data.draw(exchange_names), routing_key=data.draw(routing_keys),
        mandatory=data.draw(st.booleans())))[7:-1]
    broken = payload[:4] + data.draw(mutated(payload[4:]))
    try:
        ours = frames.decode_publish(broken)
    except FrameError as error:
        assert error.reply_code == 502
        return
    theirs = commands.Basic.Publish()
    theirs.unmarshal(broken[4:])  # what we accept, pamqp reads the same way
    assert ours == frames.PublishMethod(theirs.exchange, theirs.routing_key, theirs.mandatory,
                                        theirs.immediate)
