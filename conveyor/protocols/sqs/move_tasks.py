"""SQS message move tasks (DLQ redrive): StartMessageMoveTask, List, Cancel.

Owns: moving a dead-letter queue's messages back to their source queues (the
broker's redrive, which reads each record's ``conveyor.source``) or to a named
destination, in chunks, and the task records ListMessageMoveTasks shows.
- Without ``MaxNumberOfMessagesPerSecond`` the move runs to the end before
  StartMessageMoveTask answers: the task is COMPLETED when the client sees it.
- With a rate, the move runs in the background, one chunk (at most the rate) per
  second: the task is RUNNING, ``ApproximateNumberOfMessagesMoved`` grows, and
  CancelMessageMoveTask stops it between chunks (CANCELLING, then CANCELLED). A chunk
  is moved whole, so nothing is half-moved: a message is acked in the dead-letter
  queue only after it was appended to its destination.
- One running task per source queue, as AWS allows.
Must not know: sockets, JSON/XML.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.types import Message
from conveyor.errors import ConveyorError
from conveyor.protocols.sqs.errors import (
    InvalidParameterValue,
    ResourceNotFoundException,
    UnsupportedOperation,
)
from conveyor.tasks import Supervisor

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

MOVE_RECORDS_MAX: Final = 1_000_000  # one task moves at most this many messages
CHUNK_RECORDS_MAX: Final = 100  # records per chunk without a rate
TASKS_KEPT_MAX: Final = 1000  # finished tasks remembered (oldest dropped)


class MoveTasks:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.tasks: dict[str, dict[str, Any]] = {}  # handle -> ListMessageMoveTasks entry
        self._cancel: dict[str, asyncio.Event] = {}  # handle of a running task -> its stop
        self._runners = Supervisor("sqs-move-tasks")  # the rate-limited moves running

    async def start(self, source: str, source_arn: str, destination: str | None,
                    destination_arn: str | None, rate_per_s: int | None) -> str:
        if any(task["SourceArn"] == source_arn and task["Status"] in ("RUNNING", "CANCELLING")
               for task in self.tasks.values()):
            raise UnsupportedOperation("There is already a task running. Only one active "
                                       "task is allowed for a source queue arn at a given time.")
        handle = base64.urlsafe_b64encode(json.dumps(
            {"task": str(uuid.uuid4()), "source": source_arn}).encode()).decode()
        ready = (await self.broker.get_queue(source)).ready
        task: dict[str, Any] = {
            "TaskHandle": handle, "Status": "RUNNING", "SourceArn": source_arn,
            "ApproximateNumberOfMessagesMoved": 0, "ApproximateNumberOfMessagesToMove": ready,
            "StartedTimestamp": self.broker.clock.wall_ms()}
        if destination_arn is not None:
            task["DestinationArn"] = destination_arn
        if rate_per_s is not None:
            task["MaxNumberOfMessagesPerSecond"] = rate_per_s
        self._remember(handle, task)
        if rate_per_s is None:
            await self._run(task, source, destination, CHUNK_RECORDS_MAX, None)
            return handle
        stop = self._cancel[handle] = asyncio.Event()
        self._runners.start(self._run(task, source, destination, rate_per_s, stop),
                            name="sqs-move-task")
        return handle

    def _remember(self, handle: str, task: dict[str, Any]) -> None:
        self.tasks[handle] = task
        finished = [h for h, t in self.tasks.items() if t["Status"] not in ("RUNNING",
                                                                             "CANCELLING")]
        for old in finished[: max(0, len(self.tasks) - TASKS_KEPT_MAX)]:
            del self.tasks[old]

    async def _run(self, task: dict[str, Any], source: str, destination: str | None,
                   chunk: int, stop: asyncio.Event | None) -> None:
        try:
            while task["ApproximateNumberOfMessagesMoved"] < MOVE_RECORDS_MAX:
                moved = await self._chunk(source, destination, chunk)
                task["ApproximateNumberOfMessagesMoved"] += moved
                if moved == 0 or (stop is not None and await _stopped(stop)):
                    break
            task["Status"] = "CANCELLED" if stop is not None and stop.is_set() else "COMPLETED"
        except ConveyorError as error:
            task["Status"] = "FAILED"
            task["FailureReason"] = str(error)[:200]
        finally:
            self._cancel.pop(task["TaskHandle"], None)

    async def _chunk(self, source: str, destination: str | None, records_max: int) -> int:
        if destination is None:
            return await self.broker.redrive(source, records_max)
        deliveries = await self.broker.acquire(source, source, records_max, lock_ms=60_000)
        if deliveries:
            await self.broker.publish(destination, [
                Message(d.value, d.key, d.headers) for d in deliveries])
            await self.broker.ack([d.receipt for d in deliveries])
        return len(deliveries)

    def cancel(self, handle: str) -> dict[str, Any]:
        task = self.tasks.get(handle)
        if task is None:
            raise ResourceNotFoundException("The task handle does not exist.")
        stop = self._cancel.get(handle)
        if stop is None or task["Status"] != "RUNNING":
            raise InvalidParameterValue(f"The task is {task['Status']}; only a RUNNING task "
                                        "can be cancelled.")
        task["Status"] = "CANCELLING"
        stop.set()
        return {"ApproximateNumberOfMessagesMoved": task["ApproximateNumberOfMessagesMoved"]}

    def list(self, source_arn: str, results_max: int) -> list[dict[str, Any]]:
        tasks = [task for task in self.tasks.values() if task["SourceArn"] == source_arn]
        tasks.sort(key=lambda task: -int(task["StartedTimestamp"]))
        return [dict(task) for task in tasks[:results_max]]

    async def close(self) -> None:
        for stop in self._cancel.values():
            stop.set()
        await self._runners.close()  # each stops between chunks


async def _stopped(stop: asyncio.Event) -> bool:
    """Wait out the rest of this second (the rate's pacing); True if cancelled meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), 1.0)
    return stop.is_set()
