"""The Kafka listener's own settings (the ``[listeners.kafka]`` config section).

Owns: reading and validating the settings mapping the server hands to
``start_listener``. Every limit ends in its unit and cites its precedent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conveyor.config import KAFKA_SECURITY_PROTOCOLS, LISTENER_LIMIT_NAMES
from conveyor.errors import InvalidConfigError
from conveyor.protocols.kafka.framing import FRAME_BYTES_MAX_DEFAULT

MIGRATION_POLICIES = ("disabled", "upgrade", "downgrade", "bidirectional")


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    # Kafka's socket.request.max.bytes (100 MiB).
    frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT
    # Kafka's replica.fetch.wait.max.ms order; clients ask 500 ms by default.
    fetch_wait_ms_max: int = 30_000
    # Kafka's fetch.max.bytes broker default (55 MiB) caps one fetch response.
    fetch_bytes_max: int = 55 * 1024 * 1024
    node_id: int = 0
    cluster_id: str = "conveyor"
    # SASL/PLAIN: off unless users are configured; user -> password.
    sasl_users: Mapping[str, str] = field(default_factory=dict)
    # Kafka's group.consumer.migration.policy: disabled, upgrade, downgrade, bidirectional.
    consumer_migration_policy: str = "bidirectional"
    # KIP-368: Kafka's connections.max.reauth.ms (0: sessions never end; Kafka's default).
    sasl_session_lifetime_ms: int = 0
    # Kafka's listener security protocol: PLAINTEXT, SSL (TLS; with a client certificate
    # the principal is User:CN), SASL_PLAINTEXT, SASL_SSL (SASL required before any
    # request but ApiVersions/SaslHandshake/SaslAuthenticate).
    security_protocol: str = "PLAINTEXT"

    @property
    def sasl_enabled(self) -> bool:
        return bool(self.sasl_users) or self.security_protocol.startswith("SASL_")


def _int(settings: Mapping[str, Any], name: str, default: int, minimum: int = 0) -> int:
    value = settings.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"kafka.{name} must be an integer >= {minimum}", value=value)
    return value


def load_settings(settings: Mapping[str, Any]) -> KafkaSettings:
    known = {"frame_bytes_max", "fetch_wait_ms_max", "fetch_bytes_max", "node_id", "cluster_id",
             "sasl_users", "users", "consumer_migration_policy", "sasl_session_lifetime_ms",
             "security_protocol",
             *LISTENER_LIMIT_NAMES}  # limits: config.listener_limits
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InvalidConfigError("unknown kafka listener settings", names=unknown)
    users = settings.get("sasl_users", settings.get("users", {}))
    if not isinstance(users, Mapping) or not all(
        isinstance(name, str) and isinstance(password, str) for name, password in users.items()
    ):
        raise InvalidConfigError("kafka.sasl_users must map user names to passwords")
    security_protocol = str(settings.get("security_protocol", "PLAINTEXT")).upper()
    if security_protocol not in KAFKA_SECURITY_PROTOCOLS:
        raise InvalidConfigError("kafka.security_protocol must be one of "
                                 + ", ".join(KAFKA_SECURITY_PROTOCOLS), value=security_protocol)
    cluster_id = settings.get("cluster_id", "conveyor")
    if not isinstance(cluster_id, str) or not cluster_id:
        raise InvalidConfigError("kafka.cluster_id must be a non-empty string")
    return KafkaSettings(
        frame_bytes_max=_int(settings, "frame_bytes_max", FRAME_BYTES_MAX_DEFAULT, 64),
        fetch_wait_ms_max=_int(settings, "fetch_wait_ms_max", 30_000),
        fetch_bytes_max=_int(settings, "fetch_bytes_max", 55 * 1024 * 1024, 1),
        node_id=_int(settings, "node_id", 0),
        cluster_id=cluster_id,
        sasl_users=dict(users),
        consumer_migration_policy=_policy(settings),
        sasl_session_lifetime_ms=_int(settings, "sasl_session_lifetime_ms", 0),
        security_protocol=security_protocol,
    )


def _policy(settings: Mapping[str, Any]) -> str:
    value = settings.get("consumer_migration_policy", "bidirectional")
    if value not in MIGRATION_POLICIES:
        raise InvalidConfigError("kafka.consumer_migration_policy must be one of "
                                 + ", ".join(MIGRATION_POLICIES), value=value)
    return str(value)
