"""Goal: ``check_bounds`` lets through only bodies kio can read without over-allocating.

Method: for every API and version the listener serves, a small valid body is generated
from kio's schema (one element per array, short strings); then every byte position is
overwritten with huge counts and lengths (int16, int32 and varint forms) and each result
is parsed with ``parse_body`` — in a CHILD process, because an over-allocation in kio's
native reader aborts the process instead of raising. The child must exit 0: every body
either parses or is refused with ``InvalidRequestError``. Unit checks cover null arrays
and the exact refusal of a count larger than the bytes left.
"""

from __future__ import annotations

import dataclasses
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from kio.serial._introspect import (
    EntityField,
    EntityTupleField,
    PrimitiveTupleField,
    classify_field,
    is_optional,
)

from conveyor.errors import InvalidRequestError
from conveyor.protocols.kafka.bounds import check_bounds
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, parse_body, request_class

_FIXED = {"int8": 1, "bool": 1, "uint8": 1, "int16": 2, "uint16": 2, "error_code": 2,
          "int32": 4, "uint32": 4, "timedelta_i32": 4, "int64": 8, "uint64": 8,
          "timedelta_i64": 8, "datetime_i64": 8, "float64": 8, "uuid": 16}


def sample_body(cls: type[Any]) -> bytes:
    """A valid encoding of ``cls``: every array holds one element, every string is 'ab'."""
    flexible = bool(cls.__flexible__)
    out = bytearray()

    def length(value: int, wide: bool) -> None:
        if flexible:
            out.append(value + 1)
        else:
            out.extend(struct.pack(">i" if wide else ">h", value))

    def primitive(kafka_type: str) -> None:
        if kafka_type in _FIXED:
            out.extend(b"\x00" * _FIXED[kafka_type])
        elif kafka_type == "records":
            length(-1, True)
        else:
            length(2, kafka_type != "string")
            out.extend(b"ab")

    def entity(entity_cls: type[Any]) -> None:
        for field in dataclasses.fields(entity_cls):
            if field.metadata.get("tag") is not None:
                continue
            kind = classify_field(field)
            if isinstance(kind, EntityTupleField | PrimitiveTupleField):
                length(1, True)
                if isinstance(kind, EntityTupleField):
                    entity(kind.type_)
                else:
                    primitive(field.metadata["kafka_type"])
            elif isinstance(kind, EntityField):
                if is_optional(field):
                    out.append(1)
                entity(kind.type_)
            else:
                primitive(field.metadata["kafka_type"])
        if flexible:
            out.append(0)  # no tagged fields

    entity(cls)
    return bytes(out)


HUGE = (b"\x7f\xff\xff\xff", b"\x7f\xff", b"\xff\xff\xff\xff\x0f", b"\xff\xff\xff\x7f")


def mutations(body: bytes) -> list[bytes]:
    found = []
    for position in range(len(body)):
        for value in HUGE:
            mutated = bytearray(body)
            mutated[position : position + len(value)] = value
            found.append(bytes(mutated[: len(body) + 2]))
    return found


def all_versions() -> list[tuple[int, int]]:
    return [(key, version) for key, (low, high) in sorted(SUPPORTED_VERSIONS.items())
            for version in range(low, high + 1)]


def test_sample_bodies_are_valid() -> None:
    for api_key, version in all_versions():
        parse_body(api_key, version, sample_body(request_class(api_key, version)))


def test_no_mutated_body_aborts_the_process() -> None:
    script = textwrap.dedent("""
        import sys
        sys.path[:0] = [%r]
        from tests.protocols.kafka.test_kafka_bounds import all_versions, mutations, sample_body
        from conveyor.errors import InvalidRequestError
        from conveyor.protocols.kafka.messages import parse_body, request_class
        parsed = refused = 0
        for api_key, version in all_versions():
            for body in mutations(sample_body(request_class(api_key, version))):
                try:
                    parse_body(api_key, version, body)
                    parsed += 1
                except InvalidRequestError:
                    refused += 1
        print(parsed, refused)
    """) % (str(Path(__file__).parents[3]),)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    parsed, refused = map(int, child.stdout.split())
    assert refused > parsed > 0  # most huge counts are refused; some land in plain integers


def test_count_larger_than_the_bytes_left_is_refused() -> None:
    cls = request_class(19, 2)  # CreateTopics v2: topics array first
    with pytest.raises(InvalidRequestError, match="array count"):
        check_bounds(cls, struct.pack(">i", 1000) + b"\x00" * 100)


@pytest.mark.parametrize(("api_key", "version", "body"), [
    (0, 3, struct.pack(">hhii", -1, 1, 1000, -1)),  # Produce: null topic_data
    (2, 1, struct.pack(">ii", -1, -1)),  # ListOffsets: null topics
    (37, 0, struct.pack(">iib", -1, 1000, 0)),  # CreatePartitions: null topics
])
def test_null_for_a_non_nullable_array_is_refused(api_key: int, version: int,
                                                  body: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="null"):
        parse_body(api_key, version, body)


def test_null_where_the_schema_allows_it_passes() -> None:
    # Produce v3: a null transactional_id is the normal case.
    body = sample_body(request_class(0, 3))
    assert body[:2] == b"\x00\x02"
    check_bounds(request_class(0, 3), struct.pack(">h", -1) + body[4:])


# The compiled plans (one per class and encoding) walk nested optional entities, tagged
# fields and merged runs of fixed-size fields; these pin each of those paths.

def test_an_absent_optional_entity_is_skipped_and_a_present_one_is_walked() -> None:
    cls = request_class(75, 0)  # DescribeTopicPartitions v0: an optional ``cursor`` entity
    body = sample_body(cls)
    marker = body.index(b"\x01\x03ab")  # cursor present, its topic_name 'ab'
    check_bounds(cls, body)
    check_bounds(cls, body[:marker] + b"\xff" + b"\x00")  # absent, then the tag section
    too_long = body[:marker + 1] + b"\x7f" + body[marker + 2:]  # topic_name of 126 bytes
    with pytest.raises(InvalidRequestError, match="topic_name runs past the request body"):
        check_bounds(cls, too_long)
    with pytest.raises(InvalidRequestError, match="length runs past the request body"):
        check_bounds(cls, body[:marker])  # the marker itself is missing


def test_a_known_tagged_field_is_walked_within_its_own_size() -> None:
    cls = request_class(1, 12)  # Fetch v12: tag 0 is ``cluster_id``, a nullable string
    untagged = sample_body(cls)[:-1]  # without the (empty) tag section
    check_bounds(cls, untagged + b"\x01\x00\x03\x03ab")  # cluster_id 'ab'
    check_bounds(cls, untagged + b"\x01\x00\x01\x00")  # cluster_id null: allowed
    check_bounds(cls, untagged + b"\x01\x05\x02\x7f\x7f")  # an unknown tag: skipped
    # A length that fits in the body but not in the tag's 3 bytes is refused.
    with pytest.raises(InvalidRequestError, match="cluster_id runs past the request body"):
        check_bounds(cls, untagged + b"\x01\x00\x03\x0aab" + b"\x00" * 20)
    with pytest.raises(InvalidRequestError, match="tagged field runs past the request body"):
        check_bounds(cls, untagged + b"\x01\x00\x09\x03ab")


def test_a_short_run_of_fixed_fields_names_the_field_that_does_not_fit() -> None:
    cls = request_class(1, 12)  # Fetch v12: replica_id, max_wait, min_bytes, ... (int32s)
    with pytest.raises(InvalidRequestError, match="min_bytes runs past") as refused:
        check_bounds(cls, sample_body(cls)[:10])
    assert refused.value.details == {"position": 8, "size_bytes": 4, "left_bytes": 2}
