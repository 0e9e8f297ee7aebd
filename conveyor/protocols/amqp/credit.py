"""Consumer credit (basic.qos prefetch), as pure arithmetic.

Owns: how many records a consumer may take next, given its own prefetch window
(``basic.qos global=false``), the channel's shared window (``global=true``) and what
is unacknowledged in each; and when it is worth asking the broker again. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

ACQUIRE_BATCH_MAX = 500
THRESHOLD_MAX = 100


@dataclass(frozen=True, slots=True)
class Window:
    """What the credit depends on, at one moment."""

    prefetch: int  # the consumer's window; 0: unlimited
    unacked: int  # the consumer's deliveries not yet settled
    no_ack: bool
    channel_prefetch: int  # the channel's shared window; 0: none
    channel_unacked: int  # the channel's deliveries not yet settled


def credit(window: Window, batch_max: int = ACQUIRE_BATCH_MAX) -> int:
    """How many records the consumer may take now (<= 0: none)."""
    limit = batch_max
    if window.no_ack:
        return limit
    if window.prefetch:
        limit = min(limit, window.prefetch - window.unacked)
    if window.channel_prefetch:
        limit = min(limit, window.channel_prefetch - window.channel_unacked)
    return limit


def threshold(window: Window, batch_max: int = ACQUIRE_BATCH_MAX) -> int:
    """Acquire again only when a quarter of the window is free (at least 1): acks one
    by one then cost one acquire per ~window/4 messages, not one per message."""
    if window.no_ack:
        return 1
    size = window.prefetch or batch_max
    if window.channel_prefetch:
        size = min(size, window.channel_prefetch)
    if window.unacked == 0 and window.channel_unacked == 0:
        return 1
    return max(1, min(size // 4, THRESHOLD_MAX))
