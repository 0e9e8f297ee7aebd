"""The HTTP API's route table: every operation, its path, parameters and schemas.

Owns: the single list (``ROUTES``) that the codec matches requests against and
that openapi.py turns into /openapi.json, so the two cannot disagree.
Must not know: the broker, sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from conveyor.protocols.http import schemas as s
from conveyor.protocols.http.schemas import Schema


@dataclass(frozen=True, slots=True)
class Route:
    operation: str
    method: str
    template: str  # "/topics/{topic}/messages"
    summary: str
    tag: str
    response: Schema | None  # None: 204 No Content
    status: int = 200
    body: Schema | None = None
    body_required: bool = False
    binary_body: bool = False  # application/octet-stream accepted beside JSON
    query: dict[str, Schema] = field(default_factory=dict)
    segments: tuple[str, ...] = ()
    # media types of the success body (a non-JSON route's handler returns bytes)
    content_types: tuple[str, ...] = ("application/json",)

    @property
    def parameters(self) -> list[str]:
        return [part[1:-1] for part in self.segments if part.startswith("{")]


def _route(
    operation: str, method: str, template: str, summary: str, tag: str,
    response: Schema | None, **extra: object,
) -> Route:
    segments = tuple(template.strip("/").split("/"))
    return Route(operation, method, template, summary, tag, response,
                 segments=segments, **extra)  # type: ignore[arg-type]


_INT: Final = {"type": "integer", "minimum": 0, "maximum": 1 << 62}
_READ_QUERY: Final = {
    "partition": {"type": "integer", "minimum": 0, "maximum": 1 << 20},
    "offset": _INT,
    "timestamp_ms": {"type": "integer", "minimum": 0, "maximum": 1 << 53},
    "limit": {"type": "integer", "minimum": 1, "maximum": s.RECORDS_PER_FETCH_MAX},
    "wait_ms": {"type": "integer", "minimum": 0, "maximum": s.WAIT_MS_MAX},
}
_GROUP = "/topics/{topic}/groups/{group}"

ROUTES: Final[tuple[Route, ...]] = (
    _route("health", "GET", "/health", "Liveness", "health", s.STATUS_OUT),
    _route("ready", "GET", "/ready", "Readiness (503 while not ready)", "health", s.STATUS_OUT),
    _route("cluster", "GET", "/cluster",
           "Nodes, leases, partition and group owners (lag=true: group lag, queue backlog)",
           "health", {"type": "object"}, query={"lag": {"type": "boolean"}}),
    _route("openapi", "GET", "/openapi.json", "This document", "health", {"type": "object"}),
    # observability: Prometheus exposition (docs/observability.md)
    _route("metrics", "GET", "/metrics",
           "Prometheus metrics: text format 0.0.4, or OpenMetrics 1.0 when Accept asks",
           "health", {"type": "string"},
           content_types=("text/plain", "application/openmetrics-text")),
    # topics
    _route("list_topics", "GET", "/topics", "List topics", "topics", s.TOPIC_LIST),
    _route("create_topic", "POST", "/topics", "Create a topic", "topics", s.TOPIC_OUT,
           status=201, body=s.TOPIC_CREATE, body_required=True),
    _route("describe_topic", "GET", "/topics/{topic}", "Describe a topic", "topics", s.TOPIC_OUT),
    _route("alter_topic", "PATCH", "/topics/{topic}", "Change config or add partitions",
           "topics", s.TOPIC_OUT, body=s.TOPIC_CONFIG_BODY, body_required=True),
    _route("delete_topic", "DELETE", "/topics/{topic}", "Delete a topic", "topics", None,
           status=204),
    _route("publish", "POST", "/topics/{topic}/messages",
           "Publish one message (raw body) or a batch (JSON)", "messages", s.PUBLISH_RESULT,
           body=s.PUBLISH_BODY, body_required=True, binary_body=True),
    _route("read", "GET", "/topics/{topic}/messages",
           "Read one partition from an offset or a timestamp (replay)", "messages",
           s.MESSAGES_OUT, query=_READ_QUERY),
    _route("fetch", "POST", "/topics/{topic}/fetch",
           "Ordered read across partitions from positions, a timestamp or a group's commits",
           "messages", s.MESSAGES_OUT, body=s.FETCH_BODY),
    _route("create_shared_group", "POST", _GROUP,
           "Create a shared group on a topic (else made on first acquire)", "groups",
           s.SHARED_GROUP_OUT, status=201, body=s.SHARED_GROUP_CREATE),
    _route("committed_offsets", "GET", _GROUP + "/offsets", "An ordered group's commits",
           "groups", s.COMMITTED),
    _route("commit_offsets", "POST", _GROUP + "/offsets", "Commit ordered-group offsets",
           "groups", s.COMMITTED, body=s.COMMIT_BODY, body_required=True),
    _route("acquire", "POST", _GROUP + "/acquire",
           "Shared group: ack the receipts in 'ack' (if any), then acquire messages "
           "(long-poll), locked until acked or released",
           "messages", s.ACQUIRE_OUT, body=s.ACQUIRE_BODY),
    _route("ack", "POST", _GROUP + "/ack", "Acknowledge deliveries", "messages",
           s.RECEIPT_RESULTS, body=s.ACK_BODY, body_required=True),
    _route("release", "POST", _GROUP + "/release", "Release deliveries (optionally delayed)",
           "messages", s.RECEIPT_RESULTS, body=s.RELEASE_BODY, body_required=True),
    _route("extend", "POST", _GROUP + "/extend", "Extend the lock of deliveries", "messages",
           s.RECEIPT_RESULTS, body=s.EXTEND_BODY, body_required=True),
    _route("dlq", "GET", _GROUP + "/dlq", "Messages in the group's dead-letter topic",
           "dlq", s.MESSAGES_OUT,
           query={"offset": _INT, "limit": _READ_QUERY["limit"]}),
    _route("redrive", "POST", _GROUP + "/dlq/redrive",
           "Move dead-lettered messages back to the topic", "dlq", s.REDRIVE_OUT,
           body=s.REDRIVE_BODY),
    # groups
    _route("list_groups", "GET", "/groups", "List ordered and shared groups", "groups",
           s.GROUP_LIST),
    _route("describe_group", "GET", "/groups/{group}", "An ordered group's state and lag",
           "groups", s.LAG_OUT),
    _route("delete_group", "DELETE", "/groups/{group}", "Delete an empty ordered group",
           "groups", None, status=204),
    # queues
    _route("list_queues", "GET", "/queues", "List queues", "queues", s.QUEUE_LIST),
    _route("create_queue", "POST", "/queues", "Declare a queue", "queues", s.QUEUE_OUT,
           status=201, body=s.QUEUE_CREATE, body_required=True),
    _route("describe_queue", "GET", "/queues/{queue}", "Describe a queue", "queues",
           s.QUEUE_OUT),
    _route("delete_queue", "DELETE", "/queues/{queue}", "Delete a queue", "queues", None,
           status=204),
    # exchanges
    _route("list_exchanges", "GET", "/exchanges", "List exchanges", "exchanges",
           s.EXCHANGE_LIST),
    _route("create_exchange", "POST", "/exchanges", "Declare an exchange", "exchanges",
           s.EXCHANGE_OUT, status=201, body=s.EXCHANGE_CREATE, body_required=True),
    _route("describe_exchange", "GET", "/exchanges/{exchange}",
           "An exchange and its bindings", "exchanges", s.EXCHANGE_OUT),
    _route("delete_exchange", "DELETE", "/exchanges/{exchange}", "Delete an exchange",
           "exchanges", None, status=204),
    _route("bind", "POST", "/exchanges/{exchange}/bindings", "Bind a destination",
           "exchanges", s.BINDING, status=201, body=s.BINDING, body_required=True),
    _route("unbind", "POST", "/exchanges/{exchange}/unbind", "Remove a binding", "exchanges",
           None, status=204, body=s.BINDING, body_required=True),
    _route("publish_exchange", "POST", "/exchanges/{exchange}/messages",
           "Publish through an exchange", "messages", s.PUBLISH_RESULT,
           body=s.EXCHANGE_PUBLISH_BODY, body_required=True),
)
