"""The catalog across nodes, in one process over one embedded PostgreSQL
(conveyor/cluster/catalog.py, Exchanges.reload): a re-read applies what another node
committed and keeps what is transient here; a change notified by one node is re-read by
the other; misses wait for a re-read that starts after them (concurrent ones share it), as many
as a token bucket allows.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from conveyor.broker.exchanges import Exchanges
from conveyor.broker.routing import Destination
from conveyor.broker.topics import TopicRegistry
from conveyor.clock import SystemClock
from conveyor.cluster.catalog import CatalogSync
from conveyor.storage.postgres_engine import PostgresEngine
from conveyor.storage.state_store import SqlStateStore


async def node_exchanges(dsn: str) -> tuple[SqlStateStore, Exchanges]:
    state = SqlStateStore(PostgresEngine(dsn, SystemClock()))
    await state.open()
    exchanges = Exchanges(state, cast(TopicRegistry, None), lambda name: True)
    await exchanges.load()
    return state, exchanges


async def test_a_reload_applies_another_nodes_exchanges_and_bindings(postgres_dsn: str
                                                                     ) -> None:
    state_a, on_a = await node_exchanges(postgres_dsn)
    state_b, on_b = await node_exchanges(postgres_dsn)
    await on_a.declare("x", "direct")
    await on_a.bind("x", "queue", "q", "k")
    await on_b.declare("mine", "fanout", durable=False)  # transient: never stored
    await on_b.bind("mine", "queue", "q")
    assert not on_b.routing.exists("x")
    assert await on_b.reload()
    assert on_b.route("x", "k") == [Destination("queue", "q")]
    assert on_b.route("mine", "any") == [Destination("queue", "q")]  # kept
    await on_a.unbind("x", "queue", "q", "k")
    assert await on_b.reload()
    assert on_b.route("x", "k") == []
    await on_a.delete("x")
    await on_a.declare("x", "fanout")  # deleted and declared again with another type
    await on_a.bind("x", "queue", "q2")
    assert await on_b.reload()
    assert on_b.get("x").type == "fanout"
    assert on_b.route("x", "whatever") == [Destination("queue", "q2")]
    await on_a.delete("x")
    assert await on_b.reload()
    assert not on_b.routing.exists("x")
    assert on_b.routing.exists("mine")
    await state_a.close()
    await state_b.close()


async def test_a_change_notified_by_one_node_is_reread_by_the_other(postgres_dsn: str
                                                                    ) -> None:
    heard: dict[str, list[frozenset[str]]] = {"a": [], "b": []}
    arrived = asyncio.Event()

    def reread_by(name: str) -> Any:
        async def reread(kinds: frozenset[str]) -> None:
            heard[name].append(kinds)
            arrived.set()
        return reread

    sync_a = CatalogSync(postgres_dsn, reread_by("a"), poll_ms=600_000)
    sync_b = CatalogSync(postgres_dsn, reread_by("b"), poll_ms=600_000)
    await sync_a.open()
    await sync_b.open()
    sync_a.changed("exchanges")
    sync_a.changed("queues")  # the same loop turn: one notification
    await asyncio.wait_for(arrived.wait(), 10)
    assert heard == {"a": [], "b": [frozenset({"exchanges", "queues"})]}
    assert sync_b.received == 1  # both kinds in one notification
    await sync_a.close()
    await sync_b.close()


async def test_misses_share_a_later_reread_within_a_budget(postgres_dsn: str
                                                                    ) -> None:
    calls: list[frozenset[str]] = []
    release = asyncio.Event()

    async def reread(kinds: frozenset[str]) -> None:
        calls.append(kinds)
        await release.wait()

    sync = CatalogSync(postgres_dsn, reread, poll_ms=600_000)
    await sync.open()
    misses = [asyncio.create_task(sync.miss()) for _ in range(5)]
    await asyncio.sleep(0)  # every miss has asked
    release.set()
    await asyncio.wait_for(asyncio.gather(*misses), 10)
    assert calls == [frozenset({"topics", "queues", "exchanges"})]
    await sync.miss()  # after that re-read: a new one (it may hold a bind made since)
    assert len(calls) == 2
    sync._miss_tokens = -100.0  # a flood of misses emptied the bucket (for seconds)
    await sync.miss()
    assert len(calls) == 2 and sync.misses_refused == 1
    await sync.close()


async def test_a_reread_that_overlapped_a_change_made_here_is_read_again(postgres_dsn: str
                                                                         ) -> None:
    state, exchanges = await node_exchanges(postgres_dsn)
    original = state.load_bindings
    paused, release = asyncio.Event(), asyncio.Event()
    reads = 0

    async def held_first_read() -> Any:
        nonlocal reads
        reads += 1
        if reads == 1:  # the exchanges are read; this node declares before the bindings
            paused.set()
            await release.wait()
        return await original()

    state.load_bindings = held_first_read  # type: ignore[method-assign]
    reload = asyncio.create_task(exchanges.reload())
    await asyncio.wait_for(paused.wait(), 10)
    await exchanges.declare("z", "topic")  # committed after the first read of exchanges
    release.set()
    assert await asyncio.wait_for(reload, 10)
    assert reads == 2, "the overlapped read was thrown away and read again"
    assert exchanges.routing.exists("z"), "the stale read did not drop z"
    await state.close()


async def test_a_miss_finds_a_bind_that_was_never_notified(postgres_dsn: str) -> None:
    state_a, on_a = await node_exchanges(postgres_dsn)
    state_b, on_b = await node_exchanges(postgres_dsn)

    async def reread(kinds: frozenset[str]) -> None:
        if "exchanges" in kinds:
            await on_b.reload()

    sync_b = CatalogSync(postgres_dsn, reread, poll_ms=600_000)  # no poll in this test
    await sync_b.open()
    await on_a.declare("x", "topic")
    await on_a.bind("x", "queue", "q", "orders.*")  # node A tells nobody here
    assert not on_b.routing.exists("x")
    await sync_b.miss()  # what node B's publish does before answering "unroutable"
    assert on_b.route("x", "orders.eu") == [Destination("queue", "q")]
    await sync_b.close()
    await state_a.close()
    await state_b.close()
