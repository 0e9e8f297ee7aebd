"""Clamping state to the recovered log end (after a crash under fsync=interval/never).

Under ``fsync=always`` no state names an offset the log does not hold: a record is
durable before anyone hears of its offset. Under ``interval``/``never`` a producer,
a consumer's ack, an ordered group's commit or an idempotent producer's sequence can
reach the state store (committed, fsynced) while the records they name are still
in the page cache; a crash then truncates the log below what the state says. Left
alone, new records would reuse those offsets and count as acked or committed, and
a retried lost batch would be answered "duplicate". So every piece of state is
clamped to the partition's log end at load (Kafka truncates its producer state and
group offsets to the log end the same way), and each loss is logged once with its
range and returned in ``LostRange`` records.

Must not know: files, protocols. Pure except for the log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("conveyor.broker.recovery")


@dataclass(frozen=True, slots=True)
class LostRange:
    """State named offsets ``[log_end, state_offset)`` that the recovered log lacks."""

    kind: str  # "shared-group" | "shared-records" | "ordered-group" | "producer"
    owner: str  # the group or producer id
    topic: str
    partition: int
    log_end: int
    state_offset: int


def clamp(kind: str, owner: str, topic: str, partition: int, state_offset: int,
          log_end: int, lost: list[LostRange]) -> int:
    """``state_offset`` bounded by ``log_end``; a loss is logged and appended to ``lost``."""
    if state_offset <= log_end:
        return state_offset
    found = LostRange(kind, owner, topic, partition, log_end, state_offset)
    lost.append(found)
    logger.warning(
        "state past the recovered log end: %s %s on %s/%d named offsets up to %d, the log "
        "ends at %d; offsets [%d, %d) were lost (fsync=interval/never) and are reused",
        kind, owner, topic, partition, state_offset, log_end, log_end, state_offset)
    return log_end
