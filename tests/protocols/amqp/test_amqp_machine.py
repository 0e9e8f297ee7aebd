"""The AMQP connection / channel state machine (sans-IO), state by state.

Goal: every row of the state table in machine.py's docstring holds: negotiation
in order on channel 0; content assembled from Publish + header + body frames per
channel; connection errors (501 framing, 503 wrong method, 504 channel, 505
unexpected content) put the machine in CLOSING, where it ignores everything but
Connection.Close / Close-Ok; channel errors (406 message too large) close only
their channel, which then discards everything until Close / Close-Ok. Method:
bytes written with pamqp fed to ``ConnectionMachine.receive``; events compared.
"""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp import heartbeat as pamqp_heartbeat

from conveyor.protocols.amqp.frames import PROTOCOL_HEADER, PublishMethod
from conveyor.protocols.amqp.machine import (
    AcksReceived,
    ChannelFault,
    ChannelState,
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

FRAME_MAX = 4096
CHANNEL_MAX = 16
MESSAGE_MAX = 10_000

START_OK = commands.Connection.StartOk(client_properties={"product": "t"}, mechanism="PLAIN",
                                       response="\0guest\0guest", locale="en_US")
TUNE_OK = commands.Connection.TuneOk(CHANNEL_MAX, FRAME_MAX, 0)
OPEN = commands.Connection.Open("/")


def method(channel: int, value: Any) -> bytes:
    return pamqp_frame.marshal(value, channel)


def header(channel: int, body_size: int, class_id: int = 60,
           properties: commands.Basic.Properties | None = None) -> bytes:
    data = pamqp_frame.marshal(pamqp_header.ContentHeader(
        0, body_size, properties or commands.Basic.Properties()), channel)
    if class_id != 60:
        data = data[:7] + class_id.to_bytes(2, "big") + data[9:]
    return data


def body(channel: int, data: bytes) -> bytes:
    return pamqp_frame.marshal(pamqp_body.ContentBody(data), channel)


def publish(channel: int, routing_key: str = "q", exchange: str = "") -> bytes:
    return method(channel, commands.Basic.Publish(exchange=exchange, routing_key=routing_key))


HEARTBEAT = pamqp_frame.marshal(pamqp_heartbeat.Heartbeat(), 0)


def fresh() -> ConnectionMachine:
    return ConnectionMachine(FRAME_MAX, CHANNEL_MAX, MESSAGE_MAX)


def opened(*channels: int) -> ConnectionMachine:
    machine = fresh()
    machine.receive(PROTOCOL_HEADER + method(0, START_OK) + method(0, TUNE_OK) + method(0, OPEN)
                    + b"".join(method(number, commands.Channel.Open()) for number in channels))
    assert machine.state is ConnectionState.OPEN
    return machine


def shape(events: list[Event]) -> list[Any]:
    """Events with pamqp methods replaced by (class name, arguments) for comparison."""
    result: list[Any] = []
    for event in events:
        if isinstance(event, MethodReceived):
            result.append(("method", event.channel, type(event.method).__name__,
                           dict(event.method)))
        else:
            result.append(event)
    return result


def only_fault(events: list[Event]) -> ConnectionFault:
    assert len(events) == 1 and isinstance(events[0], ConnectionFault), events
    return events[0]


# --- negotiation -----------------------------------------------------------------------
def test_negotiation_in_order() -> None:
    machine = fresh()
    assert machine.receive(PROTOCOL_HEADER) == [HeaderAccepted()]
    assert machine.state is ConnectionState.START_OK
    for value, state in ((START_OK, ConnectionState.TUNE_OK),
                         (TUNE_OK, ConnectionState.OPEN_WAIT), (OPEN, ConnectionState.OPEN)):
        events = machine.receive(method(0, value))
        assert shape(events) == [("method", 0, type(value).__name__, dict(value))]
        assert machine.state is state


def test_header_and_frames_byte_by_byte() -> None:
    stream = PROTOCOL_HEADER + method(0, START_OK) + method(0, TUNE_OK) + method(0, OPEN)
    machine = fresh()
    events: list[Event] = []
    for index in range(len(stream)):
        events += machine.receive(stream[index : index + 1])
    assert [type(event) for event in events] == [HeaderAccepted] + [MethodReceived] * 3
    assert machine.state is ConnectionState.OPEN


@pytest.mark.parametrize("wrong", [b"AMQP\x00\x00\x08\x00", b"AMQX", b"\x16\x03\x01\x02\x00"])
def test_wrong_protocol_header_is_rejected_and_the_rest_ignored(wrong: bytes) -> None:
    machine = fresh()
    assert machine.receive(wrong) == [HeaderRejected()]
    assert machine.state is ConnectionState.CLOSED
    assert machine.receive(PROTOCOL_HEADER + method(0, START_OK)) == []


@pytest.mark.parametrize(("stream", "ids"), [
    (method(0, OPEN), (10, 40)),  # Open before Start-Ok
    (method(0, START_OK) + method(0, OPEN), (10, 40)),  # Open before Tune-Ok
    (method(0, START_OK) + method(0, TUNE_OK) + method(0, TUNE_OK), (10, 31)),
])
def test_negotiation_out_of_order_is_503(stream: bytes, ids: tuple[int, int]) -> None:
    machine = fresh()
    events = machine.receive(PROTOCOL_HEADER + stream)
    fault = events[-1]
    assert isinstance(fault, ConnectionFault)
    assert (fault.reply_code, fault.class_id, fault.method_id) == (503, *ids)
    assert machine.state is ConnectionState.CLOSING


def test_class_method_before_connection_open_is_503() -> None:
    machine = fresh()
    machine.receive(PROTOCOL_HEADER + method(0, START_OK) + method(0, TUNE_OK))
    fault = only_fault(machine.receive(method(1, commands.Queue.Declare(queue="q"))))
    assert fault.reply_code == 503


def test_connection_close_is_accepted_during_negotiation() -> None:
    machine = fresh()
    machine.receive(PROTOCOL_HEADER)
    events = machine.receive(method(0, commands.Connection.Close(200, "bye", 0, 0)))
    assert [type(event) for event in events] == [MethodReceived]


# --- heartbeats and channel 0 ----------------------------------------------------------
def test_heartbeats() -> None:
    machine = opened()
    assert machine.receive(HEARTBEAT) == [HeartbeatReceived()]
    fault = only_fault(machine.receive(b"\x08\x00\x01\x00\x00\x00\x00\xce"))
    assert fault.reply_code == 501


def test_class_methods_and_content_on_channel_0_are_503() -> None:
    assert only_fault(opened().receive(method(0, commands.Queue.Declare(queue="q")))
                      ).reply_code == 503
    assert only_fault(opened().receive(header(0, 1))).reply_code == 503


def test_connection_methods_allowed_on_channel_0_when_open() -> None:
    machine = opened()
    events = machine.receive(method(0, commands.Connection.UpdateSecret("new", "rotate"))
                             + method(0, commands.Connection.CloseOk())
                             + method(0, commands.Connection.Close(200, "bye", 0, 0)))
    assert [type(event.method).__name__ for event in events
            if isinstance(event, MethodReceived)] == ["UpdateSecret", "Close"]
    assert len(events) == 2  # the stray Close-Ok is dropped


# --- channels --------------------------------------------------------------------------
def test_channel_open_and_client_close() -> None:
    machine = opened()
    events = machine.receive(method(3, commands.Channel.Open()))
    assert shape(events)[0][:3] == ("method", 3, "Open")
    assert machine.channels[3].state is ChannelState.OPEN
    events = machine.receive(method(3, commands.Channel.Close(200, "bye", 0, 0)))
    assert shape(events)[0][:3] == ("method", 3, "Close")
    assert 3 not in machine.channels
    assert only_fault(machine.receive(method(3, commands.Basic.Qos(prefetch_count=1)))
                      ).reply_code == 504


def test_method_on_an_unopened_channel_is_504() -> None:
    assert only_fault(opened().receive(method(2, commands.Basic.Qos(prefetch_count=1)))
                      ).reply_code == 504
    assert only_fault(opened().receive(header(2, 1))).reply_code == 504
    assert only_fault(opened().receive(body(2, b"x"))).reply_code == 504


def ack(channel: int, tag: int, multiple: bool = False) -> bytes:
    return method(channel, commands.Basic.Ack(tag, multiple))


def test_acks_on_an_open_channel_are_one_event_per_run() -> None:
    machine = opened(1, 2)
    events = machine.receive(ack(1, 1) + ack(1, 2) + ack(2, 9, True)
                             + method(1, commands.Basic.Qos(prefetch_count=3)) + ack(1, 3))
    assert shape(events) == [
        AcksReceived(1, [(1, False), (2, False)]), AcksReceived(2, [(9, True)]),
        ("method", 1, "Qos", dict(commands.Basic.Qos(prefetch_count=3))),
        AcksReceived(1, [(3, False)]),
    ]


def test_acks_elsewhere_get_the_answers_of_single_methods() -> None:
    """A run of acks not on a plain open channel goes frame by frame the general way:
    on an unopened channel 504, between a publish and its content 505, on channel 0
    503, on a channel the server closed discarded (until Close / Close-Ok)."""
    assert only_fault(opened().receive(ack(2, 1) + ack(2, 2))).reply_code == 504
    assert only_fault(opened(1).receive(publish(1) + ack(1, 1) + ack(1, 2))
                      ).reply_code == 505
    assert only_fault(opened().receive(ack(0, 1))).reply_code == 503
    machine = opened(1)
    machine.close_channel(1)
    assert machine.receive(ack(1, 1) + ack(1, 2)) == []


def test_close_ok_on_a_forgotten_channel_is_ignored() -> None:
    assert opened().receive(method(2, commands.Channel.CloseOk())) == []


def test_second_channel_open_is_504() -> None:
    fault = only_fault(opened(1).receive(method(1, commands.Channel.Open())))
    assert (fault.reply_code, fault.class_id, fault.method_id) == (504, 20, 10)


def test_channel_above_channel_max_is_504() -> None:
    fault = only_fault(opened().receive(method(CHANNEL_MAX + 1, commands.Channel.Open())))
    assert fault.reply_code == 504


@pytest.mark.parametrize("value", [
    commands.Basic.Deliver("ctag", 1, False, "", "rk"),
    commands.Basic.GetOk(1, False, "", "rk", 0),
    commands.Basic.ConsumeOk("ctag"),
    commands.Queue.DeclareOk("q", 0, 0),
    commands.Channel.OpenOk(),
])
def test_server_methods_sent_by_the_client_are_503(value: Any) -> None:
    fault = only_fault(opened(1).receive(method(1, value)))
    assert fault.reply_code == 503
    assert (fault.class_id << 16 | fault.method_id) == value.index


def test_unknown_method_is_503_malformed_arguments_502() -> None:
    assert only_fault(opened(1).receive(b"\x01\x00\x01\x00\x00\x00\x04\x00\x63\x00\x01\xce")
                      ).reply_code == 503
    declare = method(1, commands.Queue.Declare(queue="q", arguments={"a": 1}))
    cut = declare[:3] + (len(declare) - 8 - 3).to_bytes(4, "big") + declare[7:-4] + b"\xce"
    assert only_fault(opened(1).receive(cut)).reply_code == 502


# --- content ---------------------------------------------------------------------------
def test_publish_is_assembled_from_header_and_body_frames() -> None:
    machine = opened(1)
    properties = commands.Basic.Properties(content_type="text/plain", delivery_mode=2)
    assert machine.receive(publish(1, "rk", "ex") + header(1, 11, properties=properties)) == []
    assert machine.channels[1].state is ChannelState.EXPECT_BODY
    assert machine.receive(body(1, b"hello ")) == []
    events = machine.receive(body(1, b"world"))
    assert events == [PublishReceived(1, PublishMethod("ex", "rk", False, False),
                                      properties.marshal(), b"hello world")]
    assert machine.channels[1].state is ChannelState.OPEN


def test_empty_body_is_published_at_the_header() -> None:
    machine = opened(1)
    events = machine.receive(publish(1) + header(1, 0))
    assert events == [PublishReceived(1, PublishMethod("", "q", False, False),
                                      b"\x00\x00", b"")]


def test_channels_assemble_content_independently() -> None:
    machine = opened(1, 2)
    events = machine.receive(publish(1, "one") + publish(2, "two") + header(2, 3)
                             + header(1, 3) + body(1, b"aaa") + HEARTBEAT + body(2, b"bbb"))
    published = [(event.channel, event.method.routing_key, event.body) for event in events
                 if isinstance(event, PublishReceived)]
    assert published == [(1, "one", b"aaa"), (2, "two", b"bbb")]
    assert HeartbeatReceived() in events


@pytest.mark.parametrize(("stream", "code"), [
    (publish(1) + method(1, commands.Basic.Qos(prefetch_count=1)), 505),  # header expected
    (publish(1) + body(1, b"x"), 505),  # header expected, body came
    (publish(1) + header(1, 1, class_id=50), 505),  # header of class queue
    (publish(1) + header(1, 2) + method(1, commands.Basic.Qos(prefetch_count=1)), 505),
    (publish(1) + header(1, 2) + header(1, 2), 505),  # a second header
    (publish(1) + header(1, 2) + body(1, b"abc"), 501),  # more body than announced
    (header(1, 1), 505),  # content header without publish
    (body(1, b"x"), 505),  # content body without publish
])
def test_content_out_of_sequence(stream: bytes, code: int) -> None:
    machine = opened(1)
    events = machine.receive(stream)
    fault = events[-1]
    assert isinstance(fault, ConnectionFault) and fault.reply_code == code, events
    assert machine.state is ConnectionState.CLOSING


def test_message_over_message_bytes_max_closes_only_its_channel() -> None:
    machine = opened(1, 2)
    events = machine.receive(publish(1) + header(1, MESSAGE_MAX + 1))
    assert len(events) == 1 and isinstance(events[0], ChannelFault)
    fault = events[0]
    assert (fault.channel, fault.reply_code, fault.class_id, fault.method_id) == (1, 406, 60, 40)
    assert machine.state is ConnectionState.OPEN
    assert machine.channels[1].state is ChannelState.CLOSING
    # The body frames still on their way, and anything else, are discarded.
    assert machine.receive(body(1, b"x" * 4000) + method(1, commands.Basic.Qos(
        prefetch_count=1)) + publish(1) + header(1, 1)) == []
    # Channel 2 is untouched.
    events = machine.receive(publish(2) + header(2, 2) + body(2, b"ok"))
    assert [type(event) for event in events] == [PublishReceived]
    # Close-Ok ends the close; the number can be opened again.
    events = machine.receive(method(1, commands.Channel.CloseOk()))
    assert shape(events)[0][:3] == ("method", 1, "CloseOk")
    assert 1 not in machine.channels
    assert shape(machine.receive(method(1, commands.Channel.Open())))[0][:3] == (
        "method", 1, "Open")


def test_message_of_exactly_message_bytes_max_is_accepted() -> None:
    machine = opened(1)
    events = machine.receive(publish(1) + header(1, MESSAGE_MAX) + body(1, b"x" * 4000)
                             + body(1, b"x" * 4000) + body(1, b"x" * 2000))
    assert len(events) == 1 and isinstance(events[0], PublishReceived)
    assert len(events[0].body) == MESSAGE_MAX


def test_server_closed_channel_discards_until_close() -> None:
    machine = opened(1)
    machine.close_channel(1)
    assert machine.receive(method(1, commands.Basic.Qos(prefetch_count=1)) + header(1, 1)) == []
    events = machine.receive(method(1, commands.Channel.Close(200, "crossed", 0, 0)))
    assert shape(events)[0][:3] == ("method", 1, "Close")
    assert 1 not in machine.channels


def test_tuned_values_bind() -> None:
    machine = opened(1)
    machine.tuned(FRAME_MAX, 1)
    assert only_fault(machine.receive(method(2, commands.Channel.Open()))).reply_code == 504
    machine = opened(1)
    machine.tuned(FRAME_MAX // 2, CHANNEL_MAX)
    assert only_fault(machine.receive(body(1, b"x" * (FRAME_MAX // 2)))).reply_code == 501


# --- after a connection error ----------------------------------------------------------
def test_closing_connection_ignores_all_but_close_and_close_ok() -> None:
    machine = opened(1)
    only_fault(machine.receive(header(1, 1)))
    assert machine.state is ConnectionState.CLOSING
    assert machine.receive(method(1, commands.Basic.Qos(prefetch_count=1)) + publish(1)
                           + method(2, commands.Channel.Open())
                           + method(0, commands.Connection.UpdateSecret("s", "r"))) == []
    events = machine.receive(method(0, commands.Connection.CloseOk()))
    assert shape(events)[0][:3] == ("method", 0, "CloseOk")
    assert machine.state is ConnectionState.CLOSED
    assert machine.receive(method(0, commands.Connection.Close(200, "x", 0, 0))) == []


def test_closing_connection_answers_a_crossing_close() -> None:
    machine = opened()
    machine.close_connection()
    events = machine.receive(method(0, commands.Connection.Close(200, "bye", 0, 0)))
    assert shape(events)[0][:3] == ("method", 0, "Close")


@pytest.mark.parametrize("stray", [
    b"\x01\x00\x00\x00\x00\x00\x04\x00\x63\x00\x63\xce",  # unknown method on channel 0
    b"\x08\x00\x05\x00\x00\x00\x00\xce",  # heartbeat on channel 5
    b"\x01\x00\x00\x00\x00\x00\x02\x00\x0a\xce",  # method frame too short for its ids
    b"\x02\x00\x00\x00\x00\x00\x00\xce",  # content header on channel 0
])
def test_closing_connection_raises_no_second_fault(stray: bytes) -> None:
    """machine.py: "a closing connection [ignores] everything but Connection.Close /
    Close-Ok" — a second ConnectionFault makes the adapter send a second Connection.Close."""
    machine = opened(1)
    only_fault(machine.receive(header(1, 1)))
    assert machine.receive(stray) == []
    assert machine.state is ConnectionState.CLOSING


# --- chunking --------------------------------------------------------------------------
def test_frames_before_a_malformed_frame_in_the_same_read_are_not_lost() -> None:
    """What a connection does must not depend on how TCP cut the stream: a valid frame
    ahead of a broken one is handled whether they arrive in one read or in two."""
    good = method(1, commands.Channel.Open()) + publish(1) + header(1, 2) + body(1, b"ok")
    broken = method(1, commands.Channel.Flow(True))[:-1] + b"\x00"  # frame-end missing

    apart = opened()
    expected = apart.receive(good) + apart.receive(broken)
    assert [type(event) for event in expected] == [MethodReceived, PublishReceived,
                                                    ConnectionFault]
    together = opened()
    assert shape(together.receive(good + broken)) == shape(expected)


def test_nothing_is_handed_out_twice_after_a_frame_error() -> None:
    machine = opened()
    close = method(0, commands.Connection.Close(200, "bye", 0, 0))
    broken = method(1, commands.Channel.Flow(True))[:-1] + b"\x00"
    events = machine.receive(close + broken)
    assert [type(event) for event in events] == [MethodReceived, ConnectionFault]
    assert machine.receive(HEARTBEAT + method(0, commands.Connection.CloseOk())) == []
    assert machine.receive(b"anything") == []
