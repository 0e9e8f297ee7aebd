"""Goal: the shared limits decide what the brief says, without sockets.

Method: the limit objects driven directly (the event loop only for RequestWatch's
timer, with deadlines of a few ms awaited through the expiry callback). Checks: the
budget sheds the largest holder first and only while over; publisher push-back hits
the heaviest publishers over the mark and everyone under the disk alarm, and tells
listeners when it lets go; the gate counts refusals; the watch expires a partial
request, an idle connection (not a busy one) and a handshake; config parsing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor.config import ListenerLimits, listener_limits
from conveyor.errors import InvalidConfigError
from conveyor.limits import (
    ConnectionGate,
    DiskAlarm,
    MemoryBudget,
    PublishFlow,
    RequestWatch,
)


class Holder:
    def __init__(self, budget: MemoryBudget, name: str) -> None:
        self.budget, self.name, self.shed = budget, name, False

    def shed_memory(self) -> None:
        self.shed = True


def test_budget_sheds_the_largest_holder_while_over() -> None:
    budget = MemoryBudget(100)
    small, large, third = Holder(budget, "s"), Holder(budget, "l"), Holder(budget, "t")
    budget.hold(small, 30)
    budget.hold(large, 60)
    assert budget.total == 90 and not large.shed
    budget.hold(third, 20)  # 110: the largest (60) goes, not the one that tipped it
    assert large.shed and not small.shed and not third.shed
    assert budget.total == 50 and budget.shed == 1
    budget.hold(small, 0)
    budget.forget(third)
    assert budget.total == 0


def test_flow_pushes_back_the_heaviest_publishers_first() -> None:
    flow = PublishFlow(100)
    heavy, light = object(), object()
    flow.hold(heavy, 90)
    flow.hold(light, 5)
    assert not flow.should_wait(heavy)  # under the mark nobody waits
    flow.hold(heavy, 120)
    assert flow.should_wait(heavy) and not flow.should_wait(light)
    assert flow.blocked_reason() == "low on memory"
    changes: list[str] = []
    unsubscribe = flow.on_change(lambda: changes.append("changed"))
    flow.hold(heavy, 90)  # 95: over 80 % of the mark still, no release yet
    assert changes == []
    flow.hold(heavy, 10)
    assert changes == ["changed"] and not flow.should_wait(heavy)
    unsubscribe()


def test_disk_alarm_pushes_back_every_publisher(tmp_path: Path) -> None:
    flow = PublishFlow(1 << 30)
    free = {"bytes": 10}
    alarm = DiskAlarm(tmp_path, 100, 1000, flow, free_bytes=lambda _: free["bytes"])
    assert alarm.check() and flow.should_wait(object())
    assert flow.blocked_reason() == "low on disk"
    free["bytes"] = 1000
    assert not alarm.check() and not flow.should_wait(object())


async def test_gate_refuses_past_the_maximum_and_counts() -> None:
    gate = ConnectionGate("kafka", 2)
    assert gate.admit() and gate.admit()
    assert not gate.admit() and not gate.admit()
    assert gate.refused == 2 and gate.open == 2
    gate.release()
    assert gate.admit()


async def _expiry(limits: ListenerLimits, busy: bool = False, handshake: bool = False,
                  partial: bool = False) -> str:
    expired: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    watch = RequestWatch(limits, expired.set_result, lambda: busy, handshake=handshake)
    if partial:
        watch.received(pending=True, completed=False)
    try:
        async with asyncio.timeout(2):
            return await expired
    finally:
        watch.stop()


async def test_watch_expires_each_deadline() -> None:
    assert await _expiry(ListenerLimits(1, 0, 20, 0), partial=True) == "request"
    assert await _expiry(ListenerLimits(1, 20, 0, 0)) == "idle"
    assert await _expiry(ListenerLimits(1, 0, 0, 20), handshake=True) == "handshake"
    with pytest.raises(TimeoutError):  # busy is never idle, and no other deadline is set
        await asyncio.wait_for(_expiry(ListenerLimits(1, 20, 0, 0), busy=True), 0.2)


def test_listener_limits_parse_and_validate() -> None:
    limits = listener_limits("kafka", {"idle_timeout_ms": "5", "connections_max": 3})
    assert limits.idle_timeout_ms == 5 and limits.connections_max == 3
    assert limits.request_timeout_ms == 30_000  # Kafka's default kept
    assert listener_limits("amqp", {}).handshake_timeout_ms == 10_000
    with pytest.raises(InvalidConfigError):
        listener_limits("http", {"connections_max": 0})
