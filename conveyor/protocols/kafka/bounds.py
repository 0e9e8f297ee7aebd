"""Checking a request body's lengths and counts before kio's native reader sees it.

Why: kio's reader (Rust) reserves memory for an array from the count on the wire. A
frame of a few dozen bytes announcing 2**31 elements made it ask for ~263 GB, and the
Rust allocator aborts the whole process (SIGABRT) instead of raising. So every length
and count in a body is checked here first, in Python, against the bytes that are left:
an array of ``n`` elements needs at least ``n * min_bytes(element)`` bytes, a string or
bytes field at least its length. Anything that cannot fit is an ``InvalidRequestError``
(Kafka answers such a request by closing the connection), and kio then only ever
allocates in proportion to the frame, which the frame limit already bounds.

The same walk refuses ``null`` where the schema does not allow it (a null ``topics``
array in a Produce request used to reach the handlers as ``None``).

The walk follows kio's generated dataclasses (field order and ``kafka_type`` metadata),
in both encodings: classic (int16/int32 lengths, -1 = null) and flexible (KIP-482:
unsigned varint lengths + 1, 0 = null, tagged-field sections whose known tags are
walked too). Sans-IO, pure; it copies nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
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
_INT16: Final = struct.Struct(">h")
_INT32: Final = struct.Struct(">i")
# Fields a schema marks nullable are allowed to be null; so are these, which kio types
# as plain ``str`` although Kafka's schema lets clients send null (librdkafka does).
_NULLABLE_BY_SPEC: Final = frozenset({"client_id"})


def _field_kafka_type(field: dataclasses.Field[Any]) -> str:
    kafka_type = field.metadata.get("kafka_type")
    if not isinstance(kafka_type, str):
        raise InvalidRequestError("schema field without a type", field=field.name)
    return kafka_type


@functools.cache
def _min_entity_bytes(cls: type[Any], flexible: bool) -> int:
    """The fewest bytes one encoded ``cls`` can take (tagged fields cost nothing)."""
    total = 1 if flexible else 0  # the tag section's count
    for field in dataclasses.fields(cls):
        if field.metadata.get("tag") is None:
            total += _min_field_bytes(field, flexible)
    return total


def _min_field_bytes(field: dataclasses.Field[Any], flexible: bool) -> int:
    kind = classify_field(field)
    if isinstance(kind, EntityTupleField | PrimitiveTupleField):
        return 1 if flexible else 4  # a count (null or empty at least)
    if isinstance(kind, EntityField):
        return 1 if is_optional(field) else _min_entity_bytes(kind.type_, flexible)
    kafka_type = _field_kafka_type(field)
    if kafka_type in _FIXED_BYTES:
        return _FIXED_BYTES[kafka_type]
    if flexible:
        return 1
    return 2 if kafka_type == "string" else 4


class _Walk:
    """One pass over a body; ``limit`` is where the current (tagged) field ends."""

    def __init__(self, body: memoryview, flexible: bool) -> None:
        self.body = body
        self.flexible = flexible
        self.position = 0
        self.limit = len(body)

    def _skip(self, size: int, what: str) -> None:
        if size < 0 or self.position + size > self.limit:
            raise InvalidRequestError(f"{what} runs past the request body",
                                      position=self.position, size_bytes=size,
                                      left_bytes=self.limit - self.position)
        self.position += size

    def _uvarint(self) -> int:
        value, end = read_unsigned_varint(self.body, self.position)
        if end > self.limit:
            raise InvalidRequestError("varint runs past the request body",
                                      position=self.position)
        self.position = end
        return value

    def _signed(self, struct_: struct.Struct) -> int:
        start = self.position
        self._skip(struct_.size, "length")
        value: int = struct_.unpack_from(self.body, start)[0]
        return value

    def _length(self, wide: bool) -> int:
        """A length or count: -1 means null."""
        if self.flexible:
            return self._uvarint() - 1
        return self._signed(_INT32 if wide else _INT16)

    def _null(self, field: dataclasses.Field[Any]) -> None:
        if not (is_optional(field) or field.name in _NULLABLE_BY_SPEC):
            raise InvalidRequestError("null where the schema allows none", field=field.name,
                                      position=self.position)

    def entity(self, cls: type[Any]) -> None:
        tagged: dict[int, dataclasses.Field[Any]] = {}
        for field in dataclasses.fields(cls):
            tag = field.metadata.get("tag")
            if tag is not None:
                tagged[int(tag)] = field
            else:
                self.field(field)
        if self.flexible:
            self.tag_section(tagged)

    def field(self, field: dataclasses.Field[Any]) -> None:
        kind = classify_field(field)
        if isinstance(kind, EntityTupleField | PrimitiveTupleField):
            self.array(field, kind)
        elif isinstance(kind, EntityField):
            if is_optional(field):
                marker = self._signed(struct.Struct(">b"))
                if marker < 0:
                    return
            self.entity(kind.type_)
        else:
            self.primitive(field)

    def array(self, field: dataclasses.Field[Any],
              kind: EntityTupleField | PrimitiveTupleField) -> None:
        count = self._length(wide=True)
        if count < 0:
            if count < -1:
                raise InvalidRequestError("negative array count", field=field.name, count=count)
            self._null(field)
            return
        if isinstance(kind, EntityTupleField):
            element_bytes = _min_entity_bytes(kind.type_, self.flexible)
        else:
            element_bytes = _min_field_bytes(field, self.flexible)
        left = self.limit - self.position
        if count * max(element_bytes, 1) > left:
            raise InvalidRequestError("array count larger than the bytes that came with it",
                                      field=field.name, count=count, left_bytes=left)
        for _ in range(count):
            if isinstance(kind, EntityTupleField):
                self.entity(kind.type_)
            else:
                self.primitive(field)

    def primitive(self, field: dataclasses.Field[Any]) -> None:
        kafka_type = _field_kafka_type(field)
        fixed = _FIXED_BYTES.get(kafka_type)
        if fixed is not None:
            self._skip(fixed, field.name)
            return
        if kafka_type not in ("string", "bytes", "records"):
            raise InvalidRequestError("unknown field type", kafka_type=kafka_type)
        length = self._length(wide=kafka_type != "string")
        if length < 0:
            if length < -1:
                raise InvalidRequestError("negative length", field=field.name, length=length)
            if kafka_type != "records":  # records are nullable in every schema
                self._null(field)
            return
        self._skip(length, field.name)

    def tag_section(self, tagged: dict[int, dataclasses.Field[Any]]) -> None:
        count = self._uvarint()
        if count * 2 > self.limit - self.position:  # a tag and a size: 2 bytes at least
            raise InvalidRequestError("tagged field count larger than the bytes left",
                                      count=count)
        for _ in range(count):
            tag = self._uvarint()
            size = self._uvarint()
            end = self.position + size
            if end > self.limit:
                raise InvalidRequestError("tagged field runs past the request body", tag=tag)
            field = tagged.get(tag)
            if field is not None:
                outer = self.limit
                self.limit = end
                self.field(field)
                self.limit = outer
            self.position = end


def check_bounds(cls: type[Any], body: bytes | memoryview) -> None:
    """Raise ``InvalidRequestError`` unless every length and count in ``body`` fits in it
    and no field the schema does not allow to be null is null."""
    _Walk(memoryview(body), bool(cls.__flexible__)).entity(cls)
