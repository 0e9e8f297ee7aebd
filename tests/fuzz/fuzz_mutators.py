"""Mutations of recorded client traffic, deterministic for a given ``random.Random``.

Owns: byte-level mutators (bit flips, byte insert/delete, interesting integers,
truncation, splicing) and the framing seams that let a mutation reach past each
protocol's framing: a ``Framing`` splits a connection's bytes into frames, and
after a mutation of one frame's body re-writes that frame's length field, so the
server's parser sees a well-framed but damaged request.
Must not know: sockets, servers, which listener is being fuzzed.
Adding a protocol: write a ``Framing`` (or use ``NO_FRAMING``).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Values that make length and count fields interesting: empty, null (-1), sign
# edges and "huge" (the kio over-allocation of issue 9 came from a huge count).
INTERESTING_INTEGERS: tuple[int, ...] = (
    0, 1, -1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF,
    0x7FFFFFFF, -0x80000000, 0xFFFFFFFF, 0x10000, 0x100000, 0x0FFFFFFF,
)
INPUT_BYTES_MAX = 1 << 20  # keep one input at most 1 MiB: mutations may grow fields


@dataclass(frozen=True, slots=True)
class Frame:
    header: bytes  # the bytes in front of the body, holding its length
    body: bytes
    trailer: bytes = b""  # AMQP's frame-end octet


@dataclass(frozen=True, slots=True)
class Framing:
    """How one protocol frames a connection: split into frames and join them again."""

    name: str
    split: Callable[[bytes], tuple[bytes, list[Frame], bytes]]  # prefix, frames, rest
    reframe: Callable[[Frame, bytes], Frame]  # the same frame with a new body, length fixed
    # mutators that know the body's format (JSON), tried on most frame mutations
    body_mutators: tuple[Callable[[random.Random, bytes, Sequence[bytes]], bytes], ...] = ()


def _no_split(data: bytes) -> tuple[bytes, list[Frame], bytes]:
    return b"", [], data


NO_FRAMING = Framing("none", _no_split, lambda frame, body: Frame(frame.header, body))


def _kafka_split(data: bytes) -> tuple[bytes, list[Frame], bytes]:
    frames: list[Frame] = []
    position = 0
    while position + 4 <= len(data):
        (size,) = struct.unpack_from(">i", data, position)
        if size < 0 or position + 4 + size > len(data):
            break
        frames.append(Frame(data[position:position + 4], data[position + 4:position + 4 + size]))
        position += 4 + size
    return b"", frames, data[position:]


KAFKA_FRAMING = Framing(
    "kafka", _kafka_split, lambda frame, body: Frame(struct.pack(">i", len(body)), body))

AMQP_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


def _amqp_split(data: bytes) -> tuple[bytes, list[Frame], bytes]:
    prefix = AMQP_PROTOCOL_HEADER if data.startswith(AMQP_PROTOCOL_HEADER) else b""
    frames: list[Frame] = []
    position = len(prefix)
    while position + 8 <= len(data):
        _kind, _channel, size = struct.unpack_from(">BHI", data, position)
        end = position + 7 + size
        if end + 1 > len(data):
            break
        frames.append(Frame(data[position:position + 7], data[position + 7:end],
                            data[end:end + 1]))
        position = end + 1
    return prefix, frames, data[position:]


def _amqp_reframe(frame: Frame, body: bytes) -> Frame:
    return Frame(frame.header[:3] + struct.pack(">I", len(body)), body, frame.trailer)


AMQP_FRAMING = Framing("amqp", _amqp_split, _amqp_reframe)


def _http_split(data: bytes) -> tuple[bytes, list[Frame], bytes]:
    """Requests as frames: header block (with Content-Length) + body."""
    frames: list[Frame] = []
    position = 0
    while (end_of_head := data.find(b"\r\n\r\n", position)) != -1:
        head = data[position:end_of_head + 4]
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        if end_of_head + 4 + length > len(data):
            break
        frames.append(Frame(head, data[end_of_head + 4:end_of_head + 4 + length]))
        position = end_of_head + 4 + length
    return b"", frames, data[position:]


def _http_reframe(frame: Frame, body: bytes) -> Frame:
    lines = frame.header.split(b"\r\n")
    fixed = [
        b"content-length: %d" % len(body)
        if line.partition(b":")[0].strip().lower() == b"content-length" else line
        for line in lines
    ]
    return Frame(b"\r\n".join(fixed), body)


HTTP_FRAMING = Framing("http", _http_split, _http_reframe)

# --- byte mutators: (rng, data, corpus) -> data ----------------------------------------

Mutator = Callable[[random.Random, bytes, Sequence[bytes]], bytes]


def flip_bits(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 3))):
        out[rng.randrange(len(out))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    return bytes(out)


def insert_bytes(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    position = rng.randrange(len(data) + 1)
    count = rng.choice((1, 1, 2, 4, 16, 256))
    filler = rng.choice((bytes([rng.randrange(256)]) * count, rng.randbytes(count)))
    return data[:position] + filler + data[position:]


def delete_bytes(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    if not data:
        return data
    position = rng.randrange(len(data))
    count = rng.choice((1, 1, 2, 4, 16))
    return data[:position] + data[position + count:]


def set_integer(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    """Overwrite 1, 2, 4 or 8 bytes at a random place with an interesting value."""
    width = rng.choice((1, 2, 4, 4, 8))
    if len(data) < width:
        return data
    position = rng.randrange(len(data) - width + 1)
    value = rng.choice(INTERESTING_INTEGERS) & ((1 << (8 * width)) - 1)
    order = rng.choice(("big", "big", "big", "little"))
    encoded = value.to_bytes(width, order)  # type: ignore[arg-type]
    return data[:position] + encoded + data[position + width:]


def grow_integer(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    """Add a small or large amount to a big-endian 2- or 4-byte field (lengths, counts)."""
    width = rng.choice((2, 4))
    if len(data) < width:
        return data
    position = rng.randrange(len(data) - width + 1)
    value = int.from_bytes(data[position:position + width], "big")
    value = (value + rng.choice((1, 2, 16, 1000, 1 << 20, 1 << 30))) % (1 << (8 * width))
    return data[:position] + value.to_bytes(width, "big") + data[position + width:]


def set_count(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    """Find a 2- or 4-byte big-endian field holding a small value (a likely length or count)
    and set it to an interesting one: where the over-allocation and null-array bugs live."""
    width = rng.choice((2, 4, 4))
    candidates = [
        position for position in range(len(data) - width + 1)
        if 0 < int.from_bytes(data[position:position + width], "big") <= 4096
    ]
    if not candidates:
        return data
    position = rng.choice(candidates)
    value = rng.choice(INTERESTING_INTEGERS) & ((1 << (8 * width)) - 1)
    return data[:position] + value.to_bytes(width, "big") + data[position + width:]


def set_varint(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    """Replace a small byte (a likely compact length, count + 1) with a huge unsigned varint,
    as Kafka's flexible versions encode them."""
    candidates = [position for position, byte in enumerate(data) if 0 < byte <= 0x40]
    if not candidates:
        return data
    position = rng.choice(candidates)
    value = rng.choice((0x7FFFFFFF, 0xFFFFFFFF, 1 << 28, 1 << 35, 1 << 20))
    encoded = bytearray()
    while value >= 0x80:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    return data[:position] + bytes(encoded) + data[position + 1:]


def truncate(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    return data[:rng.randrange(len(data) + 1)]


def splice(rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes:
    other = rng.choice(corpus) if corpus else data
    return data[:rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]


def duplicate_span(rng: random.Random, data: bytes, _corpus: Sequence[bytes]) -> bytes:
    if not data:
        return data
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.choice((4, 16, 64, 512)))
    return data[:end] + data[start:end] * rng.choice((1, 2, 8)) + data[end:]


BYTE_MUTATORS: tuple[Mutator, ...] = (
    flip_bits, set_bytes, insert_bytes, delete_bytes, set_integer, set_integer, grow_integer,
    truncate, splice, duplicate_span,
)
# Frame bodies are mutated in place (no truncation or splicing across frames there).
BODY_MUTATORS: tuple[Mutator, ...] = (
    flip_bits, set_bytes, insert_bytes, delete_bytes, set_integer, set_integer, grow_integer,
    grow_integer, duplicate_span, set_count, set_count, set_count, set_varint, set_varint,
)


def mutate(rng: random.Random, seed: bytes, framing: Framing, corpus: Sequence[bytes]) -> bytes:
    """One mutant of ``seed``: mostly a framed mutation of one frame, else raw bytes."""
    prefix, frames, rest = framing.split(seed)
    if frames and rng.random() < 0.75:
        out = _mutate_frames(rng, frames, framing, corpus)
        if rng.random() < 0.5:  # what follows the damaged frame matters less; often drop it
            out = out[:rng.randrange(len(out)) + 1] if rng.random() < 0.3 else out
        return (prefix + _join(out) + rest)[:INPUT_BYTES_MAX]
    data = seed
    for _ in range(rng.choice((1, 1, 2, 3))):
        data = rng.choice(BYTE_MUTATORS)(rng, data, corpus)
    return data[:INPUT_BYTES_MAX]


def _mutate_frames(
    rng: random.Random, frames: list[Frame], framing: Framing, corpus: Sequence[bytes]
) -> list[Frame]:
    out = list(frames)
    for _ in range(rng.choice((1, 1, 1, 2))):
        index = rng.randrange(len(out))
        frame = out[index]
        mutators = (framing.body_mutators if framing.body_mutators and rng.random() < 0.6
                    else BODY_MUTATORS)
        body = rng.choice(mutators)(rng, frame.body, corpus)
        if rng.random() < 0.9:
            out[index] = framing.reframe(frame, body)  # length fixed: past the framing
        else:
            out[index] = Frame(frame.header, body, frame.trailer)  # length now lies
        if rng.random() < 0.1:  # repeat the damaged frame (pipelined)
            out.insert(index, out[index])
    return out


def _join(frames: list[Frame]) -> bytes:
    return b"".join(frame.header + frame.body + frame.trailer for frame in frames)


# --- the node-to-node channel (conveyor/cluster/internal_wire.py) -------------------------
INTERNAL_PREAMBLE = b"CVI1"
# An input starting with this is sent after the harness authenticated the connection
# (preamble, nonce, MAC over it: the MAC cannot be recorded, the nonce is new each time).
INTERNAL_AUTHENTICATED = b"\x00AUTH"
# JSON values that make an argument interesting: wrong types, signs, sizes, nesting.
INTERESTING_JSON: tuple[object, ...] = (
    None, True, -1, 0, 2**31, 2**63, 2**64 + 1, 1e308, "", "x" * 5000, "\u0000", [], {},
    [[[[[]]]]], {"a": {"b": {"c": None}}}, ["r:0:0:0:g"] * 50, "t:0:1:2:g", "jobs",
)


def _internal_split(data: bytes) -> tuple[bytes, list[Frame], bytes]:
    prefix = next((mark for mark in (INTERNAL_AUTHENTICATED, INTERNAL_PREAMBLE)
                   if data.startswith(mark)), b"")
    _, frames, rest = _kafka_split(data[len(prefix):])
    return prefix, frames, rest


def _json_values(rng: random.Random, body: bytes, _corpus: Sequence[bytes]) -> bytes:
    """Replace one value (or add one key) somewhere in a JSON body with an interesting one."""
    import json

    try:
        document = json.loads(body)
    except ValueError:
        return body
    containers: list[object] = []
    stack: list[object] = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            containers.append(node)
            stack.extend(node.values() if isinstance(node, dict) else node)
    if not containers:
        return json.dumps(rng.choice(INTERESTING_JSON)).encode()
    target = rng.choice(containers)
    value = rng.choice(INTERESTING_JSON)
    if isinstance(target, dict):
        keys = list(target)
        key = rng.choice(keys) if keys and rng.random() < 0.8 else rng.choice(
            ("id", "op", "args", "queue", "receipts", "nonce", "mac", "node"))
        if rng.random() < 0.1 and keys:
            del target[rng.choice(keys)]
        else:
            target[key] = value
    elif target:
        target[rng.randrange(len(target))] = value  # type: ignore[index]
    return json.dumps(document).encode()


INTERNAL_FRAMING = Framing(
    "internal", _internal_split,
    lambda frame, body: Frame(struct.pack(">I", len(body)), body), (_json_values,))
