"""Goal: every exchange type routes as AMQP/RabbitMQ specify; exchange-to-exchange
bindings are loop-safe; alternate exchanges catch unroutable messages; a destination
reached twice gets one copy; exchanges and bindings survive a restart.

Method: pure matching functions, a RoutingTable, then publish_to_exchange through
the Broker (topics as destinations) and a restart."""

from __future__ import annotations

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.routing import (
    Destination,
    RoutingTable,
    exchange_info,
    headers_match,
    topic_matches,
)
from conveyor.broker.types import Binding, Message
from conveyor.errors import InvalidRequestError, PreconditionFailedError, UnknownExchangeError


@pytest.mark.parametrize(("pattern", "key", "expected"), [
    ("a.b.c", "a.b.c", True), ("a.*.c", "a.b.c", True), ("a.*.c", "a.c", False),
    ("a.#", "a", True), ("a.#", "a.b.c", True), ("#", "", True), ("#", "x.y", True),
    ("*", "x", True), ("*", "x.y", False), ("#.c", "c", True), ("#.c", "a.b.c", True),
    ("a.#.c", "a.c", True), ("a.#.c", "a.x.y.c", True), ("a.#.c", "a.x.y", False),
    ("*.#", "", False), ("a.b", "a.b.c", False), ("", "", True), ("", "a", False),
    ("#.#", "a.b", True), ("*.*", "a", False),
])
def test_topic_matching(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_headers_matching() -> None:
    headers = (("format", b"pdf"), ("type", b"report"), ("x-tag", b"1"))
    assert headers_match([("format", "pdf"), ("type", "report")], headers)
    assert not headers_match([("format", "pdf"), ("type", "log")], headers)
    assert headers_match([("x-match", "any"), ("format", "zip"), ("type", "report")], headers)
    assert not headers_match([("x-match", "any"), ("format", "zip")], headers)
    # x- arguments are ignored by all/any and used by the -with-x forms
    assert headers_match([("format", "pdf"), ("x-tag", "2")], headers)
    assert not headers_match([("x-match", "all-with-x"), ("x-tag", "2")], headers)
    assert headers_match([("x-match", "all-with-x"), ("x-tag", "1")], headers)
    assert headers_match([("x-match", "any-with-x"), ("x-tag", "1"), ("a", "b")], headers)
    assert not headers_match([("x-match", "any"), ("x-tag", "1")], headers)
    assert headers_match([], headers)
    with pytest.raises(InvalidRequestError):
        headers_match([("x-match", "some")], headers)


def table_with(queues: set[str]) -> RoutingTable:
    return RoutingTable(lambda name: name in queues)


def test_direct_fanout_and_default_exchange() -> None:
    table = table_with({"q1", "q2"})
    table.declare(exchange_info("d", "direct"))
    table.declare(exchange_info("f", "fanout"))
    table.bind(Binding("d", "queue", "q1", "red"))
    table.bind(Binding("d", "queue", "q2", "blue"))
    table.bind(Binding("f", "queue", "q1"))
    table.bind(Binding("f", "queue", "q2"))
    assert table.route("d", "red") == [Destination("queue", "q1")]
    assert table.route("d", "green") == []
    assert table.route("f", "anything") == [Destination("queue", "q1"), Destination("queue", "q2")]
    assert table.route("", "q2") == [Destination("queue", "q2")]
    assert table.route("", "missing") == []
    with pytest.raises(UnknownExchangeError):
        table.route("nope", "x")


def test_each_vhost_has_its_own_default_exchange() -> None:
    # "dev~" is vhost dev's default exchange: it reaches dev's queues only, and a key with
    # the separator never reaches a qualified queue through "/"'s default exchange
    table = RoutingTable(lambda name: name in {"orders", "dev~orders", "dev~amqp.q.x"},
                         lambda name: "amqp.q.x" if name == "x y" else name)
    assert table.route("dev~", "orders") == [Destination("queue", "dev~orders")]
    assert table.route("", "orders") == [Destination("queue", "orders")]
    assert table.route("dev~", "x y") == [Destination("queue", "dev~amqp.q.x")]
    assert table.route("dev~", "missing") == []
    assert table.route("", "dev~orders") == []
    assert table.route("dev~", "dev~orders") == []
    assert table.get("dev~").type == "direct" and table.exists("dev~")
    assert table.routes_by_key_only("dev~")
    table.declare(exchange_info("dev~amq.direct", "direct"))
    table.declare(exchange_info("dev~e", "direct"))
    for refused in (lambda: table.declare(exchange_info("dev~", "direct")),
                    lambda: table.bind(Binding("dev~", "queue", "dev~orders", "k")),
                    lambda: table.bind(Binding("dev~e", "exchange", "dev~", "k")),
                    lambda: table.unbind(Binding("dev~", "queue", "dev~orders", "k")),
                    lambda: table.delete("dev~amq.direct"), lambda: table.delete("dev~")):
        with pytest.raises(PreconditionFailedError):
            refused()
    table.delete("dev~e")


def test_redeclare_rules_and_delete() -> None:
    table = table_with(set())
    table.declare(exchange_info("e", "topic"))
    _, created = table.declare(exchange_info("e", "topic"))
    assert not created
    with pytest.raises(PreconditionFailedError):
        table.declare(exchange_info("e", "direct"))
    table.declare(exchange_info("other", "fanout"))
    table.bind(Binding("e", "exchange", "other", "#"))
    with pytest.raises(PreconditionFailedError):
        table.delete("e", if_unused=True)
    removed = table.delete("other")
    assert removed == [Binding("e", "exchange", "other", "#")]
    assert table.bindings("e") == []


def test_exchange_to_exchange_loop_and_dedup() -> None:
    table = table_with({"q"})
    table.declare(exchange_info("a", "fanout"))
    table.declare(exchange_info("b", "fanout"))
    table.bind(Binding("a", "exchange", "b"))
    table.bind(Binding("b", "exchange", "a"))  # a cycle
    table.bind(Binding("a", "queue", "q"))
    table.bind(Binding("b", "queue", "q"))  # the same queue by a second path
    table.bind(Binding("b", "topic", "log"))
    assert table.route("a", "k") == [Destination("queue", "q"), Destination("topic", "log")]


def test_alternate_exchange_chain_is_loop_safe() -> None:
    table = table_with({"unrouted"})
    table.declare(exchange_info("ae", "fanout", alternate_exchange="main"))
    table.declare(exchange_info("main", "direct", alternate_exchange="ae"))
    assert table.route("main", "x") == []
    table.bind(Binding("ae", "queue", "unrouted"))
    assert table.route("main", "x") == [Destination("queue", "unrouted")]


def test_auto_delete_after_last_unbind() -> None:
    table = table_with({"q"})
    table.declare(exchange_info("tmp", "direct", auto_delete=True))
    binding = Binding("tmp", "queue", "q", "k")
    table.bind(binding)
    removed, deleted = table.unbind(binding)
    assert removed and deleted is not None and not table.exists("tmp")


async def test_publish_to_exchange_all_types_and_restart(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    for name in ("red", "all", "audit", "pdfs", "lost"):
        await broker.create_topic(name)
    assert {e.name for e in broker.list_exchanges()} >= {
        "", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"}
    await broker.declare_exchange("events", "topic", alternate_exchange="fallback")
    await broker.declare_exchange("fallback", "fanout")
    await broker.declare_exchange("copies", "fanout")
    await broker.bind("events", "topic", "red", "color.red.*")
    await broker.bind("events", "topic", "all", "color.#")
    await broker.bind("events", "exchange", "copies", "#")
    await broker.bind("copies", "topic", "audit")
    await broker.bind("copies", "topic", "all")  # "all" reached twice: one copy
    await broker.bind("amq.headers", "topic", "pdfs", "", {"format": "pdf"})
    await broker.bind("fallback", "topic", "lost")
    with pytest.raises(PreconditionFailedError):
        await broker.declare_exchange("events", "direct")

    result = await broker.publish_to_exchange("events", "color.red.dark", [Message(b"m1")])
    assert result.routed
    assert sorted(r.topic for r in result.results) == ["all", "audit", "red"]
    unrouted = await broker.publish_to_exchange("amq.direct", "nobody", [Message(b"m2")])
    assert not unrouted.routed and unrouted.results == ()
    headers = await broker.publish_to_exchange(
        "amq.headers", "", [Message(b"m3", headers=(("format", b"pdf"),))])
    assert [r.topic for r in headers.results] == ["pdfs"]

    broker = await harness.restart()
    assert broker.get_exchange("events").alternate_exchange == "fallback"
    assert len(broker.list_bindings(source="events")) == 3
    result = await broker.publish_to_exchange("events", "color.red.x", [Message(b"m4")])
    assert sorted(r.topic for r in result.results) == ["all", "audit", "red"]
    # the "events" exchange matches nothing for this key except the e2e "#" binding
    fallback = await broker.publish_to_exchange("fallback", "k", [Message(b"m5")])
    assert [r.topic for r in fallback.results] == ["lost"]
    assert await broker.unbind("events", "topic", "red", "color.red.*")
    await broker.delete_exchange("copies")
    broker = await harness.restart()
    assert len(broker.list_bindings(source="events")) == 1
    records = await broker.read_records("all", 0, 0, 10)
    assert [r.value for r in records] == [b"m1", b"m4"]


async def test_transient_exchange_bindings_vanish_on_restart(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("t")
    await broker.declare_exchange("temp", "fanout", durable=False)
    await broker.declare_exchange("keep", "fanout", arguments={"alternate-exchange": "temp"})
    await broker.bind("temp", "topic", "t")
    await broker.bind("keep", "exchange", "temp")
    await broker.declare_exchange("hidden", "direct", internal=True)
    with pytest.raises(InvalidRequestError):
        await broker.publish_to_exchange("hidden", "k", [Message(b"x")])
    assert broker.get_exchange("keep").alternate_exchange == "temp"
    broker = await harness.restart()
    assert not broker.routing.exists("temp")
    assert broker.list_bindings(source="keep") == []
    assert broker.get_exchange("hidden").internal


def test_routes_by_key_only_unless_a_headers_exchange_is_reachable() -> None:
    table = table_with({"q"})
    table.declare(exchange_info("d", "direct"))
    table.declare(exchange_info("t", "topic"))
    table.declare(exchange_info("h", "headers"))
    table.declare(exchange_info("alt", "fanout", alternate_exchange="h"))
    table.bind(Binding("d", "exchange", "t", "k"))
    assert table.routes_by_key_only("")
    assert table.routes_by_key_only("d")
    assert not table.routes_by_key_only("h")
    assert not table.routes_by_key_only("alt")  # its alternate routes by headers
    table.bind(Binding("t", "exchange", "h", "#"))
    assert not table.routes_by_key_only("d")  # d -> t -> h
