"""Server configuration: defaults < TOML file < CONVEYOR_* environment < command-line flags.

Every limit is a named field whose unit ends its name. The configuration is a
frozen dataclass tree; ``load_config`` is the only place that reads the file or
the environment.

Environment variables: ``CONVEYOR_DATA_DIR``, ``CONVEYOR_STORAGE``, ``CONVEYOR_HOST``,
``CONVEYOR_ADVERTISED_HOST``, ``CONVEYOR_LOG_LEVEL``, ``CONVEYOR_LOG_FORMAT``,
``CONVEYOR_LISTENERS`` (comma-separated names), ``CONVEYOR_<NAME>_PORT`` for a
listener's port, and ``CONVEYOR_BROKER__<FIELD>`` for a broker field
(``CONVEYOR_BROKER__AUTO_CREATE_TOPICS=false``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.errors import InvalidConfigError

DEFAULT_PORTS: dict[str, int] = {"kafka": 9092, "amqp": 5672, "sqs": 9324, "http": 8080}


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    enabled: bool = True
    host: str | None = None  # None: the server's host
    port: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)  # protocol-specific section


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    auto_create_topics: bool = True
    default_partitions: int = 1
    # Broker-wide ceiling on one record batch: AMQP's largest configurable message (128 MiB)
    # plus room for its properties. Each topic's max.message.bytes (1 MiB by default, as
    # Kafka's) applies below it; queues take what their listener accepts.
    record_bytes_max: int = 129 << 20
    retention_check_interval_ms: int = 60_000
    # Bytes of unfinished requests (partial frames, unfinished messages and bodies) over
    # all connections of all listeners; past it the connection holding most is closed with
    # its protocol's error. Per-frame limits alone let 5 Kafka connections hold 5 x 99 MiB.
    partial_request_bytes_max: int = 256 << 20
    # Memory held by unprocessed publishes over the whole broker past which the heaviest
    # publishers are pushed back (RabbitMQ's vm_memory_high_watermark, as bytes).
    memory_high_watermark_bytes: int = 256 << 20
    # Free disk space under the data directory below which publishers are blocked and reads
    # keep working (RabbitMQ's disk_free_limit, 50 MB by default).
    disk_free_limit_bytes: int = 50_000_000
    disk_check_interval_ms: int = 1_000  # RabbitMQ checks disk space about once a second
    # several nodes on one PostgreSQL (docs/cluster.md): heartbeat period and lease length
    cluster_heartbeat_ms: int = 3_000
    cluster_lease_ms: int = 10_000


_TOP_KEYS = ("data_dir", "storage", "host", "advertised_host", "log_level", "log_format",
             "node_id", "workers")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path = Path("./conveyor-data")
    # file: (embedded: logs + SQLite under data_dir) or postgresql://user@host:port/db
    # (state in PostgreSQL); see conveyor/server/storage.py
    storage: str = "file:"
    host: str = "127.0.0.1"
    advertised_host: str | None = None  # what Kafka Metadata tells clients; None: host
    log_level: str = "info"
    log_format: str = "text"  # "text" or "json"
    # Several nodes on one PostgreSQL (docs/cluster.md): this node's id, a number or
    # "auto" (the database hands one out); None: a single node, no membership.
    node_id: str | None = None
    workers: int = 1  # --workers N: N node processes on one PostgreSQL (cluster/workers.py)
    shutdown_grace_ms: int = 10_000
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    listeners: tuple[ListenerConfig, ...] = field(
        default_factory=lambda: tuple(
            ListenerConfig(name=name, port=port)
            for name, port in DEFAULT_PORTS.items()
        )
    )

    def listener(self, name: str) -> ListenerConfig | None:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        return None


def _coerce(value: str, template: Any, name: str) -> Any:
    if isinstance(template, bool):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise InvalidConfigError(f"{name} must be a boolean", value=value)
    if isinstance(template, int):
        try:
            return int(value)
        except ValueError:
            raise InvalidConfigError(f"{name} must be an integer", value=value) from None
    return value


def _broker_settings(base: BrokerSettings, overrides: Mapping[str, Any]) -> BrokerSettings:
    known = {f.name for f in dataclasses.fields(BrokerSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise InvalidConfigError("unknown [broker] settings", names=sorted(unknown))
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        template = getattr(base, key)
        values[key] = _coerce(value, template, f"broker.{key}") if isinstance(value, str) else value
        if type(values[key]) is not type(template):
            raise InvalidConfigError(f"broker.{key} has the wrong type", value=value)
    return dataclasses.replace(base, **values)


def _listeners_from(
    sections: Mapping[str, Any], enabled_names: list[str] | None, ports: Mapping[str, int]
) -> tuple[ListenerConfig, ...]:
    names = list(DEFAULT_PORTS)
    result = []
    for name in names:
        section = dict(sections.get(name, {}))
        enabled = bool(section.pop("enabled", True))
        host = section.pop("host", None)
        port = int(section.pop("port", DEFAULT_PORTS[name]))
        if enabled_names is not None:
            enabled = name in enabled_names
        if name in ports:
            port = ports[name]
        if not 0 <= port <= 65535:
            raise InvalidConfigError("listener port out of range", listener=name, port=port)
        result.append(ListenerConfig(name, enabled, host, port, section))
    unknown = set(sections) - set(names)
    if unknown:
        raise InvalidConfigError("unknown listeners", names=sorted(unknown))
    return tuple(result)


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge defaults, the TOML file, the environment and flags (later wins)."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InvalidConfigError(
                "cannot read config file", path=str(path), error=str(error)
            ) from None
    top: dict[str, Any] = {
        key: document[key]
        for key in _TOP_KEYS
        if key in document
    }
    broker_overrides: dict[str, Any] = dict(document.get("broker", {}))
    listener_sections: dict[str, Any] = dict(document.get("listeners", {}))
    enabled_names: list[str] | None = None
    ports: dict[str, int] = {}

    for key in _TOP_KEYS:
        env_name = f"CONVEYOR_{key.upper()}"
        if env_name in environ:
            top[key] = environ[env_name]
    if "CONVEYOR_LISTENERS" in environ:
        enabled_names = [n.strip() for n in environ["CONVEYOR_LISTENERS"].split(",") if n.strip()]
    for name in DEFAULT_PORTS:
        env_name = f"CONVEYOR_{name.upper()}_PORT"
        if env_name in environ:
            ports[name] = int(_coerce(environ[env_name], 0, env_name))
    for env_name, value in environ.items():
        if env_name.startswith("CONVEYOR_BROKER__"):
            broker_overrides[env_name.removeprefix("CONVEYOR_BROKER__").lower()] = value

    for key in _TOP_KEYS:
        if flags.get(key) is not None:
            top[key] = flags[key]
    if flags.get("listeners") is not None:
        enabled_names = list(flags["listeners"])
    for name, port in (flags.get("ports") or {}).items():
        ports[name] = int(port)

    unknown_top = set(document) - {
        *_TOP_KEYS, "broker", "listeners",
    }
    if unknown_top:
        raise InvalidConfigError("unknown settings in config file", names=sorted(unknown_top))
    if "storage" in top:
        top["storage"] = str(top["storage"])
        scheme, _, rest = top["storage"].partition(":")
        if scheme == "file" and rest:
            top["data_dir"] = rest  # file:PATH names the data directory
    if "data_dir" in top:
        top["data_dir"] = Path(top["data_dir"])
    _cluster_settings(top)
    if top.get("log_format", "text") not in ("text", "json"):
        raise InvalidConfigError("log_format must be text or json", value=top["log_format"])
    return ServerConfig(
        **top,
        broker=_broker_settings(BrokerSettings(), broker_overrides),
        listeners=_listeners_from(listener_sections, enabled_names, ports),
    )


def _cluster_settings(top: dict[str, Any]) -> None:
    """``workers`` and ``node_id``: several nodes need PostgreSQL storage."""
    storage = str(top.get("storage", "file:"))
    if "workers" in top:
        from conveyor.cluster.workers import check_workers

        value = top["workers"]
        top["workers"] = _coerce(value, 1, "workers") if isinstance(value, str) else value
        if isinstance(top["workers"], bool) or not isinstance(top["workers"], int):
            raise InvalidConfigError("workers must be an integer", value=value)
        check_workers(top["workers"], storage)
    if "node_id" in top:
        top["node_id"] = _node_id(top["node_id"], storage)


def _node_id(value: object, storage: object) -> str:
    text = str(value).strip()
    if text != "auto" and not (text.isdigit() and 0 <= int(text) < 2**31):
        raise InvalidConfigError("node_id must be a number (0 .. 2^31-1) or auto", value=text)
    if not str(storage).startswith(("postgresql:", "postgres:")):
        raise InvalidConfigError(
            "node_id (several nodes) needs --storage postgresql://... (every node on one "
            "database)", storage=str(storage).split("@")[-1])
    return text


# --- connection limits shared by every listener ---------------------------------------
@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """Bounded waits and the connection cap of one listener (keys of its ``[listeners.X]``
    section; each protocol's defaults follow its peer, see ``LISTENER_LIMITS_DEFAULT``)."""

    connections_max: int  # beyond it a new connection is closed at once, logged and counted
    # No request for this long (and none in progress) closes the connection.
    idle_timeout_ms: int
    # A request whose first byte arrived must be whole (frame, or HTTP headers + body)
    # within this; a partial frame never holds a connection for longer.
    request_timeout_ms: int
    # The protocol's opening exchange (AMQP header..Connection.Open) must finish within this.
    handshake_timeout_ms: int


LISTENER_LIMITS_DEFAULT: dict[str, ListenerLimits] = {
    # Kafka: connections.max.idle.ms 10 min; request.timeout.ms 30 s bounds a frame;
    # max.connections is unbounded in Kafka, 10,000 here as for HTTP.
    "kafka": ListenerLimits(10_000, 600_000, 30_000, 30_000),
    # RabbitMQ: handshake_timeout 10 s; idle detection is heartbeats (no idle close);
    # a frame must be whole within 30 s.
    "amqp": ListenerLimits(10_000, 0, 30_000, 10_000),
    # nginx: keepalive_timeout 75 s, client_header_timeout + client_body_timeout 60 s.
    "http": ListenerLimits(10_000, 75_000, 60_000, 60_000),
    "sqs": ListenerLimits(10_000, 75_000, 60_000, 60_000),
}
LISTENER_LIMIT_NAMES: tuple[str, ...] = (
    "connections_max", "idle_timeout_ms", "request_timeout_ms", "handshake_timeout_ms",
)


def listener_limits(name: str, settings: Mapping[str, Any]) -> ListenerLimits:
    """The limits in a listener's settings section over its protocol's defaults
    (``idle_timeout_ms = 0`` turns the idle close off)."""
    base = LISTENER_LIMITS_DEFAULT.get(name, LISTENER_LIMITS_DEFAULT["http"])
    values: dict[str, int] = {}
    for key in LISTENER_LIMIT_NAMES:
        if key not in settings:
            continue
        value = settings[key]
        if isinstance(value, str):
            value = _coerce(value, 0, f"{name}.{key}")
        minimum = 1 if key == "connections_max" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidConfigError(f"{name}.{key} must be an integer >= {minimum}",
                                     value=value)
        values[key] = value
    return dataclasses.replace(base, **values)
