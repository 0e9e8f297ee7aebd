"""The AMQP channel's mode machine and consumer credit (sans-IO, no sockets).

Goal: every row of the transition table in channel_machine.py's docstring holds;
publishes are stored at once (PLAIN), with a confirm tag each (CONFIRM) or buffered
until Tx.Commit and dropped by Tx.Rollback (TX); confirm replies coalesce stored
runs into one multiple ack and nack failures singly; delivery tags are handed out in
order and settle singly, by "multiple" or all at once, an unknown tag refused; the
prefetch credit honours the consumer's and the channel's windows. Method: the pure
classes driven directly; actions compared.
"""

from __future__ import annotations

import pytest
from pamqp import commands

from conveyor.protocols.amqp import credit
from conveyor.protocols.amqp.channel_machine import (
    TRANSITIONS,
    ChannelMachine,
    Commit,
    DeliveryTags,
    Mode,
    Refusal,
    Refuse,
    Reply,
    Settle,
    Store,
    UnknownTag,
    confirm_replies,
    settle_kind,
)
from conveyor.protocols.amqp.frames import PublishMethod
from conveyor.protocols.amqp.machine import PublishReceived


def publish(body: bytes = b"x") -> PublishReceived:
    return PublishReceived(1, PublishMethod("", "q", False, False), b"", body)


def replies(actions: list[object]) -> list[object]:
    """Actions with each Reply as the name of its method (pamqp frames without fields
    do not compare equal)."""
    return [f"Reply({action.method.name})" if isinstance(action, Reply) else action
            for action in actions]


def test_plain_stores_at_once_without_confirm_tags() -> None:
    machine = ChannelMachine()
    batch = [publish(), publish()]
    assert machine.publish(batch) == [Store(batch, [0, 0])]
    ack = commands.Basic.Ack(1)
    assert machine.settle([ack]) == [Settle([ack])]


def test_confirm_mode_numbers_publishes_across_batches() -> None:
    machine = ChannelMachine()
    assert replies(machine.mode_method(commands.Confirm.Select())) == [
        "Reply(Confirm.SelectOk)"]
    assert machine.mode is Mode.CONFIRM and machine.confirming
    first, second = [publish(), publish()], [publish()]
    assert machine.publish(first) == [Store(first, [1, 2])]
    assert machine.publish(second) == [Store(second, [3])]
    assert machine.mode_method(commands.Confirm.Select(nowait=True)) == []


def test_tx_buffers_until_commit_in_arrival_order() -> None:
    machine = ChannelMachine()
    assert replies(machine.mode_method(commands.Tx.Select())) == ["Reply(Tx.SelectOk)"]
    batch = [publish(b"a"), publish(b"b")]
    nack = commands.Basic.Nack(3, requeue=False)
    assert machine.publish(batch) == []
    assert machine.settle([nack]) == []
    actions = replies(machine.mode_method(commands.Tx.Commit()))
    assert actions == [Commit(Store(batch, [0, 0]), [nack]), "Reply(Tx.CommitOk)"]
    assert machine.tx_publishes == [] and machine.tx_settlements == []
    assert machine.mode is Mode.TX  # a transaction channel stays transactional


def test_tx_rollback_drops_the_buffer() -> None:
    machine = ChannelMachine()
    machine.mode_method(commands.Tx.Select())
    machine.publish([publish()])
    machine.settle([commands.Basic.Ack(1)])
    assert replies(machine.mode_method(commands.Tx.Rollback())) == ["Reply(Tx.RollbackOk)"]
    assert replies(machine.mode_method(commands.Tx.Commit())) == [
        Commit(Store([], []), []), "Reply(Tx.CommitOk)"]


@pytest.mark.parametrize(("start", "method", "code", "ids"), [
    (Mode.TX, commands.Confirm.Select(), 406, (85, 10)),
    (Mode.CONFIRM, commands.Tx.Select(), 406, (90, 10)),
    (Mode.PLAIN, commands.Tx.Commit(), 406, (90, 20)),
    (Mode.CONFIRM, commands.Tx.Commit(), 406, (90, 20)),
    (Mode.PLAIN, commands.Tx.Rollback(), 406, (90, 30)),
    (Mode.CONFIRM, commands.Tx.Rollback(), 406, (90, 30)),
])
def test_refused_transitions_keep_the_mode(start: Mode, method: object, code: int,
                                           ids: tuple[int, int]) -> None:
    machine = ChannelMachine(mode=start)
    [action] = machine.mode_method(method)  # type: ignore[arg-type]
    assert isinstance(action, Refuse)
    assert (action.refusal.reply_code, action.refusal.class_id,
            action.refusal.method_id) == (code, *ids)
    assert machine.mode is start


def test_the_table_covers_every_mode_and_mode_method() -> None:
    methods = {commands.Confirm.Select, commands.Tx.Select, commands.Tx.Commit,
               commands.Tx.Rollback}
    assert set(TRANSITIONS) == {(mode, method) for mode in Mode for method in methods}
    assert all(isinstance(outcome, Mode | Refusal) for outcome in TRANSITIONS.values())


def test_confirm_replies_coalesce_acks_and_nack_failures_singly() -> None:
    assert confirm_replies([]) == []
    assert confirm_replies([(1, True)]) == [(True, 1, False)]
    assert confirm_replies([(1, True), (2, True), (3, True)]) == [(True, 3, True)]
    assert confirm_replies([(4, True), (5, False), (6, True)]) == [
        (True, 4, True), (False, 5, False), (True, 6, True)]
    assert confirm_replies([(0, True), (0, False)]) == []  # unconfirmed publishes


def test_delivery_tags_settle_single_multiple_and_all() -> None:
    tags: DeliveryTags[str] = DeliveryTags()
    assert [tags.hold(f"r{n}", "consumer") for n in range(1, 5)] == [1, 2, 3, 4]
    assert tags.next() == 5  # a no-ack delivery takes a tag and holds nothing
    assert [item.receipt for item in tags.take(2, False)] == ["r2"]
    with pytest.raises(UnknownTag, match="unknown delivery tag 2"):
        tags.take(2, False)
    assert [item.receipt for item in tags.take(3, True)] == ["r1", "r3"]
    assert len(tags) == 1
    assert [item.receipt for item in tags.take(0, True)] == ["r4"]
    assert tags.take(0, True) == []


def test_delivery_tags_take_a_run_up_to_the_first_unknown_tag() -> None:
    tags: DeliveryTags[str] = DeliveryTags()
    for n in range(1, 7):
        tags.hold(f"r{n}", "consumer")
    taken, unknown = tags.take_each([(2, False), (3, False), (4, True)])
    assert [item.receipt for item in taken] == ["r2", "r3", "r1", "r4"]
    assert unknown is None
    taken, unknown = tags.take_each([(5, False), (5, False), (6, False)])
    assert [item.receipt for item in taken] == ["r5"]  # what came before the bad tag
    assert unknown is not None and (unknown.delivery_tag, unknown.index) == (5, 1)
    assert [item.receipt for item in tags.take(0, True)] == ["r6"]  # untouched after it


def test_settle_kind() -> None:
    assert settle_kind(commands.Basic.Ack(1)) == "ack"
    assert settle_kind(commands.Basic.Nack(1, requeue=True)) == "requeue"
    assert settle_kind(commands.Basic.Nack(1, requeue=False)) == "reject"
    assert settle_kind(commands.Basic.Reject(1, requeue=False)) == "reject"


def test_credit_honours_consumer_and_channel_windows() -> None:
    unlimited = credit.Window(0, 0, False, 0, 0)
    assert credit.credit(unlimited) == credit.ACQUIRE_BATCH_MAX
    assert credit.threshold(unlimited) == 1
    consumer = credit.Window(prefetch=10, unacked=4, no_ack=False, channel_prefetch=0,
                             channel_unacked=4)
    assert credit.credit(consumer) == 6
    assert credit.threshold(consumer) == 2  # a quarter of 10
    shared = credit.Window(prefetch=10, unacked=1, no_ack=False, channel_prefetch=3,
                           channel_unacked=3)
    assert credit.credit(shared) == 0  # the channel's window is full
    no_ack = credit.Window(prefetch=10, unacked=10, no_ack=True, channel_prefetch=3,
                           channel_unacked=3)
    assert credit.credit(no_ack) == credit.ACQUIRE_BATCH_MAX
    assert credit.threshold(no_ack) == 1
    big = credit.Window(prefetch=10_000, unacked=1, no_ack=False, channel_prefetch=0,
                        channel_unacked=1)
    assert credit.threshold(big) == credit.THRESHOLD_MAX
