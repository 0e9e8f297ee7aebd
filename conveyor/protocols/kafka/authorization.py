"""Kafka authorization: one connection's principal checked against the security model
per resource, and the error answers Kafka gives when a check fails.

Owns: ``Access`` (the checks a handler asks: may this principal WRITE topic t?), the
Kafka operation -> model action mapping, and ``refusal``, a response of any API whose
error fields carry one code (GROUP_AUTHORIZATION_FAILED, CLUSTER_AUTHORIZATION_FAILED).

Mapping (Kafka's AclAuthorizer operations -> the model's actions, conveyor/security/api.py):
- Produce: WRITE on the topic; Fetch, ListOffsets, OffsetCommit: READ / DESCRIBE on
  the topic; Metadata: DESCRIBE on each topic (a topic listing leaves out what the
  principal may not describe; a topic named explicitly answers
  TOPIC_AUTHORIZATION_FAILED); auto-creation from Metadata and CreateTopics,
  DeleteTopics, CreatePartitions: CREATE / DELETE / ALTER = configure on the topic.
- JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit, OffsetFetch: READ on the group.
- CreateAcls, DeleteAcls, AlterUserScramCredentials: ALTER on the cluster (configure);
  DescribeAcls, DescribeUserScramCredentials: DESCRIBE on the cluster.
Kafka has no vhosts: its listener acts in the default vhost ``/``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import OperatingError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, nested
from conveyor.security.api import ACL_CLUSTER_NAME, Action

if TYPE_CHECKING:
    from conveyor.security.api import Principal, SecurityModel

# classic group APIs, OffsetDelete, KIP-848 and KIP-932 heartbeats, share fetch/ack/offsets
GROUP_API_KEYS: Final = frozenset({8, 9, 11, 12, 13, 14, 47, 68, 76, 78, 79, 90, 91, 92})


class TopicAuthorizationError(OperatingError):
    """A topic the principal may not use (answered as TOPIC_AUTHORIZATION_FAILED)."""

    code = "topic_authorization_failed"
    http_status = 403


class Access:
    """The checks of one request, for one principal in one vhost."""

    __slots__ = ("principal", "security", "vhost")

    def __init__(self, security: SecurityModel, principal: Principal, vhost: str) -> None:
        self.security = security
        self.principal = principal
        self.vhost = vhost

    def topic(self, action: Action, name: str) -> bool:
        return self.security.check(self.principal, self.vhost, action, "topic", name)

    def group(self, name: str) -> bool:
        return self.security.check(self.principal, self.vhost, "read", "group", name)

    def cluster(self, action: Action) -> bool:
        return self.security.check(self.principal, self.vhost, action, "cluster",
                                   ACL_CLUSTER_NAME)


TOPIC_RESOURCE: Final = 2  # ConfigResource type TOPIC
# API -> (action, how its body names topics). Whole-request refusal when any is denied.
_TOPIC_NAMES: Final[dict[int, tuple[Action, Callable[[Any], list[Any]]]]] = {
    21: ("configure", lambda body: [topic.name for topic in body.topics]),  # DeleteRecords
    37: ("configure", lambda body: [topic.name for topic in body.topics]),  # CreatePartitions
    32: ("describe", lambda body: [resource.resource_name for resource in body.resources
                                   if resource.resource_type == TOPIC_RESOURCE]),
    33: ("configure", lambda body: [resource.resource_name for resource in body.resources
                                    if resource.resource_type == TOPIC_RESOURCE]),
    44: ("configure", lambda body: [resource.resource_name for resource in body.resources
                                    if resource.resource_type == TOPIC_RESOURCE]),
    47: ("read", lambda body: [topic.name for topic in body.topics]),  # OffsetDelete
    78: ("read", lambda body: [topic.topic_id for topic in body.topics]),  # ShareFetch (ids)
    79: ("read", lambda body: [topic.topic_id for topic in body.topics]),  # ShareAcknowledge
}


def topics_denied(api_key: int, body: Any, access: Access,
                  name_for_id: Callable[[Any], str | None]) -> bool:
    """Whether a request of the admin or share APIs names a topic the principal may not
    act on (those answer with one refusal; Produce, Fetch, Metadata, CreateTopics and
    DeleteTopics answer per topic in their handlers)."""
    entry = _TOPIC_NAMES.get(api_key)
    if entry is None:
        return False
    action, names = entry
    for name in names(body):
        if not isinstance(name, str):
            name = name_for_id(name)  # a topic id (KIP-516): unknown ids are the handler's
            if name is None:
                continue
        if not access.topic(action, name):
            return True
    return False


def group_of(api_key: int, body: Any) -> str | None:
    """The group a group API names (None for OffsetFetch v8+, which names several)."""
    group = getattr(body, "group_id", None)
    if api_key == 9 and group is None:
        return None
    return str(group) if group is not None else None


def default_value(item: dataclasses.Field[Any], code: int) -> Any:
    """The empty value of a response field (``code`` for an error code)."""
    kafka_type = item.metadata.get("kafka_type")
    if kafka_type == "error_code":
        return error_codes.code(code)
    if kafka_type in ("timedelta_i32", "timedelta_i64"):
        return datetime.timedelta(0)
    if kafka_type == "string":
        return None if item.name == "error_message" else ""
    if kafka_type == "bytes":
        return b""
    if kafka_type == "bool":
        return False
    if kafka_type in ("int8", "int16", "int32", "int64"):
        return -1
    if kafka_type == "datetime_i64":
        return None
    if kafka_type == "uuid":
        return None
    return ()  # arrays of nested entities: none


def refusal(api_key: int, api_version: int, code: int, message: str | None = None) -> Any:
    """A response of the API carrying ``code`` in its top-level error field and nothing
    else (for APIs whose answer is one error: JoinGroup, SyncGroup, Heartbeat, ...)."""
    cls = response_class(api_key, api_version)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        has_default = (item.default is not dataclasses.MISSING
                       or item.default_factory is not dataclasses.MISSING)
        if item.name == "error_message" and message is not None:
            values[item.name] = message
        elif not has_default or item.metadata.get("kafka_type") == "error_code":
            values[item.name] = default_value(item, code)
    return cls(**values)


def offset_commit_refusal(api_version: int, body: Any, code: int) -> Any:
    """OffsetCommit answers per partition: every partition gets ``code``."""
    response_type = response_class(8, api_version)
    topic_type = nested(response_type, "OffsetCommitResponseTopic")
    partition_type = nested(response_type, "OffsetCommitResponsePartition")
    topics = tuple(
        build(topic_type, name=topic.name, partitions=tuple(
            build(partition_type, partition_index=partition.partition_index, error_code=code)
            for partition in topic.partitions))
        for topic in body.topics)
    return build(response_type, topics=topics)
