"""Goal: an unexpected error in one background pass (a bug, e.g. a retention pass that
meets a partition deleted meanwhile) is logged and the timer goes on: lock expiry,
session expiry and retention must not stop for the rest of the broker's life.

Method: the running broker's shared-groups tick raises once; the SimClock is advanced
one check interval at a time until the tick has run again.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker


async def test_a_failing_background_pass_does_not_stop_the_timer(
        broker: Broker, harness: BrokerHarness, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    shared = broker.shared_groups
    assert shared is not None
    original = shared.tick
    calls: list[int] = []
    ran_again = asyncio.Event()

    async def failing_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in one pass")
        ran_again.set()
        await original()

    monkeypatch.setattr(shared, "tick", failing_once)
    caplog.set_level(logging.ERROR, logger="conveyor.broker.broker")
    for _ in range(1000):  # zero-time turns: the timer task runs after each advance
        if ran_again.is_set():
            break
        harness.clock.advance(broker.config.group_check_interval_ms)
        await asyncio.sleep(0)
    assert ran_again.is_set() and len(calls) >= 2
    assert "background pass failed unexpectedly" in caplog.text
