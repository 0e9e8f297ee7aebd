"""Goal: no byte sequence makes the codec crash, hang or hand out a wrong frame.

Method (Hypothesis; h11's fuzz harness idea): valid request streams fed whole and
then in arbitrary chunks (down to a byte at a time) yield the same events;
arbitrary bytes and mutated valid frames either parse or raise an
OperatingError, never anything else. Seeds: Hypothesis prints the failing example.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka_wire import body_bytes, request_frame
from kio.schema.api_versions.v3.request import ApiVersionsRequest
from kio.schema.metadata.v12.request import MetadataRequest, MetadataRequestTopic
from kio.schema.produce.v7.request import PartitionProduceData, ProduceRequest, TopicProduceData
from kio.static.primitive import Records

from conveyor.errors import OperatingError
from conveyor.protocols.kafka.codec import Request, ServerCodec, UnsupportedRequest
from conveyor.protocols.kafka.framing import NeedData
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, request_class
from conveyor.protocols.kafka.tagged_fields import without_unknown_tags

names = st.text(alphabet="abcdefghij-._", min_size=1, max_size=12)


@st.composite
def requests(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return ApiVersionsRequest(client_software_name=draw(names), client_software_version="1")
    if kind == 1:
        topics = draw(st.lists(names, max_size=3))
        return MetadataRequest(
            topics=tuple(MetadataRequestTopic(topic_id=None, name=n)
                         for n in topics),
            allow_auto_topic_creation=draw(st.booleans()),
            include_topic_authorized_operations=False,
        )
    import datetime
    return ProduceRequest(
        acks=draw(st.sampled_from([0, 1, -1])),
        timeout=datetime.timedelta(milliseconds=draw(st.integers(0, 30000))),
        topic_data=(TopicProduceData(name=draw(names), partition_data=(
            PartitionProduceData(index=draw(st.integers(0, 5)), records=draw(st.binary())),
        )),),
    )


def drain(codec: ServerCodec) -> list[Any]:
    events = []
    while True:
        event = codec.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)


def events_key(events: list[Any]) -> list[Any]:
    return [(event.header, event.body if isinstance(event, Request) else None) for event in events]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=4), st.data())
def test_chunked_feeding_equals_whole(entities: list[Any], data: st.DataObject) -> None:
    stream = b"".join(request_frame(entity, index) for index, entity in enumerate(entities))
    whole = ServerCodec()
    whole.receive_data(stream)
    expected = drain(whole)
    assert [event.header.correlation_id for event in expected] == list(range(len(entities)))
    assert [event.body for event in expected] == entities

    chunked = ServerCodec()
    got: list[Any] = []
    position = 0
    while position < len(stream):
        step = data.draw(st.integers(1, 64))
        chunked.receive_data(stream[position : position + step])
        position += step
        got.extend(drain(chunked))
    assert events_key(got) == events_key(expected)

    bytewise = ServerCodec()
    got = []
    for index in range(len(stream)):
        bytewise.receive_data(stream[index : index + 1])
        got.extend(drain(bytewise))
    assert events_key(got) == events_key(expected)


def feed_expecting_operating_errors(data: bytes) -> None:
    codec = ServerCodec(frame_bytes_max=1 << 16)
    codec.receive_data(data)
    try:
        for event in drain(codec):
            assert isinstance(event, Request | UnsupportedRequest)
    except OperatingError:
        pass


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_operating_error(data: bytes) -> None:
    feed_expecting_operating_errors(data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_mutated_frames_parse_or_raise_operating_error(entity: Any, data: st.DataObject) -> None:
    frame = bytearray(request_frame(entity))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(frame) - 1))
        frame[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    feed_expecting_operating_errors(bytes(frame[:cut]) + bytes(frame[cut:]))
    feed_expecting_operating_errors(bytes(frame[:cut]))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_tag_filter_is_identity_without_unknown_tags(entity: Any) -> None:
    if not entity.__flexible__:
        return
    body = body_bytes(entity)
    assert without_unknown_tags(type(entity), body) == (body, 0)


FLEXIBLE_REQUESTS = [
    request_class(api_key, version)
    for api_key, (low, high) in SUPPORTED_VERSIONS.items()
    for version in range(low, high + 1)
    if request_class(api_key, version).__flexible__
]
st.register_type_strategy(Records, st.binary(max_size=64).map(Records))


@pytest.mark.parametrize(
    "cls", FLEXIBLE_REQUESTS, ids=lambda cls: cls.__module__.removeprefix("kio.schema.")
)
def test_tag_filter_walks_every_flexible_request(cls: type[Any]) -> None:
    """Goal: the tagged-field walker understands every served flexible request layout."""

    @settings(max_examples=5, suppress_health_check=list(HealthCheck), database=None)
    @given(st.from_type(cls))
    def check(entity: Any) -> None:
        body = body_bytes(entity)
        assert without_unknown_tags(cls, body) == (body, 0)

    check()
