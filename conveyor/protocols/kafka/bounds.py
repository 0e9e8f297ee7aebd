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

How: kio's introspection (``classify_field``, ``is_optional``, ``dataclasses.fields``)
costs tens of microseconds per request, and it ran on every field of every request: 5-9 %
of the broker's event loop at 1,000 Kafka e2e records/s. So each (entity class,
encoding) is compiled once into a ``_Plan``: a flat tuple of steps, each a tuple
``(kind, name, argument, nullable)`` (consecutive fixed-size fields merged into one
step), plus the tagged fields' steps by tag; the walk then only reads the body and the
plan. Classification stays kio's; only its cost moves to the first request of a class.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Final, NamedTuple

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
_INT8: Final = struct.Struct(">b")
_INT16: Final = struct.Struct(">h")
_INT32: Final = struct.Struct(">i")
# Fields a schema marks nullable are allowed to be null; so are these, which kio types
# as plain ``str`` although Kafka's schema lets clients send null (librdkafka does).
_NULLABLE_BY_SPEC: Final = frozenset({"client_id"})

# Step kinds; a step is (kind, name, argument, nullable). Arguments:
_FIXED: Final = 0  # (total bytes, ((field name, bytes), ...)): consecutive fixed fields
_STRING: Final = 1  # None: int16 length (classic) / uvarint (flexible), then the bytes
_BYTES: Final = 2  # None: int32 length (classic) / uvarint (flexible); records too
_ENTITY: Final = 3  # the nested _Plan
_OPTIONAL_ENTITY: Final = 4  # the nested _Plan, after an int8 marker (< 0: absent)
_ENTITY_ARRAY: Final = 5  # (nested _Plan, min bytes of one element, at least 1)
_PRIMITIVE_ARRAY: Final = 6  # (the element's step, min bytes of one element, at least 1)
_UNKNOWN: Final = 7  # the kafka_type no walk knows: refused when a body reaches it

Step = tuple[int, str, Any, bool]


class _Plan(NamedTuple):
    """One entity class in one encoding: its steps in wire order, its tagged fields'
    steps by tag, and the fewest bytes one encoded entity takes."""

    steps: tuple[Step, ...]
    tagged: dict[int, Step]
    min_bytes: int


def _field_kafka_type(field: dataclasses.Field[Any]) -> str:
    kafka_type = field.metadata.get("kafka_type")
    if not isinstance(kafka_type, str):
        raise InvalidRequestError("schema field without a type", field=field.name)
    return kafka_type


def _primitive_step(field: dataclasses.Field[Any], nullable: bool) -> Step:
    kafka_type = _field_kafka_type(field)
    fixed = _FIXED_BYTES.get(kafka_type)
    if fixed is not None:
        return (_FIXED, field.name, (fixed, ((field.name, fixed),)), False)
    if kafka_type == "string":
        return (_STRING, field.name, None, nullable)
    if kafka_type in ("bytes", "records"):  # records are nullable in every schema
        return (_BYTES, field.name, None, nullable or kafka_type == "records")
    return (_UNKNOWN, field.name, kafka_type, nullable)


def _field_step(field: dataclasses.Field[Any], flexible: bool) -> Step:
    kind = classify_field(field)
    nullable = is_optional(field) or field.name in _NULLABLE_BY_SPEC
    if isinstance(kind, EntityTupleField):
        element = _plan(kind.type_, flexible)
        return (_ENTITY_ARRAY, field.name, (element, max(element.min_bytes, 1)), nullable)
    if isinstance(kind, PrimitiveTupleField):
        # As before the plans: an element counts as the array field's own minimum (a
        # count's size), not its type's.
        return (_PRIMITIVE_ARRAY, field.name,
                (_primitive_step(field, nullable), 1 if flexible else 4), nullable)
    if isinstance(kind, EntityField):
        if is_optional(field):
            return (_OPTIONAL_ENTITY, field.name, _plan(kind.type_, flexible), nullable)
        return (_ENTITY, field.name, _plan(kind.type_, flexible), nullable)
    return _primitive_step(field, nullable)


def _step_min_bytes(step: Step, flexible: bool) -> int:
    """The fewest bytes a step's field takes: tagged fields and arrays' elements aside."""
    kind, _name, argument, _nullable = step
    if kind == _FIXED:
        total: int = argument[0]
        return total
    if kind == _ENTITY:
        nested: int = argument.min_bytes
        return nested
    if kind == _OPTIONAL_ENTITY:
        return 1  # the marker
    if flexible:
        return 1  # a varint count or length
    return 2 if kind == _STRING else 4


def _merge_fixed(steps: list[Step]) -> tuple[Step, ...]:
    """Consecutive fixed-size fields become one step (their parts kept for errors)."""
    merged: list[Step] = []
    for step in steps:
        if step[0] == _FIXED and merged and merged[-1][0] == _FIXED:
            previous = merged[-1]
            parts = previous[2][1] + step[2][1]
            merged[-1] = (_FIXED, previous[1], (previous[2][0] + step[2][0], parts), False)
        else:
            merged.append(step)
    return tuple(merged)


# (class, flexible) -> plan. Bounded: only kio's schema classes of the served versions
# (messages.SUPPORTED_VERSIONS) and their nested entities ever reach it.
_PLANS: Final[dict[tuple[type[Any], bool], _Plan]] = {}


def _plan(cls: type[Any], flexible: bool) -> _Plan:
    """Compile ``cls`` (kio's dataclass) for one encoding, once."""
    plan = _PLANS.get((cls, flexible))
    if plan is None:
        plan = _PLANS[cls, flexible] = _compile(cls, flexible)
    return plan


def _compile(cls: type[Any], flexible: bool) -> _Plan:
    steps: list[Step] = []
    tagged: dict[int, Step] = {}
    for field in dataclasses.fields(cls):
        tag = field.metadata.get("tag")
        if tag is not None:
            tagged[int(tag)] = _field_step(field, flexible)
        else:
            steps.append(_field_step(field, flexible))
    min_bytes = (1 if flexible else 0) + sum(_step_min_bytes(s, flexible) for s in steps)
    return _Plan(_merge_fixed(steps), tagged, min_bytes)


# ---- the walk: (body, position, limit) in, the next position out ---------------------

def _past_the_body(what: str, position: int, size: int, limit: int) -> InvalidRequestError:
    return InvalidRequestError(f"{what} runs past the request body", position=position,
                               size_bytes=size, left_bytes=limit - position)


def _fixed_error(parts: tuple[tuple[str, int], ...], position: int,
                 limit: int) -> InvalidRequestError:
    """The error of the first field of a merged fixed run that does not fit."""
    for name, size in parts:
        if position + size > limit:
            return _past_the_body(name, position, size, limit)
        position += size
    raise AssertionError("a fixed run that fits has no error")


def _uvarint(body: memoryview, position: int, limit: int) -> tuple[int, int]:
    if position < limit:
        byte = body[position]
        if byte < 0x80:  # one byte: every count and length below 128
            return byte, position + 1
    value, end = read_unsigned_varint(body, position)
    if end > limit:
        raise InvalidRequestError("varint runs past the request body", position=position)
    return value, end


def _length(body: memoryview, position: int, limit: int, flexible: bool,
            wide: bool) -> tuple[int, int]:
    """A length or count: -1 means null. Returns (length, the next position)."""
    if flexible:
        value, position = _uvarint(body, position, limit)
        return value - 1, position
    struct_ = _INT32 if wide else _INT16
    end = position + struct_.size
    if end > limit:
        raise _past_the_body("length", position, struct_.size, limit)
    length: int = struct_.unpack_from(body, position)[0]
    return length, end


def _null(step: Step, position: int) -> None:
    if not step[3]:
        raise InvalidRequestError("null where the schema allows none", field=step[1],
                                  position=position)


def _entity(plan: _Plan, body: memoryview, position: int, limit: int,
            flexible: bool) -> int:
    for step in plan.steps:
        if step[0] == _FIXED:
            end = position + step[2][0]
            if end > limit:
                raise _fixed_error(step[2][1], position, limit)
            position = end
        else:
            position = _step(step, body, position, limit, flexible)
    if flexible:
        position = _tag_section(plan.tagged, body, position, limit)
    return position


def _step(step: Step, body: memoryview, position: int, limit: int, flexible: bool) -> int:
    kind, name, argument, _nullable = step
    if kind == _STRING or kind == _BYTES:
        length, position = _length(body, position, limit, flexible, wide=kind == _BYTES)
        if length < 0:
            if length < -1:
                raise InvalidRequestError("negative length", field=name, length=length)
            _null(step, position)
            return position
        if position + length > limit:
            raise _past_the_body(name, position, length, limit)
        return position + length
    if kind == _FIXED:
        end: int = position + argument[0]
        if end > limit:
            raise _fixed_error(argument[1], position, limit)
        return end
    if kind == _ENTITY:
        return _entity(argument, body, position, limit, flexible)
    if kind == _OPTIONAL_ENTITY:
        if position + 1 > limit:
            raise _past_the_body("length", position, 1, limit)
        if _INT8.unpack_from(body, position)[0] < 0:
            return position + 1
        return _entity(argument, body, position + 1, limit, flexible)
    if kind == _ENTITY_ARRAY or kind == _PRIMITIVE_ARRAY:
        return _array(step, body, position, limit, flexible)
    raise InvalidRequestError("unknown field type", kafka_type=argument)


def _array(step: Step, body: memoryview, position: int, limit: int, flexible: bool) -> int:
    kind, name, (element, element_bytes), _nullable = step
    count, position = _length(body, position, limit, flexible, wide=True)
    if count < 0:
        if count < -1:
            raise InvalidRequestError("negative array count", field=name, count=count)
        _null(step, position)
        return position
    left = limit - position
    if count * element_bytes > left:
        raise InvalidRequestError("array count larger than the bytes that came with it",
                                  field=name, count=count, left_bytes=left)
    if kind == _ENTITY_ARRAY:
        for _ in range(count):
            position = _entity(element, body, position, limit, flexible)
    else:
        for _ in range(count):
            position = _step(element, body, position, limit, flexible)
    return position


def _tag_section(tagged: dict[int, Step], body: memoryview, position: int,
                 limit: int) -> int:
    count, position = _uvarint(body, position, limit)
    if count * 2 > limit - position:  # a tag and a size: 2 bytes at least
        raise InvalidRequestError("tagged field count larger than the bytes left",
                                  count=count)
    for _ in range(count):
        tag, position = _uvarint(body, position, limit)
        size, position = _uvarint(body, position, limit)
        end = position + size
        if end > limit:
            raise InvalidRequestError("tagged field runs past the request body", tag=tag)
        step = tagged.get(tag)
        if step is not None:  # walked within its own size; what it leaves is skipped
            _step(step, body, position, end, True)
        position = end
    return position


_ROOT_PLANS: Final[dict[type[Any], tuple[_Plan, bool]]] = {}  # request class -> plan


def check_bounds(cls: type[Any], body: bytes | memoryview) -> None:
    """Raise ``InvalidRequestError`` unless every length and count in ``body`` fits in it
    and no field the schema does not allow to be null is null."""
    root = _ROOT_PLANS.get(cls)
    if root is None:
        flexible = bool(cls.__flexible__)
        root = _ROOT_PLANS[cls] = (_plan(cls, flexible), flexible)
    plan, flexible = root
    view = memoryview(body)
    _entity(plan, view, 0, len(view), flexible)
