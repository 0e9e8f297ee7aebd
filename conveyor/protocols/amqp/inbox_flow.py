"""Flow control of one AMQP connection's unprocessed publishes (no socket calls).

Owns: how many bytes of publishes a connection has received and its channels have
not yet handled, added to the listener's total and reported to the server's
``PublishFlow``; and the decisions that follow: stop reading this connection's
socket (it is the one filling memory: over ``inbox_bytes_max``, over the listener's
``memory_high_watermark_bytes``, or the server's flow asks publishers to wait), send
Connection.Blocked, and later Unblocked and resume reading (at half the limit). The
adapter carries the decisions out on its transport.
"""

from __future__ import annotations

from dataclasses import dataclass

from .machine import PublishReceived
from .server import AmqpServer

FRAME_OVERHEAD_BYTES = 256  # a rough size of a publish's frames and objects


def inbox_size(event: PublishReceived) -> int:
    """What an unprocessed publish counts against the flow-control limits."""
    return len(event.body) + FRAME_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class Hold:
    pause_reading: bool
    block_reason: str | None  # send Connection.Blocked with it (None: nothing to send)


@dataclass(frozen=True, slots=True)
class Release:
    unblock: bool  # send Connection.Unblocked
    resume_reading: bool


class InboxFlow:
    def __init__(self, owner: object, server: AmqpServer) -> None:
        self.owner = owner  # the connection, as the server's flow knows it
        self.server = server
        self.inbox_bytes = 0
        self.reading_paused = False
        self.blocked = False  # Connection.Blocked sent (publisher push-back)

    def received(self, event: PublishReceived, can_pause: bool) -> Hold:
        size = inbox_size(event)
        self.inbox_bytes += size
        server = self.server
        server.inbox_bytes += size
        flow = server.shared.flow
        flow.hold(self.owner, self.inbox_bytes)
        pushed_back = flow.should_wait(self.owner)
        pause = not self.reading_paused and can_pause and (
            self.inbox_bytes > server.settings.inbox_bytes_max
            or server.inbox_bytes > server.settings.memory_high_watermark_bytes
            or pushed_back)
        if pause:
            server.reading_pauses += 1
            self.reading_paused = True
        reason = None
        if pushed_back and not self.blocked:
            self.blocked = True
            reason = flow.blocked_reason() or "low on memory"
        return Hold(pause, reason)

    def drained(self, batch: list[PublishReceived]) -> Release:
        size = sum(inbox_size(event) for event in batch)
        self.inbox_bytes -= size
        self.server.inbox_bytes -= size
        self.server.shared.flow.hold(self.owner, self.inbox_bytes)
        return self.release()

    def release(self) -> Release:
        """What the server's flow (or a drained inbox) lets go of now."""
        if self.server.shared.flow.should_wait(self.owner):
            return Release(False, False)
        unblock, self.blocked = self.blocked, False
        resume = (self.reading_paused
                  and self.inbox_bytes <= self.server.settings.inbox_bytes_max // 2)
        if resume:
            self.reading_paused = False
        return Release(unblock, resume)

    def holding(self) -> bool:
        return self.blocked or self.reading_paused
