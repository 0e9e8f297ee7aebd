"""Conveyor's own management routes under ``/api/conveyor/`` (what the web UI needs
beyond RabbitMQ's API): the rate history, topics with offsets and retention,
bounded browsing of queues, dead letters and topics, consumer groups with their
members and lag.

Owns: those routes and the *bounded preview* of a message: at most
``PREVIEW_BYTES`` of a value as text (or hex when it is not UTF-8), at most
``HEADERS_SHOWN_MAX`` headers of ``HEADER_CHARS_MAX`` characters, and the full
size beside it, so a 100 MiB or binary body never reaches the browser whole.
Errors use Conveyor's error shape (``{"error": {"code", "message", "details"}}``).
Must not know: sockets, HTTP framing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.delivery import dead_letter_topic
from conveyor.broker.queue_browse import BROWSE_RECORDS_MAX, browse_queue
from conveyor.errors import InvalidRequestError, NotFoundError, UnknownQueueError
from conveyor.protocols.http.codec import ApiResponse

if TYPE_CHECKING:
    from conveyor.broker.types import Headers
    from conveyor.protocols.http.management_host import ManagementHost

PREVIEW_BYTES: Final = 4096
HEX_PREVIEW_BYTES: Final = 512
HEADERS_SHOWN_MAX: Final = 50
HEADER_CHARS_MAX: Final = 256
LIMIT_DEFAULT: Final = 50
ASSIGNMENT_TOPICS_MAX: Final = 10_000


class UnknownRouteError(NotFoundError):
    code = "route_not_found"


def _text_preview(data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {"bytes": 0, "null": True, "text": None, "truncated": False, "binary": False}
    head = data[:PREVIEW_BYTES]
    truncated = len(data) > len(head)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        # a cut through a multi-byte character at the end is still text
        if truncated and error.start >= len(head) - 3:
            text = head[:error.start].decode("utf-8", "replace")
        else:
            return {"bytes": len(data), "binary": True, "text": None,
                    "hex": data[:HEX_PREVIEW_BYTES].hex(" "),
                    "truncated": len(data) > HEX_PREVIEW_BYTES}
    return {"bytes": len(data), "binary": False, "text": text, "truncated": truncated}


def _headers_preview(headers: Headers) -> dict[str, Any]:
    shown: dict[str, str | None] = {}
    for name, value in headers[:HEADERS_SHOWN_MAX]:
        text = None if value is None else value[:HEADER_CHARS_MAX * 4].decode(
            "utf-8", "replace")[:HEADER_CHARS_MAX]
        shown[name[:HEADER_CHARS_MAX]] = text
    return {"headers": shown, "headers_total": len(headers)}


def message_preview(record: Any, **extra: Any) -> dict[str, Any]:
    return {"offset": record.offset, "timestamp_ms": record.timestamp_ms,
            "key": _text_preview(record.key), "value": _text_preview(record.value),
            **_headers_preview(record.headers), **extra}


def _integer(query: Mapping[str, str], name: str, default: int | None, maximum: int) -> int | None:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or int(text) > maximum:
        raise InvalidRequestError(f"{name} must be an integer 0..{maximum}", parameter=name)
    return int(text)


def parse_consumer_assignment(data: bytes) -> list[tuple[str, list[int]]]:
    """Kafka's ConsumerProtocolAssignment (version, [topic, [partition]], user data);
    [] when it is not one (another protocol type's bytes)."""
    try:
        position = 2  # int16 version
        (topics,) = struct.unpack_from(">i", data, position)
        position += 4
        if not 0 <= topics <= ASSIGNMENT_TOPICS_MAX:
            return []
        assigned = []
        for _ in range(topics):
            (length,) = struct.unpack_from(">h", data, position)
            position += 2
            if length < 0 or position + length > len(data):
                return []
            name = data[position:position + length].decode("utf-8")
            position += length
            (count,) = struct.unpack_from(">i", data, position)
            position += 4
            if not 0 <= count <= (len(data) - position) // 4:
                return []
            partitions = list(struct.unpack_from(f">{count}i", data, position))
            position += 4 * count
            assigned.append((name, partitions))
        return assigned
    except (struct.error, UnicodeDecodeError):
        return []


class ConveyorExtensions:
    def __init__(self, api: ManagementHost) -> None:
        self.api = api
        self.broker = api.broker
        self.routes: dict[tuple[str, ...], Callable[..., Any]] = {
            ("history",): self.history,
            ("topics",): self.topics,
            ("topics", "*", "browse"): self.browse_topic,
            ("queues", "*", "browse"): self.browse_queue,
            ("queues", "*", "dead-letters"): self.dead_letters,
            ("groups",): self.groups,
            ("groups", "*"): self.group,
        }

    async def dispatch(self, method: str, parts: list[str], query: dict[str, str],
                       body: Any) -> ApiResponse:
        names = [part for part in parts if part]
        for pattern, handler in self.routes.items():
            if len(pattern) == len(names) and all(
                    p == "*" or p == n for p, n in zip(pattern, names, strict=True)):
                if method != "GET":
                    return ApiResponse(405, {"error": {"code": "method_not_allowed",
                                                       "message": "only GET", "details": {}}})
                arguments = [n for p, n in zip(pattern, names, strict=True) if p == "*"]
                result: ApiResponse = await handler(query, *arguments)
                return result
        raise UnknownRouteError("no such route", path="/api/conveyor/" + "/".join(names))

    async def history(self, query: dict[str, str]) -> ApiResponse:
        samples = _integer(query, "samples", 300, 600) or 300
        return ApiResponse(200, {"interval_ms": self.api.sampler.interval_ms,
                                 "series": self.api.sampler.history(samples)})

    async def topics(self, query: dict[str, str]) -> ApiResponse:
        documents = []
        for info in self.broker.list_topics():
            offsets = [self.broker.offsets(info.name, p) for p in range(info.partitions)]
            publish_rate, deliver_rate = self.api.sampler.rates(info.name)
            documents.append({
                "name": info.name, "kind": info.kind, "partitions": info.partitions,
                "retention_ms": info.config.retention_ms,
                "retention_bytes": info.config.retention_bytes,
                "cleanup_policy": info.config.cleanup_policy,
                "messages": sum(o.high_watermark - o.log_start_offset for o in offsets),
                "publish_rate": publish_rate, "deliver_rate": deliver_rate,
                "partition_offsets": [
                    {"partition": p, "log_start_offset": o.log_start_offset,
                     "high_watermark": o.high_watermark} for p, o in enumerate(offsets)],
            })
        return ApiResponse(200, {"topics": documents})

    async def browse_topic(self, query: dict[str, str], topic: str) -> ApiResponse:
        info = self.broker.get_topic(topic)
        partition = _integer(query, "partition", 0, info.partitions - 1) or 0
        limit = _integer(query, "limit", LIMIT_DEFAULT, BROWSE_RECORDS_MAX) or LIMIT_DEFAULT
        offsets = self.broker.offsets(topic, partition)
        offset = _integer(query, "offset", None, 1 << 62)
        timestamp_ms = _integer(query, "timestamp_ms", None, 1 << 53)
        if offset is None and timestamp_ms is not None:
            found = await self.broker.offset_for_timestamp(topic, partition, timestamp_ms)
            offset = offsets.high_watermark if found is None else found
        if offset is None:
            offset = max(offsets.log_start_offset, offsets.high_watermark - limit)
        offset = min(max(offset, offsets.log_start_offset), offsets.high_watermark)
        records = await self.broker.read_records(topic, partition, offset, limit)
        return ApiResponse(200, {
            "topic": topic, "partition": partition, "offset": offset,
            "log_start_offset": offsets.log_start_offset,
            "high_watermark": offsets.high_watermark,
            "next_offset": records[-1].offset + 1 if records else offset,
            "messages": [message_preview(r, partition=partition) for r in records[:limit]],
        })

    async def browse_queue(self, query: dict[str, str], queue: str) -> ApiResponse:
        shared = self.broker.shared_groups
        if shared is None or not shared.queue_exists(queue):
            raise UnknownQueueError("unknown queue", queue=queue)
        limit = _integer(query, "limit", LIMIT_DEFAULT, BROWSE_RECORDS_MAX) or LIMIT_DEFAULT
        records = await browse_queue(shared, queue, limit)
        return ApiResponse(200, {"queue": queue, "messages": [
            message_preview(r, partition=r.partition, state=r.state,
                            delivery_count=r.delivery_count) for r in records]})

    async def dead_letters(self, query: dict[str, str], queue: str) -> ApiResponse:
        info = await self.broker.get_queue(queue)
        shared = self.broker.shared_groups
        name = dead_letter_topic(queue, info.config)
        limit = _integer(query, "limit", LIMIT_DEFAULT, BROWSE_RECORDS_MAX) or LIMIT_DEFAULT
        if name is None or shared is None or not shared.queue_exists(name):
            return ApiResponse(200, {"queue": queue, "dead_letter_queue": name,
                                     "count": 0, "messages": []})
        records = await browse_queue(shared, name, limit)
        count = (await self.broker.get_queue(name)).ready
        return ApiResponse(200, {"queue": queue, "dead_letter_queue": name, "count": count,
                                 "messages": [message_preview(r, partition=r.partition)
                                              for r in records]})

    async def groups(self, query: dict[str, str]) -> ApiResponse:
        ordered = []
        for listing in self.broker.list_groups():
            lags = self.broker.group_lag(listing.group_id)
            description = self.broker.describe_group(listing.group_id)
            ordered.append({"group": listing.group_id, "kind": "ordered",
                            "state": listing.state.value, "members": len(description.members),
                            "topics": sorted({lag.topic for lag in lags}),
                            "total_lag": sum(lag.lag for lag in lags)})
        shared_groups = []
        shared = self.broker.shared_groups
        if shared is not None:
            for (group, topic) in sorted(shared.delivered_totals()):
                if group == topic and shared.queue_exists(topic):
                    continue  # a queue: on the queues page
                shared_groups.append({"group": group, "kind": "shared", "topic": topic})
        return ApiResponse(200, {"groups": ordered + shared_groups})

    async def group(self, query: dict[str, str], group: str) -> ApiResponse:
        description = self.broker.describe_group(group)
        lags = self.broker.group_lag(group)
        members = []
        for member in description.members:
            if description.protocol_type == "consumer":
                assignment = parse_consumer_assignment(member.assignment)
            else:
                pairs = self.broker.decode_server_assignment(member.assignment) \
                    if member.assignment else []
                grouped: dict[str, list[int]] = {}
                for topic, partition in pairs:
                    grouped.setdefault(topic, []).append(partition)
                assignment = sorted(grouped.items())
            members.append({"member_id": member.member_id, "client_id": member.client_id,
                            "client_host": member.client_host,
                            "assignment": [{"topic": t, "partitions": p}
                                           for t, p in assignment]})
        return ApiResponse(200, {
            "group": group, "state": description.state.value,
            "protocol_type": description.protocol_type, "protocol": description.protocol_name,
            "generation": description.generation, "members": members,
            "total_lag": sum(lag.lag for lag in lags),
            "partitions": [{"topic": lag.topic, "partition": lag.partition,
                            "committed_offset": lag.committed_offset,
                            "high_watermark": lag.high_watermark, "lag": lag.lag}
                           for lag in lags],
        })
