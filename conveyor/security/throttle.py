"""Failed logins: a per-peer back-off and a rate-limited log line.

Owns: how long a peer waits after its n-th consecutive failed login (100 ms doubling
up to 5 s, forgotten after 15 minutes or a successful login), and at most one log line
per peer every 10 s (with the count of the failures it did not log). The wait is an
``await`` on the clock, so the event loop keeps serving every other connection; a
brute-forcer on one connection or many from one address is slowed to a few tries per
5 s. The table of peers is bounded (oldest forgotten first).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from conveyor.clock import Clock
from conveyor.security.api import FailedLogin

logger = logging.getLogger("conveyor.security")

DELAY_MS_FIRST = 100
DELAY_MS_MAX = 5_000
FORGET_AFTER_MS = 15 * 60_000
LOG_INTERVAL_MS = 10_000
PEERS_MAX = 10_000


@dataclass(slots=True)
class _Peer:
    failures: int = 0
    last_failure_ms: int = 0
    last_log_ms: int = -LOG_INTERVAL_MS
    unlogged: int = 0


class LoginThrottle:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def _peer(self, peer_host: str, now_ms: int) -> _Peer:
        peer = self._peers.pop(peer_host, None)
        if peer is None or now_ms - peer.last_failure_ms > FORGET_AFTER_MS:
            peer = peer or _Peer()
            peer.failures = 0
        self._peers[peer_host] = peer
        while len(self._peers) > PEERS_MAX:
            self._peers.popitem(last=False)
        return peer

    def delay_ms(self, failures: int) -> int:
        return min(DELAY_MS_MAX, DELAY_MS_FIRST << min(failures - 1, 16))

    async def failed(self, peer_host: str | None, user: str, protocol: str) -> FailedLogin:
        now_ms = self.clock.monotonic_ms()
        peer = self._peer(peer_host or "local", now_ms)
        peer.failures += 1
        peer.last_failure_ms = now_ms
        logged = now_ms - peer.last_log_ms >= LOG_INTERVAL_MS
        if logged:
            logger.warning("login failed", extra={
                "peer": peer_host, "user": user[:64], "protocol": protocol,
                "failures": peer.failures, "unlogged": peer.unlogged})
            peer.last_log_ms = now_ms
            peer.unlogged = 0
        else:
            peer.unlogged += 1
        delay = self.delay_ms(peer.failures)
        await self.clock.sleep_ms(delay)
        return FailedLogin(delay, logged, peer.failures)

    def succeeded(self, peer_host: str | None) -> None:
        self._peers.pop(peer_host or "local", None)
