"""The AMQP 0-9-1 connection and channel state machine (sans-IO).

Owns: which frames and methods are allowed in which state, content assembly
(Basic.Publish + content header + body frames → one ``Publish`` event), and the
spec's choice between a connection error (the connection closes) and a channel error
(only the channel closes). Everything it accepts comes out as events for the
adapter; everything it rejects comes out as a fault event, after which it ignores
what the spec says to ignore (a closing channel discards everything but
Channel.Close / Close-Ok; a closing connection everything but Connection.Close /
Close-Ok).

Connection states (``ConnectionState``), each with what it accepts:

    HEADER       the 8-byte protocol header            -> START_OK
    START_OK     Connection.Start-Ok on channel 0      -> TUNE_OK
    TUNE_OK      Connection.Tune-Ok on channel 0       -> OPEN_WAIT
    OPEN_WAIT    Connection.Open on channel 0          -> OPEN
    OPEN         heartbeats; Connection.Close / Update-Secret on channel 0;
                 Channel.Open on a closed channel; class methods and content on an
                 open channel (table below)
    CLOSING      Connection.Close-Ok (-> CLOSED) or Connection.Close
    CLOSED       nothing

Channel states (``ChannelState``):

    OPEN         any client method; Basic.Publish -> EXPECT_HEADER
    EXPECT_HEADER a content header of class Basic -> EXPECT_BODY (or OPEN if empty)
    EXPECT_BODY  body frames until body-size bytes -> OPEN (emits Publish)
    CLOSING      (the server sent Channel.Close) only Close-Ok / Close

No sockets, no event loop, no broker.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from pamqp import base as pamqp_base
from pamqp import commands

from .frames import (
    BASIC_CLASS,
    CHANNEL_ERROR,
    COMMAND_INVALID,
    FRAME_BODY,
    FRAME_ERROR,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    PRECONDITION_FAILED,
    UNEXPECTED_FRAME,
    AckRun,
    FrameError,
    FrameReader,
    PublishMethod,
    check_protocol_header,
    decode_content_header,
    decode_method,
    decode_publish,
    is_publish,
    method_id,
)

_ACK_ID: Final = b"\x00\x3c\x00\x50"  # Basic.Ack (60, 80)


class ConnectionState(enum.Enum):
    HEADER = "header"
    START_OK = "start-ok"
    TUNE_OK = "tune-ok"
    OPEN_WAIT = "open-wait"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class ChannelState(enum.Enum):
    OPEN = "open"
    EXPECT_HEADER = "expect-header"
    EXPECT_BODY = "expect-body"
    CLOSING = "closing"


# Methods a client may send on an open channel (the others are server-to-client).
CLIENT_CHANNEL_METHODS: Final[frozenset[type[pamqp_base.Frame]]] = frozenset({
    commands.Channel.Flow, commands.Channel.FlowOk, commands.Channel.Close,
    commands.Channel.CloseOk,
    commands.Exchange.Declare, commands.Exchange.Delete, commands.Exchange.Bind,
    commands.Exchange.Unbind,
    commands.Queue.Declare, commands.Queue.Bind, commands.Queue.Purge, commands.Queue.Delete,
    commands.Queue.Unbind,
    commands.Basic.Qos, commands.Basic.Consume, commands.Basic.Cancel, commands.Basic.Get,
    commands.Basic.Ack, commands.Basic.Reject, commands.Basic.RecoverAsync,
    commands.Basic.Recover, commands.Basic.Nack, commands.Basic.CancelOk,
    commands.Tx.Select, commands.Tx.Commit, commands.Tx.Rollback, commands.Confirm.Select,
})


@dataclass(frozen=True, slots=True)
class HeaderAccepted:
    """The protocol header was right: send Connection.Start."""


@dataclass(frozen=True, slots=True)
class HeaderRejected:
    """Wrong protocol header: write ours and close the socket (spec 4.2.2)."""


@dataclass(slots=True)
class MethodReceived:
    channel: int
    method: pamqp_base.Frame


@dataclass(slots=True)
class AcksReceived:
    """Consecutive Basic.Acks on an open channel (one read's run, order kept): what
    ``MethodReceived`` with one ``Basic.Ack`` each would say, without an object per ack."""

    channel: int
    acks: list[tuple[int, bool]]  # (delivery tag, multiple)


@dataclass(slots=True)
class PublishReceived:
    channel: int
    method: PublishMethod
    properties: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionFault:
    """Send Connection.Close with this code; the machine is CLOSING already."""

    reply_code: int
    text: str
    class_id: int = 0
    method_id: int = 0


@dataclass(frozen=True, slots=True)
class ChannelFault:
    """Send Channel.Close on ``channel``; the machine set the channel CLOSING already."""

    channel: int
    reply_code: int
    text: str
    class_id: int = 0
    method_id: int = 0


Event = (HeaderAccepted | HeaderRejected | MethodReceived | AcksReceived | PublishReceived
         | HeartbeatReceived | ConnectionFault | ChannelFault)


@dataclass
class _Channel:
    state: ChannelState = ChannelState.OPEN
    publish: PublishMethod | None = None
    properties: bytes = b""
    body_size: int = 0
    body_parts: list[bytes] = field(default_factory=list)
    body_received: int = 0


_NEGOTIATION: Final = {
    ConnectionState.START_OK: commands.Connection.StartOk,
    ConnectionState.TUNE_OK: commands.Connection.TuneOk,
    ConnectionState.OPEN_WAIT: commands.Connection.Open,
}
_NEXT: Final = {
    ConnectionState.START_OK: ConnectionState.TUNE_OK,
    ConnectionState.TUNE_OK: ConnectionState.OPEN_WAIT,
    ConnectionState.OPEN_WAIT: ConnectionState.OPEN,
}


class ConnectionMachine:
    """Feed bytes with ``receive``; act on the events; tell it what the server closes."""

    def __init__(self, frame_bytes_max: int, channel_max: int, message_bytes_max: int) -> None:
        self.state = ConnectionState.HEADER
        self.channel_max = channel_max
        self.message_bytes_max = message_bytes_max
        self.reader = FrameReader(frame_bytes_max)
        self.channels: dict[int, _Channel] = {}
        self._header = b""
        self._reported = False  # the reader's error was turned into a fault

    # --- what the server decides -----------------------------------------------------
    def tuned(self, frame_bytes_max: int, channel_max: int) -> None:
        """The values agreed in Tune-Ok bind from now on."""
        self.reader.frame_bytes_max = frame_bytes_max
        self.channel_max = channel_max

    def close_channel(self, channel: int) -> None:
        """The server sends Channel.Close: discard frames until Close-Ok."""
        state = self.channels.get(channel)
        if state is not None:
            self.channels[channel] = _Channel(ChannelState.CLOSING)

    def close_connection(self) -> None:
        if self.state is not ConnectionState.CLOSED:
            self.state = ConnectionState.CLOSING

    # --- input ---------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self.state is ConnectionState.CLOSED:
            return events
        if self.state is ConnectionState.HEADER:
            self._header += data
            verdict = check_protocol_header(self._header)
            if verdict is None:
                return events
            if not verdict:
                self.state = ConnectionState.CLOSED
                return [HeaderRejected()]
            data = self._header[8:]
            self._header = b""
            self.state = ConnectionState.START_OK
            events.append(HeaderAccepted())
        failure: FrameError | None = None
        try:
            frames = self.reader.feed(data)
        except FrameError as error:
            frames, failure = error.frames, error
            # the reader keeps the error: without its traceback it holds no frame of
            # the adapter (and so no connection) in a cycle only the GC could free
            error.__traceback__ = None
        for item in frames:
            if self.state is ConnectionState.CLOSED:
                break
            if isinstance(item, AckRun):
                self._ack_run(item, events)
                continue
            try:
                event = self._frame(item.type, item.channel, item.payload)
            except FrameError as error:
                event = self._fail(error.reply_code, error.text)
            if event is not None:
                events.append(event)
        if failure is not None and not self._reported and self.state not in (
                ConnectionState.CLOSING, ConnectionState.CLOSED):
            self._reported = True
            events.append(self._fail(failure.reply_code, failure.text))
        return events

    def _ack_run(self, run: AckRun, events: list[Event]) -> None:
        """Acks on an open channel of an open connection become one event; anywhere
        else each goes the general way (``_frame``), which answers what the spec says
        (an ack between a publish and its content, on a closing or unopened channel)."""
        channel = run.channel
        state = self.channels.get(channel)
        if (self.state is ConnectionState.OPEN and state is not None
                and state.state is ChannelState.OPEN and channel <= self.channel_max):
            events.append(AcksReceived(channel, run.acks))
            return
        for payload in run.payloads():
            if self.state is ConnectionState.CLOSED:
                return
            try:
                event = self._frame(FRAME_METHOD, channel, payload)
            except FrameError as error:
                event = self._fail(error.reply_code, error.text)
            if event is not None:
                events.append(event)

    def _fail(self, reply_code: int, text: str, class_id: int = 0,
              method: int = 0) -> ConnectionFault:
        self.state = ConnectionState.CLOSING
        return ConnectionFault(reply_code, text, class_id, method)

    def _frame(self, frame_type: int, channel: int, payload: bytes) -> Event | None:
        state = self.state
        if state is ConnectionState.OPEN and channel and frame_type != FRAME_HEARTBEAT:
            # the hot path: content and methods on an open connection's channels
            if channel > self.channel_max:
                return self._fail(CHANNEL_ERROR, f"channel {channel} exceeds channel-max "
                                  f"{self.channel_max}")
            return self._channel_frame(frame_type, channel, payload)
        if state is ConnectionState.CLOSING:
            # after Connection.Close only Close / Close-Ok count; anything else,
            # malformed or not, is discarded (spec 2.2.4: no second close)
            if frame_type == FRAME_METHOD and channel == 0:
                try:
                    method = decode_method(payload)
                except FrameError:
                    return None
                if isinstance(method, commands.Connection.CloseOk):
                    self.state = ConnectionState.CLOSED
                    return MethodReceived(0, method)
                if isinstance(method, commands.Connection.Close):
                    return MethodReceived(0, method)
            return None
        if frame_type == FRAME_HEARTBEAT:
            if channel != 0:
                return self._fail(FRAME_ERROR, "heartbeat on a channel other than 0")
            return HeartbeatReceived()
        if state in _NEGOTIATION:
            if frame_type != FRAME_METHOD or channel != 0:
                return self._fail(COMMAND_INVALID, "connection negotiation is on channel 0")
            method = decode_method(payload)
            if not isinstance(method, _NEGOTIATION[state]):
                if isinstance(method, commands.Connection.Close):
                    return MethodReceived(0, method)
                return self._fail(COMMAND_INVALID, f"expected {_NEGOTIATION[state].__name__}, "
                                  f"got {method.name}", *method_id(payload))
            self.state = _NEXT[state]
            return MethodReceived(0, method)
        if channel == 0:
            return self._connection_frame(frame_type, payload)
        if channel > self.channel_max:
            return self._fail(CHANNEL_ERROR, f"channel {channel} exceeds channel-max "
                              f"{self.channel_max}")
        return self._channel_frame(frame_type, channel, payload)

    def _connection_frame(self, frame_type: int, payload: bytes) -> Event | None:
        if frame_type != FRAME_METHOD:
            return self._fail(COMMAND_INVALID, "content frames on channel 0")
        method = decode_method(payload)
        if isinstance(method, commands.Connection.Close | commands.Connection.UpdateSecret):
            return MethodReceived(0, method)
        if isinstance(method, commands.Connection.CloseOk):
            return None
        return self._fail(COMMAND_INVALID, f"{method.name} is not allowed on channel 0",
                          *method_id(payload))

    def _channel_frame(self, frame_type: int, channel: int, payload: bytes) -> Event | None:
        state = self.channels.get(channel)
        if state is None:
            if frame_type == FRAME_METHOD:
                method = decode_method(payload)
                if isinstance(method, commands.Channel.Open):
                    self.channels[channel] = _Channel()
                    return MethodReceived(channel, method)
                if isinstance(method, commands.Channel.CloseOk):
                    return None  # answer to a close already forgotten
            return self._fail(CHANNEL_ERROR, f"channel {channel} is not open")
        if state.state is ChannelState.CLOSING:
            if frame_type == FRAME_METHOD:
                class_id, method_number = method_id(payload)
                if (class_id, method_number) in ((20, 40), (20, 41)):  # Close, Close-Ok
                    del self.channels[channel]
                    return MethodReceived(channel, decode_method(payload))
            return None
        if state.state is ChannelState.EXPECT_HEADER:
            if frame_type != FRAME_HEADER:
                return self._fail(UNEXPECTED_FRAME, "expected a content header after "
                                  "basic.publish", 60, 40)
            header = decode_content_header(payload)
            if header.class_id != BASIC_CLASS:
                return self._fail(UNEXPECTED_FRAME, "content header of a class other "
                                  "than basic", 60, 40)
            if header.body_size > self.message_bytes_max:
                self.close_channel(channel)
                return ChannelFault(channel, PRECONDITION_FAILED,
                                    f"message size {header.body_size} is larger than the "
                                    f"maximum {self.message_bytes_max}", 60, 40)
            state.properties = header.properties
            state.body_size = header.body_size
            if header.body_size == 0:
                return self._published(channel, state)
            state.state = ChannelState.EXPECT_BODY
            return None
        if state.state is ChannelState.EXPECT_BODY:
            if frame_type != FRAME_BODY:
                return self._fail(UNEXPECTED_FRAME, "expected a content body frame", 60, 40)
            state.body_received += len(payload)
            if state.body_received > state.body_size:
                return self._fail(FRAME_ERROR, "content body longer than its header said")
            state.body_parts.append(payload)
            if state.body_received == state.body_size:
                return self._published(channel, state)
            return None
        if frame_type != FRAME_METHOD:
            return self._fail(UNEXPECTED_FRAME, "content frame without basic.publish")
        if is_publish(payload):
            state.publish = decode_publish(payload)
            state.state = ChannelState.EXPECT_HEADER
            return None
        if payload[:4] == _ACK_ID and len(payload) == 13:  # Basic.Ack, the other hot method
            return MethodReceived(channel, commands.Basic.Ack(
                int.from_bytes(payload[4:12], "big"), bool(payload[12] & 1)))
        method = decode_method(payload)
        if type(method) not in CLIENT_CHANNEL_METHODS:
            if isinstance(method, commands.Channel.Open):
                return self._fail(CHANNEL_ERROR, f"channel {channel} is already open", 20, 10)
            return self._fail(COMMAND_INVALID, f"{method.name} is not allowed from a client "
                              "on a channel", *method_id(payload))
        if isinstance(method, commands.Channel.Close | commands.Channel.CloseOk):
            del self.channels[channel]
        return MethodReceived(channel, method)

    def _published(self, channel: int, state: _Channel) -> PublishReceived:
        assert state.publish is not None
        parts = state.body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        event = PublishReceived(channel, state.publish, state.properties, body)
        state.state = ChannelState.OPEN
        state.publish = None
        state.body_parts = []
        state.body_received = 0
        return event
