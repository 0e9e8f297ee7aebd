"""AMQP 0-9-1 frames: cutting the byte stream, and the hot methods written by hand.

Owns: the protocol header check, the frame reader (type, channel, payload; frame-max
and frame-end enforced before a frame is handed out), method decoding (pamqp for the
general case, a hand-written decoder for Basic.Publish), content-header parsing, and
encoders: every method through pamqp, plus hand-written Basic.Deliver / Basic.GetOk /
Basic.Ack / Basic.Nack / Basic.Return with their content frames, which are the
per-message hot path (pamqp costs ~28 µs per message in and out; these ~3 µs).

Sans-IO: bytes in, frames out; no sockets, no event loop, no broker.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pamqp import base as pamqp_base
from pamqp import commands
from pamqp import frame as pamqp_frame

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
FRAME_END_BYTES: Final = b"\xce"
FRAME_OVERHEAD: Final = 8  # type(1) + channel(2) + size(4) + frame-end(1)
FRAME_MIN_SIZE: Final = 4096  # the spec's frame-min-size
BASIC_CLASS: Final = 60

# Reply codes of the spec (section 1.9 of amqp0-9-1.xml).
REPLY_SUCCESS: Final = 200
CONTENT_TOO_LARGE: Final = 311
NO_ROUTE: Final = 312
NO_CONSUMERS: Final = 313
CONNECTION_FORCED: Final = 320
INVALID_PATH: Final = 402
ACCESS_REFUSED: Final = 403
NOT_FOUND: Final = 404
RESOURCE_LOCKED: Final = 405
PRECONDITION_FAILED: Final = 406
FRAME_ERROR: Final = 501
SYNTAX_ERROR: Final = 502
COMMAND_INVALID: Final = 503
CHANNEL_ERROR: Final = 504
UNEXPECTED_FRAME: Final = 505
RESOURCE_ERROR: Final = 506
NOT_ALLOWED: Final = 530
NOT_IMPLEMENTED: Final = 540
INTERNAL_ERROR: Final = 541

_FRAME_HEAD = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">HH")
_CONTENT_HEAD = struct.Struct(">HHQ")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_PUBLISH_ID: Final = b"\x00\x3c\x00\x28"  # Basic.Publish (60, 40)
_HEARTBEAT_FRAME: Final = b"\x08\x00\x00\x00\x00\x00\x00\xce"
# a content header frame's head and the fixed part of its payload: type, channel, size,
# class, weight, body size
_HEADER_FRAME_HEAD = struct.Struct(">BHIHHQ")
# the frame-end of the frame before, then a body frame's head: end, type, channel, size
_END_BODY_HEAD = struct.Struct(">BBHI")
_DELIVER_ID: Final = b"\x00\x3c\x00\x3c"  # Basic.Deliver (60, 60)
# a Basic.Ack's payload: class 60, method 80, delivery tag, bits (multiple = bit 0)
_ACK_PAYLOAD = struct.Struct(">HHQB")
ACK_PAYLOAD_BYTES: Final = _ACK_PAYLOAD.size  # 13
DELIVER_ROUTES_CACHED_MAX: Final = 256  # (exchange, routing key) pairs per consumer


class FrameError(Exception):
    """A frame the connection cannot survive: close it with ``reply_code``."""

    def __init__(self, reply_code: int, text: str) -> None:
        super().__init__(text)
        self.reply_code = reply_code
        self.text = text
        # FrameReader: valid frames read before this one
        self.frames: list[Frame | AckRun] = []


@dataclass(slots=True)
class Frame:
    type: int
    channel: int
    payload: bytes


@dataclass(slots=True)
class AckRun:
    """Consecutive Basic.Ack method frames of one channel, as the reader met them: the
    hot path of consuming (most clients ack each message with a frame of its own), so
    an ack costs one tuple in ``acks`` instead of a Frame, a payload copy, a method
    object and an event of its own. Order is kept: another frame in between starts a
    new run."""

    channel: int
    acks: list[tuple[int, bool]]  # (delivery tag, multiple), in arrival order

    def payloads(self) -> list[bytes]:
        """The runs's frames as payloads again (the general path's input)."""
        return [_ACK_PAYLOAD.pack(BASIC_CLASS, 80, tag, 1 if multiple else 0)
                for tag, multiple in self.acks]


@dataclass(slots=True)
class PublishMethod:
    """Basic.Publish decoded by hand (the hot path)."""

    exchange: str
    routing_key: str
    mandatory: bool
    immediate: bool


@dataclass(slots=True)
class ContentHeader:
    class_id: int
    body_size: int
    properties: bytes  # property flags + property list, exactly as received


def check_protocol_header(data: bytes) -> bool | None:
    """True: the AMQP 0-9-1 header; False: anything else; None: need more bytes."""
    if len(data) < len(PROTOCOL_HEADER):
        return None if PROTOCOL_HEADER.startswith(data) else False
    return data[: len(PROTOCOL_HEADER)] == PROTOCOL_HEADER


class FrameReader:
    """Bytes in, whole frames out; ``frame_bytes_max`` counts the 8 bytes of framing."""

    def __init__(self, frame_bytes_max: int) -> None:
        self.frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()
        self.error: FrameError | None = None

    def feed(self, data: bytes) -> list[Frame | AckRun]:
        """Whole frames from what arrived so far, consecutive Basic.Acks of one channel
        as one ``AckRun``. A bad frame raises FrameError whose ``frames`` are the valid
        frames before it (to be acted on); the reader stays failed."""
        if self.error is not None:
            self.error.frames = []  # those were handed out with the first raise
            raise self.error
        buffer = self._buffer
        buffer += data
        frames: list[Frame | AckRun] = []
        run: AckRun | None = None  # the last item of ``frames``, if it is a run of acks
        position = 0
        size_total = len(buffer)
        view = memoryview(buffer)  # one copy per payload, not two (slice, then bytes())
        while size_total - position >= 7:
            frame_type, channel, size = _FRAME_HEAD.unpack_from(buffer, position)
            if frame_type not in (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT):
                self.error = FrameError(FRAME_ERROR, f"unknown frame type {frame_type}")
                break
            if size + FRAME_OVERHEAD > self.frame_bytes_max:
                self.error = FrameError(
                    FRAME_ERROR,
                    f"frame of {size + FRAME_OVERHEAD} bytes exceeds frame-max "
                    f"{self.frame_bytes_max}",
                )
                break
            end = position + 7 + size
            if end >= size_total:
                break
            if buffer[end] != FRAME_END:
                self.error = FrameError(FRAME_ERROR, "frame-end octet missing")
                break
            if size == ACK_PAYLOAD_BYTES and frame_type == FRAME_METHOD:
                class_id, method, tag, bits = _ACK_PAYLOAD.unpack_from(buffer, position + 7)
                if class_id == BASIC_CLASS and method == 80:
                    if run is not None and run.channel == channel:
                        run.acks.append((tag, bool(bits & 1)))
                    else:
                        run = AckRun(channel, [(tag, bool(bits & 1))])
                        frames.append(run)
                    position = end + 1
                    continue
            run = None
            frames.append(Frame(frame_type, channel, bytes(view[position + 7 : end])))
            position = end + 1
        view.release()  # the buffer is resized below
        if self.error is not None:
            buffer.clear()
            self.error.frames = frames
            raise self.error
        if position:
            del buffer[:position]
        return frames

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)


# --- decoding --------------------------------------------------------------------------
def method_id(payload: bytes) -> tuple[int, int]:
    if len(payload) < 4:
        raise FrameError(FRAME_ERROR, "method frame shorter than its class and method ids")
    class_id, method = _METHOD_ID.unpack_from(payload)
    return class_id, method


def is_publish(payload: bytes) -> bool:
    return payload[:4] == _PUBLISH_ID


def decode_publish(payload: bytes) -> PublishMethod:
    """Basic.Publish: reserved short, exchange shortstr, routing-key shortstr, bits."""
    try:
        position = 6
        length = payload[position]
        exchange = payload[position + 1 : position + 1 + length].decode("utf-8")
        position += 1 + length
        length = payload[position]
        routing_key = payload[position + 1 : position + 1 + length].decode("utf-8")
        position += 1 + length
        bits = payload[position]
    except (IndexError, UnicodeDecodeError):
        raise FrameError(SYNTAX_ERROR, "malformed basic.publish") from None
    if position + 1 != len(payload):
        raise FrameError(SYNTAX_ERROR, "malformed basic.publish: trailing bytes")
    return PublishMethod(exchange, routing_key, bool(bits & 1), bool(bits & 2))


def decode_method(payload: bytes) -> pamqp_base.Frame:
    """Any method through pamqp; unknown ids and malformed arguments are FrameErrors."""
    class_id, method = method_id(payload)
    factory = commands.INDEX_MAPPING.get((class_id << 16) | method)
    if factory is None:
        raise FrameError(COMMAND_INVALID, f"unknown method {class_id}.{method}")
    value: pamqp_base.Frame = factory()
    try:
        value.unmarshal(payload[4:])
    except Exception as error:  # pamqp raises struct.error, ValueError, IndexError, ...
        raise FrameError(
            SYNTAX_ERROR, f"malformed {value.name}: {type(error).__name__}") from None
    return value


def decode_content_header(payload: bytes) -> ContentHeader:
    if len(payload) < 14:
        raise FrameError(FRAME_ERROR, "content header shorter than 14 bytes")
    class_id, _weight, body_size = _CONTENT_HEAD.unpack_from(payload)
    return ContentHeader(class_id, body_size, payload[12:])


# --- encoding --------------------------------------------------------------------------
def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return b"".join((_FRAME_HEAD.pack(frame_type, channel, len(payload)), payload,
                     FRAME_END_BYTES))


def encode_method(channel: int, method: pamqp_base.Frame) -> bytes:
    return pamqp_frame.marshal(method, channel)


def heartbeat_frame() -> bytes:
    return _HEARTBEAT_FRAME


def _shortstr(value: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > 255:  # cut on a character boundary
        data = data[:255].decode("utf-8", "ignore").encode("utf-8")
    return bytes((len(data),)) + data


def content_frames(channel: int, properties: bytes, body: bytes,
                   frame_bytes_max: int) -> list[bytes]:
    """The content header and body frames of one message (body split by frame-max)."""
    header_payload = _CONTENT_HEAD.pack(BASIC_CLASS, 0, len(body)) + properties
    parts = [_FRAME_HEAD.pack(FRAME_HEADER, channel, len(header_payload)), header_payload,
             FRAME_END_BYTES]
    chunk = frame_bytes_max - FRAME_OVERHEAD
    if len(body) <= chunk:
        if body:
            parts += (_FRAME_HEAD.pack(FRAME_BODY, channel, len(body)), body, FRAME_END_BYTES)
    else:
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            piece = view[start : start + chunk]
            parts += (_FRAME_HEAD.pack(FRAME_BODY, channel, len(piece)), bytes(piece),
                      FRAME_END_BYTES)
    return parts


def _with_content(channel: int, method: bytes, properties: bytes, body: bytes,
                  frame_bytes_max: int) -> list[bytes]:
    """A method frame (payload already encoded) followed by its content frames."""
    return [_FRAME_HEAD.pack(FRAME_METHOD, channel, len(method)), method, FRAME_END_BYTES,
            *content_frames(channel, properties, body, frame_bytes_max)]


class DeliverEncoder:
    """Basic.Deliver + content frames of one consumer on one channel, the hot path of
    consuming: what is the same for every delivery (the method frame's head with the
    consumer tag, and per exchange and routing key the rest of the method) is encoded
    once, so a message costs one 8-byte tag and two struct packs, appended to the
    caller's list (one ``b"".join`` and one write per batch). The bytes are exactly
    ``deliver_frames``'s."""

    def __init__(self, channel: int, consumer_tag: str) -> None:
        self.channel = channel
        self._consumer_tag = _shortstr(consumer_tag)
        # (exchange, routing key) -> (method frame head, rest not redelivered, redelivered)
        self._routes: dict[tuple[str, str], tuple[bytes, bytes, bytes]] = {}

    def _route(self, exchange: str, routing_key: str) -> tuple[bytes, bytes, bytes]:
        names = _shortstr(exchange) + _shortstr(routing_key)
        size = len(_DELIVER_ID) + len(self._consumer_tag) + 8 + 1 + len(names)
        head = _FRAME_HEAD.pack(FRAME_METHOD, self.channel, size) + _DELIVER_ID
        if len(self._routes) >= DELIVER_ROUTES_CACHED_MAX:
            self._routes.clear()
        route = self._routes[(exchange, routing_key)] = (
            head + self._consumer_tag, b"\x00" + names + FRAME_END_BYTES,
            b"\x01" + names + FRAME_END_BYTES)
        return route

    def add(self, parts: list[bytes], delivery_tag: int, redelivered: bool, exchange: str,
            routing_key: str, properties: bytes, body: bytes, frame_bytes_max: int) -> None:
        route = self._routes.get((exchange, routing_key))
        if route is None:
            route = self._route(exchange, routing_key)
        size = len(body)
        if not size or size > frame_bytes_max - FRAME_OVERHEAD:  # no body or several frames
            parts += (route[0], _U64.pack(delivery_tag), route[2] if redelivered else route[1],
                      *content_frames(self.channel, properties, body, frame_bytes_max))
            return
        channel = self.channel
        parts += (
            route[0], _U64.pack(delivery_tag), route[2] if redelivered else route[1],
            _HEADER_FRAME_HEAD.pack(FRAME_HEADER, channel, 12 + len(properties), BASIC_CLASS,
                                    0, size),
            properties, _END_BODY_HEAD.pack(FRAME_END, FRAME_BODY, channel, size), body,
            FRAME_END_BYTES,
        )


def deliver_frames(channel: int, consumer_tag: str, delivery_tag: int, redelivered: bool,
                   exchange: str, routing_key: str, properties: bytes, body: bytes,
                   frame_bytes_max: int) -> list[bytes]:
    """Basic.Deliver + content header + body frames, as a list ready for writelines."""
    method = b"".join((
        b"\x00\x3c\x00\x3c", _shortstr(consumer_tag), _U64.pack(delivery_tag),
        b"\x01" if redelivered else b"\x00", _shortstr(exchange), _shortstr(routing_key),
    ))
    return _with_content(channel, method, properties, body, frame_bytes_max)


def get_ok_frames(channel: int, delivery_tag: int, redelivered: bool, exchange: str,
                  routing_key: str, message_count: int, properties: bytes, body: bytes,
                  frame_bytes_max: int) -> list[bytes]:
    method = b"".join((
        b"\x00\x3c\x00\x47", _U64.pack(delivery_tag), b"\x01" if redelivered else b"\x00",
        _shortstr(exchange), _shortstr(routing_key), struct.pack(">I", message_count),
    ))
    return _with_content(channel, method, properties, body, frame_bytes_max)


def return_frames(channel: int, reply_code: int, reply_text: str, exchange: str,
                  routing_key: str, properties: bytes, body: bytes,
                  frame_bytes_max: int) -> list[bytes]:
    method = b"".join((
        b"\x00\x3c\x00\x32", _U16.pack(reply_code), _shortstr(reply_text),
        _shortstr(exchange), _shortstr(routing_key),
    ))
    return _with_content(channel, method, properties, body, frame_bytes_max)


def ack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    payload = b"".join((b"\x00\x3c\x00\x50", _U64.pack(delivery_tag),
                        b"\x01" if multiple else b"\x00"))
    return frame(FRAME_METHOD, channel, payload)


def nack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    payload = b"".join((b"\x00\x3c\x00\x78", _U64.pack(delivery_tag),
                        b"\x01" if multiple else b"\x00"))
    return frame(FRAME_METHOD, channel, payload)
