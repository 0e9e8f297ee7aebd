"""Sans-IO tests of the HTTP framing, codec and schema validator (no sockets).

Goal: bad input becomes a typed 4xx error with a clear message — malformed JSON,
wrong types, unknown fields, bad base64, oversized bodies, unknown routes — and
good input becomes exactly the messages it describes. Method: feed bytes to
RequestFramer and RawRequests to decode_request.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pytest

from conveyor.errors import (
    InvalidRequestError,
    NotFoundError,
    OperatingError,
    RecordTooLargeError,
)
from conveyor.protocols.http.codec import (
    HEADER_CORRELATION_ID,
    HEADER_REPLY_TO,
    MethodNotAllowedError,
    UnsupportedMediaTypeError,
    decode_request,
    error_response,
    record_document,
)
from conveyor.protocols.http.framing import RawRequest, RequestFramer, encode_response
from conveyor.protocols.http.openapi import build_document
from conveyor.protocols.http.routes import ROUTES


@dataclass(frozen=True)
class FakeRecord:
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def raw(method: str, target: str, body: object = None, headers: dict[str, str] | None = None,
        content: bytes | None = None) -> RawRequest:
    data = content if content is not None else (
        b"" if body is None else json.dumps(body).encode()
    )
    all_headers = {"content-type": "application/json", **(headers or {})}
    return RawRequest(method, target, all_headers, data, True, list(all_headers.items()))


def test_framer_splits_pipelined_requests_and_keeps_order() -> None:
    framer = RequestFramer()
    data = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /topics HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
    requests, immediate = framer.receive_data(data[:20])
    assert requests == [] and immediate == b""
    requests, _ = framer.receive_data(data[20:])
    assert [(r.method, r.target, r.body) for r in requests] == [
        ("GET", "/health", b""), ("POST", "/topics", b"body")
    ]
    assert all(r.keep_alive for r in requests)


def test_framer_rejects_an_announced_oversized_body_before_reading_it() -> None:
    framer = RequestFramer(body_bytes_max=10)
    with pytest.raises(RecordTooLargeError) as raised:
        framer.receive_data(b"POST /t HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    assert raised.value.http_status == 413


def test_framer_rejects_an_oversized_chunked_body() -> None:
    framer = RequestFramer(body_bytes_max=10)
    with pytest.raises(RecordTooLargeError):
        framer.receive_data(b"POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")


def test_framer_answers_expect_100_continue_and_rejects_garbage() -> None:
    _, immediate = RequestFramer().receive_data(
        b"POST /t HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert immediate == b"HTTP/1.1 100 Continue\r\n\r\n"
    with pytest.raises(InvalidRequestError):
        RequestFramer().receive_data(b"\x00\x01 nonsense\r\n\r\n")


def test_encode_response_has_length_and_close() -> None:
    data = encode_response(201, b"{}", keep_alive=False)
    assert data.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"Content-Length: 2\r\n" in data and b"Connection: close\r\n" in data
    assert data.endswith(b"\r\n\r\n{}")


def test_publish_json_decodes_text_base64_and_options() -> None:
    request = decode_request(raw("POST", "/topics/orders/messages", {"messages": [
        {"value": "hi", "key": "k", "headers": {"h": "v"}, "priority": 3, "delay_ms": 500},
        {"value_base64": base64.b64encode(b"\xff\x00").decode(), "partition": 2,
         "reply_to": "replies", "correlation_id": "c1"},
    ]}))
    assert request.operation == "publish" and request.path == {"topic": "orders"}
    first, second = request.messages
    assert (first.value, first.key, first.priority) == (b"hi", b"k", 3)
    assert ("h", b"v") in first.headers
    assert second.value == b"\xff\x00"
    assert (HEADER_REPLY_TO, b"replies") in second.headers
    assert (HEADER_CORRELATION_ID, b"c1") in second.headers
    assert request.message_partitions == (None, 2)


def test_raw_body_publish_uses_x_conveyor_headers() -> None:
    request = decode_request(raw("POST", "/topics/t/messages", content=b"\x00bin",
                                 headers={"content-type": "application/octet-stream",
                                          "x-conveyor-key": "k",
                                          "x-conveyor-partition": "1",
                                          "x-conveyor-header-trace": "abc"}))
    [message] = request.messages
    assert (message.value, message.key) == (b"\x00bin", b"k")
    assert ("trace", b"abc") in message.headers
    assert request.message_partitions == (1,)


@pytest.mark.parametrize(("body", "content", "fragment"), [
    (None, b"{not json", "malformed JSON"),
    ({"messages": [{"valu": "x"}]}, None, "unknown field 'valu'"),
    ({"messages": [{"value": 5}]}, None, "must be of type string"),
    ({"messages": [{"value_base64": "!!!"}]}, None, "not valid base64"),
    ({"messages": [{"value": "a", "value_base64": "YQ=="}]}, None, "not both"),
    ({"messages": []}, None, "at least 1"),
    ({"messages": [{"value": "x", "priority": 10}]}, None, "<= 9"),
    ({"messages": [{"value": "x", "headers": {"h": 1}}]}, None, "type string or null"),
    ({"messages": [{"value": "\ud800"}]}, None, "not valid Unicode"),
    ([1, 2], None, "of type object"),
])
def test_bad_publish_bodies_are_400_with_a_clear_message(
    body: object, content: bytes | None, fragment: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        decode_request(raw("POST", "/topics/t/messages", body, content=content))
    assert fragment in str(raised.value)
    assert raised.value.http_status == 400


def test_text_only_publish_bodies_decode_as_the_general_path_does() -> None:
    """The common body (text values only) skips the schema walk: same messages as a body
    that takes the walk, and the item limit still holds (413)."""
    fast = decode_request(raw("POST", "/topics/t/messages",
                              {"messages": [{"value": "a"}, {"value": "\u00e9"}]}))
    general = decode_request(raw("POST", "/topics/t/messages", {"messages": [
        {"value": "a", "key": None}, {"value": "\u00e9", "key": None}]}))
    assert fast.messages == general.messages
    assert fast.message_partitions == general.message_partitions == (None, None)
    with pytest.raises(OperatingError) as raised:
        decode_request(raw("POST", "/topics/t/messages",
                           {"messages": [{"value": "x"}] * 10_001}))
    assert raised.value.http_status == 413


def test_routes_methods_queries_and_media_types() -> None:
    with pytest.raises(NotFoundError):
        decode_request(raw("GET", "/nowhere"))
    with pytest.raises(MethodNotAllowedError) as wrong_method:
        decode_request(raw("PUT", "/topics"))
    assert wrong_method.value.http_status == 405
    with pytest.raises(InvalidRequestError, match="unknown query parameter"):
        decode_request(raw("GET", "/topics/t/messages?bogus=1"))
    with pytest.raises(InvalidRequestError, match="integer"):
        decode_request(raw("GET", "/topics/t/messages?offset=abc"))
    with pytest.raises(UnsupportedMediaTypeError):
        decode_request(raw("POST", "/topics", content=b"name=x",
                           headers={"content-type": "application/x-www-form-urlencoded"}))
    read = decode_request(raw("GET", "/topics/a%2Eb/messages?partition=1&offset=5"))
    assert read.path == {"topic": "a.b"} and read.query == {"partition": 1, "offset": 5}


def test_error_document_shape_and_retry_after() -> None:
    response = error_response(RecordTooLargeError("too big", size_bytes=5))
    assert response.status == 413
    assert response.document == {"error": {"code": "record_too_large", "message": "too big",
                                            "details": {"size_bytes": 5}}}
    from conveyor.errors import UnavailableError

    assert ("Retry-After", "1") in error_response(UnavailableError("later")).headers


def test_record_document_is_lossless() -> None:
    record = FakeRecord(3, 99, b"\xff", b"text", (("a", b"1"), ("b", b"\xfe"), ("c", None)))
    document = record_document("t", 0, record)
    assert document["value"] == "text" and document["key_base64"] == "/w=="
    assert document["headers"] == {"a": "1", "c": None}
    assert document["headers_base64"] == {"b": "/g=="}


def test_the_common_message_document_equals_the_general_one() -> None:
    fast = record_document("t", 1, FakeRecord(4, 5, None, b"text", ()))
    assert list(fast.items()) == [("topic", "t"), ("partition", 1), ("offset", 4),
                                  ("timestamp_ms", 5), ("key", None), ("value", "text"),
                                  ("headers", {})]
    binary = record_document("t", 1, FakeRecord(4, 5, None, b"\xff", ()))
    assert binary["value_base64"] == "/w==" and "value" not in binary


@pytest.mark.parametrize(("receipts", "fragment", "status"), [
    (["a", 1], "body.receipts[1] must be of type string", 400),
    (["a", ""], "body.receipts[1] is shorter than 1", 400),
    (["a", "b" * 513], "body.receipts[1] is longer than 512", 400),
    ([None], "body.receipts[0] must be of type string", 400),
    ([], "at least 1", 400),
    (["r"] * 10_001, "more than 10000 items", 413),
])
def test_bad_receipt_lists_name_the_first_bad_item(
        receipts: list[object], fragment: str, status: int) -> None:
    with pytest.raises(OperatingError) as raised:
        decode_request(raw("POST", "/topics/t/groups/g/ack", {"receipts": receipts}))
    assert fragment in str(raised.value)
    assert raised.value.http_status == status
    good = decode_request(raw("POST", "/topics/t/groups/g/ack", {"receipts": ["a", "b" * 512]}))
    assert good.body == {"receipts": ["a", "b" * 512]}


def test_openapi_lists_every_route_with_its_schemas() -> None:
    document = build_document()
    for route in ROUTES:
        operation = document["paths"][route.template][route.method.lower()]
        assert operation["operationId"] == route.operation
        assert str(route.status) in operation["responses"]
        assert ("requestBody" in operation) == (route.body is not None)
    publish = document["paths"]["/topics/{topic}/messages"]["post"]["requestBody"]["content"]
    assert set(publish) == {"application/json", "application/octet-stream"}
    nullable = publish["application/json"]["schema"]["properties"]["messages"]["items"]
    assert nullable["properties"]["value"] == {
        "type": "string", "nullable": True, "description": "UTF-8 text value"
    }


def test_remembered_routes_give_fresh_parameters_and_still_check_the_method() -> None:
    from conveyor.errors import ConveyorError
    from conveyor.protocols.http import codec

    first_route, first = codec.match_route("POST", "/topics/orders/messages")
    first["topic"] = "changed by a handler"
    route, again = codec.match_route("POST", "/topics/orders/messages")
    assert route is first_route and again == {"topic": "orders"}
    with pytest.raises(ConveyorError) as wrong:  # the same path, another method: still 405
        codec.match_route("PATCH", "/topics/orders/messages")
    assert wrong.value.code == "method_not_allowed"
    long_name = "t" * codec.ROUTE_CACHED_PATH_MAX
    assert codec.match_route("POST", f"/topics/{long_name}/messages")[1] == {
        "topic": long_name}
    assert ("POST", f"/topics/{long_name}/messages") not in codec._route_cache
    for index in range(codec.ROUTES_CACHED_MAX + 1):  # full: it starts over, still right
        assert codec.match_route("GET", f"/topics/t{index}")[1] == {"topic": f"t{index}"}
    assert len(codec._route_cache) <= codec.ROUTES_CACHED_MAX
