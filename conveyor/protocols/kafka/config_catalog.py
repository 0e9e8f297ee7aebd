"""What DescribeConfigs says about each config: its type, source, synonyms, documentation.

Owns: the catalog of broker configs Conveyor answers for (the Kafka names whose
meaning Conveyor has, with the values it really runs with), the Kafka types of
topic and group configs, and the broker-level synonyms of topic configs. Pure; the
handlers build responses from these entries.

Kafka's ConfigType codes (DescribeConfigs v3+): BOOLEAN 1, STRING 2, INT 3, SHORT 4,
LONG 5, DOUBLE 6, LIST 7, CLASS 8, PASSWORD 9. Sources: DYNAMIC_TOPIC_CONFIG 1,
STATIC_BROKER_CONFIG 4, DEFAULT_CONFIG 5, GROUP_CONFIG 8.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from conveyor.broker.share_coordinator import SESSIONS_MAX

BOOLEAN, STRING, INT, SHORT, LONG, DOUBLE, LIST = 1, 2, 3, 4, 5, 6, 7
SOURCE_TOPIC, SOURCE_STATIC_BROKER, SOURCE_DEFAULT, SOURCE_GROUP = 1, 4, 5, 8


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    name: str
    value: str | None
    config_type: int
    source: int
    read_only: bool
    documentation: str
    synonyms: tuple[tuple[str, str | None, int], ...] = ()  # (name, value, source)


# topic config -> (type, broker-level synonym, documentation)
TOPIC_CONFIGS: Final[dict[str, tuple[int, str | None, str]]] = {
    "retention.ms": (LONG, "log.retention.ms", "How long records are kept (-1: forever)."),
    "retention.bytes": (LONG, "log.retention.bytes",
                        "Bytes a partition keeps before old segments go (-1: no limit)."),
    "segment.bytes": (INT, "log.segment.bytes", "Size at which a segment file rolls."),
    "segment.ms": (LONG, "log.roll.ms", "Age at which a segment rolls."),
    "cleanup.policy": (LIST, "log.cleanup.policy",
                       "delete, compact, or work-queue (records go once every shared "
                       "group settled them)."),
    "max.message.bytes": (INT, "message.max.bytes", "Largest record batch accepted."),
    "min.compaction.lag.ms": (LONG, "log.cleaner.min.compaction.lag.ms",
                              "Records younger than this are not compacted."),
    "delete.retention.ms": (LONG, "log.cleaner.delete.retention.ms",
                            "How long a compacted topic keeps tombstones."),
    "conveyor.fsync": (STRING, None, "always, interval or never: when appends are fsynced."),
    "conveyor.fsync.interval.ms": (LONG, None, "Fsync period of the interval policy."),
}
_LONG_MAX: Final = str(2**63 - 1)
# Kafka topic configs Conveyor has no meaning for: described read-only with the value
# Conveyor behaves as (AlterConfigs accepts the ones clients send routinely, ignored).
FIXED_TOPIC_CONFIGS: Final[dict[str, tuple[str, int]]] = {
    "compression.type": ("producer", STRING),  # batches are stored as the producer sent
    "message.timestamp.type": ("CreateTime", STRING),
    "message.timestamp.before.max.ms": (_LONG_MAX, LONG),
    "message.timestamp.after.max.ms": (_LONG_MAX, LONG),
    "min.insync.replicas": ("1", INT),
    "unclean.leader.election.enable": ("false", BOOLEAN),
    "preallocate": ("false", BOOLEAN),
    "index.interval.bytes": ("4096", INT),
    "segment.index.bytes": ("10485760", INT),
    "segment.jitter.ms": ("0", LONG),
    "file.delete.delay.ms": ("0", LONG),
    "flush.messages": (_LONG_MAX, LONG),  # the fsync policy is conveyor.fsync
    "flush.ms": (_LONG_MAX, LONG),
    "follower.replication.throttled.replicas": ("", LIST),
    "leader.replication.throttled.replicas": ("", LIST),
    "min.cleanable.dirty.ratio": ("0.5", DOUBLE),
    "max.compaction.lag.ms": (_LONG_MAX, LONG),
    "remote.storage.enable": ("false", BOOLEAN),
    "local.retention.ms": ("-2", LONG),
    "local.retention.bytes": ("-2", LONG),
}
_FIXED_DOCUMENTATION: Final = "Fixed in Conveyor: it behaves as this value."


def fixed_topic_entries(known: set[str]) -> list[ConfigEntry]:
    return [ConfigEntry(name, value, config_type, SOURCE_DEFAULT, True, _FIXED_DOCUMENTATION)
            for name, (value, config_type) in sorted(FIXED_TOPIC_CONFIGS.items())
            if name not in known]


# group config -> documentation (types: the *.ms and limit ones are INT, the rest STRING)
GROUP_DOCUMENTATION: Final[dict[str, str]] = {
    "share.auto.offset.reset": "Where a share group starts on a topic: latest, earliest, "
                               "or by_duration:<ISO-8601 duration> (records at most that old).",
    "share.isolation.level": "read_committed or read_uncommitted (the same in Conveyor).",
    "share.record.lock.duration.ms": "How long an acquired record stays locked.",
    "share.session.timeout.ms": "A share member silent this long is removed.",
    "share.heartbeat.interval.ms": "How often share members heartbeat.",
    "share.delivery.count.limit": "Deliveries before a record is archived/dead-lettered.",
    "consumer.session.timeout.ms": "A consumer-group member silent this long is removed.",
    "consumer.heartbeat.interval.ms": "How often consumer-group members heartbeat.",
}


def group_type(name: str) -> int:
    return INT if name.endswith(".ms") or name.endswith(".limit") else STRING


def topic_entry(name: str, value: str, default: str | None) -> ConfigEntry:
    config_type, synonym, documentation = TOPIC_CONFIGS.get(name, (STRING, None, ""))
    is_default = value == default
    synonyms: list[tuple[str, str | None, int]] = []
    if not is_default:
        synonyms.append((name, value, SOURCE_TOPIC))
    if synonym is not None:
        synonyms.append((synonym, default, SOURCE_DEFAULT))
    return ConfigEntry(name, value, config_type, SOURCE_DEFAULT if is_default else SOURCE_TOPIC,
                       False, documentation, tuple(synonyms))


@dataclass(frozen=True, slots=True)
class BrokerFacts:
    """What the broker entries are made of (the handlers collect it)."""

    node_id: int
    host: str
    port: int
    frame_bytes_max: int
    fetch_bytes_max: int
    auto_create_topics: bool
    default_partitions: int
    session_timeout_ms_min: int
    session_timeout_ms_max: int
    topic_defaults: Mapping[str, str]
    group_defaults: Mapping[str, str]
    migration_policy: str = "bidirectional"  # group.consumer.migration.policy


def broker_entries(facts: BrokerFacts) -> list[ConfigEntry]:
    """The broker configs Conveyor has a meaning for, read-only, with their real values."""
    listener = f"PLAINTEXT://{facts.host}:{facts.port}"
    static: list[tuple[str, str, int, str]] = [
        ("advertised.listeners", listener, STRING, "The address clients are given."),
        ("listeners", listener, STRING, "The address the Kafka listener is bound to."),
        ("listener.security.protocol.map", "PLAINTEXT:PLAINTEXT", STRING,
         "Listener names and their security protocols."),
        ("node.id", str(facts.node_id), INT, "This node's id."),
        ("broker.id", str(facts.node_id), INT, "This node's id (the older name)."),
        ("process.roles", "broker,controller", LIST, "One node is broker and controller."),
        ("log.dirs", "conveyor", STRING, "The one log directory DescribeLogDirs reports."),
        ("num.partitions", str(facts.default_partitions), INT,
         "Partitions of an auto-created topic."),
        ("auto.create.topics.enable", str(facts.auto_create_topics).lower(), BOOLEAN,
         "Whether Metadata and Produce create unknown topics."),
        ("default.replication.factor", "1", INT, "Every partition has one replica."),
        ("offsets.topic.replication.factor", "1", SHORT, "Group offsets live in the state "
         "store; there is no internal topic to replicate."),
        ("min.insync.replicas", "1", INT, "acks=all waits for this node's fsync."),
        ("socket.request.max.bytes", str(facts.frame_bytes_max), INT,
         "Largest request frame."),
        ("fetch.max.bytes", str(facts.fetch_bytes_max), INT, "Cap on one Fetch response."),
        ("group.min.session.timeout.ms", str(facts.session_timeout_ms_min), INT,
         "Smallest session timeout a classic member may ask for."),
        ("group.max.session.timeout.ms", str(facts.session_timeout_ms_max), INT,
         "Largest session timeout a classic member may ask for."),
        ("group.consumer.assignors", "uniform,range", LIST,
         "Server-side assignors of KIP-848 groups; the first is the default."),
        ("group.share.max.share.sessions", str(SESSIONS_MAX), INT,
         "Share sessions open at once; one more is SHARE_SESSION_LIMIT_REACHED."),
        ("group.consumer.migration.policy", facts.migration_policy, STRING,
         "Whether a group with members converts online from the classic to the consumer "
         "protocol (upgrade), back (downgrade), both (bidirectional) or neither "
         "(disabled); an empty one always does (its committed offsets are shared)."),
    ]
    entries = [ConfigEntry(name, value, config_type, SOURCE_STATIC_BROKER, True, doc)
               for name, value, config_type, doc in static]
    for name, value in sorted(facts.topic_defaults.items()):
        config_type, synonym, doc = TOPIC_CONFIGS.get(name, (STRING, None, ""))
        if synonym is not None:
            entries.append(ConfigEntry(synonym, value, config_type, SOURCE_DEFAULT, True, doc))
    for name, value in sorted(facts.group_defaults.items()):
        entries.append(ConfigEntry(f"group.{name}", value, group_type(name), SOURCE_DEFAULT,
                                   True, GROUP_DOCUMENTATION.get(name, "")))
    return entries
