"""Dropping tagged fields a schema does not know, so kio can parse the rest.

The protocol says a receiver skips tagged fields it does not know (KIP-482);
kio's reader raises ``KeyError`` instead. When that happens the codec asks
``without_unknown_tags`` for a copy of the body whose tagged-field sections keep
only the tags the schema declares, and parses that. The walk follows kio's
generated dataclasses (field order and ``kafka_type`` metadata) over the
flexible (compact) encoding; anything that does not fit raises
``InvalidRequestError``. Sans-IO, pure.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from kio.serial._introspect import (  # kio's own field classification
    EntityField,
    EntityTupleField,
    PrimitiveTupleField,
    classify_field,
    is_optional,
)

from conveyor.errors import InvalidRequestError
from conveyor.protocols.kafka.framing import read_unsigned_varint

_FIXED_BYTES: Final[dict[str, int]] = {
    "int8": 1, "bool": 1, "uint8": 1, "int16": 2, "uint16": 2, "error_code": 2,
    "int32": 4, "uint32": 4, "timedelta_i32": 4, "int64": 8, "uint64": 8,
    "timedelta_i64": 8, "datetime_i64": 8, "float64": 8, "uuid": 16,
}
_LENGTH_PREFIXED: Final = frozenset({"string", "bytes", "records"})


def _encode_unsigned_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _Walker:
    def __init__(self, body: bytes | memoryview) -> None:
        self.body = memoryview(body)
        self.position = 0
        self.out = bytearray()
        self.dropped = 0

    def _take(self, size: int) -> None:
        end = self.position + size
        if size < 0 or end > len(self.body):
            raise InvalidRequestError("field runs past the body", position=self.position)
        self.out += self.body[self.position : end]
        self.position = end

    def _varint(self) -> int:
        value, end = read_unsigned_varint(self.body, self.position)
        self.out += self.body[self.position : end]
        self.position = end
        return value

    def primitive(self, kafka_type: str) -> None:
        if kafka_type in _FIXED_BYTES:
            self._take(_FIXED_BYTES[kafka_type])
        elif kafka_type in _LENGTH_PREFIXED:
            length = self._varint()
            if length:
                self._take(length - 1)
        else:
            raise InvalidRequestError("unknown field type", kafka_type=kafka_type)

    def entity(self, cls: type[Any]) -> None:
        known: set[int] = set()
        for field in dataclasses.fields(cls):
            tag = field.metadata.get("tag")
            if tag is not None:
                known.add(int(tag))
                continue
            self.field(field)
        self.tag_section(known)

    def field(self, field: dataclasses.Field[Any]) -> None:
        kind = classify_field(field)
        if isinstance(kind, EntityTupleField | PrimitiveTupleField):
            count = self._varint()
            for _ in range(max(count - 1, 0)):
                if isinstance(kind, EntityTupleField):
                    self.entity(kind.type_)
                else:
                    self.primitive(field.metadata["kafka_type"])
        elif isinstance(kind, EntityField):
            if is_optional(field):
                self._take(1)  # nullable struct marker
                if self.body[self.position - 1] == 0xFF:
                    return
            self.entity(kind.type_)
        else:
            self.primitive(field.metadata["kafka_type"])

    def tag_section(self, known: set[int]) -> None:
        count, position = read_unsigned_varint(self.body, self.position)
        kept: list[bytes] = []
        for _ in range(count):
            start = position
            tag, position = read_unsigned_varint(self.body, position)
            size, position = read_unsigned_varint(self.body, position)
            position += size
            if position > len(self.body):
                raise InvalidRequestError("tagged field runs past the body", tag=tag)
            if tag in known:
                kept.append(bytes(self.body[start:position]))
            else:
                self.dropped += 1
        self.out += _encode_unsigned_varint(len(kept))
        for item in kept:
            self.out += item
        self.position = position


def without_unknown_tags(cls: type[Any], body: bytes | memoryview) -> tuple[bytes, int]:
    """The body with unknown tagged fields removed, and how many were removed."""
    assert cls.__flexible__, "only flexible versions have tagged fields"
    walker = _Walker(body)
    walker.entity(cls)
    return bytes(walker.out) + bytes(walker.body[walker.position :]), walker.dropped
