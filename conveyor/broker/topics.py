"""Topics: names, configs, partitions; persisted through the StateStore.

Owns: the topic-name rules (Kafka's, so every protocol can hold every topic), the
TopicConfig <-> config-name mapping with validation (Conveyor's own config names,
documented in docs/broker-api.md and used by the HTTP API and the CLI; they follow
Kafka's spelling where one exists, so the Kafka listener passes them through), and
the ``TopicRegistry`` (create/delete/list/describe/alter config/create partitions),
which keeps the StateStore rows and the LogStore
partitions in step.

Must not know: protocols, files. Invariants: a topic in the registry has a
state-store row and ``partitions`` partition logs; names are valid; configs
passed validation. On open the registry re-creates any partition log missing
from the log store (a crash between the two writes) so both agree again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from conveyor.clock import Clock
from conveyor.errors import (
    InvalidConfigError,
    InvalidNameError,
    InvalidRequestError,
    TopicExistsError,
    UnknownPartitionError,
    UnknownTopicError,
)
from conveyor.storage.log_api import LogOffsets, LogStore
from conveyor.storage.log_config import CLEANUP_POLICIES, FSYNC_POLICIES
from conveyor.storage.state_store import StateStore, TopicRow

from .types import TopicConfig, TopicInfo

TOPIC_NAME_BYTES_MAX = 249  # Kafka's Topic.MAX_NAME_LENGTH
PARTITIONS_MAX = 10_000  # a bound so a typo cannot create a million directories
# A name of a vhost other than "/" carries the vhost as a prefix, "vhost~name"
# (conveyor/security/api.py: qualify); "~" is illegal in Kafka names, so a name of the
# default vhost never collides with one.
_LEGAL_NAME = re.compile(r"(?:[a-zA-Z0-9._-]{1,64}~)?[a-zA-Z0-9._-]+")

# config name (Conveyor's; Kafka's spelling where one exists) -> TopicConfig field
CONFIG_FIELDS: dict[str, str] = {
    "retention.ms": "retention_ms",
    "retention.bytes": "retention_bytes",
    "segment.bytes": "segment_bytes",
    "segment.ms": "segment_ms",
    "cleanup.policy": "cleanup_policy",
    "max.message.bytes": "max_message_bytes",
    "min.compaction.lag.ms": "min_compaction_lag_ms",
    "delete.retention.ms": "delete_retention_ms",
    "conveyor.fsync": "fsync",
    "conveyor.fsync.interval.ms": "fsync_interval_ms",
}
FIELD_CONFIGS = {field: name for name, field in CONFIG_FIELDS.items()}
# Kafka topic configs that clients send routinely and that have no meaning for a
# single-node broker; accepted and ignored rather than failing the request.
IGNORED_CONFIGS = frozenset({
    "min.insync.replicas", "unclean.leader.election.enable", "compression.type",
    "message.downconversion.enable", "preallocate", "index.interval.bytes",
    "segment.index.bytes", "segment.jitter.ms", "file.delete.delay.ms", "flush.messages",
    "flush.ms", "follower.replication.throttled.replicas",
    "leader.replication.throttled.replicas", "message.timestamp.difference.max.ms",
    "min.cleanable.dirty.ratio", "max.compaction.lag.ms", "message.format.version",
})
_CLEANUP_POLICIES = CLEANUP_POLICIES
_FSYNC_POLICIES = FSYNC_POLICIES
# field -> smallest legal value (Kafka's ConfigDef ranges)
_MINIMUMS: dict[str, int] = {
    "retention_ms": -1,
    "retention_bytes": -1,
    "segment_bytes": 14,
    "segment_ms": 1,
    "max_message_bytes": 0,
    "min_compaction_lag_ms": 0,
    "delete_retention_ms": 0,
    "fsync_interval_ms": 1,
}


def validate_topic_name(name: str) -> None:
    """Kafka's rules: [a-zA-Z0-9._-], 1..249 chars, not "." or ".." (plus an optional
    ``vhost~`` prefix)."""
    if not name:
        raise InvalidNameError("topic name is empty")
    if len(name) > TOPIC_NAME_BYTES_MAX:
        raise InvalidNameError(
            "topic name too long", name=name[:40], length=len(name),
            length_max=TOPIC_NAME_BYTES_MAX,
        )
    if name in (".", ".."):
        raise InvalidNameError("topic name cannot be '.' or '..'", name=name)
    if not _LEGAL_NAME.fullmatch(name):
        raise InvalidNameError("topic name has an illegal character", name=name)


def validate_partitions(partitions: int) -> None:
    if not 1 <= partitions <= PARTITIONS_MAX:
        raise InvalidRequestError(
            "partition count out of range", partitions=partitions, partitions_max=PARTITIONS_MAX
        )


def _parse_value(name: str, field: str, text: str) -> Any:
    if field == "cleanup_policy":
        if text not in _CLEANUP_POLICIES:
            raise InvalidConfigError(
                "unsupported cleanup.policy", name=name, value=text, allowed=_CLEANUP_POLICIES
            )
        return text
    if field == "fsync":
        if text not in _FSYNC_POLICIES:
            raise InvalidConfigError(
                "unsupported fsync policy", name=name, value=text, allowed=_FSYNC_POLICIES
            )
        return text
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidConfigError("config value is not an integer", name=name, value=text) from None
    minimum = _MINIMUMS[field]
    if value < minimum:
        raise InvalidConfigError("config value too small", name=name, value=value, minimum=minimum)
    return value


def config_from_mapping(
    mapping: Mapping[str, str | None], base: TopicConfig | None = None
) -> TopicConfig:
    """Apply Kafka-named settings to ``base`` (defaults); unknown names are InvalidConfigError."""
    changes: dict[str, Any] = {}
    for name, text in mapping.items():
        if name in IGNORED_CONFIGS:
            continue
        field = CONFIG_FIELDS.get(name)
        if field is None:
            raise InvalidConfigError("unknown topic config", name=name)
        if text is None:
            raise InvalidConfigError("config value is missing", name=name)
        changes[field] = _parse_value(name, field, str(text))
    return dataclasses.replace(base or TopicConfig(), **changes)


def config_to_mapping(config: TopicConfig) -> dict[str, str]:
    """Every setting under its Kafka (or conveyor.*) name, values as strings."""
    return {
        name: str(getattr(config, field)) for name, field in CONFIG_FIELDS.items()
    }


def config_to_row(config: TopicConfig) -> dict[str, Any]:
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}


def config_from_row(row: Mapping[str, Any]) -> TopicConfig:
    known = {field.name for field in dataclasses.fields(TopicConfig)}
    return TopicConfig(**{key: value for key, value in row.items() if key in known})


LogConfigFactory = Any  # callable(**fields) -> LogConfig


def log_config_for(config: TopicConfig, factory: Any) -> Any:
    """Build the log store's LogConfig from the TopicConfig fields it shares."""
    if dataclasses.is_dataclass(factory):
        accepted = {field.name for field in dataclasses.fields(factory)}
    else:  # pragma: no cover - non-dataclass factories take every field
        accepted = {field.name for field in dataclasses.fields(config)}
    values = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name in accepted
    }
    return factory(**values)


class TopicRegistry:
    """Topic metadata in memory, written through to the StateStore and LogStore."""

    def __init__(
        self, log_store: LogStore, state_store: StateStore, clock: Clock,
        log_config_factory: Any,
    ) -> None:
        self.log_store = log_store
        self._state_store = state_store
        self._clock = clock
        self._log_config_factory = log_config_factory
        # name -> info of every live topic (queues included, kind="queue")
        self._topics: dict[str, TopicInfo] = {}
        # names whose partitions are being created (not yet in _topics)
        self._creating: set[str] = set()
        # changes made here: started and finished (a cluster node's re-read of the
        # catalog that overlapped one is thrown away: conveyor/cluster/catalog_apply.py)
        self.changes = 0
        self.changing = 0

    @contextlib.contextmanager
    def _change(self) -> Iterator[None]:
        self.changes += 1
        self.changing += 1
        try:
            yield
        finally:
            self.changing -= 1
            self.changes += 1

    def forget(self, name: str) -> TopicInfo | None:
        """Another cluster node deleted the topic: forget it here (the stores are left
        alone; the caller forgets its partitions)."""
        self.changes += 1
        return self._topics.pop(name, None)

    async def load(self, attempts: int = 3) -> None:
        """Read topics from the state store; create partition logs the log store lacks.
        A cluster node re-reads beside requests: a read that overlapped a topic created,
        deleted or forgotten here is thrown away and read again (it could bring back a
        topic deleted meanwhile), up to ``attempts`` times; then nothing is applied (the
        next re-read is)."""
        for _ in range(attempts):
            mark = self.changes
            existing = set(self.log_store.partitions())
            infos = [TopicInfo(
                name=row.name, partitions=row.partitions, config=config_from_row(row.config),
                kind="queue" if row.kind == "queue" else "topic", created_ms=row.created_ms,
            ) for row in await self._state_store.load_topics()]
            for info in infos:
                log_config = log_config_for(info.config, self._log_config_factory)
                for partition in range(info.partitions):
                    if (info.name, partition) not in existing:
                        await self.log_store.create_partition(info.name, partition, log_config)
            if self.changes != mark:
                continue
            for info in infos:  # known once its partitions are, all at once
                self._topics[info.name] = info
            return

    def get(self, name: str) -> TopicInfo:
        info = self._topics.get(name)
        if info is None:
            raise UnknownTopicError("unknown topic", topic=name)
        return info

    def find(self, name: str) -> TopicInfo | None:
        return self._topics.get(name)

    def is_creating(self, name: str) -> bool:
        return name in self._creating

    def list_topics(self) -> list[TopicInfo]:
        return [self._topics[name] for name in sorted(self._topics)]

    def check_partition(self, name: str, partition: int) -> None:
        """UnknownTopicError / UnknownPartitionError unless the partition exists."""
        info = self.get(name)
        if not 0 <= partition < info.partitions:
            raise UnknownPartitionError(
                "unknown partition", topic=name, partition=partition, partitions=info.partitions
            )

    def offsets(self, name: str, partition: int) -> LogOffsets:
        """Log start, high watermark and log end of a known partition."""
        self.check_partition(name, partition)
        return self.log_store.offsets(name, partition)

    async def create(
        self,
        name: str,
        partitions: int = 1,
        config: Mapping[str, str | None] | TopicConfig | None = None,
        kind: str = "topic",
    ) -> TopicInfo:
        validate_topic_name(name)
        validate_partitions(partitions)
        if isinstance(config, TopicConfig):
            topic_config = config
        else:
            topic_config = config_from_mapping(config or {})
        if name in self._topics or name in self._creating:
            raise TopicExistsError("topic already exists", topic=name)
        info = TopicInfo(
            name=name, partitions=partitions, config=topic_config,
            kind="queue" if kind == "queue" else "topic", created_ms=self._clock.wall_ms(),
        )
        log_config = log_config_for(topic_config, self._log_config_factory)
        self._creating.add(name)
        with self._change():
            try:
                for partition in range(partitions):
                    await self.log_store.create_partition(name, partition, log_config)
            finally:
                self._creating.discard(name)
            # visible only once every partition exists
            self._topics[name] = info
            self._save(info)
            await self._state_store.commit()
        return info

    async def delete(self, name: str) -> TopicInfo:
        info = self.get(name)
        with self._change():
            del self._topics[name]
            self._state_store.delete_topic(name)
            self._state_store.delete_producer_sequences_for_topic(name)
            await self._state_store.commit()
            for partition in range(info.partitions):
                await self.log_store.delete_partition(name, partition)
        return info

    async def alter_config(
        self,
        name: str,
        set_configs: Mapping[str, str | None] | None = None,
        delete_configs: Iterable[str] = (),
    ) -> TopicInfo:
        """Set and reset (to default) named settings atomically; all validated first."""
        info = self.get(name)
        defaults = TopicConfig()
        reset: dict[str, Any] = {}
        for config_name in delete_configs:
            if config_name in IGNORED_CONFIGS:
                continue
            field = CONFIG_FIELDS.get(config_name)
            if field is None:
                raise InvalidConfigError("unknown topic config", name=config_name)
            reset[field] = getattr(defaults, field)
        config = config_from_mapping(set_configs or {}, dataclasses.replace(info.config, **reset))
        updated = dataclasses.replace(info, config=config)
        with self._change():
            self._topics[name] = updated
            log_config = log_config_for(config, self._log_config_factory)
            for partition in range(updated.partitions):
                await self.log_store.set_config(name, partition, log_config)
            self._save(updated)
            await self._state_store.commit()
        return updated

    async def create_partitions(self, name: str, total: int) -> TopicInfo:
        info = self.get(name)
        if total <= info.partitions:
            raise InvalidRequestError(
                "partition count can only grow", topic=name, partitions=info.partitions,
                requested=total,
            )
        validate_partitions(total)
        log_config = log_config_for(info.config, self._log_config_factory)
        with self._change():
            for partition in range(info.partitions, total):
                await self.log_store.create_partition(name, partition, log_config)
            updated = dataclasses.replace(info, partitions=total)
            self._topics[name] = updated
            self._save(updated)
            await self._state_store.commit()
        return updated

    def _save(self, info: TopicInfo) -> None:
        self._state_store.save_topic(
            TopicRow(info.name, info.partitions, info.kind, config_to_row(info.config),
                     info.created_ms)
        )
