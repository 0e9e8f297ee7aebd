"""Request dispatch: one typed Kafka request in, the bytes of its answer out.

Owns: the table api_key -> handler, ApiVersions, SASL/PLAIN (SaslHandshake v1
+ SaslAuthenticate), the authentication gate, and one set of Kafka 4 group
coordinators per broker (group configs, share groups, KIP-848 consumer groups). The
per-API work lives in data_handlers (Produce, Fetch, ListOffsets), group_handlers,
admin_handlers, log_admin_handlers, consumer_handlers and share_handlers.

Rules:
- With SASL users configured, a connection may send only ApiVersions,
  SaslHandshake and SaslAuthenticate until it authenticates; anything else,
  or a failed authentication, closes it after the answer (Kafka does the same).
- Handlers answer operating errors with the protocol's error codes; only
  errors about the connection itself (bad framing, SASL violations) close it.
"""

from __future__ import annotations

import hmac
import weakref
from typing import TYPE_CHECKING, Any, Final

from conveyor.broker import group_configs
from conveyor.broker.consumer_coordinator import ConsumerCoordinator
from conveyor.broker.group_configs import GroupConfigs
from conveyor.broker.share_coordinator import ShareCoordinator
from conveyor.broker.topics import config_to_mapping
from conveyor.broker.types import TopicConfig
from conveyor.errors import AuthenticationError
from conveyor.protocols.kafka import (
    admin_handlers,
    consumer_handlers,
    data_handlers,
    error_codes,
    group_handlers,
    log_admin_handlers,
    share_handlers,
)
from conveyor.protocols.kafka.adapter import ConnectionState, Response
from conveyor.protocols.kafka.admin_handlers import Node
from conveyor.protocols.kafka.cluster_routing import KafkaCluster, group_refusal
from conveyor.protocols.kafka.codec import Request, ServerCodec
from conveyor.protocols.kafka.config_catalog import BrokerFacts
from conveyor.protocols.kafka.messages import SUPPORTED_VERSIONS, response_class
from conveyor.protocols.kafka.responses import build, nested
from conveyor.protocols.kafka.settings import KafkaSettings
from conveyor.server.listeners import ListenerCounters

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

SASL_API_KEYS: Final = frozenset({17, 18, 36})
_COORDINATORS: weakref.WeakKeyDictionary[
    Broker, tuple[GroupConfigs, ShareCoordinator, ConsumerCoordinator]
] = weakref.WeakKeyDictionary()
PLAIN: Final = "PLAIN"


class KafkaHandlers:
    def __init__(self, broker: Broker, settings: KafkaSettings, node: Node,
                 counters: ListenerCounters | None = None,
                 cluster: KafkaCluster | None = None) -> None:
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
        self.group_configs, self.shares, self.consumers = coordinators

    async def handle(self, request: Request, state: ConnectionState) -> Response:
        api_key = request.header.api_key
        if self.settings.sasl_enabled and state.authenticated_user is None and (
            api_key not in SASL_API_KEYS
        ):
            raise AuthenticationError("request before SASL authentication", api_key=api_key)
        if api_key == 0:
            return await data_handlers.handle_produce(self.broker, request, self.count_error,
                                                      self._gate)
        if api_key == 1:
            return await data_handlers.handle_fetch(self.broker, self.settings, request,
                                                    self.count_error, self._gate)
        refusal = (await group_refusal(self.cluster, request)
                   if self.cluster is not None else None)
        entity = refusal if refusal is not None else await self._typed(request, state)
        for code in error_codes.error_codes_in(entity):
            self.count_error(code)
        return self._codec.send(request.header, entity)

    def count_error(self, code: int) -> None:
        self.counters.error(error_codes.error_name(code))

    async def _typed(self, request: Request, state: ConnectionState) -> Any:
        api_key = request.header.api_key
        broker, node = self.broker, self.node
        if api_key == 2:
            return await data_handlers.handle_list_offsets(broker, request)
        if api_key == 3:
            return await admin_handlers.handle_metadata(broker, node, request, self.cluster)
        if api_key == 8:
            return await group_handlers.handle_offset_commit(broker, request, self.consumers)
        if api_key == 9:
            return group_handlers.handle_offset_fetch(broker, request, self.consumers)
        if api_key == 10:
            return admin_handlers.handle_find_coordinator(node, request, self.cluster)
        if api_key == 11:
            return await group_handlers.handle_join_group(broker, request, state,
                                                          self.consumers)
        if api_key == 12:
            return await group_handlers.handle_heartbeat(broker, request)
        if api_key == 13:
            return await group_handlers.handle_leave_group(broker, request)
        if api_key == 14:
            return await group_handlers.handle_sync_group(broker, request)
        if api_key == 15:
            return group_handlers.handle_describe_groups(broker, request, self._kafka4_group)
        if api_key == 16:
            return group_handlers.handle_list_groups(broker, request, self.shares,
                                                     self.consumers)
        if api_key == 17:
            return self._sasl_handshake(request, state)
        if api_key == 18:
            return api_versions_response(request.header.api_version)
        if api_key == 19:
            return await admin_handlers.handle_create_topics(broker, request)
        if api_key == 20:
            return await admin_handlers.handle_delete_topics(broker, request)
        if api_key == 22:
            return await admin_handlers.handle_init_producer_id(broker, request)
        if api_key == 32:
            return admin_handlers.handle_describe_configs(broker, request, self.group_configs,
                                                          self._facts())
        if api_key == 33:
            return await admin_handlers.handle_alter_configs(broker, request, self.group_configs,
                                                             incremental=False)
        if api_key == 36:
            return self._sasl_authenticate(request, state)
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
        if api_key == 21:
            return await log_admin_handlers.handle_delete_records(broker, request)
        if api_key == 23:
            return log_admin_handlers.handle_offset_for_leader_epoch(broker, request)
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
                                                            request, state)
        if api_key == 69:
            return consumer_handlers.handle_describe(self.consumers, request)
        if api_key == 76:
            return await share_handlers.handle_heartbeat(self.shares, request, state)
        if api_key == 77:
            return share_handlers.handle_describe(self.shares, request)
        if api_key == 78:
            return await share_handlers.handle_fetch(self.shares, self.broker, self.settings,
                                                     self.node, request, state)
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
            group_configs.DEFAULTS)

    # --- SASL --------------------------------------------------------------------------
    def _sasl_handshake(self, request: Request, state: ConnectionState) -> Any:
        response_type = response_class(17, request.header.api_version)
        mechanisms = (PLAIN,) if self.settings.sasl_enabled else ()
        if request.body.mechanism not in mechanisms:
            state.close_after_response = True
            return build(response_type, error_code=error_codes.UNSUPPORTED_SASL_MECHANISM,
                         mechanisms=mechanisms)
        state.sasl_mechanism = request.body.mechanism
        return build(response_type, error_code=error_codes.NONE, mechanisms=mechanisms)

    def _sasl_authenticate(self, request: Request, state: ConnectionState) -> Any:
        response_type = response_class(36, request.header.api_version)
        if state.sasl_mechanism != PLAIN or state.authenticated_user is not None:
            state.close_after_response = True
            return build(response_type, error_code=error_codes.ILLEGAL_SASL_STATE,
                         error_message="SaslHandshake(PLAIN) must come first, once",
                         auth_bytes=b"", session_lifetime=0)
        user = check_plain(request.body.auth_bytes, self.settings.sasl_users)
        if user is None:
            state.close_after_response = True
            return build(response_type, error_code=error_codes.SASL_AUTHENTICATION_FAILED,
                         error_message="Authentication failed: invalid username or password",
                         auth_bytes=b"", session_lifetime=0)
        state.authenticated_user = user
        return build(response_type, error_code=error_codes.NONE, error_message=None,
                     auth_bytes=b"", session_lifetime=0)


def check_plain(auth_bytes: bytes, users: dict[str, str] | Any) -> str | None:
    """RFC 4616 PLAIN: [authzid] NUL authcid NUL passwd; the user name when it checks out."""
    parts = bytes(auth_bytes).split(b"\x00")
    if len(parts) != 3:
        return None
    authorization_id, user_bytes, password_bytes = parts
    try:
        user, password = user_bytes.decode(), password_bytes.decode()
    except UnicodeDecodeError:
        return None
    if authorization_id and authorization_id != user_bytes:
        return None
    expected = users.get(user)
    if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
        return None
    return user


def api_versions_response(version: int) -> Any:
    response_type = response_class(18, version)
    entry_type = nested(response_type, "ApiVersion")
    entries = tuple(
        build(entry_type, api_key=api_key, min_version=low, max_version=high)
        for api_key, (low, high) in sorted(SUPPORTED_VERSIONS.items())
    )
    return build(response_type, error_code=error_codes.NONE, api_keys=entries,
                 supported_features=(), finalized_features_epoch=-1, finalized_features=(),
                 zk_migration_ready=False)
