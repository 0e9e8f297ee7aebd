"""The AMQP channel's mode state machine (sans-IO): confirms, transactions, settlement.

Owns: what one open channel does with each publish, ack/nack/reject and mode method
it receives, given the mode it is in; the confirm counter and the publisher-confirm
frames that answer a stored batch; the transaction buffer; the delivery tags of
records handed to the client and not yet settled. ``machine.py`` has already checked
that a frame is allowed at all (connection and content states); this machine decides
what an accepted method means for the channel and answers with actions for the
handlers (``handlers.py``), which make the broker calls.

Modes (``Mode``) and what each accepts:

    PLAIN     publishes are stored as they come; acks, nacks and rejects settle now
    CONFIRM   as PLAIN, and every publish gets a tag: Basic.Ack / Basic.Nack once stored
    TX        publishes, acks, nacks and rejects wait in the buffer until Tx.Commit
              (stored, then settled, in arrival order) or Tx.Rollback (dropped)

Transitions (``TRANSITIONS``): (mode, method) -> next mode, or the channel error that
the spec's reply names (the channel closes; the mode does not change):

    PLAIN    Confirm.Select -> CONFIRM     Tx.Select -> TX
    CONFIRM  Confirm.Select -> CONFIRM     Tx.Select -> 406 (confirm to tx)
    TX       Confirm.Select -> 406         Tx.Select -> TX
    TX       Tx.Commit / Tx.Rollback -> TX
    PLAIN, CONFIRM  Tx.Commit / Tx.Rollback -> 406 (not transactional)

No sockets, no event loop, no broker.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from pamqp import base as pamqp_base
from pamqp import commands

from .frames import PRECONDITION_FAILED
from .machine import MethodReceived, PublishReceived

Holder = TypeVar("Holder")


class Mode(enum.Enum):
    PLAIN = "plain"
    CONFIRM = "confirm"
    TX = "tx"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A channel error: close the channel with this reply."""

    reply_code: int
    text: str
    class_id: int
    method_id: int


_TX_TO_CONFIRM: Final = Refusal(PRECONDITION_FAILED, "PRECONDITION_FAILED - cannot switch "
                                "from tx to confirm mode", 85, 10)
_CONFIRM_TO_TX: Final = Refusal(PRECONDITION_FAILED, "PRECONDITION_FAILED - cannot switch "
                                "from confirm to tx mode", 90, 10)
_NOT_TX_COMMIT: Final = Refusal(PRECONDITION_FAILED, "PRECONDITION_FAILED - channel is not "
                                "transactional", 90, 20)
_NOT_TX_ROLLBACK: Final = Refusal(PRECONDITION_FAILED, "PRECONDITION_FAILED - channel is not "
                                  "transactional", 90, 30)

MODE_METHODS: Final = (commands.Confirm.Select, commands.Tx.Select, commands.Tx.Commit,
                       commands.Tx.Rollback)
SETTLE_METHODS: Final = (commands.Basic.Ack, commands.Basic.Nack, commands.Basic.Reject)
SettleMethod = commands.Basic.Ack | commands.Basic.Nack | commands.Basic.Reject

TRANSITIONS: Final[dict[tuple[Mode, type[pamqp_base.Frame]], Mode | Refusal]] = {
    (Mode.PLAIN, commands.Confirm.Select): Mode.CONFIRM,
    (Mode.CONFIRM, commands.Confirm.Select): Mode.CONFIRM,
    (Mode.TX, commands.Confirm.Select): _TX_TO_CONFIRM,
    (Mode.PLAIN, commands.Tx.Select): Mode.TX,
    (Mode.TX, commands.Tx.Select): Mode.TX,
    (Mode.CONFIRM, commands.Tx.Select): _CONFIRM_TO_TX,
    (Mode.TX, commands.Tx.Commit): Mode.TX,
    (Mode.PLAIN, commands.Tx.Commit): _NOT_TX_COMMIT,
    (Mode.CONFIRM, commands.Tx.Commit): _NOT_TX_COMMIT,
    (Mode.TX, commands.Tx.Rollback): Mode.TX,
    (Mode.PLAIN, commands.Tx.Rollback): _NOT_TX_ROLLBACK,
    (Mode.CONFIRM, commands.Tx.Rollback): _NOT_TX_ROLLBACK,
}


# --- actions -------------------------------------------------------------------------
@dataclass(slots=True)
class Store:
    """Route and store these publishes; ``tags`` (0: unconfirmed) answer each once stored."""

    publishes: list[PublishReceived]
    tags: list[int]


@dataclass(slots=True)
class Settle:
    """Ack, nack or reject now (consecutive acks arrive together)."""

    methods: list[SettleMethod]


@dataclass(slots=True)
class Reply:
    method: pamqp_base.Frame


@dataclass(slots=True)
class Commit:
    """Store the buffered publishes, then settle the buffered methods, then Commit-Ok."""

    store: Store
    settlements: list[SettleMethod]


@dataclass(slots=True)
class Refuse:
    refusal: Refusal


Action = Store | Settle | Reply | Commit | Refuse


# --- the machine -----------------------------------------------------------------------
@dataclass
class ChannelMachine:
    mode: Mode = Mode.PLAIN
    publish_tag: int = 0  # the last confirm tag handed out
    tx_publishes: list[PublishReceived] = field(default_factory=list)
    tx_settlements: list[SettleMethod] = field(default_factory=list)

    @property
    def transactional(self) -> bool:
        return self.mode is Mode.TX

    @property
    def confirming(self) -> bool:
        return self.mode is Mode.CONFIRM

    def publish(self, batch: list[PublishReceived]) -> list[Action]:
        if self.mode is Mode.TX:
            self.tx_publishes.extend(batch)
            return []
        return [self._store(batch)]

    def settle(self, methods: list[SettleMethod]) -> list[Action]:
        if self.mode is Mode.TX:
            self.tx_settlements.extend(methods)
            return []
        return [Settle(methods)]

    def mode_method(self, method: pamqp_base.Frame) -> list[Action]:
        """Confirm.Select, Tx.Select, Tx.Commit or Tx.Rollback."""
        outcome = TRANSITIONS[(self.mode, type(method))]
        if isinstance(outcome, Refusal):
            return [Refuse(outcome)]
        self.mode = outcome
        if isinstance(method, commands.Confirm.Select):
            return [] if method.nowait else [Reply(commands.Confirm.SelectOk())]
        if isinstance(method, commands.Tx.Select):
            return [Reply(commands.Tx.SelectOk())]
        publishes, self.tx_publishes = self.tx_publishes, []
        settlements, self.tx_settlements = self.tx_settlements, []
        if isinstance(method, commands.Tx.Rollback):
            return [Reply(commands.Tx.RollbackOk())]
        return [Commit(self._store(publishes), settlements), Reply(commands.Tx.CommitOk())]

    def _store(self, batch: list[PublishReceived]) -> Store:
        tags = [0] * len(batch)
        if self.mode is Mode.CONFIRM:
            for index in range(len(batch)):
                self.publish_tag += 1
                tags[index] = self.publish_tag
        return Store(batch, tags)


def confirm_replies(outcomes: Iterable[tuple[int, bool]]) -> list[tuple[bool, int, bool]]:
    """(tag, stored) per publish, in order -> (ack?, delivery tag, multiple) to send: a
    run of stored publishes is one multiple ack, each failed one a single nack."""
    replies: list[tuple[bool, int, bool]] = []
    pending_ack = 0
    for tag, good in outcomes:
        if not tag:
            continue
        if good:
            pending_ack = tag
            continue
        if pending_ack:
            replies.append((True, pending_ack, True))
            pending_ack = 0
        replies.append((False, tag, False))
    if pending_ack:
        replies.append((True, pending_ack, pending_ack > 1))
    return replies


# --- delivery tags ---------------------------------------------------------------------
class UnknownTag(Exception):
    def __init__(self, delivery_tag: int, index: int = 0) -> None:
        super().__init__(f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}")
        self.delivery_tag = delivery_tag
        self.index = index  # which request of a run (``take_each``) named it


class Unacked(Generic[Holder]):
    # not ``@dataclass(slots=True)``: mypyc's build cannot rebuild a Generic class
    __slots__ = ("holder", "receipt")

    def __init__(self, receipt: str | None, holder: Holder | None) -> None:
        self.receipt = receipt  # None: nothing to settle in the broker (a stream delivery)
        self.holder = holder  # the consumer whose credit it takes (None: basic.get)


class DeliveryTags(Generic[Holder]):
    """Delivery tags of one channel: handed out in order, held until settled."""

    def __init__(self) -> None:
        self.last = 0
        self.unacked: dict[int, Unacked[Holder]] = {}

    def next(self) -> int:
        self.last += 1
        return self.last

    def hold(self, receipt: str | None, holder: Holder | None) -> int:
        tag = self.last = self.last + 1  # next(), inline: once per delivery
        self.unacked[tag] = Unacked(receipt, holder)
        return tag

    def take(self, delivery_tag: int, multiple: bool) -> list[Unacked[Holder]]:
        """The unacked deliveries one ack/nack/reject settles (tag 0 + multiple: all)."""
        if not multiple:
            item = self.unacked.pop(delivery_tag, None)
            if item is None:
                raise UnknownTag(delivery_tag)
            return [item]
        unacked = self.unacked
        if delivery_tag == 0:
            taken = list(unacked.values())
            unacked.clear()
            return taken
        # tags are held in ascending order (``hold``), so the range ends at the first
        # tag past ``delivery_tag``: a multiple ack costs what it settles, not the window
        tags: list[int] = []
        for tag in unacked:
            if tag > delivery_tag:
                break
            tags.append(tag)
        pop = unacked.pop
        return [pop(tag) for tag in tags]

    def take_each(self, requests: Iterable[tuple[int, bool]]
                  ) -> tuple[list[Unacked[Holder]], UnknownTag | None]:
        """What a run of (delivery tag, multiple) settles, in order: one pass, no list
        per request. Stops at the first unknown tag and returns it with what came before
        (already taken)."""
        unacked = self.unacked
        taken: list[Unacked[Holder]] = []
        for index, (delivery_tag, multiple) in enumerate(requests):
            if multiple:
                taken += self.take(delivery_tag, True)
                continue
            item = unacked.pop(delivery_tag, None)
            if item is None:
                return taken, UnknownTag(delivery_tag, index)
            taken.append(item)
        return taken, None

    def __len__(self) -> int:
        return len(self.unacked)

    def clear(self) -> None:
        self.unacked.clear()


def settle_kind(method: SettleMethod) -> str:
    """"ack", "requeue" or "reject" for Basic.Ack / Nack / Reject."""
    if isinstance(method, commands.Basic.Ack):
        return "ack"
    return "requeue" if method.requeue else "reject"


__all__ = [
    "TRANSITIONS",
    "Action",
    "ChannelMachine",
    "Commit",
    "DeliveryTags",
    "MethodReceived",
    "Mode",
    "Refusal",
    "Refuse",
    "Reply",
    "Settle",
    "Store",
    "Unacked",
    "UnknownTag",
    "confirm_replies",
    "settle_kind",
]
