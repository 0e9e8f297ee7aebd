"""SQS message actions: send, receive (long polling), delete, change visibility.

Owns: how an SQS message maps onto a Conveyor record and back, so every protocol
reads the same thing:
- value = the body (UTF-8); key = none;
- each String/Number message attribute = a plain record header ``<Name>`` with its
  value as UTF-8, Binary ones with their raw bytes; a data type other than ``String``
  is kept in ``conveyor.sqs.type.<Name>`` (a plain header written by another protocol
  reads back as a String attribute; a non-UTF-8 one as Binary);
- ``conveyor.sqs.message-id``, ``conveyor.sqs.trace-header`` (AWSTraceHeader);
- MessageGroupId -> ``conveyor.group``, MessageDeduplicationId (or the body's SHA-256
  under ContentBasedDeduplication) -> ``conveyor.dedup-id``, DelaySeconds ->
  ``conveyor.deliver-at``; SentTimestamp is the record's timestamp, SequenceNumber
  its offset, ApproximateReceiveCount the delivery count.
Long polls wait on the broker's acquire (woken by appends, never polling); a client
that goes away before its answer is written releases what it was given.
Must not know: sockets, JSON/XML.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any, Final

from conveyor.broker.types import (
    HEADER_DEDUP_ID,
    HEADER_GROUP,
    Delivery,
    Headers,
    Message,
)
from conveyor.errors import ConveyorError, LockExpiredError, UnknownDeliveryError
from conveyor.protocols.sqs.attributes import (
    MessageAttribute,
    attributes_size_bytes,
    check_text,
    is_fifo,
    md5_of_attributes,
    md5_of_body,
    parse_message_attributes,
    with_defaults,
)
from conveyor.protocols.sqs.base import RequestContext, SqsBase
from conveyor.protocols.sqs.errors import (
    BatchRequestTooLong,
    InvalidParameterValue,
    MessageNotInflight,
    MissingParameter,
    ReceiptHandleIsInvalid,
    SqsError,
    from_conveyor,
)
from conveyor.protocols.sqs.params import (
    batch_entries,
    optional_int,
    optional_str,
    required_str,
    string_list,
)
from conveyor.protocols.sqs.receive_attempts import check_attempt_id
from conveyor.tasks import unless_set

HEADER_MESSAGE_ID: Final = "conveyor.sqs.message-id"
HEADER_TRACE: Final = "conveyor.sqs.trace-header"
HEADER_TYPE_PREFIX: Final = "conveyor.sqs.type."
HEADER_SCOPED_DEDUP_ID: Final = "conveyor.sqs.dedup-id"  # DeduplicationScope=messageGroup
RECEIVE_MESSAGES_MAX: Final = 10  # AWS: MaxNumberOfMessages 1..10
WAIT_SECONDS_MAX: Final = 20  # AWS: WaitTimeSeconds 0..20
VISIBILITY_SECONDS_MAX: Final = 43_200  # AWS: 12 hours
DELAY_SECONDS_MAX: Final = 900  # AWS: 15 minutes
FIRST_RECEIVES_MAX: Final = 100_000  # remembered first-receive times (oldest dropped)
SYSTEM_ATTRIBUTES: Final = frozenset({
    "SenderId", "SentTimestamp", "ApproximateReceiveCount",
    "ApproximateFirstReceiveTimestamp", "SequenceNumber", "MessageDeduplicationId",
    "MessageGroupId", "AWSTraceHeader", "DeadLetterQueueSourceArn",
})


class MessageActions(SqsBase):
    # --- send --------------------------------------------------------------------------
    def _limits(self, name: str) -> tuple[dict[str, str], bool]:
        meta = self.catalog.get(name)
        fifo = is_fifo(name)
        return with_defaults(meta.attributes if meta else {}, fifo), fifo

    def _message(self, name: str, entry: dict[str, Any],
                 limits: tuple[dict[str, str], bool]) -> tuple[Message, dict[str, str]]:
        """The record for one SendMessage(Batch) entry, and the digests to answer with."""
        attributes, fifo = limits
        body = entry.get("MessageBody")
        if body is None or body == "":
            raise MissingParameter("The request must contain the parameter MessageBody.")
        if not isinstance(body, str):
            raise InvalidParameterValue("MessageBody must be a string.")
        check_text(body, "the message body")
        user = parse_message_attributes(entry.get("MessageAttributes"))
        system = parse_message_attributes(entry.get("MessageSystemAttributes"), system=True)
        size_max = int(attributes["MaximumMessageSize"])
        if len(body.encode()) + attributes_size_bytes(user) > size_max:
            raise InvalidParameterValue(
                f"One or more parameters are invalid. Reason: Message must be shorter than "
                f"{size_max} bytes.")
        delay_s = optional_int(entry, "DelaySeconds", 0, DELAY_SECONDS_MAX)
        group = optional_str(entry, "MessageGroupId")
        dedup = optional_str(entry, "MessageDeduplicationId")
        if fifo:
            if delay_s is not None:
                raise InvalidParameterValue(
                    f"Value {delay_s} for parameter DelaySeconds is invalid. Reason: The "
                    "request include parameter that is not valid for this queue type.")
            if not group:
                raise MissingParameter("The request must contain the parameter "
                                       "MessageGroupId.")
            if dedup is None:
                if attributes.get("ContentBasedDeduplication") != "true":
                    raise InvalidParameterValue(
                        "The queue should either have ContentBasedDeduplication enabled or "
                        "MessageDeduplicationId provided explicitly")
                dedup = hashlib.sha256(body.encode()).hexdigest()
        elif dedup is not None:
            raise InvalidParameterValue(
                "Value for parameter MessageDeduplicationId is invalid. Reason: The request "
                "includes a parameter that is not valid for this queue type.")
        message_id = self.message_ids.next_id()
        headers: list[tuple[str, bytes | None]] = [(HEADER_MESSAGE_ID, message_id.encode())]
        for attribute in user:
            headers.append((attribute.name, attribute.value))
            if attribute.data_type != "String":
                headers.append((HEADER_TYPE_PREFIX + attribute.name,
                                attribute.data_type.encode()))
        for attribute in system:
            headers.append((HEADER_TRACE, attribute.value))
        if fifo and dedup is not None and attributes.get("DeduplicationScope") == "messageGroup":
            # the broker's window is per queue: scope the id by its group, keep it as sent
            headers.append((HEADER_SCOPED_DEDUP_ID, dedup.encode()))
            dedup = f"{group}\x1f{dedup}"
        deliver_at = (self.broker.clock.wall_ms() + delay_s * 1000
                      if delay_s is not None else None)
        message = Message(body.encode(), None, tuple(headers), deliver_at_ms=deliver_at,
                          dedup_id=dedup if fifo else None,
                          message_group=group if fifo else None)
        digests = {"MessageId": message_id, "MD5OfMessageBody": md5_of_body(body)}
        if user:
            digests["MD5OfMessageAttributes"] = md5_of_attributes(user)
        if system:
            digests["MD5OfMessageSystemAttributes"] = md5_of_attributes(system)
        return message, digests

    async def action_SendMessage(self, params: dict[str, Any],
                                 context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        message, result = self._message(name, params, self._limits(name))
        published = await self.broker.publish(name, [message])
        if is_fifo(name) and published and published[0].offset >= 0:
            result["SequenceNumber"] = f"{published[0].offset:020d}"
        return result

    async def action_SendMessageBatch(self, params: dict[str, Any],
                                      context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        entries = batch_entries(params)
        limits = self._limits(name)
        attributes = limits[0]
        total = sum(len(str(entry.get("MessageBody", "")).encode()) for entry in entries)
        if total > int(attributes["MaximumMessageSize"]):
            raise BatchRequestTooLong(
                f"Batch requests cannot be longer than {attributes['MaximumMessageSize']} "
                "bytes.")
        successful: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        messages: list[Message] = []
        for entry in entries:
            try:
                message, digests = self._message(name, entry, limits)
            except SqsError as error:
                failed.append(_failure(entry["Id"], error))
                continue
            messages.append(message)
            successful.append({"Id": entry["Id"], **digests})
        if messages:
            published = await self.broker.publish(name, messages)
            if is_fifo(name):
                for item, result in zip(successful, published, strict=True):
                    if result.offset >= 0:
                        item["SequenceNumber"] = f"{result.offset:020d}"
        return {"Successful": successful, "Failed": failed}

    # --- receive -----------------------------------------------------------------------
    async def action_ReceiveMessage(self, params: dict[str, Any],
                                    context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        attributes, _fifo = self._limits(name)
        count = optional_int(params, "MaxNumberOfMessages", 1, RECEIVE_MESSAGES_MAX) or 1
        visibility_s = optional_int(params, "VisibilityTimeout", 0, VISIBILITY_SECONDS_MAX)
        wait_s = optional_int(params, "WaitTimeSeconds", 0, WAIT_SECONDS_MAX)
        if wait_s is None:
            wait_s = int(attributes["ReceiveMessageWaitTimeSeconds"])
        system_names = set(string_list(params, "AttributeNames")) | set(
            string_list(params, "MessageSystemAttributeNames"))
        user_names = string_list(params, "MessageAttributeNames")
        attempt = optional_str(params, "ReceiveRequestAttemptId") if _fifo else None
        if attempt is not None:
            check_attempt_id(attempt)
            lock_s = (visibility_s if visibility_s is not None
                      else int(attributes["VisibilityTimeout"]))
            replayed = await self.attempts.replay(name, attempt, lock_s * 1000)
            if replayed is not None:
                return replayed
        self.receive_counter += 1
        consumer = f"sqs-receive-{self.receive_counter}"  # unique: its release hits only it
        lock_ms = None if visibility_s is None else visibility_s * 1000
        # what is there now needs no waiting (and no watcher task); a long poll does
        deliveries = await self.broker.acquire(name, name, count, lock_ms, 0, consumer)
        if not deliveries and wait_s > 0:
            work = self.broker.acquire(name, name, count, lock_ms, wait_s * 1000, consumer)
            deliveries = await _unless_disconnected(work, context.disconnected)
        if context.disconnected.is_set():
            # nobody to tell: give back what this receive locked, and only that
            if deliveries:
                await self.broker.release([d.receipt for d in deliveries])
            else:
                await self.broker.release_consumer(consumer)
            return {}
        messages = [self._received(name, d, system_names, user_names) for d in deliveries]
        result = {"Messages": messages} if messages else {}
        if attempt is not None and deliveries:
            self.attempts.remember(name, attempt, [d.receipt for d in deliveries], result)
        return result

    def _received(self, name: str, delivery: Delivery, system_names: set[str],
                  user_names: list[str]) -> dict[str, Any]:
        body = (delivery.value or b"").decode("utf-8", "replace")
        message_id, trace, user = _from_headers(delivery.headers)
        if message_id is None:
            message_id = str(uuid.UUID(bytes=hashlib.md5(
                f"{delivery.topic}/{delivery.partition}/{delivery.offset}".encode(),
                usedforsecurity=False).digest()))
        result: dict[str, Any] = {
            "MessageId": message_id,
            "ReceiptHandle": self.receipt_handle(delivery.receipt),
            "MD5OfBody": md5_of_body(body), "Body": body,
        }
        system = self._system_attributes(name, delivery, trace)
        if "All" not in system_names:
            system = {key: value for key, value in system.items() if key in system_names}
        if system:
            result["Attributes"] = system
        selected = [a for a in user if _selected(a.name, user_names)]
        if selected:
            result["MessageAttributes"] = {a.name: a.to_wire() for a in selected}
            result["MD5OfMessageAttributes"] = md5_of_attributes(selected)
        return result

    def _system_attributes(self, name: str, delivery: Delivery,
                           trace: bytes | None) -> dict[str, str]:
        key = (name, delivery.partition, delivery.offset)
        first_ms = self.first_receive_ms.setdefault(key, self.broker.clock.wall_ms())
        if len(self.first_receive_ms) > FIRST_RECEIVES_MAX:
            del self.first_receive_ms[next(iter(self.first_receive_ms))]
        values = {
            "SenderId": self.account_id,
            "SentTimestamp": str(delivery.timestamp_ms),
            "ApproximateReceiveCount": str(delivery.delivery_count),
            "ApproximateFirstReceiveTimestamp": str(first_ms),
        }
        headers = dict(delivery.headers)
        if is_fifo(name):
            values["SequenceNumber"] = f"{delivery.offset:020d}"
            scoped = HEADER_SCOPED_DEDUP_ID if HEADER_SCOPED_DEDUP_ID in headers else None
            for header, attribute in ((HEADER_GROUP, "MessageGroupId"),
                                      (scoped or HEADER_DEDUP_ID, "MessageDeduplicationId")):
                value = headers.get(header)
                if value is not None:
                    values[attribute] = value.decode("utf-8", "replace")
        if trace is not None:
            values["AWSTraceHeader"] = trace.decode("utf-8", "replace")
        return values

    # --- delete / visibility -----------------------------------------------------------
    async def _delete(self, name: str, handle: Any) -> None:
        receipt = self.broker_receipt(handle, name)
        try:
            await self.broker.ack([receipt])
        except UnknownDeliveryError:
            return  # deleted already: AWS answers success again
        except LockExpiredError:
            raise ReceiptHandleIsInvalid(
                "The receipt handle has expired: the message is visible again.") from None

    async def _change(self, name: str, handle: Any, entry: dict[str, Any]) -> None:
        receipt = self.broker_receipt(handle, name)
        timeout_s = optional_int(entry, "VisibilityTimeout", 0, VISIBILITY_SECONDS_MAX)
        if timeout_s is None:
            raise MissingParameter("The request must contain the parameter "
                                   "VisibilityTimeout.")
        try:
            if timeout_s == 0:
                await self.broker.release([receipt])
            else:
                await self.broker.extend([receipt], timeout_s * 1000)
        except (UnknownDeliveryError, LockExpiredError):
            raise MessageNotInflight("Message does not exist or is not available for "
                                     "visibility timeout change.") from None

    async def action_DeleteMessage(self, params: dict[str, Any],
                                   context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        await self._delete(name, required_str(params, "ReceiptHandle"))
        return {}

    async def action_ChangeMessageVisibility(self, params: dict[str, Any],
                                             context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        await self._change(name, required_str(params, "ReceiptHandle"), params)
        return {}

    async def action_DeleteMessageBatch(self, params: dict[str, Any],
                                        context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        entries = batch_entries(params)
        receipts: list[str] = []
        for entry in entries:
            try:
                receipts.append(self.broker_receipt(entry.get("ReceiptHandle"), name))
            except SqsError:
                break
        else:
            try:  # the common case: every handle is good and held, one settle for all
                await self.broker.ack(receipts)
                return {"Successful": [{"Id": e["Id"]} for e in entries], "Failed": []}
            except ConveyorError:
                pass  # some were not: settle one by one (acked ones answer success again)
        return await _each(entries, lambda entry: self._delete(name, entry.get("ReceiptHandle")))

    async def action_ChangeMessageVisibilityBatch(self, params: dict[str, Any],
                                                  context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        return await _each(batch_entries(params), lambda entry: self._change(
            name, entry.get("ReceiptHandle"), entry))


async def _each(entries: list[dict[str, Any]], action: Any) -> dict[str, Any]:
    """Settle entries concurrently (one state-store COMMIT per loop turn serves them all);
    each gets its own outcome."""

    async def one(entry: dict[str, Any]) -> SqsError | None:
        try:
            await action(entry)
        except ConveyorError as error:
            return from_conveyor(error)
        return None

    outcomes = await asyncio.gather(*(one(entry) for entry in entries))
    successful = [{"Id": e["Id"]} for e, error in zip(entries, outcomes, strict=True)
                  if error is None]
    failed = [_failure(e["Id"], error) for e, error in zip(entries, outcomes, strict=True)
              if error is not None]
    return {"Successful": successful, "Failed": failed}


def _failure(entry_id: str, error: SqsError) -> dict[str, Any]:
    return {"Id": entry_id, "SenderFault": error.sender, "Code": error.code,
            "Message": error.aws_message}


def _selected(name: str, wanted: list[str]) -> bool:
    for pattern in wanted:
        if pattern in ("All", ".*") or pattern == name:
            return True
        if pattern.endswith(".*") and name.startswith(pattern[:-1]):
            return True
    return False


def _from_headers(headers: Headers) -> tuple[str | None, bytes | None, list[MessageAttribute]]:
    """(message id, trace header, message attributes) of a record from any protocol."""
    message_id: str | None = None
    trace: bytes | None = None
    types: dict[str, str] = {}
    plain: list[tuple[str, bytes]] = []
    for header, value in headers:
        if header == HEADER_MESSAGE_ID and value is not None:
            message_id = value.decode("utf-8", "replace")
        elif header == HEADER_TRACE:
            trace = value
        elif header.startswith(HEADER_TYPE_PREFIX) and value is not None:
            types[header[len(HEADER_TYPE_PREFIX):]] = value.decode("utf-8", "replace")
        elif not header.startswith("conveyor.") and value is not None:
            plain.append((header, value))
    attributes = []
    for header, value in plain:
        data_type = types.get(header)
        if data_type is None:
            try:
                value.decode("utf-8")
                data_type = "String"
            except UnicodeDecodeError:
                data_type = "Binary"
        attributes.append(MessageAttribute(header, data_type, value))
    return message_id, trace, sorted(attributes, key=lambda a: a.name)


async def _unless_disconnected(work: Any, disconnected: asyncio.Event) -> list[Delivery]:
    """Await ``work``; if the client goes away first, cancel it and return []."""
    result: list[Delivery] | None = await unless_set(work, disconnected)
    return [] if result is None else result
