"""Deterministic simulation of a queue: seeded workload, deadline jumps, crash-restarts.

Goal: the four invariants of ../shared/STYLE.md "The deterministic harness" hold
after every step of a random workload:

1. offsets in each partition are dense and increasing;
2. every acknowledged publish is readable at its offset (or, on a work-queue
   topic, sits below the log start only because it was acked);
3. an acked delivery never comes back;
4. every unacked delivery comes back after its lock deadline or a restart
   (a "drain" step acquires everything acquirable and compares with the model).

Method: a Broker on FileLogStore over MemoryFileSystem + SqliteStateStore in a
file under tmp_path + SimClock + Random(seed). Steps: publish, acquire, ack,
release, clock jumps, clean restarts, crash-restarts. Crash model: the memory
file system keeps only fsynced bytes plus a random torn (possibly bit-flipped)
tail of the rest; the SQLite connection is abandoned with its open transaction
rolled back, which is what a killed process leaves behind (WAL +
synchronous=FULL makes every reported COMMIT survive power loss too, so a
rollback of the uncommitted tail is the whole SQLite crash model). Crashes
happen between steps: a step's awaited result is what a client was told.

Replay: CI runs SEEDS; ``CONVEYOR_SEED=<n>`` runs only that seed, and a failure
prints the replay command.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conveyor.broker.broker import Broker
from conveyor.broker.shared_groups import SharedGroups
from conveyor.broker.types import Delivery, Message, QueueConfig
from conveyor.errors import LockExpiredError
from conveyor.storage.log_store import FileLogStore
from conveyor.storage.record_batch import iter_records
from conveyor.storage.state_store import SqliteStateStore
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem

SEEDS = [1, 2, 3, 5, 8, 13, 21, 34]
STEPS = 120
QUEUE = "work"
PARTITIONS = 2


def seeds() -> list[int]:
    chosen = os.environ.get("CONVEYOR_SEED")
    return [int(chosen)] if chosen is not None else SEEDS


Key = tuple[int, int]  # (partition, offset)


@dataclass
class Model:
    """What clients were told."""

    # (partition, offset) -> value of every publish that returned an offset
    published: dict[Key, bytes] = field(default_factory=dict)
    # keys whose ack returned
    acked: set[Key] = field(default_factory=set)
    # key -> (delivery, lock deadline wall ms) of deliveries the workload still holds
    held: dict[Key, Delivery] = field(default_factory=dict)


class Simulation:
    def __init__(self, seed: int, directory: Path) -> None:
        self.seed = seed
        self.workload = random.Random(seed)
        self.faults = random.Random(seed + 1_000_003)
        self.clock = SimClock()
        self.fs = MemoryFileSystem()
        self.directory = directory
        self.model = Model()
        self.broker: Broker | None = None
        self.log: list[str] = []
        self.counter = 0

    @property
    def shared(self) -> SharedGroups:
        assert self.broker is not None
        assert isinstance(self.broker.shared_groups, SharedGroups)
        return self.broker.shared_groups

    async def start(self) -> None:
        log_store = FileLogStore("/data", self.fs, self.clock)
        state_store = SqliteStateStore(self.directory / "state.sqlite3")
        self.broker = Broker(log_store, state_store, self.clock,
                             random.Random(self.seed + 7))
        await self.broker.open()

    async def restart(self, crash: bool) -> None:
        assert self.broker is not None
        if crash:
            await self._abandon(self.broker)
            self.fs.crash(self.faults)
        else:
            await self.broker.close()
        self.model.held.clear()  # locks do not survive a restart
        await self.start()

    @staticmethod
    async def _abandon(broker: Broker) -> None:
        """Kill without closing: stop its timer, drop SQLite's uncommitted transaction."""
        task = broker._timer_task
        if task is not None:
            task.cancel()
        store = broker.state_store
        assert isinstance(store, SqliteStateStore)
        if store._in_transaction:
            store.connection.execute("ROLLBACK")
            store._in_transaction = False
        store.connection.close()
        store._connection = None

    # --- steps --------------------------------------------------------------------
    async def step(self) -> None:
        roll = self.workload.random()
        if roll < 0.25:
            await self.publish()
        elif roll < 0.45:
            await self.acquire()
        elif roll < 0.60:
            await self.settle(ack=True)
        elif roll < 0.68:
            await self.settle(ack=False)
        elif roll < 0.72:
            await self.extend()
        elif roll < 0.82:
            self.advance()
        elif roll < 0.90:
            await self.drain()
        elif roll < 0.95:
            self.log.append("crash-restart")
            await self.restart(crash=True)
        else:
            self.log.append("restart")
            await self.restart(crash=False)

    async def publish(self) -> None:
        assert self.broker is not None
        count = self.workload.randint(1, 3)
        values = []
        for _ in range(count):
            self.counter += 1
            values.append(f"m{self.counter}".encode())
        results = await self.broker.publish(QUEUE, [Message(value) for value in values])
        self.log.append(f"publish {[(r.partition, r.offset) for r in results]}")
        for value, result in zip(values, results, strict=True):
            assert result.offset >= 0
            key = (result.partition, result.offset)
            assert key not in self.model.published, f"offset reused: {key}"
            self.model.published[key] = value

    async def acquire(self) -> None:
        lock_ms = self.workload.randint(100, 2_000)
        deliveries = await self.shared.acquire(
            QUEUE, QUEUE, records_max=self.workload.randint(1, 5), lock_ms=lock_ms)
        self.log.append(f"acquire {[(d.partition, d.offset) for d in deliveries]}")
        self.take(deliveries)

    def take(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            key = (delivery.partition, delivery.offset)
            assert key in self.model.published, f"delivered a record never published: {key}"
            assert key not in self.model.acked, f"acked record delivered again: {key}"
            assert key not in self.live_held(), f"record delivered while locked: {key}"
            assert delivery.value == self.model.published[key]
            assert delivery.delivery_count >= 1
            self.model.held[key] = delivery

    def live_held(self) -> set[Key]:
        now_ms = self.clock.wall_ms()
        return {key for key, d in self.model.held.items() if d.lock_deadline_ms > now_ms}

    async def settle(self, ack: bool) -> None:
        live = sorted(self.live_held())
        if not live:
            return
        chosen = self.workload.sample(live, self.workload.randint(1, len(live)))
        receipts = [self.model.held[key].receipt for key in chosen]
        if ack:
            await self.shared.ack(receipts)
            self.model.acked.update(chosen)
        else:
            await self.shared.release(receipts)
        for key in chosen:
            del self.model.held[key]
        self.log.append(f"{'ack' if ack else 'release'} {chosen}")

    async def extend(self) -> None:
        live = sorted(self.live_held())
        if not live:
            return
        chosen = self.workload.sample(live, self.workload.randint(1, len(live)))
        lock_ms = self.workload.randint(100, 3_000)
        deadlines = await self.shared.extend(
            [self.model.held[key].receipt for key in chosen], lock_ms)
        for key, deadline_ms in zip(chosen, deadlines, strict=True):
            assert deadline_ms == self.clock.wall_ms() + lock_ms
            self.model.held[key] = dataclasses.replace(
                self.model.held[key], lock_deadline_ms=deadline_ms)
        self.log.append(f"extend {chosen} {lock_ms}")

    def advance(self) -> None:
        duration_ms = self.workload.choice([0, 50, 300, 1_000, 2_500])
        self.clock.advance(duration_ms)
        now_ms = self.clock.wall_ms()
        for key in [k for k, d in self.model.held.items() if d.lock_deadline_ms <= now_ms]:
            del self.model.held[key]  # expired: must come back
        self.log.append(f"advance {duration_ms}")

    async def drain(self) -> None:
        """Everything published, not acked and not locked must be acquirable now."""
        expected = set(self.model.published) - self.model.acked - self.live_held()
        got: list[Delivery] = []
        while True:
            batch = await self.shared.acquire(QUEUE, QUEUE, records_max=1_000, lock_ms=60_000)
            if not batch:
                break
            got.extend(batch)
        self.take(got)
        returned = {(d.partition, d.offset) for d in got}
        self.log.append(f"drain {sorted(returned)}")
        assert returned == expected, (
            f"missing {sorted(expected - returned)}, unexpected {sorted(returned - expected)}")
        try:
            await self.shared.release([d.receipt for d in got])
        except LockExpiredError:  # pragma: no cover - 60 s locks cannot expire here
            raise
        for delivery in got:
            del self.model.held[(delivery.partition, delivery.offset)]

    # --- invariants ---------------------------------------------------------------
    def check_log(self) -> None:
        assert self.broker is not None
        for partition in range(PARTITIONS):
            log = self.broker.log_store.partition(QUEUE, partition)
            data = log.read(log.log_start_offset, 1 << 24).read_bytes()
            # a read returns whole batches: drop records below the start it asked for
            records = [r for r in iter_records(data) if r.offset >= log.log_start_offset]
            offsets = [record.offset for record in records]
            values = {record.offset: record.value for record in records}
            assert offsets == list(range(log.log_start_offset, log.high_watermark)), (
                f"partition {partition}: offsets not dense: {offsets[:10]}...")
            for (p, offset), value in self.model.published.items():
                if p != partition:
                    continue
                if offset < log.log_start_offset:
                    assert (p, offset) in self.model.acked, (
                        f"unacked record {(p, offset)} removed by retention")
                    continue
                assert values.get(offset) == value, f"published record lost: {(p, offset)}"


@pytest.mark.parametrize("seed", seeds())
async def test_shared_queue_simulation(seed: int, tmp_path: Path) -> None:
    simulation = Simulation(seed, tmp_path)
    await simulation.start()
    await simulation.shared.declare_queue(
        QUEUE, QueueConfig(partitions=PARTITIONS, visibility_timeout_ms=1_000))
    try:
        for _ in range(STEPS):
            await simulation.step()
            simulation.check_log()
        await simulation.restart(crash=True)
        simulation.check_log()
        await simulation.drain()
    except AssertionError as error:
        history = "\n  ".join(simulation.log[-15:])
        raise AssertionError(
            f"{error}\nlast steps:\n  {history}\nreplay: CONVEYOR_SEED={seed} "
            f".venv/bin/pytest tests/sim -k test_shared_queue_simulation"
        ) from error
    finally:
        if simulation.broker is not None:
            await simulation.broker.close()
