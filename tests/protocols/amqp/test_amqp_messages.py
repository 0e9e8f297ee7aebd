"""AMQP message properties and the AMQP <-> record mapping.

Goal: ``decode_properties`` reads what pamqp writes and ``encode_properties``
writes what pamqp reads; malformed property lists raise ``PropertiesError`` only;
a published message becomes a record with the raw properties kept byte for byte,
the interop headers for Kafka/HTTP readers, priority and expiry; a record is
handed back to an AMQP consumer with the same properties (AMQP-written) or
properties rebuilt from its headers (Kafka/HTTP-written); a dead-lettered record
carries RabbitMQ's x-death headers and loses its expiration. Method: fixed
examples against pamqp's codec.
"""

from __future__ import annotations

import datetime
import decimal
import json
from typing import Any

import pytest
from pamqp import commands
from pamqp import encode as pamqp_encode

from conveyor.broker.types import Message
from conveyor.protocols.amqp.messages import (
    HEADER_DEATHS,
    HEADER_EXCHANGE,
    HEADER_PROPERTIES,
    HEADER_ROUTING_KEY,
    Properties,
    PropertiesError,
    decode_properties,
    derive,
    encode_properties,
    expiration_ms,
    outgoing,
    publish_message,
)

NOW_MS = 1_700_000_000_000


def pamqp_properties(raw: bytes) -> commands.Basic.Properties:
    flags = int.from_bytes(raw[:2], "big")
    value = commands.Basic.Properties()
    value.unmarshal(flags, raw[2:])
    return value


FULL = Properties(
    content_type="application/json", content_encoding="gzip",
    headers={"text": "v", "count": 7, "flag": True, "nested": {"a": [1, "b"]}},
    delivery_mode=2, priority=5, correlation_id="c-1", reply_to="replies",
    expiration="60000", message_id="m-1", timestamp=1_700_000_000, type="order.created",
    user_id="guest", app_id="shop", cluster_id="c",
)


# --- the codec -------------------------------------------------------------------------
def test_decode_reads_what_pamqp_writes() -> None:
    sent = commands.Basic.Properties(
        content_type="text/plain", headers={"x": "y", "n": 1}, delivery_mode=1, priority=0,
        expiration="5", timestamp=datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
        message_type="kind", app_id="app")
    assert decode_properties(sent.marshal()) == Properties(
        content_type="text/plain", headers={"x": "y", "n": 1}, delivery_mode=1, priority=0,
        expiration="5", timestamp=int(datetime.datetime(2024, 1, 2,
                                                        tzinfo=datetime.UTC).timestamp()),
        type="kind", app_id="app")


def test_encode_writes_what_pamqp_reads() -> None:
    raw = encode_properties(FULL)
    read = pamqp_properties(raw)
    assert read.content_type == FULL.content_type
    assert read.content_encoding == FULL.content_encoding
    assert read.headers == FULL.headers
    assert (read.delivery_mode, read.priority) == (2, 5)
    assert (read.correlation_id, read.reply_to, read.expiration) == ("c-1", "replies", "60000")
    assert read.message_id == "m-1"
    assert read.timestamp == datetime.datetime.fromtimestamp(1_700_000_000, tz=datetime.UTC)
    assert (read.message_type, read.user_id, read.app_id, read.cluster_id) == (
        "order.created", "guest", "shop", "c")


def test_round_trip_and_empty() -> None:
    assert decode_properties(encode_properties(FULL)) == FULL
    assert encode_properties(Properties()) == b"\x00\x00"
    assert decode_properties(b"\x00\x00") == Properties()


def test_continuation_flag_words_are_skipped() -> None:
    # content-type set + continuation bit; a second flag word with no known property
    raw = b"\x80\x01" + b"\x00\x00" + b"\x04text"
    assert decode_properties(raw) == Properties(content_type="text")


@pytest.mark.parametrize("raw", [
    b"",
    b"\x80",  # half a flag word
    b"\x80\x00",  # content-type announced, absent
    b"\x80\x00\x05abc",  # content-type shorter than its length
    b"\x80\x00\x02\xff\xfe",  # content-type not UTF-8
    b"\x00\x00\x00",  # a byte after an empty list
    b"\x00\x40\x00\x00\x00\x01",  # timestamp cut short
    b"\x20\x00\x00\x00\x00\x10\x01k",  # headers table longer than the data
    b"\x20\x00\x00\x00\x00\x03\x01kZ",  # headers value of an unknown type
    b"\x00\x01",  # a continuation word announced, absent
])
def test_malformed_properties_raise_properties_error(raw: bytes) -> None:
    with pytest.raises(PropertiesError):
        decode_properties(raw)


def test_hostile_nesting_is_a_properties_error() -> None:
    table = b"\x00\x00\x00\x00"
    for _ in range(5000):  # each level: key "k", type "F", table
        inner = b"\x01kF" + table
        table = len(inner).to_bytes(4, "big") + inner
    with pytest.raises(PropertiesError):
        decode_properties(b"\x20\x00" + table)


def test_long_shortstr_values_are_cut_on_a_character_boundary() -> None:
    """A shortstr holds 255 bytes; a longer value (rebuilt from a Kafka header, say) must
    still encode to UTF-8 that clients can decode."""
    raw = encode_properties(Properties(message_id="ж" * 200))  # 400 bytes
    decoded = decode_properties(raw)
    assert decoded.message_id is not None
    assert ("ж" * 200).startswith(decoded.message_id)


# --- publish ---------------------------------------------------------------------------
def headers_of(message: Message) -> dict[str, bytes | None]:
    return dict(message.headers)


def test_publish_message_keeps_raw_properties_and_writes_interop_headers() -> None:
    raw = encode_properties(FULL)
    message = publish_message("shop", "order.created", raw, FULL, b"{}", NOW_MS)
    headers = headers_of(message)
    assert message.value == b"{}" and message.key is None
    assert headers[HEADER_PROPERTIES] == raw
    assert headers[HEADER_EXCHANGE] == b"shop"
    assert headers[HEADER_ROUTING_KEY] == b"order.created"
    assert headers["conveyor.content-type"] == b"application/json"
    assert headers["conveyor.content-encoding"] == b"gzip"
    assert headers["conveyor.delivery-mode"] == b"2"
    assert headers["conveyor.correlation-id"] == b"c-1"
    assert headers["conveyor.reply-to"] == b"replies"
    assert headers["conveyor.expiration"] == b"60000"
    assert headers["conveyor.message-id"] == b"m-1"
    assert headers["conveyor.timestamp"] == b"1700000000"
    assert headers["conveyor.type"] == b"order.created"
    assert headers["conveyor.user-id"] == b"guest"
    assert headers["conveyor.app-id"] == b"shop"
    assert headers["text"] == b"v"
    assert headers["count"] == b"7"
    assert headers["flag"] == b"true"
    assert json.loads(headers["nested"] or b"") == {"a": [1, "b"]}
    assert message.priority == 5
    assert message.expires_at_ms == NOW_MS + 60_000


def test_a_publish_with_derived_properties_is_the_same_record() -> None:
    """The publishing path keeps ``derive``'s result per property bytes and hands it
    in: the record is the one publish_message builds from the properties alone; an
    invalid expiration raises from derive, before anything could keep it."""
    raw = encode_properties(FULL)
    derived = derive(FULL)
    for exchange, key in (("shop", "order.created"), ("", "q")):
        assert publish_message(exchange, key, raw, FULL, b"x", NOW_MS, derived) == \
            publish_message(exchange, key, raw, FULL, b"x", NOW_MS)
    with pytest.raises(ValueError):
        derive(Properties(expiration="-5"))


def test_messages_published_alike_share_one_headers_tuple() -> None:
    """Publishes with the same property bytes, exchange and routing key get one shared
    (immutable) headers tuple, which the deliver path recognises by identity; any of
    the three differing gives other headers."""
    raw = encode_properties(FULL)
    first = publish_message("shop", "order.created", raw, FULL, b"1", NOW_MS)
    second = publish_message("shop", "order.created", raw, FULL, b"2", NOW_MS)
    assert first.headers is second.headers
    other = publish_message("shop", "order.paid", raw, FULL, b"3", NOW_MS)
    assert other.headers != first.headers
    assert dict(other.headers)[HEADER_ROUTING_KEY] == b"order.paid"


def test_publish_message_header_values_as_text() -> None:
    table: dict[str, Any] = {
        "s": "ü", "raw": bytearray(b"\x00\xff"), "yes": True, "no": False, "int": -12,
        "float": 1.5, "decimal": decimal.Decimal("2.50"), "none": None,
        "when": datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC), "list": [1, "x"],
    }
    message = publish_message("", "q", b"\x20\x00", Properties(headers=table), b"", NOW_MS)
    headers = headers_of(message)
    assert headers["s"] == "ü".encode()
    assert headers["raw"] == b"\x00\xff"
    assert (headers["yes"], headers["no"], headers["int"]) == (b"true", b"false", b"-12")
    assert (headers["float"], headers["decimal"]) == (b"1.5", b"2.50")
    assert headers["none"] is None
    assert headers["when"] == str(int(table["when"].timestamp())).encode()
    assert json.loads(headers["list"] or b"") == [1, "x"]


def test_reserved_names_in_the_headers_table_are_not_copied() -> None:
    properties = Properties(headers={"conveyor.priority": "9", "conveyor.expires-at": "1",
                                     "conveyor.exchange": "spoof", "plain": "kept"})
    message = publish_message("real", "rk", b"", properties, b"", NOW_MS)
    headers = headers_of(message)
    assert "conveyor.priority" not in headers and "conveyor.expires-at" not in headers
    assert headers[HEADER_EXCHANGE] == b"real"
    assert headers["plain"] == b"kept"
    assert message.priority is None and message.expires_at_ms is None


@pytest.mark.parametrize(("priority", "expected"), [(0, 0), (9, 9), (10, 9), (255, 9)])
def test_priority_is_capped_at_9(priority: int, expected: int) -> None:
    message = publish_message("", "q", b"", Properties(priority=priority), b"", NOW_MS)
    assert message.priority == expected


@pytest.mark.parametrize(("expiration", "ttl_ms"), [
    (None, None), ("0", 0), ("1", 1), ("86400000", 86_400_000)])
def test_expiration(expiration: str | None, ttl_ms: int | None) -> None:
    assert expiration_ms(Properties(expiration=expiration)) == ttl_ms
    message = publish_message("", "q", b"", Properties(expiration=expiration), b"", NOW_MS)
    assert message.expires_at_ms == (None if ttl_ms is None else NOW_MS + ttl_ms)


@pytest.mark.parametrize("expiration", ["", "-1", "-0", "+5", "1.5", "abc", "1_000", "1e3"])
def test_invalid_expiration_is_a_value_error(expiration: str) -> None:
    with pytest.raises(ValueError):
        expiration_ms(Properties(expiration=expiration))
    with pytest.raises(ValueError):
        publish_message("", "q", b"", Properties(expiration=expiration), b"", NOW_MS)


# --- deliver ---------------------------------------------------------------------------
def test_amqp_record_is_delivered_with_its_own_property_bytes() -> None:
    raw = encode_properties(FULL)
    message = publish_message("shop", "order.created", raw, FULL, b"{}", NOW_MS)
    out = outgoing(message.headers, None, "orders")
    assert (out.exchange, out.routing_key, out.properties) == ("shop", "order.created", raw)


def test_kafka_record_gets_properties_from_its_headers() -> None:
    headers = (
        ("conveyor.content-type", b"text/plain"), ("conveyor.delivery-mode", b"2"),
        ("conveyor.timestamp", b"1700000000"), ("conveyor.message-id", b"m-9"),
        ("conveyor.priority", b"4"), ("conveyor.deliver-at", b"1"),
        ("trace", b"abc"), ("empty", None), ("conveyor.delivery-mode", b"2"),
    )
    out = outgoing(headers, b"the-key", "topic-a")
    assert (out.exchange, out.routing_key) == ("", "the-key")
    assert decode_properties(out.properties) == Properties(
        content_type="text/plain", delivery_mode=2, timestamp=1_700_000_000,
        message_id="m-9", priority=4, headers={"trace": "abc", "empty": None})


def test_record_without_key_or_routing_key_is_routed_by_its_source() -> None:
    out = outgoing((), None, "the-queue")
    assert (out.exchange, out.routing_key) == ("", "the-queue")
    assert decode_properties(out.properties) == Properties()


def test_malformed_interop_numbers_are_skipped() -> None:
    headers = (("conveyor.delivery-mode", b"two"), ("conveyor.priority", b"high"),
               ("conveyor.timestamp", b"soon"), ("conveyor.type", b"t"))
    assert decode_properties(outgoing(headers, None, "q").properties) == Properties(type="t")


def deaths_document(*deaths: dict[str, Any], first: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"deaths": list(deaths), "first": first or {
        "queue": deaths[-1]["queue"], "reason": deaths[-1]["reason"],
        "exchange": deaths[-1]["exchange"]}}).encode()


def test_dead_lettered_record_gets_x_death_and_loses_its_expiration() -> None:
    properties = Properties(expiration="1000", headers={"app": "kept"}, message_id="m")
    raw = encode_properties(properties)
    message = publish_message("work", "task", raw, properties, b"x", NOW_MS)
    document = deaths_document(
        {"queue": "retry", "reason": "expired", "count": 1, "time": 1_700_000_100,
         "exchange": "retry-x", "routing-keys": ["task"], "original-expiration": "1000"},
        {"queue": "work", "reason": "max-deliveries", "count": 3, "time": 1_700_000_000,
         "exchange": "work", "routing-keys": ["task"]},
        first={"queue": "work", "reason": "rejected", "exchange": "work"},
    )
    out = outgoing((*message.headers, (HEADER_DEATHS, document)), None, "dead")
    decoded = decode_properties(out.properties)
    assert decoded.expiration is None
    assert decoded.message_id == "m"
    table = decoded.headers or {}
    assert table["app"] == "kept"
    assert table["x-death"] == [
        {"count": 1, "reason": "expired", "queue": "retry",
         "time": datetime.datetime.fromtimestamp(1_700_000_100, tz=datetime.UTC),
         "exchange": "retry-x", "routing-keys": ["task"], "original-expiration": "1000"},
        {"count": 3, "reason": "delivery_limit", "queue": "work",
         "time": datetime.datetime.fromtimestamp(1_700_000_000, tz=datetime.UTC),
         "exchange": "work", "routing-keys": ["task"]},
    ]
    assert (table["x-first-death-queue"], table["x-first-death-reason"],
            table["x-first-death-exchange"]) == ("work", "rejected", "work")
    assert (table["x-last-death-queue"], table["x-last-death-reason"],
            table["x-last-death-exchange"]) == ("retry", "expired", "retry-x")
    assert (out.exchange, out.routing_key) == ("work", "task")


def test_dead_lettered_kafka_record_gets_x_death_too() -> None:
    document = deaths_document({"queue": "q", "reason": "rejected", "count": 1, "time": 5,
                                "exchange": "", "routing-keys": ["q"]})
    out = outgoing((("h", b"v"), (HEADER_DEATHS, document)), None, "dlq")
    table = decode_properties(out.properties).headers or {}
    assert table["h"] == "v"
    assert [entry["reason"] for entry in table["x-death"]] == ["rejected"]


@pytest.mark.parametrize("document", [b"not json", b"{}", b'{"deaths": 5}', b"[]"])
def test_malformed_deaths_document_leaves_the_properties_alone(document: bytes) -> None:
    properties = Properties(headers={"a": "b"}, expiration="7")
    raw = encode_properties(properties)
    out = outgoing(((HEADER_PROPERTIES, raw), (HEADER_DEATHS, document)), None, "q")
    assert decode_properties(out.properties) == properties


def test_dead_lettered_record_with_a_binary_header_value_can_be_delivered() -> None:
    """A longstr header value need not be UTF-8 (pamqp reads it as bytes); dead-lettering
    adds x-death and must not lose or choke on it."""
    table = pamqp_encode.field_table({"x-death-marker": "ok"})
    body = b"\x03binS\x00\x00\x00\x02\xff\xfe" + table[4:]
    raw = b"\x20\x00" + len(body).to_bytes(4, "big") + body
    assert decode_properties(raw).headers == {"bin": b"\xff\xfe", "x-death-marker": "ok"}
    document = deaths_document({"queue": "q", "reason": "rejected", "count": 1, "time": 5,
                                "exchange": "", "routing-keys": ["q"]})
    out = outgoing(((HEADER_PROPERTIES, raw), (HEADER_DEATHS, document)), None, "dlq")
    table_out = decode_properties(out.properties).headers or {}
    assert bytes(table_out["bin"]) == b"\xff\xfe"
    assert [entry["queue"] for entry in table_out["x-death"]] == ["q"]
