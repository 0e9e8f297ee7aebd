"""Pure parts of the management API: the rate sampler's arithmetic, listings (columns,
sort, paging, regex), queue arguments both ways, binding keys, Kafka assignments, the
connection registry.

Goal: rates are slopes over the last samples and survive a recreated topic; listing
options behave as RabbitMQ's; a queue's arguments round-trip; hostile assignment bytes
give [] instead of an exception.
Method: a stub broker under a SimClock (no sockets, no sleeps); plain function calls.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from conveyor.broker.types import PartitionOffsets, QueueConfig, TopicConfig, TopicInfo
from conveyor.connections import ConnectionRegistry, ConnectionView
from conveyor.errors import InvalidRequestError
from conveyor.protocols.http.management_conveyor import parse_consumer_assignment
from conveyor.protocols.http.management_documents import (
    ArgumentError,
    listing,
    properties_key,
    queue_arguments,
    queue_config,
)
from conveyor.protocols.http.rates import RateSampler
from conveyor.testing.clock import SimClock


@dataclass
class StubShared:
    delivered: dict[tuple[str, str], int] = field(default_factory=dict)

    def delivered_totals(self) -> dict[tuple[str, str], int]:
        return dict(self.delivered)


@dataclass
class StubBroker:
    clock: SimClock = field(default_factory=SimClock)
    high_watermarks: dict[str, list[int]] = field(default_factory=dict)
    shared_groups: StubShared = field(default_factory=StubShared)

    def list_topics(self) -> list[TopicInfo]:
        return [TopicInfo(name, len(marks), TopicConfig())
                for name, marks in self.high_watermarks.items()]

    def offsets(self, topic: str, partition: int) -> PartitionOffsets:
        return PartitionOffsets(0, self.high_watermarks[topic][partition])


def test_rates_are_slopes_over_recent_samples() -> None:
    broker = StubBroker(high_watermarks={"orders": [0, 0]})
    sampler = RateSampler(broker, interval_ms=1000)  # type: ignore[arg-type]
    sampler.sample()
    for second in range(1, 8):
        broker.clock.advance(1000)
        broker.high_watermarks["orders"] = [10 * second, 10 * second]  # 20 records/s
        broker.shared_groups.delivered = {("orders", "orders"): 5 * second}
        sampler.sample()
    assert sampler.rates("orders") == (20.0, 5.0)
    assert sampler.totals_all() == (140, 35)
    history = sampler.history(3)
    assert [point["publish"] for point in history] == [20.0, 20.0, 20.0]
    assert history[-1]["time_ms"] == broker.clock.wall_ms()
    assert sampler.rates("unknown") == (0.0, 0.0)


def test_a_recreated_topic_starts_its_history_again() -> None:
    broker = StubBroker(high_watermarks={"orders": [50]})
    sampler = RateSampler(broker)  # type: ignore[arg-type]
    sampler.sample()
    broker.clock.advance(1000)
    broker.high_watermarks["orders"] = [2]  # deleted and created again
    sampler.sample()
    assert sampler.rates("orders") == (0.0, 0.0)
    broker.clock.advance(1000)
    broker.high_watermarks["orders"] = [6]
    sampler.sample()
    assert sampler.rates("orders") == (4.0, 0.0)
    del broker.high_watermarks["orders"]
    sampler.sample()
    assert sampler.totals("orders") is None


ITEMS = [{"name": f"queue-{index}", "messages": index, "message_stats": {"publish": index * 2}}
         for index in range(12)]


def test_columns_keep_nesting_and_sort() -> None:
    picked = listing(ITEMS, {"columns": "name,message_stats.publish", "sort": "messages",
                             "sort_reverse": "true"})
    assert picked[0] == {"name": "queue-11", "message_stats": {"publish": 22}}


def test_paging_and_name_filters() -> None:
    page = listing(ITEMS, {"page": "2", "page_size": "5"})
    assert [item["name"] for item in page["items"]] == [f"queue-{i}" for i in range(5, 10)]
    assert (page["page_count"], page["total_count"], page["filtered_count"]) == (3, 12, 12)
    regex = listing(ITEMS, {"page": "1", "name": "^queue-1[01]$", "use_regex": "true"})
    assert [item["name"] for item in regex["items"]] == ["queue-10", "queue-11"]
    substring = listing(ITEMS, {"page": "1", "name": "QUEUE-1"})
    assert substring["filtered_count"] == 3
    for bad in ({"page": "0"}, {"page": "1", "name": "(", "use_regex": "true"},
                {"page": "1", "name": "x" * 300}):
        with pytest.raises(InvalidRequestError):
            listing(ITEMS, bad)


def test_queue_arguments_round_trip_and_refusals() -> None:
    arguments = {"x-max-length": 10, "x-overflow": "reject-publish", "x-message-ttl": 500,
                 "x-max-priority": 5, "x-delivery-limit": 2, "x-dead-letter-exchange": "dlx",
                 "x-dead-letter-routing-key": "dead"}
    config = queue_config(arguments, durable=True)
    assert config.max_deliveries == 3 and config.overflow == "reject-publish"
    assert queue_arguments(config) == arguments
    assert queue_arguments(QueueConfig()) == {}
    for bad in ({"x-max-length": -1}, {"x-max-length": "10"}, {"x-overflow": "explode"},
                {"x-queue-type": "lazy"}, {"x-dead-letter-routing-key": "k"},
                {"x-max-priority": 1000}):
        with pytest.raises(ArgumentError):
            queue_config(bad, durable=True)


def test_properties_key() -> None:
    assert properties_key("", ()) == "~"
    assert properties_key("a.b", ()) == "a.b"
    with_arguments = properties_key("", (("x-match", "all"),))
    assert with_arguments.startswith("~~") and with_arguments != properties_key(
        "", (("x-match", "any"),))


def test_consumer_assignment_parsing_is_bounded() -> None:
    topic = b"orders"
    data = struct.pack(">hih", 1, 1, len(topic)) + topic + struct.pack(">iii", 2, 0, 3)
    assert parse_consumer_assignment(data + struct.pack(">i", -1)) == [("orders", [0, 3])]
    assert parse_consumer_assignment(b"") == []
    assert parse_consumer_assignment(struct.pack(">hi", 0, 1 << 30)) == []
    assert parse_consumer_assignment(data[:-3]) == []
    huge_count = struct.pack(">hih", 1, 1, len(topic)) + topic + struct.pack(">i", 1 << 29)
    assert parse_consumer_assignment(huge_count) == []


def test_registry_sources_come_and_go() -> None:
    registry = ConnectionRegistry()
    live: list[ConnectionView] = [ConnectionView("kafka", "10.0.0.1:5000", 9092)]
    remove = registry.add_source("kafka", 9092, lambda: list(live))
    registry.add_source("http", 8080, lambda: [])
    assert [view.peer for view in registry.snapshot()] == ["10.0.0.1:5000"]
    live.clear()
    assert registry.snapshot() == []
    remove()
    assert [listener.protocol for listener in registry.listeners()] == ["http"]
