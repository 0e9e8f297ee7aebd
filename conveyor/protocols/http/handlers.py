"""HTTP API handlers: one ApiRequest -> broker calls -> one ApiResponse.

Owns: what each operation means in terms of the Broker facade — health, topics,
publish, ordered reads and commits, groups, exchanges — and the dispatch table.
Queues and shared groups live in shared_handlers.py (mixed into ``Handlers``).
Must not know: sockets or HTTP framing (listener.py), JSON shapes of messages
(codec.py builds them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.group_operations import GroupOperations, LocalGroups
from conveyor.broker.types import ExchangeInfo, Message
from conveyor.errors import ConveyorError, InvalidRequestError, UnavailableError
from conveyor.protocols.http.chunks import documents as in_slices
from conveyor.protocols.http.codec import (
    RELATIVE_DELAY,
    RELATIVE_TTL,
    ApiRequest,
    ApiResponse,
    error_response,
    record_document,
)
from conveyor.protocols.http.shared_handlers import (
    FETCH_LIMIT_DEFAULT,
    RequestContext,
    SharedGroupHandlers,
)

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.server.listeners import Observability

__all__ = ["Handlers", "RequestContext"]


Handler = Callable[["Handlers", ApiRequest, RequestContext], Awaitable[ApiResponse]]


class Handlers(SharedGroupHandlers):
    """Dispatch table from operation name to coroutine; one instance per listener."""

    def __init__(self, broker: Broker, openapi: Callable[[], dict[str, Any]],
                 observability: Observability | None = None) -> None:
        self.broker = broker
        self.openapi = openapi
        self.observability = observability  # the server's /metrics and /ready; None: alone
        # ordered groups: this node's coordinator; on a cluster node, each group's owner
        # (conveyor/cluster/remote_groups.py, set by the listener)
        self.groups: GroupOperations = LocalGroups(broker)
        self.closing = False

    async def handle(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        handler = _HANDLERS[request.operation]
        try:
            return await handler(self, request, context)
        except ConveyorError as error:
            return error_response(error)

    # --- health -------------------------------------------------------------------
    async def health(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        return ApiResponse(200, {"status": "ok"})

    async def ready(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        """200 when every check is "ok"; else 503 with the checks (docs/observability.md)."""
        checks = {"http": "stopping" if self.closing else "ok",
                  "shared_groups": "ok" if self.broker.shared_groups is not None else "absent"}
        if self.observability is not None:
            checks.update(self.observability.readiness())
        failing = {name: value for name, value in checks.items() if value != "ok"}
        if failing:
            raise NotReadyError("not ready", checks=checks)
        return ApiResponse(200, {"status": "ready", "checks": checks})

    async def cluster(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        """docs/cluster.md: this node's view of the nodes, leases and owners; with
        ``?lag=true`` each group's lag and each queue's backlog as well."""
        status = (self.observability.cluster_status()
                  if self.observability is not None else None)
        if status is None:
            return ApiResponse(200, {"clustered": False})
        if request.query.get("lag") and self.observability is not None:
            status["lag"] = await self.observability.cluster_lag()
        return ApiResponse(200, {"clustered": True, **status})

    async def metrics(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        if self.observability is None:
            raise UnavailableError("metrics are served by a full server, not a lone listener")
        body, content_type = await self.observability.render_metrics(context.accept)
        return ApiResponse(200, raw=body, content_type=content_type)

    async def openapi_document(
        self, request: ApiRequest, context: RequestContext
    ) -> ApiResponse:
        return ApiResponse(200, self.openapi())

    # --- topics -------------------------------------------------------------------
    def _topic_document(self, name: str, detail: bool) -> dict[str, Any]:
        info = self.broker.get_topic(name)
        document: dict[str, Any] = {"name": info.name, "kind": info.kind,
                                    "partitions": info.partitions}
        if detail:
            offsets = [self.broker.offsets(name, p) for p in range(info.partitions)]
            document["config"] = self.broker.topic_config(name)
            document["partition_offsets"] = [
                {"partition": p, "log_start_offset": o.log_start_offset,
                 "high_watermark": o.high_watermark}
                for p, o in enumerate(offsets)
            ]
            document["messages"] = sum(o.high_watermark - o.log_start_offset for o in offsets)
        return document

    async def list_topics(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        names = sorted(info.name for info in self.broker.list_topics())
        return ApiResponse(200, {"topics": [self._topic_document(n, True) for n in names]})

    async def create_topic(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        body = request.body
        info = await self.broker.create_topic(
            body["name"], body.get("partitions", 1), body.get("config") or None
        )
        return ApiResponse(201, self._topic_document(info.name, True))

    async def describe_topic(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        return ApiResponse(200, self._topic_document(request.path["topic"], True))

    async def alter_topic(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        name = request.path["topic"]
        body = request.body
        self.broker.get_topic(name)
        if "set" in body or "delete" in body:
            await self.broker.alter_topic_config(name, body.get("set"), body.get("delete", ()))
        if "partitions" in body:
            await self.broker.create_partitions(name, body["partitions"])
        return ApiResponse(200, self._topic_document(name, True))

    async def delete_topic(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        await self.broker.delete_topic(request.path["topic"])
        return ApiResponse(204)

    # --- publish ------------------------------------------------------------------
    def resolve_times(self, messages: Sequence[Message]) -> list[Message]:
        """Relative delay/TTL markers (codec) -> absolute wall-ms fields."""
        now_ms = self.broker.clock.wall_ms()
        resolved = []
        for message in messages:
            markers = {name: value for name, value in message.headers
                       if name in (RELATIVE_DELAY, RELATIVE_TTL)}
            if markers:
                delay = markers.get(RELATIVE_DELAY)
                ttl = markers.get(RELATIVE_TTL)
                message = dataclasses.replace(
                    message,
                    headers=tuple(h for h in message.headers if h[0] not in markers),
                    deliver_at_ms=now_ms + int(delay) if delay is not None else None,
                    expires_at_ms=now_ms + int(ttl) if ttl is not None else None,
                )
            resolved.append(message)
        return resolved

    async def publish(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        topic = request.path["topic"]
        messages = self.resolve_times(request.messages)
        results: list[Any] = []
        start = 0
        # consecutive messages with the same explicit partition (or none) go together
        while start < len(messages):
            partition = request.message_partitions[start]
            end = start + 1
            while end < len(messages) and request.message_partitions[end] == partition:
                end += 1
            results.extend(await self.broker.publish(topic, messages[start:end], partition))
            start = end
        return ApiResponse(200, {"results": [
            {"topic": r.topic, "partition": r.partition, "offset": r.offset,
             "duplicate": r.duplicate}
            for r in results
        ]})

    async def publish_exchange(
        self, request: ApiRequest, context: RequestContext
    ) -> ApiResponse:
        exchange = request.path["exchange"]
        await self.broker.look_up_exchange(exchange)
        routed = await self.broker.publish_to_exchange(
            exchange, request.body.get("routing_key", ""), self.resolve_times(request.messages)
        )
        return ApiResponse(200, {"routed": routed.routed, "results": [
            {"topic": r.topic, "partition": r.partition, "offset": r.offset,
             "duplicate": r.duplicate}
            for r in routed.results
        ]})

    # --- ordered reads ------------------------------------------------------------
    async def read(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        topic = request.path["topic"]
        query = request.query
        partition = query.get("partition", 0)
        offsets = self.broker.offsets(topic, partition)
        if "offset" in query:
            offset = query["offset"]
        elif "timestamp_ms" in query:
            found = await self.broker.offset_for_timestamp(topic, partition,
                                                           query["timestamp_ms"])
            offset = offsets.high_watermark if found is None else found
        else:
            offset = offsets.log_start_offset
        offset = min(offset, offsets.high_watermark)
        records = await self.broker.read_records(
            topic, partition, offset, query.get("limit", FETCH_LIMIT_DEFAULT),
            query.get("wait_ms", 0),
        )
        next_offset = records[-1].offset + 1 if records else offset
        return ApiResponse(200, {
            "messages": await in_slices(records, partial(record_document, topic, partition)),
            "next_offsets": {str(partition): next_offset},
        })

    async def _start_positions(self, topic: str, body: dict[str, Any]) -> dict[int, int]:
        info = self.broker.get_topic(topic)
        positions: dict[int, int] = {}
        explicit = body.get("offsets", {})
        group = body.get("group")
        committed = {}
        start = body.get("start", "committed" if group else "earliest")
        if group is not None and start == "committed":
            found = await self.groups.committed(
                group, [(topic, p) for p in range(info.partitions)])
            committed = {p: offset for (_, p), offset in found.items()}
        for partition in range(info.partitions):
            offsets = self.broker.offsets(topic, partition)
            if str(partition) in explicit:
                position = explicit[str(partition)]
            elif "timestamp_ms" in body:
                found_offset = await self.broker.offset_for_timestamp(
                    topic, partition, body["timestamp_ms"]
                )
                position = offsets.high_watermark if found_offset is None else found_offset
            elif partition in committed:
                position = committed[partition]
            elif start == "latest":
                position = offsets.high_watermark
            else:
                position = offsets.log_start_offset
            positions[partition] = min(max(position, offsets.log_start_offset),
                                       offsets.high_watermark)
        unknown = set(explicit) - {str(p) for p in positions}
        if unknown:
            raise InvalidRequestError("offsets name unknown partitions", partitions=sorted(unknown))
        return positions

    async def fetch(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        topic = request.path["topic"]
        body = request.body
        limit = body.get("limit", FETCH_LIMIT_DEFAULT)
        positions = await self._start_positions(topic, body)
        documents = await self._read_partitions(topic, positions, limit)
        wait_ms = body.get("wait_ms", 0)
        if not documents and wait_ms > 0:
            await self.broker.wait_for_append([(topic, p) for p in positions], wait_ms)
            documents = await self._read_partitions(topic, positions, limit)
        return ApiResponse(200, {
            "messages": documents,
            "next_offsets": {str(p): o for p, o in positions.items()},
        })

    async def _read_partitions(
        self, topic: str, positions: dict[int, int], limit: int
    ) -> list[dict[str, Any]]:
        """Read from each partition in turn (updating ``positions``) until ``limit``."""
        documents: list[dict[str, Any]] = []
        for partition, offset in positions.items():
            if len(documents) >= limit:
                break
            records = await self.broker.read_records(
                topic, partition, offset, limit - len(documents)
            )
            documents.extend(await in_slices(records, partial(record_document, topic, partition)))
            if records:
                positions[partition] = records[-1].offset + 1
        return documents

    async def committed_offsets(
        self, request: ApiRequest, context: RequestContext
    ) -> ApiResponse:
        topic, group = request.path["topic"], request.path["group"]
        info = self.broker.get_topic(topic)
        found = await self.groups.committed(group, [(topic, p) for p in range(info.partitions)])
        return ApiResponse(200, {"group": group, "topic": topic, "offsets": {
            str(p): offset for (_, p), offset in sorted(found.items())
        }})

    async def commit_offsets(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        topic, group = request.path["topic"], request.path["group"]
        info = self.broker.get_topic(topic)
        offsets: dict[tuple[str, int], int] = {}
        for text, offset in request.body["offsets"].items():
            if not text.isdigit() or int(text) >= info.partitions:
                raise InvalidRequestError("unknown partition", topic=topic, partition=text)
            offsets[(topic, int(text))] = offset
        await self.groups.commit(group, offsets)
        return await self.committed_offsets(request, context)

    # --- groups -------------------------------------------------------------------
    async def list_groups(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        groups = [
            {"group": g.group_id, "kind": "ordered", "state": g.state.value}
            for g in self.broker.list_groups()
        ]
        if self.broker.shared_groups is not None:
            for queue in await self.broker.list_queues():
                groups.append({"group": queue.name, "kind": "shared", "topic": queue.name})
        return ApiResponse(200, {"groups": groups})

    async def describe_group(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        group = request.path["group"]
        summary = await self.groups.describe(group)
        return ApiResponse(200, {
            "group": group, "state": summary.state,
            "members": summary.members,
            "total_lag": sum(lag.lag for lag in summary.partitions),
            "partitions": [
                {"topic": lag.topic, "partition": lag.partition,
                 "committed_offset": lag.committed_offset,
                 "high_watermark": lag.high_watermark, "lag": lag.lag}
                for lag in summary.partitions
            ],
        })

    async def delete_group(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        await self.groups.delete(request.path["group"])
        return ApiResponse(204)

    # --- exchanges ----------------------------------------------------------------
    def _exchange_document(self, info: ExchangeInfo, bindings: bool) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": info.name, "type": info.type, "durable": info.durable,
            "auto_delete": info.auto_delete, "internal": info.internal,
            "alternate_exchange": info.alternate_exchange, "arguments": dict(info.arguments),
        }
        if bindings:
            document["bindings"] = [
                {"source": b.source, "destination_kind": b.destination_kind,
                 "destination": b.destination, "routing_key": b.routing_key,
                 "arguments": dict(b.arguments)}
                for b in self.broker.list_bindings(source=info.name)
            ]
        return document

    async def list_exchanges(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        return ApiResponse(200, {"exchanges": [
            self._exchange_document(info, False) for info in self.broker.list_exchanges()
        ]})

    async def create_exchange(
        self, request: ApiRequest, context: RequestContext
    ) -> ApiResponse:
        body = request.body
        info = await self.broker.declare_exchange(
            body["name"], body["type"], body.get("durable", True), body.get("auto_delete", False),
            body.get("internal", False), body.get("alternate_exchange"), body.get("arguments"),
        )
        return ApiResponse(201, self._exchange_document(info, True))

    async def describe_exchange(
        self, request: ApiRequest, context: RequestContext
    ) -> ApiResponse:
        info = await self.broker.look_up_exchange(request.path["exchange"])
        return ApiResponse(200, self._exchange_document(info, True))

    async def delete_exchange(
        self, request: ApiRequest, context: RequestContext
    ) -> ApiResponse:
        await self.broker.delete_exchange(request.path["exchange"])
        return ApiResponse(204)

    async def bind(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        body = request.body
        source = request.path["exchange"]
        await self.broker.look_up_exchange(source)
        binding = await self.broker.bind(
            source, body["destination_kind"], body["destination"],
            body.get("routing_key", ""), body.get("arguments"),
        )
        return ApiResponse(201, {
            "source": binding.source, "destination_kind": binding.destination_kind,
            "destination": binding.destination, "routing_key": binding.routing_key,
            "arguments": dict(binding.arguments),
        })

    async def unbind(self, request: ApiRequest, context: RequestContext) -> ApiResponse:
        body = request.body
        source = request.path["exchange"]
        await self.broker.look_up_exchange(source)
        await self.broker.unbind(
            source, body["destination_kind"], body["destination"],
            body.get("routing_key", ""), body.get("arguments"),
        )
        return ApiResponse(204)


_HANDLERS: Final[dict[str, Handler]] = {
    "health": Handlers.health,
    "ready": Handlers.ready,
    "openapi": Handlers.openapi_document,
    "metrics": Handlers.metrics,
    "cluster": Handlers.cluster,
    "list_topics": Handlers.list_topics,
    "create_topic": Handlers.create_topic,
    "describe_topic": Handlers.describe_topic,
    "alter_topic": Handlers.alter_topic,
    "delete_topic": Handlers.delete_topic,
    "publish": Handlers.publish,
    "read": Handlers.read,
    "fetch": Handlers.fetch,
    "committed_offsets": Handlers.committed_offsets,
    "commit_offsets": Handlers.commit_offsets,
    "create_shared_group": Handlers.create_shared_group,
    "acquire": Handlers.acquire,
    "ack": Handlers.ack,
    "release": Handlers.release,
    "extend": Handlers.extend,
    "dlq": Handlers.dlq,
    "redrive": Handlers.redrive,
    "list_groups": Handlers.list_groups,
    "describe_group": Handlers.describe_group,
    "delete_group": Handlers.delete_group,
    "list_queues": Handlers.list_queues,
    "create_queue": Handlers.create_queue,
    "describe_queue": Handlers.describe_queue,
    "delete_queue": Handlers.delete_queue,
    "list_exchanges": Handlers.list_exchanges,
    "create_exchange": Handlers.create_exchange,
    "describe_exchange": Handlers.describe_exchange,
    "delete_exchange": Handlers.delete_exchange,
    "bind": Handlers.bind,
    "unbind": Handlers.unbind,
    "publish_exchange": Handlers.publish_exchange,
}


class NotReadyError(UnavailableError):
    """A readiness check failed: 503 with every check in ``details.checks``."""

    code = "not_ready"
