"""SharedPartition, the sans-IO record state machine, driven directly.

Goal: the transition table is the only way states change (illegal events raise
typed errors), the window stays bounded, and delayed records stay out of the
scan path. Method: feed hand-made records with explicit ``now_ms``; no I/O.
"""

from __future__ import annotations

import pytest

from conveyor.broker.delivery import record_policy
from conveyor.broker.shared_group import (
    TRANSITIONS,
    RecordEvent,
    RecordState,
    SharedPartition,
)
from conveyor.broker.types import HEADER_DELIVER_AT, QueueConfig
from conveyor.errors import IllegalStateError, LockExpiredError, UnknownDeliveryError
from conveyor.storage.record_batch import Record


def make_partition(config: QueueConfig | None = None, window: int = 100) -> SharedPartition:
    return SharedPartition("t", 0, "g", config or QueueConfig(), window_records_max=window)


def feed(part: SharedPartition, count: int, headers: tuple[tuple[str, bytes | None], ...] = ()
         ) -> None:
    for _ in range(count):
        offset = part.next_offset
        record = Record(offset, 0, None, str(offset).encode(), headers)
        part.load(record, record_policy(record, part.config))


def test_final_states_have_no_way_out() -> None:
    for state, _ in TRANSITIONS:
        assert state not in (RecordState.ACKED, RecordState.DEAD)


def test_illegal_transition_raises() -> None:
    part = make_partition()
    feed(part, 1)
    entry = part.entries[0]
    with pytest.raises(IllegalStateError):
        part._move(entry, RecordEvent.ACK)  # AVAILABLE cannot be acked


def test_receipt_errors_are_typed() -> None:
    part = make_partition()
    feed(part, 2)
    taken = part.acquire(now_ms=0, records_max=2, lock_ms=100, consumer_id="c", token=7)
    assert [item.offset for item in taken] == [0, 1]
    part.ack(0, 7, now_ms=10)
    with pytest.raises(UnknownDeliveryError):
        part.ack(0, 7, now_ms=10)
    with pytest.raises(LockExpiredError):
        part.ack(1, 7, now_ms=100)  # deadline reached: lazily expired
    assert part.entries[1].state is RecordState.AVAILABLE
    assert part.start_offset == 1


def test_a_receipt_never_issued_is_unknown_not_expired() -> None:
    """docs/http.md: a wrong token answers unknown_delivery; the live lock stays."""
    part = make_partition()
    feed(part, 1)
    part.acquire(now_ms=0, records_max=1, lock_ms=1_000, consumer_id="c", token=7)
    with pytest.raises(UnknownDeliveryError):
        part.ack(0, 999, now_ms=10)
    assert part.entries[0].state is RecordState.ACQUIRED
    part.release(0, 7, now_ms=20)
    part.acquire(now_ms=30, records_max=1, lock_ms=1_000, consumer_id="c", token=8)
    with pytest.raises(LockExpiredError):
        part.ack(0, 7, now_ms=40)  # an earlier lock's receipt: expired, not unknown
    with pytest.raises(UnknownDeliveryError):
        part.ack(0, 6, now_ms=40)
    part.ack(0, 8, now_ms=50)


def test_window_is_bounded() -> None:
    part = make_partition(window=3)
    feed(part, 3)
    assert part.room() == 0
    taken = part.acquire(0, 10, 100, "c", 1)
    for item in taken:
        part.ack(item.offset, 1, 1)
    assert part.room() == 3 and part.start_offset == 3


def test_acked_records_behind_an_unacked_one_free_the_window() -> None:
    """One unacked delivery plus a full window of later acks must not stop delivery:
    the window bounds records in flight, not settled ones behind the start."""
    part = make_partition(window=3)
    feed(part, 3)
    taken = part.acquire(0, 10, 100_000, "c", 1)
    assert [item.offset for item in taken] == [0, 1, 2]
    part.ack(1, 1, 1)
    part.ack(2, 1, 1)
    assert part.start_offset == 0 and part.room() == 2
    feed(part, 2)
    more = part.acquire(2, 10, 100_000, "c", 2)
    assert [item.offset for item in more] == [3, 4]
    for offset in (3, 4):
        part.ack(offset, 2, 3)
    with pytest.raises(UnknownDeliveryError):
        part.ack(3, 2, 3)  # settled behind the start: unknown, not lost
    part.ack(0, 1, 4)
    assert part.start_offset == 5 and not part.entries and not part.settled


def test_settled_span_is_bounded() -> None:
    part = make_partition(window=3)
    part.span_records_max = 5
    feed(part, 3)
    part.acquire(0, 10, 100_000, "c", 1)
    part.ack(1, 1, 1)
    part.ack(2, 1, 1)
    feed(part, 2)  # span 5: the settled offsets behind offset 0 are bounded too
    assert part.room() == 0
    part.ack(0, 1, 2)
    assert part.start_offset == 3 and part.room() == 1  # 3 and 4 are in flight


def test_delayed_records_are_not_scanned() -> None:
    part = make_partition()
    feed(part, 1000, headers=((HEADER_DELIVER_AT, b"1000000000"),))
    feed(part, 1)
    assert len(part.delayed) == 1000 and len(part.available) == 1
    taken = part.acquire(0, 10, 100, "c", 1)
    assert [item.offset for item in taken] == [1000]
    part.tick(1_000_000_000)
    assert len(part.available) == 1001  # the 1000 delayed + the expired lock


def test_max_deliveries_kills_on_unlock() -> None:
    part = make_partition(QueueConfig(max_deliveries=1))
    feed(part, 1)
    part.acquire(0, 1, 100, "c", 5)
    part.release(0, 5, 1)
    dead = [change for change in part.changes if change.state is RecordState.DEAD]
    assert len(dead) == 1 and dead[0].reason == "max-deliveries"
    assert part.start_offset == 1


def test_extended_lock_outlives_its_first_deadline() -> None:
    part = make_partition()
    feed(part, 1)
    part.acquire(0, 1, 100, "c", 3)
    assert part.extend(0, 3, now_ms=50, lock_ms=1_000) == 1_050
    assert part.acquire(200, 1, 100, "d", 4) == []  # the old deadline (100) passed: still held
    assert part.entries[0].state is RecordState.ACQUIRED
    part.ack(0, 3, now_ms=1_000)
    assert part.start_offset == 1


def test_fifo_keeps_group_order_across_releases() -> None:
    part = make_partition(QueueConfig(fifo=True))
    for group in (b"a", b"a", b"b"):
        offset = part.next_offset
        record = Record(offset, 0, None, None, (("conveyor.group", group),))
        part.load(record, record_policy(record, part.config))
    first = part.acquire(0, 10, 100, "c", 1)
    assert [item.offset for item in first] == [0, 2]
    part.release(0, 1, 1)
    assert [item.offset for item in part.acquire(1, 10, 100, "c", 2)] == [0]
