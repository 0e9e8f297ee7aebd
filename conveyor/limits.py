"""Limits every listener shares: connection caps, bounded waits, the memory budget of
unfinished requests, publisher push-back (memory high-water mark) and the disk alarm.

Owns: the protocol-neutral bookkeeping. Each protocol adapter decides how to act on it
in its own terms (Kafka closes or mutes, AMQP sends Connection.Close / connection.blocked,
HTTP answers 408 / 429 / 503); no protocol imports another, they all import this.

- ``ConnectionGate`` (one per listener): ``admit()`` is False past ``connections_max``;
  refusals are counted and logged at most once a second with the count since the last
  line, so a flood of connections writes a few lines, not one per connection.
- ``RequestWatch`` (one per connection): one timer for the handshake deadline, the
  deadline of the request whose first byte arrived (a partial frame never holds a
  connection longer than ``request_timeout_ms``) and the idle deadline.
- ``MemoryBudget`` (one per server): bytes of unfinished requests over all connections of
  all listeners. When a connection's holding pushes the total past the budget, the
  connection holding the most is shed (its adapter closes it and drops its buffers).
- ``PublishFlow`` (one per server): bytes of publishes accepted but not yet stored, per
  publisher. Past the high-water mark the publishers holding at least a fair share of it
  are pushed back, the light ones are not; the disk alarm pushes back every publisher.
- ``DiskAlarm``: compares the free space under the data directory with
  ``disk_free_limit_bytes`` every ``disk_check_interval_ms`` (RabbitMQ's disk_free_limit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from conveyor.config import ListenerLimits
from conveyor.tasks import Supervisor

logger = logging.getLogger("conveyor.limits")

# At most one "refused" log line per listener per second (RabbitMQ logs each one).
REFUSED_LOG_INTERVAL_S: Final = 1.0
# Once pushed back, a publisher resumes when the total falls below this share of the mark
# (hysteresis, so publishers do not flap at the mark).
RESUME_FRACTION: Final = 0.8


class ConnectionGate:
    """The connection cap of one listener."""

    def __init__(self, listener: str, connections_max: int) -> None:
        self.listener = listener
        self.connections_max = connections_max
        self.open = 0
        self.refused = 0  # since start
        self._refused_unlogged = 0
        self._logged_at = -REFUSED_LOG_INTERVAL_S
        self._changed: asyncio.Event | None = None

    def admit(self) -> bool:
        """Count a new connection in, or refuse it (the caller closes it at once)."""
        if self.open < self.connections_max:
            self.open += 1
            self._notify()
            return True
        self.refused += 1
        self._refused_unlogged += 1
        now = asyncio.get_running_loop().time()
        if now - self._logged_at >= REFUSED_LOG_INTERVAL_S:
            logger.warning(
                "%s: refused %d connection(s): connections_max %d reached (%d refused so far)",
                self.listener, self._refused_unlogged, self.connections_max, self.refused,
                extra={"listener": self.listener, "refused": self.refused},
            )
            self._logged_at = now
            self._refused_unlogged = 0
        return False

    def release(self) -> None:
        self.open -= 1
        assert self.open >= 0, "a connection released twice"
        self._notify()

    async def until_open(self, count: int) -> None:
        """Wait until ``count`` connections are open (for tests and draining)."""
        while self.open != count:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


class RequestWatch:
    """The deadlines of one connection, driven by one timer on the event loop.

    ``on_expire`` gets "handshake", "request" or "idle" once; the watch is then stopped.
    ``is_busy`` says whether a request is being answered (a long-poll is not idleness).
    """

    def __init__(self, limits: ListenerLimits, on_expire: Callable[[str], None],
                 is_busy: Callable[[], bool], handshake: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._limits = limits
        self._on_expire = on_expire
        self._is_busy = is_busy
        now = self._loop.time()
        self._handshake_until: float | None = (
            now + limits.handshake_timeout_ms / 1000
            if handshake and limits.handshake_timeout_ms else None)
        self._request_started: float | None = None  # first byte of the unfinished request
        self._active_at = now
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self._arm()

    def received(self, pending: bool, completed: bool) -> None:
        """After a read: ``pending`` if part of a request is buffered, ``completed`` if a
        request (frame) was finished by this read."""
        now = self._loop.time()
        self._active_at = now
        if not pending:
            self._request_started = None
        elif completed or self._request_started is None:
            self._request_started = now  # the unfinished request began in this read
            self._arm()

    def active(self) -> None:
        """A response went out: the idle clock restarts."""
        self._active_at = self._loop.time()

    def handshake_done(self) -> None:
        self._handshake_until = None

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadlines(self) -> list[tuple[float, str]]:
        limits = self._limits
        found: list[tuple[float, str]] = []
        if self._handshake_until is not None:
            found.append((self._handshake_until, "handshake"))
        if self._request_started is not None and limits.request_timeout_ms:
            found.append((self._request_started + limits.request_timeout_ms / 1000, "request"))
        if limits.idle_timeout_ms:
            found.append((self._active_at + limits.idle_timeout_ms / 1000, "idle"))
        return found

    def _arm(self) -> None:
        if self._stopped:
            return
        deadlines = self._deadlines()
        if not deadlines:
            return
        when = min(deadlines)[0]
        if self._timer is not None:
            if self._timer.when() <= when:
                return  # it fires first and re-arms
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._stopped:
            return
        now = self._loop.time()
        for when, reason in sorted(self._deadlines()):
            if when > now:
                break
            if reason == "idle" and (self._is_busy() or self._request_started is not None):
                self._active_at = now
                continue
            self.stop()
            self._on_expire(reason)
            return
        self._arm()


class BudgetHolder(Protocol):
    def shed_memory(self) -> None:
        """Close this connection with the protocol's error and drop what it buffers; then
        ``MemoryBudget.forget`` it."""
        ...


class MemoryBudget:
    """Bytes of unfinished requests over every connection of every listener."""

    def __init__(self, bytes_max: int) -> None:
        self.bytes_max = bytes_max
        self.total = 0
        self.shed = 0  # connections closed to keep the budget, since start
        self._held: dict[BudgetHolder, int] = {}

    def hold(self, holder: BudgetHolder, held_bytes: int) -> None:
        """Set what ``holder`` holds now; sheds the largest holders while over budget."""
        self.total += held_bytes - self._held.get(holder, 0)
        if held_bytes:
            self._held[holder] = held_bytes
        else:
            self._held.pop(holder, None)
        while self.total > self.bytes_max and self._held:
            largest = max(self._held, key=self._held.__getitem__)
            logger.warning(
                "closing the connection holding most unfinished request bytes (%d of %d "
                "over all connections; partial_request_bytes_max %d)",
                self._held[largest], self.total, self.bytes_max,
            )
            self.shed += 1
            self.forget(largest)
            largest.shed_memory()

    def forget(self, holder: BudgetHolder) -> None:
        self.total -= self._held.pop(holder, 0)

    def held(self, holder: BudgetHolder) -> int:
        return self._held.get(holder, 0)


class PublishFlow:
    """Publisher push-back over the whole broker: the memory high-water mark of publishes
    accepted but not yet stored, and the disk alarm."""

    def __init__(self, high_watermark_bytes: int) -> None:
        self.high_watermark_bytes = high_watermark_bytes
        self.total = 0
        self.disk_alarm = False
        # over the mark, until the total falls back under RESUME_FRACTION of it
        self.pressed = False
        self.pushbacks = 0  # times a publisher was pushed back, since start
        self._held: dict[object, int] = {}
        self._listeners: list[Callable[[], None]] = []

    def hold(self, publisher: object, held_bytes: int) -> None:
        self.total += held_bytes - self._held.get(publisher, 0)
        if held_bytes:
            self._held[publisher] = held_bytes
        else:
            self._held.pop(publisher, None)
        if self.total > self.high_watermark_bytes:
            self.pressed = True
        elif self.pressed and self.total <= self.high_watermark_bytes * RESUME_FRACTION:
            self.pressed = False
            self._changed()

    def add(self, publisher: object, delta_bytes: int) -> None:
        """Change what ``publisher`` holds by ``delta_bytes`` (several requests of one)."""
        self.hold(publisher, self._held.get(publisher, 0) + delta_bytes)

    def forget(self, publisher: object) -> None:
        self.hold(publisher, 0)

    def should_wait(self, publisher: object) -> bool:
        """Whether this publisher must be pushed back now: always under the disk alarm;
        over the mark, when it holds at least a fair share (the heaviest first)."""
        if self.disk_alarm:
            return True
        if not self.pressed:
            return False
        publishers = max(1, len(self._held))
        wait = self._held.get(publisher, 0) * publishers >= self.total
        if wait:
            self.pushbacks += 1
        return wait

    def blocked_reason(self) -> str | None:
        if self.disk_alarm:
            return "low on disk"
        if self.pressed:
            return "low on memory"
        return None

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when push-back may have ended; returns the unsubscriber."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def set_disk_alarm(self, alarm: bool) -> None:
        if alarm != self.disk_alarm:
            self.disk_alarm = alarm
            self._changed()

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback()


class DiskAlarm:
    """Sets ``flow.disk_alarm`` while free space under ``path`` is below ``limit_bytes``."""

    def __init__(self, path: Path, limit_bytes: int, interval_ms: int, flow: PublishFlow,
                 free_bytes: Callable[[Path], int] | None = None) -> None:
        self.path = path
        self.limit_bytes = limit_bytes
        self.interval_ms = interval_ms
        self._flow = flow
        self._free_bytes = free_bytes or _free_bytes
        self._tasks = Supervisor("disk-alarm")

    def check(self) -> bool:
        """Check once now; returns whether the alarm is on."""
        try:
            free = self._free_bytes(self.path)
        except OSError as error:
            logger.warning("cannot read free disk space of %s: %s", self.path, error)
            return self._flow.disk_alarm
        alarm = free < self.limit_bytes
        if alarm != self._flow.disk_alarm:
            level = logging.WARNING if alarm else logging.INFO
            logger.log(level, "disk alarm %s: %d bytes free under %s, disk_free_limit_bytes %d",
                       "set, publishers blocked" if alarm else "cleared", free, self.path,
                       self.limit_bytes)
        self._flow.set_disk_alarm(alarm)
        return alarm

    def start(self) -> None:
        self.check()
        if self.limit_bytes > 0:
            self._tasks.start(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_ms / 1000)
            self.check()

    async def stop(self) -> None:
        await self._tasks.close(cancel=True)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path if path.exists() else os.getcwd()).free


class ServerLimits:
    """What the server hands every listener: the shared budget, flow and alarm."""

    def __init__(self, partial_request_bytes_max: int = 256 << 20,
                 memory_high_watermark_bytes: int = 256 << 20) -> None:
        self.budget = MemoryBudget(partial_request_bytes_max)
        self.flow = PublishFlow(memory_high_watermark_bytes)
        self.gates: dict[str, ConnectionGate] = {}

    def gate(self, listener: str, limits: ListenerLimits) -> ConnectionGate:
        gate = self.gates.get(listener)
        if gate is None:
            gate = self.gates[listener] = ConnectionGate(listener, limits.connections_max)
        return gate
