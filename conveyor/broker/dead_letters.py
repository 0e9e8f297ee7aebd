"""DeadLetters: a record that died (rejected, expired, too many deliveries) goes on.

Owns: writing dead letters (to the group's dead-letter queue, or RabbitMQ-style
through its dead-letter exchange) and the failures since the last success. A dead
letter that cannot be appended (too large with its headers, disk full) parks its
record in the window and is retried ``DEAD_LETTER_RETRY_MS`` later, never dropped
with the changes around it; the failure is logged once per group and error.

May call: the topics, the exchanges' route, the producer's ensure_topic (through
``SharedGroupsHost``), and the coordinator's declare_queue and publish admission
(passed in: a dead letter is admitted as ``Broker.publish`` would admit it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from conveyor.errors import OperatingError

from .delivery import (
    dead_letter_cycle,
    dead_letter_exchange_message,
    dead_letter_message,
    dead_letter_routing_key,
    dead_letter_topic,
    record_policy,
)
from .shared_group import Change, SharedPartition
from .shared_model import SharedGroupsHost, SharedGroupWindows
from .types import Message, PublishResult, QueueConfig, QueueInfo

# a dead letter that could not be appended (too large with its headers, disk full) is
# retried this much later; SQS's redrive and RabbitMQ's dead-lettering have no retry
DEAD_LETTER_RETRY_MS = 60_000

logger = logging.getLogger("conveyor.broker.shared")


class DeadLetters:
    def __init__(
        self, host: SharedGroupsHost, wall_skew_ms: Callable[[], int],
        declare_queue: Callable[[str, QueueConfig | None], Awaitable[QueueInfo]],
        publish: Callable[[str, Sequence[Message]], Awaitable[list[PublishResult]]],
    ) -> None:
        self.host = host
        self.clock = host.clock
        self._wall_skew_ms = wall_skew_ms
        self._declare_queue = declare_queue
        self._publish = publish
        # (group, error code) -> dead-letter appends failed since the last success
        self.failures: dict[tuple[str, str], int] = {}

    async def write_or_park(self, state: SharedGroupWindows, part: SharedPartition,
                            change: Change) -> Change | None:
        """Dead-letter ``change``; if the append fails the record is parked (kept in the
        window, retried after DEAD_LETTER_RETRY_MS) and the failure logged once."""
        failures = self.failures
        try:
            await self.write(state, part, change)
            state.counters.dead_lettered += 1
        except OperatingError as error:
            key = (state.group, error.code)
            failures[key] = failures.get(key, 0) + 1
            if failures[key] == 1:
                logger.warning("dead letter of %s/%d offset %d (group %s) failed, kept and "
                               "retried every %d ms: %s", part.topic, part.partition,
                               change.offset, state.group, DEAD_LETTER_RETRY_MS, error)
            assert change.record is not None
            policy = record_policy(change.record, state.config, self._wall_skew_ms())
            return part.park(change, policy, self.clock.monotonic_ms() + DEAD_LETTER_RETRY_MS)
        for key in [key for key in failures if key[0] == state.group]:
            logger.warning("dead letters of group %s written again after %d failures (%s)",
                           state.group, failures.pop(key), key[1])
        return None

    async def write(self, state: SharedGroupWindows, part: SharedPartition,
                    change: Change) -> None:
        assert change.record is not None and change.reason is not None
        if state.config.dead_letter_exchange is not None:
            await self._to_exchange(state, change)
            return
        target = dead_letter_topic(state.group, state.config)
        if target is None:
            return  # no DLQ: an expired or rejected record is dropped
        if self.host.topics.find(target) is None:
            await self._declare_queue(target, None)
        message = dead_letter_message(change.record, part.topic, part.partition, change.reason)
        await self._publish(target, [message])

    async def _to_exchange(self, state: SharedGroupWindows, change: Change) -> None:
        """RabbitMQ's dead-lettering: re-publish through the dead-letter exchange with the
        death recorded; a missing exchange or no route drops the record, as RabbitMQ does."""
        assert change.record is not None and change.reason is not None
        exchange = state.config.dead_letter_exchange or ""
        routing_key = dead_letter_routing_key(change.record, state.group, state.config)
        message = dead_letter_exchange_message(
            change.record, state.group, change.reason, self.clock.wall_ms(), exchange,
            routing_key)
        try:
            destinations = self.host.route(exchange, routing_key, message.headers)
        except OperatingError:
            return
        for destination in destinations:
            if not dead_letter_cycle(message, destination.name):
                info = await self.host.ensure_topic(destination.name)
                await self._publish(info.name, [message])
