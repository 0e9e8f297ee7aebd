"""What a node answers when another asks it to end a transaction's offsets or add a group
to a transaction (cluster/txn_offsets_remote.py), before anything runs.

Goal: a peer's malformed arguments are InvalidRequestError (never another exception, and
nothing is called), a node that does not serve the group or the transactional id answers
NotOwnerError (the caller asks the owner again), and a well-formed request on the owner
reaches the group side or the transaction coordinator with its arguments.
Method: ``RemoteTxnOffsets.handle`` with recording stand-ins for the two broker parts it
calls and a ``serve`` answer chosen per test (no sockets: the channel's own rules are
tests/cluster/test_internal_api.py's).
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from conveyor.cluster.internal_api import NotOwnerError
from conveyor.cluster.txn_offsets_remote import ADD_GROUP, FINISH, RemoteTxnOffsets
from conveyor.errors import InvalidRequestError


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def finish(self, *args: Any) -> None:
        self.calls.append(("finish", args))

    async def add_offsets(self, *args: Any) -> None:
        self.calls.append(("add_offsets", args))


def remote(serves: bool) -> tuple[RemoteTxnOffsets, Recorder]:
    recorder = Recorder()

    async def serve(kind: str, name: str) -> bool:
        return serves

    return RemoteTxnOffsets(cast(Any, None), b"secret", serve, cast(Any, recorder),
                            cast(Any, recorder)), recorder


GOOD = {"group": "g", "transactional_id": "tx", "producer_id": 7, "epoch": 3,
        "commit": True}


@pytest.mark.parametrize("bad", [
    {"group": ""}, {"group": 5}, {"transactional_id": None}, {"producer_id": -1},
    {"producer_id": True}, {"producer_id": 2**63}, {"epoch": 2**15}, {"epoch": "3"},
    {"commit": 1}, {"group": "g" * 40_000},
])
async def test_malformed_arguments_are_refused_before_anything_runs(bad: dict[str, Any]
                                                                    ) -> None:
    side, recorder = remote(serves=True)
    with pytest.raises(InvalidRequestError):
        await side.handle(FINISH, {**GOOD, **bad})
    assert recorder.calls == []


async def test_an_unknown_op_is_refused() -> None:
    side, recorder = remote(serves=True)
    with pytest.raises(InvalidRequestError):
        await side.handle("txn_whatever", GOOD)
    assert recorder.calls == []


async def test_a_node_that_does_not_serve_the_item_answers_not_owner() -> None:
    side, recorder = remote(serves=False)
    with pytest.raises(NotOwnerError):
        await side.handle(FINISH, GOOD)
    with pytest.raises(NotOwnerError):
        await side.handle(ADD_GROUP, GOOD)
    assert recorder.calls == []


async def test_the_owner_runs_the_request() -> None:
    side, recorder = remote(serves=True)
    await side.handle(FINISH, GOOD)
    await side.handle(ADD_GROUP, GOOD)
    assert recorder.calls == [("finish", ("g", "tx", 7, 3, True)),
                              ("add_offsets", ("tx", 7, 3, "g"))]
