"""Goal: topic names, configs and partitions follow Kafka's rules and survive a restart.

Method: unit-check name and config validation; drive create/alter/grow/delete
through the Broker on the real FileLogStore; restart and compare."""

from __future__ import annotations

import asyncio

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.broker.topics import config_from_mapping, config_to_mapping, validate_topic_name
from conveyor.broker.types import Message, TopicConfig
from conveyor.errors import (
    InvalidConfigError,
    InvalidNameError,
    InvalidRequestError,
    TopicExistsError,
    UnknownPartitionError,
    UnknownTopicError,
)


@pytest.mark.parametrize("name", ["a", "orders.v1", "A_b-c.9", "x" * 249, "..."])
def test_legal_names(name: str) -> None:
    validate_topic_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "x" * 250, "has space", "slash/name", "ü"])
def test_illegal_names(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_topic_name(name)


def test_config_mapping_round_trip() -> None:
    config = config_from_mapping({
        "retention.ms": "1000", "cleanup.policy": "compact", "conveyor.fsync": "never",
        "segment.bytes": "4096", "max.message.bytes": "100",
    })
    assert config.retention_ms == 1000
    assert config.cleanup_policy == "compact"
    assert config.fsync == "never"
    assert config_from_mapping(config_to_mapping(config)) == config
    assert config_to_mapping(TopicConfig())["retention.ms"] == str(7 * 24 * 3600 * 1000)


@pytest.mark.parametrize("mapping", [
    {"retention.ms": "soon"}, {"retention.ms": "-2"}, {"segment.bytes": "1"},
    {"cleanup.policy": "shred"}, {"conveyor.fsync": "sometimes"}, {"no.such.config": "1"},
    {"retention.ms": None},
])
def test_invalid_configs(mapping: dict[str, str | None]) -> None:
    with pytest.raises(InvalidConfigError):
        config_from_mapping(mapping)


def test_ignored_kafka_configs_are_accepted() -> None:
    assert config_from_mapping({"min.insync.replicas": "2"}) == TopicConfig()


async def test_create_list_describe_and_errors(broker: Broker) -> None:
    info = await broker.create_topic("events", 3, {"retention.ms": "60000"})
    assert (info.name, info.partitions, info.config.retention_ms) == ("events", 3, 60000)
    assert [topic.name for topic in broker.list_topics()] == ["events"]
    assert broker.topic_config("events")["retention.ms"] == "60000"
    with pytest.raises(TopicExistsError):
        await broker.create_topic("events")
    with pytest.raises(InvalidNameError):
        await broker.create_topic("bad name")
    with pytest.raises(InvalidConfigError):
        await broker.create_topic("other", 1, {"retention.ms": "x"})
    assert broker.topics.find("other") is None
    with pytest.raises(InvalidRequestError):
        await broker.create_topic("zero", 0)
    with pytest.raises(UnknownPartitionError):
        broker.offsets("events", 3)
    assert broker.validate_topic("fresh", 2, {"retention.ms": "5"}).retention_ms == 5
    assert broker.topics.find("fresh") is None
    with pytest.raises(TopicExistsError):
        broker.validate_topic("events")


async def test_alter_config_and_grow_survive_restart(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("events", 1, {"retention.ms": "60000", "segment.ms": "5000"})
    altered = await broker.alter_topic_config(
        "events", {"cleanup.policy": "compact"}, delete=["retention.ms"]
    )
    assert altered.config.cleanup_policy == "compact"
    assert altered.config.retention_ms == TopicConfig().retention_ms
    assert altered.config.segment_ms == 5000
    with pytest.raises(InvalidConfigError):
        await broker.alter_topic_config("events", {"segment.ms": "0"})
    grown = await broker.create_partitions("events", 4)
    assert grown.partitions == 4
    with pytest.raises(InvalidRequestError):
        await broker.create_partitions("events", 2)
    await broker.publish("events", [Message(b"x")], partition=3)
    broker = await harness.restart()
    info = broker.get_topic("events")
    assert info.partitions == 4
    assert info.config.cleanup_policy == "compact"
    assert info.config.segment_ms == 5000
    assert broker.offsets("events", 3).high_watermark == 1
    assert broker.log_store.partition("events", 0).config.cleanup_policy == "compact"


async def test_delete_topic(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("gone", 2)
    await broker.publish("gone", [Message(b"x")])
    await broker.commit_offsets("g", {("gone", 0): 1})
    await broker.delete_topic("gone")
    assert broker.fetch_offsets("g") == {}
    with pytest.raises(UnknownTopicError):
        broker.get_topic("gone")
    assert ("gone", 0) not in broker.log_store.partitions()
    broker = await harness.restart()
    assert broker.list_topics() == []
    assert broker.fetch_offsets("g") == {}
    again = await broker.create_topic("gone", 1)
    assert again.partitions == 1
    assert broker.offsets("gone", 0).high_watermark == 0


async def test_auto_create_on_publish(broker: Broker) -> None:
    results = await broker.publish("auto", [Message(b"x")])
    assert results[0].offset == 0
    assert broker.get_topic("auto").partitions == broker.config.default_partitions


async def test_concurrent_auto_create_shares_one_creation(broker: Broker) -> None:
    results = await asyncio.gather(*(broker.publish("fresh", [Message(b"x")]) for _ in range(5)))
    assert sorted(r[0].offset for r in results) == [0, 1, 2, 3, 4]
    assert [t.name for t in broker.list_topics()] == ["fresh"]
