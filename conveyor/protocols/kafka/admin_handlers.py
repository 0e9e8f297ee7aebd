"""Handlers for cluster metadata and administration.

Owns: Metadata, FindCoordinator, DescribeCluster, InitProducerId, CreateTopics,
DeleteTopics, CreatePartitions, DescribeConfigs, AlterConfigs and
IncrementalAlterConfigs: typed request -> ``Broker`` call -> kio response.

Conveyor is one node (or, later, nodes behind one address): every partition's
leader, every group's coordinator and the controller is this listener's node,
advertised at ``advertised_host:port``. Topic ids are derived from the name
(uuid5) so they are stable and never zero; Conveyor serves no API version
that addresses topics by id.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker.topics import config_to_mapping
from conveyor.broker.types import TopicConfig, TopicInfo
from conveyor.errors import InvalidConfigError, OperatingError, UnknownTopicError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.authorization import TopicAuthorizationError
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.config_catalog import (
    GROUP_DOCUMENTATION,
    LIST,
    SOURCE_DEFAULT,
    SOURCE_GROUP,
    STRING,
    TOPIC_CONFIGS,
    BrokerFacts,
    ConfigEntry,
    broker_entries,
    fixed_topic_entries,
    group_type,
    topic_entry,
)
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, millis, nested

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.broker.group_configs import GroupConfigs
    from conveyor.protocols.kafka.authorization import Access
    from conveyor.protocols.kafka.cluster_routing import KafkaCluster
RESOURCE_TOPIC: Final = 2
RESOURCE_BROKER: Final = 4
RESOURCE_GROUP: Final = 32
OPERATION_SET: Final = 0
OPERATION_DELETE: Final = 1
OPERATION_APPEND: Final = 2
OPERATION_SUBTRACT: Final = 3
AUTHORIZED_OPERATIONS_OMITTED: Final = -(2**31)
_TOPIC_ID_NAMESPACE: Final = uuid.UUID("6f2c4d0e-8a5b-4c3f-9e21-c0ffee000001")
_DEFAULT_CONFIG: Final = config_to_mapping(TopicConfig())


@dataclass(frozen=True, slots=True)
class Node:
    node_id: int
    host: str
    port: int
    cluster_id: str


def topic_id(name: str) -> uuid.UUID:
    return uuid.uuid5(_TOPIC_ID_NAMESPACE, name)


def _name_for_id(broker: Broker, identifier: uuid.UUID | None) -> str | None:
    if identifier is None or identifier.int == 0:
        return None
    for info in broker.list_topics():
        if topic_id(info.name) == identifier:
            return info.name
    return None


def _code(error: OperatingError) -> int:
    return error_codes.error_code_for(error)


# --- metadata ----------------------------------------------------------------------------
# Names Kafka brokers keep their own state under. Conveyor keeps offsets, transactions and
# share-group state in its state store, so it neither lists these nor lets a Kafka client
# create them (auto-created by a Metadata lookup, or by CreateTopics): a tool that reads
# __consumer_offsets to compute lag would take an empty or user-made topic for "no
# commits". docs/kafka.md, "Internal topics".
KAFKA_INTERNAL_TOPICS: Final = frozenset({
    "__consumer_offsets", "__transaction_state", "__share_group_state"})


def _brokers(node: Node, cluster: KafkaCluster | None) -> list[tuple[int, str, int]]:
    """(id, host, port) of every node clients may talk to: this one, or every live one."""
    if cluster is None:
        return [(node.node_id, node.host, node.port)]
    found = cluster.kafka_nodes()
    if all(node_id != node.node_id for node_id, _, _ in found):
        found.append((node.node_id, node.host, node.port))
    return sorted(found)


def _leader(node: Node, cluster: KafkaCluster | None, topic: str,
            partition: int) -> tuple[int, int]:
    if cluster is None:
        return node.node_id, 0
    return cluster.partition_leader(topic, partition)


async def _requested_infos(broker: Broker, requested: Any, access: Access | None,
                           allow_create: bool) -> list[TopicInfo | tuple[str, OperatingError]]:
    """The topics a Metadata request names (by name or id), each its info or its error;
    a name the principal may create is created when the broker auto-creates topics."""
    infos: list[TopicInfo | tuple[str, OperatingError]] = []
    for item in requested:
        name = item.name
        if name is None:  # a lookup by topic id (KIP-516), as share consumers send
            name = _name_for_id(broker, getattr(item, "topic_id", None))
            if name is None:
                infos.append(("", UnknownTopicError("unknown topic id")))
                continue
            try:
                infos.append(broker.get_topic(name))
            except OperatingError as error:
                infos.append((name, error))
            continue
        if access is not None and not access.topic("describe", name):
            infos.append((name, TopicAuthorizationError("not authorized", topic=name)))
            continue
        create = allow_create and name not in KAFKA_INTERNAL_TOPICS and (
            access is None or access.topic("configure", name))
        try:  # ensure_topic creates only when the broker's auto_create_topics allows
            infos.append(await broker.ensure_topic(name) if create
                         else broker.get_topic(name))
        except OperatingError as error:
            infos.append((name or "", error))
    return infos


async def handle_metadata(broker: Broker, node: Node, request: Request,
                          access: Access | None = None,
                          cluster: KafkaCluster | None = None) -> Any:
    body = request.body
    version = request.header.api_version
    response_type = response_class(3, version)
    requested = body.topics
    if requested is not None and version == 0 and len(requested) == 0:
        requested = None  # v0: an empty list means every topic
    allow_create = getattr(body, "allow_auto_topic_creation", True)
    topic_type = nested(response_type, "MetadataResponseTopic")
    partition_type = nested(response_type, "MetadataResponsePartition")
    broker_type = nested(response_type, "MetadataResponseBroker")
    topics = []
    if cluster is not None and requested is not None and any(
            item.name is not None and broker.topics.find(item.name) is None
            for item in requested):
        await cluster.refresh_catalog()  # made on another node? (before auto-creating it)
    if requested is None:  # a listing leaves out what the principal may not describe
        infos: list[TopicInfo | tuple[str, OperatingError]] = [
            info for info in broker.list_topics()
            if access is None or access.topic("describe", info.name)]
    else:
        infos = await _requested_infos(broker, requested, access, allow_create)
    for info in infos:
        if isinstance(info, tuple):
            name, failure = info
            topics.append(build(topic_type, error_code=_code(failure), name=name,
                                topic_id=uuid.UUID(int=0), is_internal=False, partitions=()))
            continue
        leaders = [_leader(node, cluster, info.name, index) for index in range(info.partitions)]
        partitions = tuple(
            build(partition_type,
                  error_code=(error_codes.NONE if leader >= 0
                              else error_codes.LEADER_NOT_AVAILABLE),
                  partition_index=index, leader_id=leader, leader_epoch=epoch,
                  replica_nodes=(leader,) if leader >= 0 else (),
                  isr_nodes=(leader,) if leader >= 0 else (), offline_replicas=())
            for index, (leader, epoch) in enumerate(leaders)
        )
        topics.append(build(topic_type, error_code=error_codes.NONE, name=info.name,
                            topic_id=topic_id(info.name), is_internal=False,
                            partitions=partitions,
                            topic_authorized_operations=AUTHORIZED_OPERATIONS_OMITTED))
    brokers = tuple(build(broker_type, node_id=node_id, host=host, port=port, rack=None)
                    for node_id, host, port in _brokers(node, cluster))
    return build(response_type, brokers=brokers, cluster_id=node.cluster_id,
                 controller_id=brokers[0].node_id, topics=tuple(topics),
                 cluster_authorized_operations=AUTHORIZED_OPERATIONS_OMITTED)


TRANSACTION_KEY: Final = 1  # FindCoordinator's key type of a transactional id


def _coordinator(node: Node, cluster: KafkaCluster | None, key: str,
                 key_type: int) -> tuple[int, int, str, int]:
    """(error code, node id, host, port) of the key's coordinator: the transactional
    id's owner for key type TRANSACTION, else the group's (GROUP, and SHARE: Conveyor
    keeps share-partition state in the shared group, docs/cluster.md)."""
    if cluster is None:
        return error_codes.NONE, node.node_id, node.host, node.port
    owner = (cluster.txn_coordinator(key) if key_type == TRANSACTION_KEY
             else cluster.group_coordinator(key))
    for node_id, host, port in _brokers(node, cluster):
        if node_id == owner:
            return error_codes.NONE, node_id, host, port
    return error_codes.COORDINATOR_NOT_AVAILABLE, -1, "", -1


def handle_find_coordinator(node: Node, request: Request,
                            cluster: KafkaCluster | None = None) -> Any:
    version = request.header.api_version
    response_type = response_class(10, version)
    key_type = int(getattr(request.body, "key_type", 0))  # v0: groups only
    if version < 4:
        code, node_id, host, port = _coordinator(node, cluster, request.body.key, key_type)
        return build(response_type, error_code=code, error_message=None,
                     node_id=node_id, host=host, port=port)
    coordinator_type = nested(response_type, "Coordinator")
    coordinators = []
    for key in request.body.coordinator_keys:
        code, node_id, host, port = _coordinator(node, cluster, key, key_type)
        coordinators.append(build(coordinator_type, key=key, node_id=node_id, host=host,
                                  port=port, error_code=code, error_message=None))
    return build(response_type, coordinators=tuple(coordinators))


def handle_describe_cluster(node: Node, request: Request,
                            cluster: KafkaCluster | None = None) -> Any:
    response_type = response_class(60, request.header.api_version)
    broker_type = nested(response_type, "DescribeClusterBroker")
    brokers = tuple(build(broker_type, broker_id=node_id, host=host, port=port, rack=None)
                    for node_id, host, port in _brokers(node, cluster))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 endpoint_type=1, cluster_id=node.cluster_id, controller_id=node.node_id,
                 brokers=brokers, cluster_authorized_operations=AUTHORIZED_OPERATIONS_OMITTED)


async def handle_init_producer_id(broker: Broker, request: Request) -> Any:
    response_type = response_class(22, request.header.api_version)
    try:
        body = request.body
        producer_id, epoch = await broker.init_producer_id(
            body.transactional_id, millis(body.transaction_timeout),
            int(getattr(body, "producer_id", -1)), int(getattr(body, "producer_epoch", -1)))
    except OperatingError as error:
        code = _code(error)
        if code == error_codes.PRODUCER_FENCED and request.header.api_version < 4:
            code = error_codes.INVALID_PRODUCER_EPOCH
        return build(response_type, error_code=code, producer_id=-1, producer_epoch=-1)
    return build(response_type, error_code=error_codes.NONE, producer_id=producer_id,
                 producer_epoch=epoch)


# --- topics ------------------------------------------------------------------------------
async def handle_create_topics(broker: Broker, request: Request,
                              access: Access | None = None) -> Any:
    body = request.body
    response_type = response_class(19, request.header.api_version)
    result_type = nested(response_type, "CreatableTopicResult")
    results = []
    for topic in body.topics:
        code, message, partitions = error_codes.NONE, None, topic.num_partitions
        if partitions == -1:
            partitions = broker.config.default_partitions
        configs = {config.name: config.value for config in topic.configs}
        try:
            if access is not None and not access.topic("configure", topic.name):
                code, message = error_codes.TOPIC_AUTHORIZATION_FAILED, (
                    "Authorization failed.")
            elif topic.replication_factor not in (-1, 1):
                code, message = error_codes.INVALID_REPLICATION_FACTOR, (
                    "replication factor must be 1 on a single node")
            elif topic.name in KAFKA_INTERNAL_TOPICS:
                code, message = error_codes.INVALID_TOPIC_EXCEPTION, (
                    "the name of a Kafka-internal topic; Conveyor keeps that state in its "
                    "state store, not in a topic")
            elif topic.assignments:
                code, message = error_codes.INVALID_REQUEST, "manual assignments unsupported"
            elif body.validate_only:
                broker.validate_topic(topic.name, partitions, configs)
            else:
                await broker.create_topic(topic.name, partitions, configs)
        except OperatingError as error:
            code, message = _code(error), error.message
        results.append(build(result_type, name=topic.name, topic_id=topic_id(topic.name),
                             error_code=code, error_message=message,
                             num_partitions=partitions if code == 0 else -1,
                             replication_factor=1 if code == 0 else -1, configs=None))
    return build(response_type, topics=tuple(results))


async def handle_delete_topics(broker: Broker, request: Request,
                              access: Access | None = None) -> Any:
    body = request.body
    version = request.header.api_version
    response_type = response_class(20, version)
    result_type = nested(response_type, "DeletableTopicResult")
    names: list[str | None]
    if version >= 6:
        names = [topic.name for topic in body.topics]
    else:
        names = list(body.topic_names)
    results = []
    for name in names:
        code, message = error_codes.NONE, None
        if name is None:
            code, message = error_codes.UNKNOWN_TOPIC_ID, "topic ids are not supported"
        elif access is not None and not access.topic("configure", name):
            code, message = error_codes.TOPIC_AUTHORIZATION_FAILED, "Authorization failed."
        else:
            try:
                await broker.delete_topic(name)
            except OperatingError as error:
                code, message = _code(error), error.message
        results.append(build(result_type, name=name, topic_id=topic_id(name or ""),
                             error_code=code, error_message=message))
    return build(response_type, responses=tuple(results))


async def handle_create_partitions(broker: Broker, request: Request) -> Any:
    body = request.body
    response_type = response_class(37, request.header.api_version)
    result_type = nested(response_type, "CreatePartitionsTopicResult")
    results = []
    for topic in body.topics:
        code, message = error_codes.NONE, None
        try:
            info = broker.get_topic(topic.name)
            if topic.count <= info.partitions:
                code, message = error_codes.INVALID_PARTITIONS, (
                    f"topic has {info.partitions} partitions; the count must grow")
            elif not body.validate_only:
                await broker.create_partitions(topic.name, topic.count)
        except OperatingError as error:
            code, message = _code(error), error.message
        results.append(build(result_type, name=topic.name, error_code=code,
                             error_message=message))
    return build(response_type, results=tuple(results))


# --- configs -----------------------------------------------------------------------------
def handle_describe_configs(broker: Broker, request: Request,
                            configs: GroupConfigs | None = None,
                            facts: BrokerFacts | None = None) -> Any:
    """Topic, broker and group configs, with Kafka's types, sources, read-only flags,
    and (when asked) synonyms and documentation."""
    body = request.body
    response_type = response_class(32, request.header.api_version)
    result_type = nested(response_type, "DescribeConfigsResult")
    results = []
    for resource in body.resources:
        code, message = error_codes.NONE, None
        entries: list[ConfigEntry] = []
        if resource.resource_type == RESOURCE_TOPIC:
            try:
                values = broker.topic_config(resource.resource_name)
                entries = [topic_entry(name, value, _DEFAULT_CONFIG.get(name))
                           for name, value in sorted(values.items())]
                entries += fixed_topic_entries(set(values))
            except OperatingError as error:
                code, message = _code(error), error.message
        elif resource.resource_type == RESOURCE_GROUP and configs is not None:
            entries = _group_entries(configs, resource.resource_name)
        elif resource.resource_type == RESOURCE_BROKER and facts is not None:
            entries = broker_entries(facts)
        elif resource.resource_type != RESOURCE_BROKER:
            code, message = error_codes.INVALID_REQUEST, "unsupported resource type"
        keys = resource.configuration_keys
        results.append(build(
            result_type, error_code=code, error_message=message,
            resource_type=resource.resource_type, resource_name=resource.resource_name,
            configs=tuple(_config_result(response_type, entry,
                                         getattr(body, "include_synonyms", False),
                                         getattr(body, "include_documentation", False))
                          for entry in entries if keys is None or entry.name in keys)))
    return build(response_type, results=tuple(results))


RESOURCE_CLIENT_METRICS: Final = 16


def handle_list_config_resources(broker: Broker, node: Node, configs: GroupConfigs,
                                 request: Request) -> Any:
    """v0 lists client-metrics resources (Conveyor has none); v1 topics, this broker and
    the groups with configs set, filtered by type; an unknown type is INVALID_REQUEST."""
    version = request.header.api_version
    response_type = response_class(74, version)
    resource_type = nested(response_type, "ConfigResource")
    known = (RESOURCE_TOPIC, RESOURCE_BROKER, RESOURCE_GROUP, RESOURCE_CLIENT_METRICS)
    wanted = tuple(getattr(request.body, "resource_types", ()) or ()) or known
    if version == 0:
        wanted = (RESOURCE_CLIENT_METRICS,)
    if any(kind not in known for kind in wanted):
        return build(response_type, error_code=error_codes.INVALID_REQUEST,
                     config_resources=())
    found: list[tuple[str, int]] = []
    if RESOURCE_TOPIC in wanted:
        found += [(info.name, RESOURCE_TOPIC) for info in broker.list_topics()]
    if RESOURCE_BROKER in wanted:
        found.append((str(node.node_id), RESOURCE_BROKER))
    if RESOURCE_GROUP in wanted:
        found += [(name, RESOURCE_GROUP) for name in sorted(configs.explicit)
                  if configs.explicit[name]]
    return build(response_type, error_code=error_codes.NONE, config_resources=tuple(
        build(resource_type, resource_name=name, resource_type=kind) for name, kind in found))


def _group_entries(configs: GroupConfigs, group: str) -> list[ConfigEntry]:
    explicit = configs.set_on(group)
    return [ConfigEntry(name, value, group_type(name),
                        SOURCE_GROUP if name in explicit else SOURCE_DEFAULT, False,
                        GROUP_DOCUMENTATION.get(name, ""),
                        ((name, value, SOURCE_GROUP),) if name in explicit else ())
            for name, value in sorted(configs.get(group).items())]


def _config_result(response_type: type[Any], entry: ConfigEntry, synonyms: bool,
                   documentation: bool) -> Any:
    entry_type = nested(response_type, "DescribeConfigsResourceResult")
    synonym_type = nested(response_type, "DescribeConfigsSynonym")
    return build(entry_type, name=entry.name, value=entry.value, read_only=entry.read_only,
                 config_source=entry.source, is_default=entry.source == SOURCE_DEFAULT,
                 is_sensitive=False, config_type=entry.config_type,
                 documentation=entry.documentation if documentation else None,
                 synonyms=tuple(build(synonym_type, name=name, value=value, source=source)
                                for name, value, source in entry.synonyms) if synonyms else ())


async def _alter_group(configs: GroupConfigs, resource: Any, incremental: bool,
                       validate_only: bool) -> tuple[int, str | None]:
    to_set: dict[str, str | None] = {}
    to_delete: list[str] = []
    for config in resource.configs:
        operation = config.config_operation if incremental else OPERATION_SET
        if operation == OPERATION_SET:
            to_set[config.name] = config.value
        elif operation == OPERATION_DELETE:
            to_delete.append(config.name)
        else:
            return error_codes.INVALID_CONFIG, "APPEND/SUBTRACT apply to list configs only"
    if not incremental:  # AlterConfigs replaces the whole set
        to_delete = [name for name in configs.set_on(resource.resource_name)
                     if name not in to_set]
    try:
        await configs.alter(resource.resource_name, to_set, to_delete, validate_only)
    except OperatingError as error:
        return _code(error), error.message
    return error_codes.NONE, None


def _list_operation(name: str, current: str | None, operation: int,
                    value: str | None) -> str:
    """APPEND (2) adds the values a list config lacks, SUBTRACT (3) removes them; the
    topic's own validation then judges the result (Conveyor's cleanup.policy takes one
    policy, so "delete,compact" is INVALID_CONFIG)."""
    if TOPIC_CONFIGS.get(name, (STRING, None, ""))[0] != LIST:
        raise InvalidConfigError("APPEND/SUBTRACT apply to list configs only", name=name)
    if operation not in (OPERATION_APPEND, OPERATION_SUBTRACT):
        raise InvalidConfigError("unknown config operation", name=name, operation=operation)
    items = [item for item in (current or "").split(",") if item]
    given = [item.strip() for item in (value or "").split(",") if item.strip()]
    if operation == OPERATION_APPEND:
        items += [item for item in given if item not in items]
    else:
        items = [item for item in items if item not in given]
    return ",".join(items)


async def _alter_one(
    broker: Broker, resource: Any, incremental: bool, validate_only: bool,
    configs: GroupConfigs | None = None,
) -> tuple[int, str | None]:
    if resource.resource_type == RESOURCE_GROUP and configs is not None:
        return await _alter_group(configs, resource, incremental, validate_only)
    if resource.resource_type != RESOURCE_TOPIC:
        return error_codes.INVALID_REQUEST, "only topic and group configs can be altered"
    try:
        current = broker.topic_config(resource.resource_name)
        to_set: dict[str, str | None] = {}
        to_delete: list[str] = []
        for config in resource.configs:
            operation = config.config_operation if incremental else OPERATION_SET
            if operation == OPERATION_SET:
                to_set[config.name] = config.value
            elif operation == OPERATION_DELETE:
                to_delete.append(config.name)
            else:
                base = to_set.get(config.name, current.get(config.name))
                to_set[config.name] = _list_operation(config.name, base, operation,
                                                      config.value)
        if not incremental:  # AlterConfigs replaces: what is not given returns to default
            to_delete = [name for name in current if name not in to_set]
        if not validate_only:
            await broker.alter_topic_config(resource.resource_name, to_set, to_delete)
    except OperatingError as error:
        return _code(error), error.message
    return error_codes.NONE, None


async def handle_alter_configs(broker: Broker, request: Request,
                               configs: GroupConfigs | None = None,
                               incremental: bool = False) -> Any:
    api_key = 44 if incremental else 33
    response_type = response_class(api_key, request.header.api_version)
    result_type = nested(response_type, "AlterConfigsResourceResponse")
    results = []
    for resource in request.body.resources:
        code, message = await _alter_one(broker, resource, incremental,
                                         request.body.validate_only, configs)
        results.append(build(result_type, error_code=code, error_message=message,
                             resource_type=resource.resource_type,
                             resource_name=resource.resource_name))
    return build(response_type, responses=tuple(results))
