"""AMQP frames: the protocol header check, the frame reader, decoders and hand encoders.

Goal: the reader cuts exactly the frames pamqp writes, whatever the chunking;
frame-max and frame-end are enforced (501) before a frame is handed out, and an
oversized frame is refused as soon as its size is known; the decoders turn
malformed input into ``FrameError`` with the spec's reply code; every hand-written
encoder produces the bytes pamqp produces for the same method. Method: fixed
examples, each compared with pamqp (tests/protocols/amqp/test_amqp_fuzz.py does
the same over generated input).
"""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp import heartbeat as pamqp_heartbeat

from conveyor.protocols.amqp import frames
from conveyor.protocols.amqp.frames import (
    FRAME_BODY,
    FRAME_HEADER,
    FRAME_METHOD,
    AckRun,
    Frame,
    FrameError,
    FrameReader,
)


def method_frame(channel: int, method: Any) -> bytes:
    return pamqp_frame.marshal(method, channel)


def content_header(channel: int, body_size: int,
                   properties: commands.Basic.Properties | None = None) -> bytes:
    return pamqp_frame.marshal(pamqp_header.ContentHeader(
        0, body_size, properties or commands.Basic.Properties()), channel)


def body_frame(channel: int, data: bytes) -> bytes:
    return pamqp_frame.marshal(pamqp_body.ContentBody(data), channel)


def payload_of(frame: bytes) -> bytes:
    return frame[7:-1]


# --- protocol header -------------------------------------------------------------------
@pytest.mark.parametrize(("data", "verdict"), [
    (b"AMQP\x00\x00\x09\x01", True),
    (b"AMQP\x00\x00\x09\x01\x01\x00\x00", True),  # frames may follow in the same read
    (b"", None),
    (b"AM", None),
    (b"AMQP\x00\x00\x09", None),
    (b"AMQP\x00\x00\x09\x02", False),
    (b"AMQP\x01\x01\x00\x09", False),  # 0-9 in the old layout
    (b"AMQP\x00\x00\x08\x00", False),
    (b"GET / HTTP/1.1\r\n", False),
    (b"X", False),  # a wrong first byte is wrong at once
])
def test_check_protocol_header(data: bytes, verdict: bool | None) -> None:
    assert frames.check_protocol_header(data) is verdict


# --- the reader ------------------------------------------------------------------------
def sample_stream() -> tuple[bytes, list[Frame]]:
    parts = [
        method_frame(0, commands.Connection.StartOk(
            client_properties={"product": "test"}, mechanism="PLAIN",
            response="\0guest\0guest", locale="en_US")),
        method_frame(1, commands.Basic.Publish(exchange="ex", routing_key="rk")),
        content_header(1, 5),
        body_frame(1, b"hello"),
        pamqp_frame.marshal(pamqp_heartbeat.Heartbeat(), 0),
        method_frame(65535, commands.Channel.Close(200, "bye", 0, 0)),
    ]
    expected = [Frame(part[0], int.from_bytes(part[1:3], "big"), payload_of(part))
                for part in parts]
    return b"".join(parts), expected


def test_reader_cuts_the_frames_pamqp_writes() -> None:
    stream, expected = sample_stream()
    reader = FrameReader(131_072)
    assert reader.feed(stream) == expected
    assert reader.buffered_bytes == 0


def test_reader_gives_the_same_frames_fed_one_byte_at_a_time() -> None:
    stream, expected = sample_stream()
    reader = FrameReader(131_072)
    got: list[Frame] = []
    for index in range(len(stream)):
        got += reader.feed(stream[index : index + 1])
    assert got == expected
    assert reader.buffered_bytes == 0


def test_reader_gives_consecutive_acks_of_a_channel_as_one_run_in_order() -> None:
    """Basic.Ack frames (the hot path of consuming) come out as runs of (tag, multiple):
    one run per stretch of acks on one channel; any other frame or another channel in
    between ends it, so the order of everything stays as it arrived, and a run reads
    the same fed whole or one byte at a time (only where reads cut it differs)."""
    qos = method_frame(1, commands.Basic.Qos(prefetch_count=10))
    stream = b"".join([
        method_frame(1, commands.Basic.Ack(1, False)),
        method_frame(1, commands.Basic.Ack(2, False)),
        method_frame(1, commands.Basic.Ack(2**63 - 1, True)),
        method_frame(2, commands.Basic.Ack(7, False)),
        qos,
        method_frame(1, commands.Basic.Ack(4, True)),
        method_frame(1, commands.Basic.Reject(5, False)),  # 13 bytes too, not an ack
    ])
    got = FrameReader(4096).feed(stream)
    assert got == [
        AckRun(1, [(1, False), (2, False), (2**63 - 1, True)]),
        AckRun(2, [(7, False)]),
        Frame(FRAME_METHOD, 1, payload_of(qos)),
        AckRun(1, [(4, True)]),
        Frame(FRAME_METHOD, 1, payload_of(method_frame(1, commands.Basic.Reject(5, False)))),
    ]
    run = got[0]
    assert isinstance(run, AckRun)
    assert run.payloads() == [payload_of(method_frame(1, commands.Basic.Ack(tag, multiple)))
                              for tag, multiple in run.acks]
    reader = FrameReader(4096)
    one_by_one: list[Frame | AckRun] = []
    for index in range(len(stream)):
        one_by_one += reader.feed(stream[index : index + 1])
    flattened = [(item.channel, ack) for item in one_by_one if isinstance(item, AckRun)
                 for ack in item.acks]
    assert flattened == [(item.channel, ack) for item in got if isinstance(item, AckRun)
                         for ack in item.acks]
    assert [item for item in one_by_one if isinstance(item, Frame)] == \
        [item for item in got if isinstance(item, Frame)]


def test_reader_keeps_a_partial_frame_until_its_frame_end() -> None:
    frame = method_frame(1, commands.Basic.Qos(prefetch_count=10))
    reader = FrameReader(4096)
    assert reader.feed(frame[:-1]) == []
    assert reader.buffered_bytes == len(frame) - 1
    assert reader.feed(frame[-1:]) == [Frame(FRAME_METHOD, 1, payload_of(frame))]
    assert reader.buffered_bytes == 0


def test_frame_of_exactly_frame_max_is_accepted_one_more_byte_is_501() -> None:
    frame_max = 4096
    fits = frames.frame(FRAME_BODY, 1, b"x" * (frame_max - 8))
    assert len(fits) == frame_max
    assert FrameReader(frame_max).feed(fits) == [Frame(FRAME_BODY, 1, b"x" * (frame_max - 8))]
    too_big = frames.frame(FRAME_BODY, 1, b"x" * (frame_max - 7))
    with pytest.raises(FrameError) as caught:
        FrameReader(frame_max).feed(too_big)
    assert caught.value.reply_code == 501


def test_oversized_frame_is_refused_from_its_7_byte_head() -> None:
    reader = FrameReader(4096)
    with pytest.raises(FrameError) as caught:
        reader.feed(b"\x03\x00\x01\x40\x00\x00\x00")  # a 1 GiB body frame announced
    assert caught.value.reply_code == 501


def test_missing_frame_end_is_501() -> None:
    frame = method_frame(1, commands.Channel.Open())
    with pytest.raises(FrameError) as caught:
        FrameReader(4096).feed(frame[:-1] + b"\x00")
    assert caught.value.reply_code == 501


def test_frames_ahead_of_a_bad_frame_come_with_the_error_once() -> None:
    good = method_frame(1, commands.Channel.Open())
    bad = method_frame(1, commands.Channel.Flow(True))[:-1] + b"\x00"
    reader = FrameReader(4096)
    with pytest.raises(FrameError) as caught:
        reader.feed(good + bad)
    assert caught.value.reply_code == 501
    assert caught.value.frames == [Frame(FRAME_METHOD, 1, payload_of(good))]
    with pytest.raises(FrameError) as again:  # the reader stays failed
        reader.feed(good)
    assert again.value.frames == []


@pytest.mark.parametrize("frame_type", [0, 4, 5, 7, 9, 0xCE, 0xFF])
def test_unknown_frame_type_is_501(frame_type: int) -> None:
    with pytest.raises(FrameError) as caught:
        FrameReader(4096).feed(bytes((frame_type,)) + b"\x00\x00\x00\x00\x00\x00\xce")
    assert caught.value.reply_code == 501


def test_frame_max_can_be_lowered_after_tune() -> None:
    reader = FrameReader(131_072)
    body = frames.frame(FRAME_BODY, 1, b"y" * 5000)
    assert len(reader.feed(body)) == 1
    reader.frame_bytes_max = 4096
    with pytest.raises(FrameError):
        reader.feed(body)


# --- decoding --------------------------------------------------------------------------
def test_method_id() -> None:
    payload = payload_of(method_frame(1, commands.Queue.Declare(queue="q")))
    assert frames.method_id(payload) == (50, 10)
    with pytest.raises(FrameError) as caught:
        frames.method_id(b"\x00\x32\x00")
    assert caught.value.reply_code == 501


@pytest.mark.parametrize(("exchange", "routing_key", "mandatory", "immediate"), [
    ("", "", False, False),
    ("amq.topic", "a.b.c", True, False),
    ("ex", "ключ", False, True),
    ("e" * 127, "r" * 255, True, True),
])
def test_decode_publish_matches_pamqp(exchange: str, routing_key: str, mandatory: bool,
                                      immediate: bool) -> None:
    payload = payload_of(method_frame(1, commands.Basic.Publish(
        exchange=exchange, routing_key=routing_key, mandatory=mandatory,
        immediate=immediate)))
    assert frames.is_publish(payload)
    assert frames.decode_publish(payload) == frames.PublishMethod(
        exchange, routing_key, mandatory, immediate)


@pytest.mark.parametrize("payload", [
    b"\x00\x3c\x00\x28",  # no arguments at all
    b"\x00\x3c\x00\x28\x00\x00",  # no exchange
    b"\x00\x3c\x00\x28\x00\x00\x05ab",  # exchange shorter than its length
    b"\x00\x3c\x00\x28\x00\x00\x00\x02rk",  # no bits
    b"\x00\x3c\x00\x28\x00\x00\x00\x00\x00\x00",  # a trailing byte
    b"\x00\x3c\x00\x28\x00\x00\x02\xff\xfe\x00\x00",  # exchange not UTF-8
    b"\x00\x3c\x00\x28\x00\x00\x00\x01\xc3\x00",  # routing key not UTF-8
])
def test_malformed_publish_is_502(payload: bytes) -> None:
    with pytest.raises(FrameError) as caught:
        frames.decode_publish(payload)
    assert caught.value.reply_code == 502


def test_decode_method_matches_pamqp() -> None:
    sent = commands.Queue.Declare(queue="orders", durable=True,
                                  arguments={"x-max-length": 10, "x-queue-type": "quorum"})
    decoded = frames.decode_method(payload_of(method_frame(1, sent)))
    assert isinstance(decoded, commands.Queue.Declare)
    assert dict(decoded) == dict(sent)


def test_unknown_method_is_503() -> None:
    with pytest.raises(FrameError) as caught:
        frames.decode_method(b"\x00\x63\x00\x63")
    assert caught.value.reply_code == 503


def test_malformed_method_arguments_are_502() -> None:
    payload = payload_of(method_frame(1, commands.Queue.Declare(
        queue="q", arguments={"x-max-length": 10})))
    with pytest.raises(FrameError) as caught:
        frames.decode_method(payload[:-3])  # the arguments table cut short
    assert caught.value.reply_code == 502


def test_decode_content_header() -> None:
    properties = commands.Basic.Properties(content_type="text/plain", delivery_mode=2)
    payload = payload_of(content_header(1, 1234, properties))
    header = frames.decode_content_header(payload)
    assert (header.class_id, header.body_size) == (60, 1234)
    assert header.properties == properties.marshal()
    with pytest.raises(FrameError) as caught:
        frames.decode_content_header(payload[:13])
    assert caught.value.reply_code == 501


# --- encoding --------------------------------------------------------------------------
def test_frame_and_encode_method_match_pamqp() -> None:
    method = commands.Basic.ConsumeOk("ctag")
    assert frames.encode_method(3, method) == method_frame(3, method)
    payload = payload_of(method_frame(3, method))
    assert frames.frame(FRAME_METHOD, 3, payload) == method_frame(3, method)
    assert frames.heartbeat_frame() == pamqp_frame.marshal(pamqp_heartbeat.Heartbeat(), 0)


PROPERTIES = commands.Basic.Properties(content_type="application/json", delivery_mode=2,
                                       headers={"a": 1, "b": "two"}, message_id="m-1")


def expected_content(channel: int, body: bytes) -> bytes:
    expected = content_header(channel, len(body), PROPERTIES)
    if body:
        expected += body_frame(channel, body)
    return expected


@pytest.mark.parametrize("body", [b"", b"x", b"payload" * 100])
@pytest.mark.parametrize("redelivered", [False, True])
def test_deliver_frames_match_pamqp(body: bytes, redelivered: bool) -> None:
    got = b"".join(frames.deliver_frames(
        7, "amq.ctag-abc", 2**40 + 3, redelivered, "amq.direct", "route.key",
        PROPERTIES.marshal(), body, 131_072))
    expected = method_frame(7, commands.Basic.Deliver(
        "amq.ctag-abc", 2**40 + 3, redelivered, "amq.direct", "route.key"))
    assert got == expected + expected_content(7, body)


@pytest.mark.parametrize("frame_max", [4096, 131_072])
def test_deliver_encoder_writes_the_bytes_of_deliver_frames(frame_max: int) -> None:
    """The consumer's encoder (constant parts encoded once, cached per exchange and routing
    key) writes what deliver_frames writes: empty, small and multi-frame bodies,
    redelivered or not, routes alternating, a cache that overflows, long names cut."""
    encoder = frames.DeliverEncoder(3, "amq.ctag-xyz")
    routes = [("amq.direct", "route.key"), ("", "q"), ("ex", "é" * 200)]
    routes += [("many", f"key-{n}") for n in range(frames.DELIVER_ROUTES_CACHED_MAX + 5)]
    bodies = [b"", b"x", b"payload" * 100, bytes(range(256)) * 40]
    properties = PROPERTIES.marshal()
    got: list[bytes] = []
    expected: list[bytes] = []
    for tag, (exchange, routing_key) in enumerate(routes * 2, start=2**33):
        body = bodies[tag % len(bodies)]
        redelivered = tag % 3 == 0
        encoder.add(got, tag, redelivered, exchange, routing_key, properties, body, frame_max)
        expected += frames.deliver_frames(3, "amq.ctag-xyz", tag, redelivered, exchange,
                                          routing_key, properties, body, frame_max)
    assert b"".join(got) == b"".join(expected)
    cut = FrameReader(frame_max).feed(b"".join(got))
    assert cut[0].type == FRAME_METHOD and cut[1].type == FRAME_HEADER


@pytest.mark.parametrize("body", [b"", b"get me"])
def test_get_ok_frames_match_pamqp(body: bytes) -> None:
    got = b"".join(frames.get_ok_frames(
        2, 9, True, "", "queue-name", 4_000_000_000, PROPERTIES.marshal(), body, 131_072))
    expected = method_frame(2, commands.Basic.GetOk(9, True, "", "queue-name", 4_000_000_000))
    assert got == expected + expected_content(2, body)


def test_return_frames_match_pamqp() -> None:
    got = b"".join(frames.return_frames(
        1, 312, "NO_ROUTE", "ex", "nowhere", PROPERTIES.marshal(), b"back", 131_072))
    expected = method_frame(1, commands.Basic.Return(312, "NO_ROUTE", "ex", "nowhere"))
    assert got == expected + expected_content(1, b"back")


@pytest.mark.parametrize("multiple", [False, True])
def test_ack_and_nack_frames_match_pamqp(multiple: bool) -> None:
    assert frames.ack_frame(5, 77, multiple) == method_frame(
        5, commands.Basic.Ack(77, multiple))
    assert frames.nack_frame(5, 77, multiple) == method_frame(
        5, commands.Basic.Nack(77, multiple, requeue=False))


def test_body_larger_than_frame_max_is_split_into_frame_max_frames() -> None:
    frame_max = 4096
    body = bytes(range(256)) * 40  # 10240 bytes: 4088 + 4088 + 2064
    parts = frames.content_frames(1, b"\x00\x00", body, frame_max)
    cut = FrameReader(frame_max).feed(b"".join(parts))
    assert [item.type for item in cut] == [FRAME_HEADER, FRAME_BODY, FRAME_BODY, FRAME_BODY]
    assert [len(item.payload) for item in cut[1:]] == [4088, 4088, 2064]
    assert b"".join(item.payload for item in cut[1:]) == body
    header = frames.decode_content_header(cut[0].payload)
    assert header.body_size == len(body)


def test_long_names_are_cut_on_a_character_boundary() -> None:
    """A record key longer than a shortstr (a Kafka key, say) becomes the routing key of a
    delivery: what goes on the wire must still be UTF-8 that a client can decode."""
    routing_key = "é" * 200  # 400 bytes; 255 would cut the 128th "é" in half
    wire = b"".join(frames.deliver_frames(1, "t", 1, False, "", routing_key, b"\x00\x00",
                                          b"", 131_072))
    _, _, deliver = pamqp_frame.unmarshal(wire)
    assert isinstance(deliver, commands.Basic.Deliver) and deliver.routing_key is not None
    assert routing_key.startswith(deliver.routing_key)
    assert len(deliver.routing_key.encode()) <= 255
