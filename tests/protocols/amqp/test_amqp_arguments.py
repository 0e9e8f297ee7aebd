"""AMQP names and queue arguments on Conveyor's model.

Goal: a queue name Kafka accepts is its topic's name; any other name maps to a
legal, deterministic ``amqp.q.…`` topic name; RabbitMQ's queue arguments become
the right ``QueueConfig`` and the arguments RabbitMQ refuses raise
``ArgumentError`` (406); binding arguments become strings. Method: examples plus
a Hypothesis property over arbitrary names (derandomized: the same examples every
run).
"""

from __future__ import annotations

import decimal
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.broker.types import QueueConfig
from conveyor.protocols.amqp.arguments import (
    ArgumentError,
    binding_arguments,
    generated_name,
    queue_options,
)
from conveyor.protocols.amqp.names import topic_name_for

KAFKA_LEGAL = re.compile(r"[a-zA-Z0-9._-]{1,249}")
VISIBILITY_MS = 1_800_000


# --- names -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["orders", "a.b-c_d", "Q1", "x" * 249])
def test_kafka_legal_names_are_their_own_topic(name: str) -> None:
    assert topic_name_for(name) == name


@pytest.mark.parametrize("name", [
    "celery@host.celery.pidbox", "with space", "ünïcode", "x" * 250, ".", "..", "a/b", "",
])
def test_other_names_map_to_a_legal_deterministic_topic(name: str) -> None:
    topic = topic_name_for(name)
    assert topic != name
    assert topic.startswith("amqp.q.")
    assert KAFKA_LEGAL.fullmatch(topic) and topic not in (".", "..")
    assert topic_name_for(name) == topic


def test_similar_names_do_not_share_a_topic() -> None:
    names = ["a b", "a/b", "a@b", "a:b", "a" + "\u00e9" + "b", "a" + "\u00ea" + "b"]
    topics = {topic_name_for(name) for name in names}
    assert len(topics) == len(names)


@settings(max_examples=300, derandomize=True, database=None)
@given(st.text(min_size=1, max_size=300))
def test_every_name_maps_to_a_legal_topic(name: str) -> None:
    topic = topic_name_for(name)
    assert KAFKA_LEGAL.fullmatch(topic), topic
    assert topic not in (".", "..")
    assert topic_name_for(name) == topic


def test_generated_name() -> None:
    name = generated_name("amq.gen", bytes(range(16)))
    assert name.startswith("amq.gen-")
    assert "=" not in name
    assert KAFKA_LEGAL.fullmatch(name)
    assert generated_name("amq.gen", bytes(16)) != generated_name("amq.gen", b"\x01" * 16)


# --- queue arguments -------------------------------------------------------------------
def config(arguments: dict[str, Any] | None, durable: bool = True) -> QueueConfig:
    return queue_options(arguments, durable, VISIBILITY_MS).config


def test_no_arguments() -> None:
    options = queue_options(None, True, VISIBILITY_MS)
    assert options.queue_type == "classic" and options.single_active_consumer is False
    assert options.config == QueueConfig(visibility_timeout_ms=VISIBILITY_MS,
                                         dead_letter_topic="", durable=True)
    assert config({}, durable=False).durable is False


def test_rabbitmq_arguments_map_onto_the_queue_config() -> None:
    options = queue_options({
        "x-message-ttl": 60_000, "x-max-length": 100, "x-overflow": "reject-publish",
        "x-max-priority": 5, "x-delivery-limit": 3, "x-dead-letter-exchange": "dlx",
        "x-dead-letter-routing-key": "dead", "x-single-active-consumer": True,
        "x-queue-type": "quorum",
    }, False, VISIBILITY_MS)
    assert options.queue_type == "quorum" and options.single_active_consumer is True
    assert options.config == QueueConfig(
        visibility_timeout_ms=VISIBILITY_MS, max_deliveries=4, dead_letter_topic="",
        dead_letter_exchange="dlx", dead_letter_routing_key="dead", message_ttl_ms=60_000,
        max_length=100, overflow="reject-publish", max_priority=5, durable=True)


@pytest.mark.parametrize(("limit", "max_deliveries"), [(0, 1), (1, 2), (20, 21)])
def test_delivery_limit_counts_redeliveries(limit: int, max_deliveries: int) -> None:
    """RabbitMQ dead-letters once a message was returned more than the limit."""
    assert config({"x-delivery-limit": limit}).max_deliveries == max_deliveries


@pytest.mark.parametrize(("overflow", "expected"), [
    ("drop-head", "drop-head"), ("reject-publish", "reject-publish"),
    ("reject-publish-dlx", "reject-publish"), (b"drop-head", "drop-head")])
def test_overflow(overflow: str | bytes, expected: str) -> None:
    assert config({"x-overflow": overflow, "x-max-length": 1}).overflow == expected


@pytest.mark.parametrize(("priority", "expected"), [(0, None), (1, 1), (9, 9), (10, 9),
                                                     (255, 9)])
def test_max_priority_is_capped_at_9(priority: int, expected: int | None) -> None:
    assert config({"x-max-priority": priority}).max_priority == expected


def test_dead_letter_to_the_default_exchange_routes_by_topic_name() -> None:
    queue_config = config({"x-dead-letter-exchange": "",
                           "x-dead-letter-routing-key": "celery@host.pidbox"})
    assert queue_config.dead_letter_exchange == ""
    assert queue_config.dead_letter_routing_key == topic_name_for("celery@host.pidbox")
    named = config({"x-dead-letter-exchange": "dlx",
                    "x-dead-letter-routing-key": "celery@host.pidbox"})
    assert named.dead_letter_routing_key == "celery@host.pidbox"  # an exchange's own key


def test_dead_letter_exchange_without_routing_key_keeps_the_records_own() -> None:
    queue_config = config({"x-dead-letter-exchange": b"dlx"})
    assert queue_config.dead_letter_exchange == "dlx"
    assert queue_config.dead_letter_routing_key is None
    assert queue_config.max_deliveries == 0


def test_decimal_integers_are_accepted() -> None:
    assert config({"x-max-length": decimal.Decimal(7)}).max_length == 7


@pytest.mark.parametrize("arguments", [
    {"x-message-ttl": "1000"},
    {"x-message-ttl": -1},
    {"x-message-ttl": True},
    {"x-max-length": 1.5},
    {"x-max-length": -5},
    {"x-delivery-limit": -1},
    {"x-max-priority": 256},
    {"x-max-priority": "high"},
    {"x-overflow": "drop-tail"},
    {"x-queue-type": "lazy"},
    {"x-queue-type": 1},
    {"x-dead-letter-exchange": 5},
    {"x-dead-letter-routing-key": "dead"},  # without x-dead-letter-exchange
])
def test_arguments_rabbitmq_refuses(arguments: dict[str, Any]) -> None:
    with pytest.raises(ArgumentError):
        queue_options(arguments, True, VISIBILITY_MS)


def test_equal_arguments_give_equal_configs() -> None:
    """Redeclaring with the same arguments must compare equal (else 406)."""
    arguments = {"x-max-length": 10, "x-dead-letter-exchange": "dlx"}
    assert config(dict(arguments)) == config(dict(arguments))
    assert config({"x-max-length": 10}) != config({"x-max-length": 11})


# --- binding arguments -----------------------------------------------------------------
def test_binding_arguments_become_strings() -> None:
    assert binding_arguments({"x-match": "all", "flag": True, "off": False, "n": 5,
                              "raw": b"bytes", "f": 1.5}) == {
        "x-match": "all", "flag": "true", "off": "false", "n": "5", "raw": "bytes",
        "f": "1.5"}
    assert binding_arguments(None) == {}
