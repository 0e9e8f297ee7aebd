"""SQS queue actions: create, delete, URLs, listing, attributes, purge, tags, DLQ,
message move tasks and permissions.

Owns: how each queue action maps onto the broker facade (declare_queue,
alter_queue, delete_queue, purge_queue, get_queue, list_queues, redrive) and the
SQS-only metadata in the catalog. AddPermission/RemovePermission are accepted and
stored; Conveyor has no security model yet, so they grant and deny nothing.
Must not know: sockets, JSON/XML.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Final

from conveyor.protocols.sqs.attributes import (
    ALL_NAMES,
    attributes_from_config,
    is_fifo,
    normalise_attributes,
    parse_redrive,
    queue_config,
    validate_queue_name,
    with_defaults,
)
from conveyor.protocols.sqs.base import RequestContext, SqsBase
from conveyor.protocols.sqs.catalog import QueueMeta
from conveyor.protocols.sqs.errors import (
    InvalidAttributeName,
    InvalidParameterValue,
    PurgeQueueInProgress,
    QueueNameExists,
)
from conveyor.protocols.sqs.params import (
    optional_int,
    optional_str,
    required_str,
    string_list,
    string_map,
)

PURGE_INTERVAL_MS: Final = 60_000  # AWS: one PurgeQueue per queue per 60 seconds
LIST_QUEUES_MAX: Final = 1000  # AWS: ListQueues returns at most 1,000 URLs


class QueueActions(SqsBase):
    # --- create / delete / find --------------------------------------------------------
    async def action_CreateQueue(self, params: dict[str, Any],
                                 context: RequestContext) -> dict[str, Any]:
        name = validate_queue_name(required_str(params, "QueueName"))
        fifo = is_fifo(name)
        attributes = normalise_attributes(params.get("Attributes"), fifo, creating=True)
        attributes.pop("FifoQueue", None)
        tags = string_map(params, "tags") or string_map(params, "Tags")
        if self.queue_exists(name):
            meta = self.catalog.get(name)
            current = (meta.attributes if meta is not None else attributes_from_config(
                (await self.broker.get_queue(name)).config))
            if with_defaults(current, fifo) != with_defaults(attributes, fifo):
                raise QueueNameExists("A queue already exists with the same name and a "
                                      "different value for attribute(s).")
            return {"QueueUrl": self.queue_url(name, context)}
        config = queue_config(attributes, fifo)
        self._check_dead_letter_target(name, attributes)
        await self.broker.declare_queue(name, config)
        now_s = self.broker.clock.wall_ms() // 1000
        await self.catalog.save(name, QueueMeta(attributes, tags, {}, now_s, now_s))
        return {"QueueUrl": self.queue_url(name, context)}

    def _check_dead_letter_target(self, name: str, attributes: dict[str, str]) -> None:
        text = attributes.get("RedrivePolicy")
        if not text:
            return
        target = parse_redrive(text).dead_letter_queue
        if not self.queue_exists(target) or is_fifo(target) != is_fifo(name):
            raise InvalidParameterValue(
                f"Value {text} for parameter RedrivePolicy is invalid. Reason: Dead-letter "
                "target does not exist (or is not of the same queue type).")
        meta = self.catalog.get(target)
        allow_text = meta.attributes.get("RedriveAllowPolicy") if meta else None
        if not allow_text:
            return
        try:
            allow = json.loads(allow_text)
        except ValueError:
            return
        permission = allow.get("redrivePermission", "allowAll")
        if permission == "denyAll" or (permission == "byQueue" and self.queue_arn(name)
                                       not in allow.get("sourceQueueArns", [])):
            raise InvalidParameterValue(
                f"Value {text} for parameter RedrivePolicy is invalid. Reason: the "
                "dead-letter queue's RedriveAllowPolicy does not allow this source queue.")

    async def action_DeleteQueue(self, params: dict[str, Any],
                                 context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        await self.broker.delete_queue(name)
        await self.catalog.remove(name)
        self.purged_at_ms.pop(name, None)
        self.attempts.forget_queue(name)
        return {}

    async def action_GetQueueUrl(self, params: dict[str, Any],
                                 context: RequestContext) -> dict[str, Any]:
        name = required_str(params, "QueueName")
        if not self.queue_exists(name):
            from conveyor.protocols.sqs.errors import QueueDoesNotExist

            raise QueueDoesNotExist("The specified queue does not exist.")
        return {"QueueUrl": self.queue_url(name, context)}

    async def action_ListQueues(self, params: dict[str, Any],
                                context: RequestContext) -> dict[str, Any]:
        prefix = optional_str(params, "QueueNamePrefix") or ""
        results_max = optional_int(params, "MaxResults", 1, LIST_QUEUES_MAX)
        after = _decode_token(optional_str(params, "NextToken"))
        names = sorted(info.name for info in await self.broker.list_queues()
                       if info.name.startswith(prefix) and info.name > after)
        page = names[: results_max or LIST_QUEUES_MAX]
        result: dict[str, Any] = {}
        if page:
            result["QueueUrls"] = [self.queue_url(name, context) for name in page]
        if results_max is not None and len(names) > len(page):
            result["NextToken"] = base64.urlsafe_b64encode(page[-1].encode()).decode()
        return result

    # --- attributes --------------------------------------------------------------------
    async def action_GetQueueAttributes(self, params: dict[str, Any],
                                        context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        wanted = string_list(params, "AttributeNames")
        for attribute in wanted:
            if attribute != "All" and attribute not in ALL_NAMES:
                raise InvalidAttributeName(f"Unknown Attribute {attribute}.")
        if not wanted:
            return {}
        info = await self.broker.get_queue(name)
        meta = self.catalog.get(name)
        stored = meta.attributes if meta else attributes_from_config(info.config)
        values = with_defaults(stored, is_fifo(name))
        values.update(
            QueueArn=self.queue_arn(name),
            ApproximateNumberOfMessages=str(info.ready),
            ApproximateNumberOfMessagesNotVisible=str(info.in_flight),
            ApproximateNumberOfMessagesDelayed=str(info.delayed),
            CreatedTimestamp=str(meta.created_s if meta else 0),
            LastModifiedTimestamp=str(meta.modified_s if meta else 0),
        )
        if "All" not in wanted:
            values = {key: value for key, value in values.items() if key in wanted}
        return {"Attributes": values} if values else {}

    async def action_SetQueueAttributes(self, params: dict[str, Any],
                                        context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        fifo = is_fifo(name)
        if params.get("Attributes") is None:
            from conveyor.protocols.sqs.errors import MissingParameter

            raise MissingParameter("The request must contain the parameter Attributes.")
        changes = normalise_attributes(params.get("Attributes"), fifo, creating=False)
        info = await self.broker.get_queue(name)
        meta = self.catalog.get(name) or QueueMeta(attributes_from_config(info.config))
        attributes = {**meta.attributes, **changes}
        attributes = {key: value for key, value in attributes.items() if value != "" or
                      key not in ("RedrivePolicy", "RedriveAllowPolicy", "Policy")}
        self._check_dead_letter_target(name, attributes)
        config = queue_config(attributes, fifo, info.config.partitions)
        if config != info.config:
            await self.broker.alter_queue(name, config)
        meta.attributes = attributes
        meta.modified_s = self.broker.clock.wall_ms() // 1000
        await self.catalog.save(name, meta)
        return {}

    async def action_PurgeQueue(self, params: dict[str, Any],
                                context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        now_ms = self.broker.clock.monotonic_ms()
        last_ms = self.purged_at_ms.get(name)
        if last_ms is not None and now_ms - last_ms < PURGE_INTERVAL_MS:
            raise PurgeQueueInProgress(
                f"Only one PurgeQueue operation on {name} is allowed every 60 seconds.")
        self.purged_at_ms[name] = now_ms
        await self.broker.purge_queue(name)
        return {}

    # --- tags --------------------------------------------------------------------------
    async def _meta(self, name: str) -> QueueMeta:
        meta = self.catalog.get(name)
        if meta is None:
            info = await self.broker.get_queue(name)
            meta = QueueMeta(attributes_from_config(info.config))
        return meta

    async def action_TagQueue(self, params: dict[str, Any],
                              context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        meta = await self._meta(name)
        meta.tags.update(string_map(params, "Tags"))
        if len(meta.tags) > 50:  # AWS: at most 50 tags per queue
            raise InvalidParameterValue("Too many tags added for queue " + name + ".")
        await self.catalog.save(name, meta)
        return {}

    async def action_UntagQueue(self, params: dict[str, Any],
                                context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        meta = await self._meta(name)
        for key in string_list(params, "TagKeys"):
            meta.tags.pop(key, None)
        await self.catalog.save(name, meta)
        return {}

    async def action_ListQueueTags(self, params: dict[str, Any],
                                   context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        tags = (await self._meta(name)).tags
        return {"Tags": dict(tags)} if tags else {}

    # --- dead-letter queues and move tasks ----------------------------------------------
    async def action_ListDeadLetterSourceQueues(self, params: dict[str, Any],
                                                context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        sources = sorted(info.name for info in await self.broker.list_queues()
                         if info.config.dead_letter_topic == name and info.name != name)
        return {"queueUrls": [self.queue_url(source, context) for source in sources]}

    async def action_StartMessageMoveTask(self, params: dict[str, Any],
                                          context: RequestContext) -> dict[str, Any]:
        source_arn = required_str(params, "SourceArn")
        source = self.queue_from_arn(source_arn)
        destination_arn = optional_str(params, "DestinationArn")
        destination = (None if destination_arn is None
                       else self.queue_from_arn(destination_arn))
        rate_per_s = optional_int(params, "MaxNumberOfMessagesPerSecond", 1, 500)
        if not any(info.config.dead_letter_topic == source
                   for info in await self.broker.list_queues()):
            raise InvalidParameterValue("Source queue must be configured as a Dead Letter "
                                        "Queue.")
        handle = await self.move_tasks.start(source, source_arn, destination,
                                             destination_arn, rate_per_s)
        return {"TaskHandle": handle}

    async def action_ListMessageMoveTasks(self, params: dict[str, Any],
                                          context: RequestContext) -> dict[str, Any]:
        source_arn = required_str(params, "SourceArn")
        self.queue_from_arn(source_arn)
        results_max = optional_int(params, "MaxResults", 1, 10) or 1
        return {"Results": self.move_tasks.list(source_arn, results_max)}

    async def action_CancelMessageMoveTask(self, params: dict[str, Any],
                                           context: RequestContext) -> dict[str, Any]:
        return self.move_tasks.cancel(required_str(params, "TaskHandle"))

    # --- permissions (stored; no security model yet) ------------------------------------
    async def action_AddPermission(self, params: dict[str, Any],
                                   context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        label = required_str(params, "Label")
        accounts = string_list(params, "AWSAccountIds")
        actions = string_list(params, "Actions")
        if not accounts or not actions:
            from conveyor.protocols.sqs.errors import MissingParameter

            raise MissingParameter("The request must contain AWSAccountIds and Actions.")
        meta = await self._meta(name)
        if label in meta.permissions:
            raise InvalidParameterValue(f"Value {label} for parameter Label is invalid. "
                                        "Reason: Already exists.")
        meta.permissions[label] = {"accounts": accounts, "actions": actions}
        await self.catalog.save(name, meta)
        return {}

    async def action_RemovePermission(self, params: dict[str, Any],
                                      context: RequestContext) -> dict[str, Any]:
        name = self.resolve_queue(params, context)
        label = required_str(params, "Label")
        meta = await self._meta(name)
        if meta.permissions.pop(label, None) is None:
            raise InvalidParameterValue(f"Value {label} for parameter Label is invalid. "
                                        "Reason: can't find label.")
        await self.catalog.save(name, meta)
        return {}


def _decode_token(token: str | None) -> str:
    if token is None:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, ValueError):
        raise InvalidParameterValue("Invalid NextToken value.") from None
