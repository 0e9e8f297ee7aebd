"""The client's sans-IO core: message JSON both ways, backoff, call shapes.

Goal: values survive the JSON round trip losslessly (text when UTF-8, base64
otherwise), backoff is capped and honours Retry-After, and only safe calls are
marked idempotent. Method: pure function calls, seeded randomness.
"""

from __future__ import annotations

import dataclasses
import random

from conveyor.client import core


def test_encode_message_uses_text_when_it_can_and_base64_otherwise() -> None:
    assert core.encode_message("héllo", key=b"k") == {"value": "héllo", "key": "k"}
    binary = core.encode_message(b"\xff\x00", key=b"\xfe", headers={"h": "v"}, delay_s=1.5,
                                 ttl_s=0.0001, reply_to="r", correlation_id="c")
    assert binary == {"value_base64": "/wA=", "key_base64": "/g==", "headers": {"h": "v"},
                      "delay_ms": 1500, "ttl_ms": 1, "reply_to": "r", "correlation_id": "c"}
    assert core.encode_message(None) == {"value": None}


def test_message_fields_round_trip_a_server_document() -> None:
    document = {"topic": "t", "partition": 1, "offset": 5, "timestamp_ms": 9,
                "key_base64": "/g==", "value": "text", "headers": {"a": "1", "n": None},
                "headers_base64": {"b": "/w=="}, "receipt": "r", "delivery_count": 2,
                "lock_deadline_ms": 100}
    message = core.MessageData(**core.message_fields(document, "g"))
    assert (message.key, message.value) == (b"\xfe", b"text")
    assert message.headers == {"a": b"1", "n": None, "b": b"\xff"}
    assert (message.receipt, message.delivery_count, message.group) == ("r", 2, "g")
    assert core.MessageData(**core.message_fields(message.to_document())).value == b"text"


def test_positional_message_arguments_follow_the_dataclass_fields() -> None:
    """An acquire builds each message from ``message_args`` by position: the tuple's order
    must be MessageData's field order, and it must equal the by-name construction."""
    assert core.MESSAGE_FIELDS == tuple(f.name for f in dataclasses.fields(core.MessageData))
    document = {"topic": "t", "partition": 1, "offset": 5, "timestamp_ms": 9,
                "key_base64": "/g==", "value": "text", "headers": {"a": "1", "n": None},
                "headers_base64": {"b": "/w=="}, "receipt": "r", "delivery_count": 2,
                "lock_deadline_ms": 100}
    by_position = core.MessageData(*core.message_args(document, "g"))
    assert by_position == core.MessageData(**core.message_fields(document, "g"))
    assert (by_position.receipt, by_position.delivery_count, by_position.lock_deadline_ms,
            by_position.group, by_position.headers) == ("r", 2, 100, "g",
                                                        {"a": b"1", "n": None, "b": b"\xff"})


def test_backoff_is_capped_jittered_and_honours_retry_after() -> None:
    policy = core.RetryPolicy(backoff_initial_s=0.1, backoff_max_s=1.0, rng=random.Random(7))
    delays = [policy.delay_s(attempt) for attempt in range(10)]
    assert all(0 <= delay <= 1.0 for delay in delays)
    assert policy.delay_s(0, retry_after="0.5") >= 0.5
    assert policy.delay_s(0, retry_after="60") <= 1.0  # capped: never sleep a minute
    assert policy.delay_s(0, retry_after="soon") <= 0.1


def test_only_safe_calls_are_idempotent() -> None:
    assert core.fetch_call("t", None, None, None, None, 10, 1.0).idempotent
    assert core.commit_call("t", "g", {0: 1}).idempotent
    assert not core.acquire_call("t", "g", 1, 0, None).idempotent
    assert not core.settle_call("t", "g", "ack", ["r"]).idempotent
    assert not core.publish_call("t", [{"value": "v"}], idempotent=False).idempotent
    assert core.admin_call("GET", "/topics").idempotent
    assert not core.admin_call("POST", "/topics", {"name": "x"}).idempotent
    assert core.transport_failure_retryable(True, core.acquire_call("t", "g", 1, 0, None))
    assert core.fetch_call("t", None, None, None, None, 10, 2.5).wait_s == 2.5
    assert core.group_path("a/b", "g h") == "/topics/a%2Fb/groups/g%20h"
