"""Goal: the server codec turns frames into typed requests and answers what it cannot serve.

Method: a client-side encoder (kio, via kafka_wire) writes requests; the codec
parses them; responses are parsed back with kio's reader.
"""

from __future__ import annotations

import datetime
import struct

import pytest
from kafka_wire import body_bytes, parse_response, request_frame, request_header
from kio.schema.api_versions.v3.request import ApiVersionsRequest
from kio.schema.fetch.v12.request import FetchPartition, FetchRequest, FetchTopic
from kio.schema.metadata.v12.request import MetadataRequest

from conveyor.errors import InvalidRequestError
from conveyor.protocols.kafka.codec import (
    UNSUPPORTED_VERSION,
    Request,
    ServerCodec,
    UnsupportedRequest,
)
from conveyor.protocols.kafka.framing import NEED_DATA
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, response_class
from conveyor.protocols.kafka.tagged_fields import without_unknown_tags


def test_typed_request_and_in_order_events() -> None:
    codec = ServerCodec()
    codec.receive_data(
        request_frame(ApiVersionsRequest(client_software_name="c", client_software_version="1"), 1)
        + request_frame(MetadataRequest(
            topics=None, allow_auto_topic_creation=False, include_topic_authorized_operations=False
        ), 2)
    )
    first, second = codec.next_event(), codec.next_event()
    assert isinstance(first, Request) and isinstance(second, Request)
    assert first.body.client_software_name == "c"
    assert second.body.allow_auto_topic_creation is False
    assert codec.next_event() is NEED_DATA


def test_unknown_api_versions_version_gets_v0_answer() -> None:
    payload = request_header(18, 99, 4, "new-client")
    codec = ServerCodec()
    codec.receive_data(struct.pack(">i", len(payload)) + payload)
    event = codec.next_event()
    assert isinstance(event, UnsupportedRequest)
    answer = codec.send_unsupported(event.header)
    correlation_id, response = parse_response(answer[4:], 18, 0)
    assert correlation_id == 4
    assert response.error_code == UNSUPPORTED_VERSION
    advertised = {entry.api_key: (entry.min_version, entry.max_version)
                  for entry in response.api_keys}
    assert advertised == SUPPORTED_VERSIONS


def test_unknown_api_key_is_unsupported_and_unanswerable() -> None:
    payload = request_header(9999 % 32768, 0, 4, None) + b"junk"
    codec = ServerCodec()
    codec.receive_data(struct.pack(">i", len(payload)) + payload)
    event = codec.next_event()
    assert isinstance(event, UnsupportedRequest)
    with pytest.raises(InvalidRequestError):
        codec.send_unsupported(event.header)


def test_body_with_missing_bytes_rejected_trailing_bytes_ignored() -> None:
    good = request_frame(MetadataRequest(
        topics=None, allow_auto_topic_creation=True, include_topic_authorized_operations=False
    ))
    codec = ServerCodec()
    cut = good[4:-1]
    codec.receive_data(struct.pack(">i", len(cut)) + cut)
    with pytest.raises(InvalidRequestError):
        codec.next_event()
    # librdkafka 2.x appends bytes to some Metadata v12 bodies; Kafka ignores them too.
    longer = good[4:] + b"\x01\x00\x00"
    codec = ServerCodec()
    codec.receive_data(struct.pack(">i", len(longer)) + longer)
    event = codec.next_event()
    assert isinstance(event, Request) and event.body.allow_auto_topic_creation is True


def test_unknown_body_tagged_fields_are_skipped() -> None:
    payload = request_header(3, 12, 1, "x") + b"\x00\x01\x00" + b"\x01\x05\x02ab"
    codec = ServerCodec()
    codec.receive_data(struct.pack(">i", len(payload)) + payload)
    event = codec.next_event()
    assert isinstance(event, Request)
    assert event.body.topics is None and event.body.allow_auto_topic_creation is True


def test_known_tags_kept_unknown_dropped_in_nested_structs() -> None:
    fetch = FetchRequest(
        cluster_id="c1", replica_id=-1, max_wait=datetime.timedelta(milliseconds=5),
        min_bytes=1, max_bytes=100, isolation_level=0, session_id=0, session_epoch=-1,
        topics=(FetchTopic(topic="t", partitions=(FetchPartition(
            partition=3, current_leader_epoch=-1, fetch_offset=7, last_fetched_epoch=-1,
            log_start_offset=-1, partition_max_bytes=4321),)),),
        forgotten_topics_data=(), rack_id="",
    )
    body = bytearray(body_bytes(fetch))
    # the partition's (empty) tag section is right after partition_max_bytes = 4321
    marker = (4321).to_bytes(4, "big") + b"\x00"
    index = bytes(body).index(marker) + 4
    body[index : index + 1] = b"\x01\x09\x03xyz"  # one unknown tag (9) in the partition
    cleaned, dropped = without_unknown_tags(FetchRequest, bytes(body))
    assert dropped == 1 and cleaned == body_bytes(fetch)
    payload = request_header(1, 12, 1, "x") + bytes(body)
    codec = ServerCodec()
    codec.receive_data(struct.pack(">i", len(payload)) + payload)
    event = codec.next_event()
    assert isinstance(event, Request) and event.body == fetch  # cluster_id (tag 0) kept


def test_truncated_tag_section_is_an_operating_error() -> None:
    payload = request_header(3, 12, 1, "x") + b"\x00\x01\x00" + b"\x01\x05\x09ab"
    codec = ServerCodec()
    codec.receive_data(struct.pack(">i", len(payload)) + payload)
    with pytest.raises(InvalidRequestError):
        codec.next_event()


def test_send_round_trips_through_kio() -> None:
    codec = ServerCodec()
    codec.receive_data(request_frame(ApiVersionsRequest(
        client_software_name="c", client_software_version="1"), 11))
    event = codec.next_event()
    assert isinstance(event, Request)
    cls = response_class(18, 3)
    module = __import__(cls.__module__, fromlist=["x"])
    from kio.schema.errors import ErrorCode
    response = cls(
        error_code=ErrorCode.none,
        api_keys=(module.ApiVersion(api_key=0, min_version=3, max_version=11),),
        throttle_time=__import__("datetime").timedelta(0),
    )
    correlation_id, parsed = parse_response(codec.send(event.header, response)[4:], 18, 3)
    assert correlation_id == 11 and parsed.api_keys[0].max_version == 11
