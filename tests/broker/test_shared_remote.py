"""SharedGroups with a SharedRemote (several nodes): what another node owns goes to the
remote, the rest is settled here, and one call's outcomes stay in receipt order."""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.broker.broker import Broker
from conveyor.broker.shared_groups import SharedGroups
from conveyor.broker.shared_remote import EXTEND, Outcome, group_of
from conveyor.broker.types import Delivery, Message
from conveyor.errors import OperatingError, UnknownDeliveryError

FAR_RECEIPT = "far:0:{offset}:77:far"


class FakeRemote:
    """This node serves queue ``near`` only: the remote answers for every other group
    as their owner node would."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, list[str], int]] = []
        self.released: list[str] = []

    async def serves(self, group: str, topic: str) -> bool:
        return group == "near"

    def exports(self, group: str, topic: str) -> bool:
        return group == "near"

    async def acquire(self, topic: str, group: str, records_max: int, lock_ms: int | None,
                      wait_ms: int, consumer_id: str | None,
                      partitions: Sequence[int] | None = None) -> list[Delivery]:
        return [Delivery(FAR_RECEIPT.format(offset=index), topic, 0, index, 0, None,
                         b"far", (), 1, 1_000) for index in range(records_max)]

    async def settle(self, op: str, receipts: Sequence[str], arg: int,
                     wait_durable: bool) -> list[Outcome]:
        self.settled.append((op, list(receipts), arg))
        outcomes: list[Outcome] = []
        for receipt in receipts:
            if receipt.endswith(":bad"):
                outcomes.append((UnknownDeliveryError("unknown"), None))
            else:
                outcomes.append((None, 5_000 if op == EXTEND else None))
        return outcomes

    async def release_consumer(self, consumer_id: str) -> int:
        self.released.append(consumer_id)
        return 2

    async def counts(self, queue: str) -> tuple[int, int, int] | None:
        return (40, 2, 0) if queue == "far" else None

    async def purge(self, queue: str) -> int:
        return 40


async def test_remote_groups_go_to_the_remote(broker: Broker) -> None:
    shared = broker.shared_groups
    assert isinstance(shared, SharedGroups)
    remote = FakeRemote()
    await broker.declare_queue("near")
    await broker.declare_queue("far")
    shared.remote = remote
    await broker.publish("near", [Message(value=b"here")])

    far = await broker.acquire("far", "far", records_max=2)
    assert [d.receipt for d in far] == [FAR_RECEIPT.format(offset=0), FAR_RECEIPT.format(offset=1)]
    near = await broker.acquire("near", "near", records_max=5, consumer_id="c")
    assert [d.value for d in near] == [b"here"]

    bad = "far:0:9:77:bad"  # group "bad" of topic "far": the remote's, which refuses it
    assert group_of(bad) == ("bad", "far")
    outcomes: list[Exception | None] = []
    await broker.ack([far[0].receipt, near[0].receipt, bad, "malformed"], outcomes=outcomes)
    assert outcomes[0] is None and outcomes[1] is None
    assert isinstance(outcomes[2], UnknownDeliveryError)
    assert isinstance(outcomes[3], OperatingError)  # answered here, as before
    assert remote.settled == [("ack", [far[0].receipt, bad], 0)]
    info = await broker.get_queue("near")
    assert (info.ready, info.in_flight) == (0, 0)  # the local one was acked here

    deadlines = await broker.extend([far[1].receipt], 30_000)
    assert deadlines == [5_000]
    assert remote.settled[-1] == ("extend", [far[1].receipt], 30_000)

    assert await broker.release_consumer("c") == 2  # nothing held here; 2 at the remote
    assert remote.released == ["c"]
    info = await broker.get_queue("far")  # the owner's counts, not this node's copy
    assert (info.ready, info.in_flight, info.delayed) == (40, 2, 0)
    assert await broker.purge_queue("far") == 40
