"""PeerClients: one internal-channel client per peer node, for the calls a node sends to
an item's owner (group operations, transactional offsets, queues consumed through
another node). A peer that now advertises
another internal address (it restarted, or moved) gets a new client; the old one is
closed. Must not know: what the calls mean."""

from __future__ import annotations

from conveyor.cluster.internal_api import InternalClient, Orphan
from conveyor.cluster.membership import Membership
from conveyor.config import TlsConfig


class PeerClients:
    def __init__(self, membership: Membership, secret: bytes,
                 tls: TlsConfig | None = None, orphan: Orphan | None = None) -> None:
        self.membership = membership
        self.secret = secret
        self.tls = tls  # TLS to other nodes' internal ports (None: plain)
        self.orphan = orphan  # an answer that came after its caller stopped waiting
        self._clients: dict[int, InternalClient] = {}

    async def get(self, node_id: int) -> InternalClient | None:
        """The client of a live node that advertises an internal address; else None."""
        address = next((node.addresses.get("internal") for node in self.membership.live_nodes()
                        if node.node_id == node_id), None)
        if address is None:
            return None
        client = self._clients.get(node_id)
        if client is None or client.address != address:  # a new node, or it restarted
            if client is not None:
                await client.close()
            client = InternalClient(address, self.secret, self.membership.node_id,
                                    self.membership.incarnation, self.orphan, self.tls)
            self._clients[node_id] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
