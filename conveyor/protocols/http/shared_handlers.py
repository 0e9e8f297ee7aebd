"""HTTP handlers of queues and shared groups: declare, acquire, ack, release, extend, DLQ.

Owns: the shared-group operations of the API and the long-poll rule — an
acquire whose client went away is abandoned, and records acquired for a client
that is gone before the response is written are released at once.
Must not know: sockets or HTTP framing (listener.py), message JSON (codec.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.delivery import dead_letter_topic
from conveyor.broker.types import Delivery, QueueConfig
from conveyor.errors import (
    ConveyorError,
    PreconditionFailedError,
    UnavailableError,
    UnknownDeliveryError,
    UnknownQueueError,
)
from conveyor.protocols.http.chunks import documents
from conveyor.protocols.http.codec import ApiRequest, ApiResponse, error_response, record_document
from conveyor.tasks import unless_set

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

ACQUIRE_LIMIT_DEFAULT: Final = 10
FETCH_LIMIT_DEFAULT: Final = 100
CONSUMER_PREFIX: Final = "http-"
RECEIPT_SEPARATOR: Final = ":"  # make_receipt's layout: topic:partition:offset:token:group
RECEIPT_FIELDS: Final = 5


@dataclasses.dataclass(slots=True)
class RequestContext:
    """What a handler may know about the connection: whether it is still there."""

    is_connected: Callable[[], bool]
    disconnected: asyncio.Event
    peer: str = ""
    accept: str = ""  # the request's Accept header (content negotiation of /metrics)
    # Receipts handed out are sealed to the authenticated user and opened on settle
    # (receipts.py), a request's receipts in one call; None in what ``open_receipts``
    # gives: that receipt was refused (it answers unknown_delivery).
    seal_receipts: Callable[[list[str]], list[str]] = list
    open_receipts: Callable[[list[str]], list[str | None]] = list


class SharedGroupHandlers:
    broker: Broker

    # --- queues and shared groups ----------------------------------------------------
    async def list_queues(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        queues = await _shared(self.broker).list_queues()
        return ApiResponse(200, {"queues": [queue_document(q) for q in queues]})

    async def create_queue(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        body = dict(request.body)
        name = body.pop("name")
        info = await _shared(self.broker).declare_queue(name, QueueConfig(**body))
        return ApiResponse(201, queue_document(info))

    async def describe_queue(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        info = await _shared(self.broker).get_queue(request.path["queue"])
        return ApiResponse(200, queue_document(info))

    async def delete_queue(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        await _shared(self.broker).delete_queue(request.path["queue"])
        return ApiResponse(204)

    async def create_shared_group(
        self, request: ApiRequest, context: RequestContext
    ) -> ApiResponse:
        topic, group = request.path["topic"], request.path["group"]
        body = dict(request.body)
        start = body.pop("start", "earliest")
        self.broker.get_topic(topic)
        await _shared(self.broker).create_shared_group(topic, group, QueueConfig(**body),
                                                       start=start)
        return ApiResponse(201, {"group": group, "topic": topic, "start": start})

    async def acquire(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        topic, group = request.path["topic"], request.path["group"]
        body = request.body
        shared = _shared(self.broker)
        consumer_id = CONSUMER_PREFIX + (context.peer or "client")
        if not (topic == group and shared.queue_exists(topic)):
            self.broker.get_topic(topic)
            with contextlib.suppress(PreconditionFailedError):  # exists with its own config
                await shared.create_shared_group(topic, group, start=body.get("start",
                                                                              "earliest"))
        acks: list[str] | None = body.get("ack")
        if not acks:
            deliveries = await self._acquire(topic, group, body, consumer_id, context)
            return ApiResponse(200, {"messages": await self._documents(deliveries, context)})
        # Acks carried by the acquire (as KIP-932's ShareFetch carries acknowledgements):
        # settled first, then the acquire, in the same loop turn, so both share one
        # window save and one COMMIT; the acks are fsynced before the answer, as the
        # ack endpoint's are, whichever way the acquire ends.
        receipts, outcome = await self._settled(
            topic, group, acks, context, lambda ours, settled: shared.ack(
                ours, outcomes=settled, durable_later=True))
        report = ack_report(receipts, outcome)
        try:
            deliveries = await self._acquire(topic, group, body, consumer_id, context)
        except ConveyorError as error:
            await shared.acks_durable()
            error.details["acks"] = report  # what was acked although the acquire failed
            raise
        await shared.acks_durable()
        return ApiResponse(200, {"messages": await self._documents(deliveries, context),
                                 "acks": report})

    async def _acquire(self, topic: str, group: str, body: dict[str, Any], consumer_id: str,
                       context: RequestContext) -> list[Delivery]:
        shared = _shared(self.broker)
        wait_ms = body.get("wait_ms", 0)
        work = shared.acquire(topic, group, body.get("limit", ACQUIRE_LIMIT_DEFAULT),
                              body.get("lock_ms"), wait_ms, consumer_id)
        # Only a long poll races the client's disconnection (two tasks and a TaskGroup:
        # ~17 us and several loop turns per request); an acquire that does not wait
        # returns at once, and the check below releases what a gone client would miss.
        deliveries: list[Delivery] = (
            await _unless_disconnected(work, context) if wait_ms > 0 else await work)
        if deliveries and not context.is_connected():
            # The client went away during the acquire: nobody will ack these.
            await shared.release([d.receipt for d in deliveries], 0)
            deliveries = []
        return deliveries

    @staticmethod
    async def _documents(deliveries: list[Delivery], context: RequestContext
                         ) -> list[dict[str, Any]]:
        # no copy of each Delivery just to seal its receipt
        sealed = context.seal_receipts([delivery.receipt for delivery in deliveries])
        return await documents(list(zip(deliveries, sealed, strict=True)),
                               lambda pair: _delivery_document(*pair))

    async def _settled(
        self, topic: str, group: str, receipts: list[str], context: RequestContext,
        action: Callable[[list[str], list[Exception | None]], Awaitable[Any]],
    ) -> tuple[list[str], list[Exception | None]]:
        """Settle every receipt of the group in one broker call (one save and one COMMIT
        for the request): the receipts and each one's outcome (None: settled)."""
        outcome: list[Exception | None] = []
        ours: list[str] = []
        for sealed, receipt in zip(receipts, context.open_receipts(receipts), strict=True):
            if receipt is None:
                outcome.append(UnknownDeliveryError("receipt was not issued to this user",
                                                    receipt=sealed[:80]))
                continue
            # the topic and group parse_receipt would read; the broker parses the rest
            # (a malformed number answers unknown_delivery there, receipt by receipt)
            fields = receipt.split(RECEIPT_SEPARATOR, 4)
            if len(fields) != RECEIPT_FIELDS:
                outcome.append(UnknownDeliveryError("malformed receipt",
                                                    receipt=receipt[:80]))
                continue
            if fields[0] != topic or fields[4] != group:
                outcome.append(UnknownDeliveryError("receipt belongs to another group",
                                                    receipt=receipt[:80]))
                continue
            outcome.append(None)
            ours.append(receipt)
        settled: list[Exception | None] = []
        if ours:
            await action(ours, settled)
        answers = iter(settled)
        return receipts, [error if error is not None else next(answers) for error in outcome]

    async def _settle_each(
        self, request: ApiRequest, context: RequestContext,
        action: Callable[[list[str], list[Exception | None]], Awaitable[Any]],
    ) -> ApiResponse:
        """``_settled``, answered receipt by receipt (``receipt_results``)."""
        return receipt_results(*await self._settled(
            request.path["topic"], request.path["group"], request.body["receipts"], context,
            action))

    async def ack(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        shared = _shared(self.broker)
        return await self._settle_each(
            request, context,
            lambda receipts, outcomes: shared.ack(receipts, outcomes=outcomes))

    async def release(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        shared = _shared(self.broker)
        delay_ms = request.body.get("delay_ms", 0)
        return await self._settle_each(
            request, context,
            lambda receipts, outcomes: shared.release(receipts, delay_ms, outcomes)
        )

    async def extend(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        shared = _shared(self.broker)
        lock_ms = request.body["lock_ms"]
        return await self._settle_each(
            request, context,
            lambda receipts, outcomes: shared.extend(receipts, lock_ms, outcomes))

    async def _dead_letter_topic(self, topic: str, group: str) -> str | None:
        """The DLQ topic of a queue or shared group, or None while it does not exist.

        A DLQ is created by its first dead letter; until then (or when the queue
        dead-letters nowhere) it reads as empty and redrives nothing. Only an unknown
        queue or topic is an error (docs/http.md, "Dead letters")."""
        shared = _shared(self.broker)
        if topic == group and shared.queue_exists(topic):
            info = await shared.get_queue(topic)
            name = dead_letter_topic(topic, info.config)
        else:
            if self.broker.find_topic(topic) is None:
                raise UnknownQueueError("unknown queue or topic", topic=topic, group=group)
            name = f"{group}.dlq"
        if name is None or not shared.queue_exists(name):
            return None
        return name

    async def dlq(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        topic, group = request.path["topic"], request.path["group"]
        dead_topic = await self._dead_letter_topic(topic, group)
        if dead_topic is None:
            offset = request.query.get("offset", 0)
            return ApiResponse(200, {"messages": [], "next_offsets": {"0": offset}})
        offsets = self.broker.offsets(dead_topic, 0)
        offset = max(request.query.get("offset", 0), offsets.log_start_offset)
        offset = min(offset, offsets.high_watermark)
        records = await self.broker.read_records(
            dead_topic, 0, offset, request.query.get("limit", FETCH_LIMIT_DEFAULT),
        )
        return ApiResponse(200, {
            "messages": [record_document(dead_topic, 0, r) for r in records],
            "next_offsets": {"0": records[-1].offset + 1 if records else offset},
        })

    async def redrive(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        topic, group = request.path["topic"], request.path["group"]
        dead_topic = await self._dead_letter_topic(topic, group)
        if dead_topic is None:
            return ApiResponse(200, {"redriven": 0})
        count = await _shared(self.broker).redrive(dead_topic, request.body.get("limit", 1000))
        return ApiResponse(200, {"redriven": count})


def queue_document(info: Any) -> dict[str, Any]:
    config = dataclasses.asdict(info.config)
    return {"name": info.name, "ready": info.ready, "in_flight": info.in_flight,
            "delayed": info.delayed, "config": config}


def receipt_results(
    receipts: Sequence[str], outcome: Sequence[Exception | None]
) -> ApiResponse:
    """All failed: the first failure's status. Else 200 with one result per receipt."""
    failures = [error for error in outcome if error is not None]
    if failures and len(failures) == len(receipts):
        first = failures[0]
        if isinstance(first, ConveyorError):
            return error_response(first)
        raise first
    results: list[dict[str, Any]] = []
    for receipt, error in zip(receipts, outcome, strict=True):
        if error is None:
            results.append({"receipt": receipt, "ok": True})
        else:
            code = error.code if isinstance(error, ConveyorError) else "internal_error"
            results.append({"receipt": receipt, "ok": False,
                            "error": {"code": code, "message": str(error)}})
    return ApiResponse(200, {"results": results})


def ack_report(receipts: Sequence[str], outcome: Sequence[Exception | None]
               ) -> dict[str, Any]:
    """The acks an acquire carried: how many were acked (saved and fsynced before the
    answer) and each failed receipt with its error; the acquired messages do not depend
    on them."""
    failed: list[dict[str, Any]] = []
    for receipt, error in zip(receipts, outcome, strict=True):
        if error is not None:
            code = error.code if isinstance(error, ConveyorError) else "internal_error"
            failed.append({"receipt": receipt, "error": {"code": code, "message": str(error)}})
    return {"acked": len(receipts) - len(failed), "failed": failed}


async def _unless_disconnected(work: Awaitable[Any], context: RequestContext) -> Any:
    """Await ``work``; if the client disconnects first, cancel it and return []."""
    result = await unless_set(work, context.disconnected)
    return [] if result is None else result


def _shared(broker: Broker) -> Broker:
    if broker.shared_groups is None:
        raise UnavailableError("shared groups are not available in this build")
    return broker  # every queue operation goes through the facade


def _delivery_document(delivery: Delivery, receipt: str) -> dict[str, Any]:
    document = record_document(delivery.topic, delivery.partition, delivery)
    document["receipt"] = receipt
    document["delivery_count"] = delivery.delivery_count
    document["lock_deadline_ms"] = delivery.lock_deadline_ms
    return document
