"""Transactional offsets across nodes: the two calls between a transaction's coordinator
and a group's coordinator when they are different nodes (docs/cluster.md, "Transactions
across nodes").

Owns both sides of:
- ``finish``: at the end of a transaction, after its markers, the transactional id's
  owner tells each group the transaction added how it ended (Kafka's WriteTxnMarkers to
  the group's offsets partition). The group's owner applies it under its owner fence
  (broker/txn_offsets.py: the producer's pending offsets become committed or are
  dropped, in memory and in the store); any other node answers ``NotOwnerError``. A call
  that fails (refused, the owner unreachable, no live owner) fails the completion: the
  transaction stays Prepare* and the coordinator's timer tries again, so a dead group
  owner's successor (which reloads the pending offsets at its claim) finishes it.
- ``add_group``: a TxnOffsetCommit v5 (``transaction.version`` 2) adds its group to the
  transaction implicitly: the group's coordinator asks the transactional id's owner
  (AddOffsetsToTxn there) before it keeps the offsets, as Kafka's does.

Either call is local when this node serves the item. Arguments from a peer are checked
(types and ranges) before anything runs: ``InvalidRequestError`` otherwise.
Must not know: wire formats of the public protocols, SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from conveyor.cluster.internal_api import InternalClient, NotOwnerError
from conveyor.cluster.ownership import GROUP, TXN
from conveyor.cluster.peer_clients import PeerClients
from conveyor.config import TlsConfig
from conveyor.errors import InvalidRequestError, UnavailableError

if TYPE_CHECKING:
    from conveyor.broker.transactions import Transactions
    from conveyor.broker.txn_offsets import TxnOffsets
    from conveyor.cluster.membership import Membership

logger = logging.getLogger("conveyor.cluster.txn")

FINISH: Final = "txn_offsets_finish"
ADD_GROUP: Final = "txn_add_group"
OPS: Final = frozenset({FINISH, ADD_GROUP})
CALL_TIMEOUT_S: Final = 10.0  # a guarded write at the owner, with its retries
PRODUCER_ID_MAX: Final = 2**63 - 1
EPOCH_MAX: Final = 2**15 - 1
NAME_CHARS_MAX: Final = 32_767  # Kafka's string length bound (group and transactional ids)

Serve = Callable[[str, str], Awaitable[bool]]  # (kind, name) -> does this node serve it?


class RemoteTxnOffsets:
    """The calls of this node to other nodes, and the answers to theirs."""

    def __init__(self, membership: Membership, secret: bytes, serve: Serve,
                 transactions: Transactions, offsets: TxnOffsets,
                 tls: TlsConfig | None = None) -> None:
        self.membership = membership
        self.serve = serve  # ClusterNode: ensure_owned (claims when this node is the choice)
        self.transactions = transactions
        self.offsets = offsets
        self.peers = PeerClients(membership, secret, tls)
        self.forwarded = 0  # calls sent to other nodes (tests)

    async def close(self) -> None:
        await self.peers.close()

    # --- this node asks ------------------------------------------------------------------
    async def finish(self, group_id: str, transactional_id: str, producer_id: int,
                     epoch: int, commit: bool) -> None:
        """Transactions.finish_offsets on a cluster node."""
        if await self.serve(GROUP, group_id):
            await self.offsets.finish(group_id, transactional_id, producer_id, epoch, commit)
            return
        await self._call(GROUP, group_id, FINISH, {
            "group": group_id, "transactional_id": transactional_id,
            "producer_id": producer_id, "epoch": epoch, "commit": commit})

    async def add_group(self, transactional_id: str, producer_id: int, epoch: int,
                        group_id: str) -> None:
        """Transactions.add_group on a cluster node (TxnOffsetCommit v5)."""
        if await self.serve(TXN, transactional_id):
            await self.transactions.add_offsets(transactional_id, producer_id, epoch,
                                                group_id)
            return
        await self._call(TXN, transactional_id, ADD_GROUP, {
            "group": group_id, "transactional_id": transactional_id,
            "producer_id": producer_id, "epoch": epoch})

    async def _call(self, kind: str, name: str, op: str, args: dict[str, Any]) -> None:
        client = await self._client(kind, name)
        try:
            self.forwarded += 1
            await client.call(op, args, CALL_TIMEOUT_S)
        except NotOwnerError as error:
            raise UnavailableError("the owner moved: retried", kind=kind, name=name) from error
        except ConnectionError as error:
            raise UnavailableError("the owner node cannot be reached", kind=kind, name=name,
                                   reason=str(error)) from error

    async def _client(self, kind: str, name: str) -> InternalClient:
        owner, _ = self.membership.owner_of(kind, name)
        client = await self.peers.get(owner) if owner is not None else None
        if client is None:
            raise UnavailableError("no live node serves it", kind=kind, name=name)
        return client

    # --- another node asks ---------------------------------------------------------------
    async def handle(self, op: str, args: dict[str, Any]) -> None:
        group_id = _name(args, "group")
        transactional_id = _name(args, "transactional_id")
        producer_id = _bounded(args, "producer_id", PRODUCER_ID_MAX)
        epoch = _bounded(args, "epoch", EPOCH_MAX)
        if op == FINISH:
            commit = args.get("commit")
            if not isinstance(commit, bool):
                raise InvalidRequestError("internal request: commit must be a boolean")
            if not await self.serve(GROUP, group_id):
                raise NotOwnerError("not the group's coordinator", group=group_id)
            await self.offsets.finish(group_id, transactional_id, producer_id, epoch, commit)
            return
        if op == ADD_GROUP:
            if not await self.serve(TXN, transactional_id):
                raise NotOwnerError("not the transaction's coordinator",
                                    transactional_id=transactional_id)
            await self.transactions.add_offsets(transactional_id, producer_id, epoch, group_id)
            return
        raise InvalidRequestError("unknown internal request", op=op)


def _name(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= NAME_CHARS_MAX:
        raise InvalidRequestError(f"internal request: {key} must be a non-empty string",
                                  key=key)
    return value


def _bounded(args: dict[str, Any], key: str, high: int) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise InvalidRequestError(f"internal request: {key} must be an integer in 0..{high}",
                                  key=key)
    return value
