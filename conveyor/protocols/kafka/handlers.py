"""Request dispatch: one typed Kafka request in, the bytes of its answer out.

Owns: the table api_key -> handler, ApiVersions, the authentication gate and the
per-resource authorization of each request (sasl.py, authorization.py), and one set of Kafka 4 group
coordinators per broker (group configs, share groups, KIP-848 consumer groups). The
per-API work lives in data_handlers (Produce, Fetch, ListOffsets), group_handlers,
admin_handlers, log_admin_handlers, consumer_handlers and share_handlers.

Rules:
- A connection without a principal (auth required, or not from loopback) may send
  only ApiVersions, SaslHandshake and SaslAuthenticate until it authenticates;
  anything else, or a failed authentication, closes it after the answer (Kafka does
  the same). Every other request runs as the connection's principal and each
  resource it names is checked (authorization.py).
- Handlers answer operating errors with the protocol's error codes; only
  errors about the connection itself (bad framing, SASL violations) close it.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker import group_configs
from conveyor.broker.consumer_coordinator import ConsumerCoordinator
from conveyor.broker.group_configs import GroupConfigs
from conveyor.broker.share_coordinator import ShareCoordinator
from conveyor.broker.topics import config_to_mapping
from conveyor.broker.types import TopicConfig
from conveyor.protocols.kafka import (
    acl_handlers,
    admin_handlers,
    consumer_handlers,
    data_handlers,
    error_codes,
    features,
    group_handlers,
    log_admin_handlers,
    share_handlers,
    txn_handlers,
)
from conveyor.protocols.kafka.adapter import ConnectionState, Response
from conveyor.protocols.kafka.admin_handlers import Node, _name_for_id
from conveyor.protocols.kafka.authorization import (
    GROUP_API_KEYS,
    Access,
    group_of,
    offset_commit_refusal,
    refusal,
    topics_denied,
)
from conveyor.protocols.kafka.cluster_routing import (
    SHARE_PARTITION_APIS,
    TXN_APIS,
    KafkaCluster,
    group_refusal,
    share_partition_refusal,
    txn_refusal,
)
from conveyor.protocols.kafka.codec import Request, ServerCodec
from conveyor.protocols.kafka.config_catalog import BrokerFacts
from conveyor.protocols.kafka.group_migration import GroupMigration
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, response_class
from conveyor.protocols.kafka.responses import build, nested
from conveyor.protocols.kafka.sasl import SASL_API_KEYS, Sasl
from conveyor.protocols.kafka.settings import KafkaSettings
from conveyor.server.listeners import ListenerCounters

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.security.api import SecurityModel

_COORDINATORS: weakref.WeakKeyDictionary[
    Broker, tuple[GroupConfigs, ShareCoordinator, ConsumerCoordinator]
] = weakref.WeakKeyDictionary()
VHOST_DEFAULT: Final = "/"
# one line per request and per answer (its error codes) at DEBUG, Produce and Fetch aside:
# `--log-level debug` makes a broker log show which request a client waits on
requests_log = logging.getLogger("conveyor.kafka.requests")


class KafkaHandlers:
    def __init__(self, broker: Broker, settings: KafkaSettings, node: Node,
                 counters: ListenerCounters | None = None,
                 security: SecurityModel | None = None,
                 cluster: KafkaCluster | None = None) -> None:
        if security is None:  # a listener started alone: auth off, loopback guest
            from conveyor.security.model import open_model
            security = open_model()
        self.security = security
        self.sasl = Sasl(security, settings, broker.clock.monotonic_ms)
        self.broker = broker
        self.cluster = cluster  # several nodes on one PostgreSQL (cluster_routing.py)
        self._gate = cluster.serve_partition if cluster is not None else None
        self.settings = settings
        self.node = node
        self.counters = counters or ListenerCounters("kafka")
        # Encoding kio responses needs no per-connection state: one codec serves all.
        self._codec = ServerCodec(settings.frame_bytes_max)
        # Kafka 4 groups: group configs, share groups (KIP-932, over the broker's shared
        # groups) and consumer groups (KIP-848, over its committed offsets).
        coordinators = _COORDINATORS.get(broker)
        if coordinators is None:  # one set per broker, shared by its Kafka listeners
            configs = broker.group_configs
            coordinators = _COORDINATORS[broker] = (
                configs, ShareCoordinator(broker, broker.clock, configs),
                ConsumerCoordinator(broker, broker.clock, configs))
            if cluster is not None:  # claimed (again): read the members from the store
                shares, consumers = coordinators[1], coordinators[2]

                async def claimed(group_id: str) -> None:
                    await consumers.reload_group(group_id)
                    await shares.reload_group(group_id)

                cluster.on_group_claimed(claimed)
                shares.coordinates = lambda group_id: (
                    cluster.group_coordinator(group_id) == cluster.node_id)
        self.group_configs, self.shares, self.consumers = coordinators
        self.migration = GroupMigration(broker, self.consumers,
                                        settings.consumer_migration_policy)

    async def handle(self, request: Request, state: ConnectionState) -> Response:
        header = request.header
        if header.api_key in (0, 1) or not requests_log.isEnabledFor(logging.DEBUG):
            return await self._handle(request, state)
        requests_log.debug("request %s api %d v%d corr %d from %s", header.client_id,
                           header.api_key, header.api_version, header.correlation_id,
                           state.peer)
        try:
            return await self._handle(request, state)
        except BaseException as error:
            requests_log.debug("answer api %d corr %d to %s: raised %r", header.api_key,
                               header.correlation_id, state.peer, error)
            raise

    async def _handle(self, request: Request, state: ConnectionState) -> Response:
        api_key = request.header.api_key
        if api_key in SASL_API_KEYS:
            entity = await self._sasl(request, state)
        else:
            access = Access(self.security, self.sasl.admit(api_key, state), VHOST_DEFAULT)
            if api_key == 0:
                return await data_handlers.handle_produce(self.broker, request,
                                                          self.count_error, access, self._gate)
            if api_key == 1:
                return await data_handlers.handle_fetch(self.broker, self.settings, request,
                                                        self.count_error, access, self._gate)
            routed = None
            if self.cluster is not None:
                routed = await group_refusal(self.cluster, request)
                if routed is None and api_key in TXN_APIS:
                    routed = await txn_refusal(self.cluster, request)
                if routed is None and api_key in SHARE_PARTITION_APIS:
                    routed = await share_partition_refusal(
                        self.cluster, request, share_handlers.topic_names(self.broker))
            entity = routed if routed is not None else await self._authorized(
                request, state, access)
        for code in error_codes.error_codes_in(entity):
            self.count_error(code)
        if api_key not in (0, 1) and requests_log.isEnabledFor(logging.DEBUG):
            header = request.header
            requests_log.debug("answer api %d corr %d to %s: error codes [%s]", api_key,
                               header.correlation_id, state.peer, ", ".join(
                                   f"{error_codes.error_name(code)} {code}"
                                   for code in _all_codes(entity)))
        return self._codec.send(request.header, entity)

    def count_error(self, code: int) -> None:
        self.counters.error(error_codes.error_name(code))

    async def _sasl(self, request: Request, state: ConnectionState) -> Any:
        api_key = request.header.api_key
        if api_key == 17:
            return self.sasl.handshake(request, state)
        if api_key == 36:
            return await self.sasl.authenticate(request, state)
        assert api_key == 18  # ApiVersions
        return api_versions_response(request.header.api_version)

    async def _authorized(self, request: Request, state: ConnectionState,
                          access: Access) -> Any:
        """Group checks and the security admin APIs; then the rest."""
        api_key = request.header.api_key
        version = request.header.api_version
        if api_key in GROUP_API_KEYS:
            group = group_of(api_key, request.body)
            if group is not None and not access.group(group):
                code = error_codes.GROUP_AUTHORIZATION_FAILED
                if api_key == 8:
                    return offset_commit_refusal(version, request.body, code)
                return refusal(api_key, version, code)
        if topics_denied(api_key, request.body, access,
                         lambda topic_id: _name_for_id(self.broker, topic_id)):
            return refusal(api_key, version, error_codes.TOPIC_AUTHORIZATION_FAILED,
                           "Topic authorization failed.")
        if api_key == 29:
            return acl_handlers.handle_describe_acls(self.security, access, request)
        if api_key == 30:
            return await acl_handlers.handle_create_acls(self.security, access, request)
        if api_key == 31:
            return await acl_handlers.handle_delete_acls(self.security, access, request)
        if api_key == 50:
            return acl_handlers.handle_describe_scram(self.security, access, request)
        if api_key == 51:
            return await acl_handlers.handle_alter_scram(self.security, access, request)
        return await self._typed(request, state, access)

    async def _typed(self, request: Request, state: ConnectionState, access: Access) -> Any:
        api_key = request.header.api_key
        broker, node = self.broker, self.node
        if api_key == 2:
            return await data_handlers.handle_list_offsets(broker, request)
        if api_key == 3:
            return await admin_handlers.handle_metadata(broker, node, request, access,
                                                        self.cluster)
        if api_key == 8:
            return await group_handlers.handle_offset_commit(broker, request, self.consumers)
        if api_key == 9:
            return group_handlers.handle_offset_fetch(broker, request, self.consumers)
        if api_key == 10:
            return admin_handlers.handle_find_coordinator(node, request, self.cluster)
        if api_key == 11:
            return await group_handlers.handle_join_group(broker, request, state,
                                                          self.consumers, self.migration)
        if api_key == 12:
            return await group_handlers.handle_heartbeat(broker, request, self.migration)
        if api_key == 13:
            return await group_handlers.handle_leave_group(broker, request, self.migration)
        if api_key == 14:
            return await group_handlers.handle_sync_group(broker, request, self.migration)
        if api_key == 15:
            return group_handlers.handle_describe_groups(broker, request, self._kafka4_group)
        if api_key == 16:
            return group_handlers.handle_list_groups(broker, request, self.shares,
                                                     self.consumers)
        if api_key == 19:
            return await admin_handlers.handle_create_topics(broker, request, access)
        if api_key == 20:
            return await admin_handlers.handle_delete_topics(broker, request, access)
        if api_key == 22:
            return await admin_handlers.handle_init_producer_id(broker, request)
        if api_key == 32:
            return admin_handlers.handle_describe_configs(broker, request, self.group_configs,
                                                          self._facts())
        if api_key == 33:
            return await admin_handlers.handle_alter_configs(broker, request, self.group_configs,
                                                             incremental=False)
        if api_key == 37:
            return await admin_handlers.handle_create_partitions(broker, request)
        if api_key == 42:
            return await group_handlers.handle_delete_groups(broker, request, self.shares,
                                                             self.consumers)
        if api_key == 44:
            return await admin_handlers.handle_alter_configs(broker, request, self.group_configs,
                                                             incremental=True)
        if api_key == 60:
            return admin_handlers.handle_describe_cluster(node, request, self.cluster)
        return await self._newer(request, state)

    async def _newer(self, request: Request, state: ConnectionState) -> Any:
        """The APIs Kafka 4 clients added: log admin, KIP-848 and KIP-932 groups."""
        api_key = request.header.api_key
        broker = self.broker
        if api_key in txn_handlers.API_KEYS:
            return await txn_handlers.handle(broker, request)
        if api_key == 21:
            return await log_admin_handlers.handle_delete_records(broker, request)
        if api_key == 23:
            return await log_admin_handlers.handle_offset_for_leader_epoch(
                broker, request, self.cluster)
        if api_key == 34:
            return log_admin_handlers.handle_alter_replica_log_dirs(broker, request)
        if api_key == 35:
            return log_admin_handlers.handle_describe_log_dirs(broker, request)
        if api_key == 43:
            return log_admin_handlers.handle_elect_leaders(broker, request)
        if api_key == 45:
            return log_admin_handlers.handle_alter_partition_reassignments(broker, self.node,
                                                                           request)
        if api_key == 46:
            return log_admin_handlers.handle_list_partition_reassignments(request)
        if api_key == 47:
            subscribed = group_handlers.subscribed_topics(broker, self.consumers,
                                                          request.body.group_id)
            return await log_admin_handlers.handle_offset_delete(broker, request, subscribed)
        if api_key == 48:
            return log_admin_handlers.handle_describe_client_quotas(request)
        if api_key == 49:
            return log_admin_handlers.handle_alter_client_quotas(request)
        if api_key == 55:
            return log_admin_handlers.handle_describe_quorum(self.node, request)
        if api_key == 57:
            return features.handle_update_features(request)
        if api_key == 61:
            return log_admin_handlers.handle_describe_producers(broker, request)
        if api_key == 74:
            return admin_handlers.handle_list_config_resources(broker, self.node,
                                                               self.group_configs, request)
        if api_key == 75:
            return log_admin_handlers.handle_describe_topic_partitions(broker, self.node,
                                                                       request)
        return await self._kafka4_groups(request, state)

    async def _kafka4_groups(self, request: Request, state: ConnectionState) -> Any:
        """KIP-848 consumer groups and KIP-932 share groups."""
        api_key = request.header.api_key
        if api_key == 68:
            return await consumer_handlers.handle_heartbeat(self.consumers, self.broker,
                                                            request, state, self.migration)
        if api_key == 69:
            return consumer_handlers.handle_describe(self.consumers, request)
        if api_key == 76:
            return await share_handlers.handle_heartbeat(self.shares, request, state)
        if api_key == 77:
            return share_handlers.handle_describe(self.shares, request)
        if api_key == 78:
            return await share_handlers.handle_fetch(self.shares, self.broker, self.settings,
                                                     self.node, request, state, self._gate)
        if api_key == 79:
            return await share_handlers.handle_acknowledge(self.shares, self.broker, self.node,
                                                           request)
        if api_key == 90:
            return share_handlers.handle_describe_offsets(self.shares, self.broker, request)
        if api_key == 91:
            name = request.body.group_id
            other = self.consumers.is_consumer_group(name) or any(
                listing.group_id == name for listing in self.broker.list_groups())
            return await share_handlers.handle_alter_offsets(self.shares, request, other)
        if api_key == 92:
            return await share_handlers.handle_delete_offsets(self.shares, request)
        raise AssertionError(f"api key {api_key} is in SUPPORTED_VERSIONS without a handler")

    def _kafka4_group(self, group_id: str) -> bool:
        """Is this id a KIP-848 consumer group or a share group (not a classic one)?"""
        return self.consumers.is_consumer_group(group_id) or self.shares.is_share_group(group_id)

    def _facts(self) -> BrokerFacts:
        config = self.broker.config
        return BrokerFacts(
            self.node.node_id, self.node.host, self.node.port, self.settings.frame_bytes_max,
            self.settings.fetch_bytes_max, config.auto_create_topics,
            config.default_partitions, config.session_timeout_ms_min,
            config.session_timeout_ms_max, config_to_mapping(TopicConfig()),
            group_configs.DEFAULTS, self.settings.consumer_migration_policy)


def api_versions_response(version: int) -> Any:
    response_type = response_class(18, version)
    entry_type = nested(response_type, "ApiVersion")
    entries = tuple(
        build(entry_type, api_key=api_key, min_version=low, max_version=high)
        for api_key, (low, high) in sorted(SUPPORTED_VERSIONS.items())
    )
    return build(response_type, error_code=error_codes.NONE, api_keys=entries,
                 supported_features=features.supported_features(response_type),
                 finalized_features_epoch=features.FEATURES_EPOCH,
                 finalized_features=features.finalized_features(response_type),
                 zk_migration_ready=False)


def _all_codes(entity: Any, depth: int = 4) -> list[int]:
    """Every non-zero ``*error_code`` of a response entity (for the request log)."""
    if depth < 0 or not dataclasses.is_dataclass(entity):
        return []
    found = []
    for item in dataclasses.fields(entity):
        value = getattr(entity, item.name)
        if item.name.endswith("error_code") and isinstance(value, int) and value:
            found.append(int(value))
        elif isinstance(value, tuple):
            for nested_entity in value:
                found.extend(_all_codes(nested_entity, depth - 1))
    return found
