"""Server configuration: defaults < TOML file < CONVEYOR_* environment < command-line flags.

Every limit is a named field whose unit ends its name. The configuration is a
frozen dataclass tree; ``load_config`` is the only place that reads the file or
the environment.

Environment variables: ``CONVEYOR_DATA_DIR``, ``CONVEYOR_STORAGE``, ``CONVEYOR_HOST``,
``CONVEYOR_ADVERTISED_HOST``, ``CONVEYOR_LOG_LEVEL``, ``CONVEYOR_LOG_FORMAT``,
``CONVEYOR_AUTH`` (``required`` or ``off``), ``CONVEYOR_INSECURE``,
``CONVEYOR_LISTENERS`` (comma-separated names), ``CONVEYOR_<NAME>_PORT`` for a
listener's port, ``CONVEYOR_BROKER__<FIELD>`` for a broker field
(``CONVEYOR_BROKER__AUTO_CREATE_TOPICS=false``), and ``CONVEYOR_TLS_CERT``,
``CONVEYOR_TLS_KEY``, ``CONVEYOR_TLS_CA``, ``CONVEYOR_TLS_VERIFY`` for the ``[tls]`` section.

TLS (docs/security.md, "TLS"): the global ``[tls]`` section (``cert_file``,
``key_file``, optional ``ca_file`` and ``verify``) applies to every listener;
``[listeners.X.tls]`` overrides any of its keys for one listener (``enabled = false``
keeps that listener plaintext). ``[listeners.X] tls_port`` puts TLS on a port of its
own beside the plain one (AMQP: 5671 by default, as RabbitMQ); without it the
listener's port itself speaks TLS. ``plaintext = false`` drops the plain port.
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
# A separate TLS port by default only where the peer has one: RabbitMQ's amqps 5671.
DEFAULT_TLS_PORTS: dict[str, int] = {"amqp": 5671}
TLS_VERIFY_MODES: tuple[str, ...] = ("none", "optional", "required")
TLS_KEYS: tuple[str, ...] = ("cert_file", "key_file", "ca_file", "verify")
KAFKA_SECURITY_PROTOCOLS: tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Where a listener's certificate comes from and what it asks of clients."""

    cert_file: Path  # PEM: the server certificate, then its intermediates
    key_file: Path  # PEM private key of cert_file
    ca_file: Path | None = None  # PEM CA bundle that client certificates must chain to
    # Client certificates: "none" (not asked), "optional" (verified when sent),
    # "required" (handshake refused without one). Default: optional with ca_file.
    verify: str = "none"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    enabled: bool = True
    host: str | None = None  # None: the server's host
    port: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)  # protocol-specific section
    tls: TlsConfig | None = None  # None: no TLS on this listener
    # With tls: None puts TLS on ``port`` itself; a number adds a TLS port beside the
    # plain one (0: any free port).
    tls_port: int | None = None
    plaintext: bool = True  # serve plain on ``port`` (ignored when TLS is on ``port``)


@dataclass(frozen=True, slots=True)
class InternalConfig:
    """The node-to-node channel of a cluster node (``[listeners.internal]``,
    docs/cluster.md): its port and its TLS."""

    port: int = 0  # 0: a free port chosen at start (advertised in conveyor_nodes)
    # The [tls] section unless ``[listeners.internal.tls]`` overrides it (``enabled =
    # false``: plain). With a ca_file a peer must present a certificate that chains to it
    # (``verify`` is "required" whatever the section says: every node has a certificate).
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    auto_create_topics: bool = True
    default_partitions: int = 1
    # Broker-wide ceiling on one record batch: AMQP's largest configurable message (128 MiB)
    # plus room for its properties. Each topic's max.message.bytes (1 MiB by default, as
    # Kafka's) applies below it; queues take what their listener accepts.
    record_bytes_max: int = 129 << 20
    retention_check_interval_ms: int = 60_000
    # Kafka's transactional.id.expiration.ms (7 days) and producer.id.expiration.ms (1 day)
    transactional_id_expiration_ms: int = 7 * 24 * 3600 * 1000
    producer_id_expiration_ms: int = 24 * 3600 * 1000
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
    # --storage postgresql://: appends waiting for the database (stalled, away) past
    # which new ones are refused at once with the protocol's retriable storage error
    storage_queue_bytes_max: int = 64 << 20
    storage_queue_appends_max: int = 10_000
    # several nodes on one PostgreSQL (docs/cluster.md): heartbeat period and lease length
    cluster_heartbeat_ms: int = 3_000
    cluster_lease_ms: int = 10_000


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
    # "required": every listener demands credentials (docs/security.md). "off": clients
    # without credentials are the guest user, from loopback peers only.
    auth: str = "off"
    # Listen on a non-loopback address with auth off (refused without it).
    insecure: bool = False
    # Several nodes on one PostgreSQL (docs/cluster.md): this node's id, a number or
    # "auto" (the database hands one out); None: a single node, no membership.
    node_id: str | None = None
    workers: int = 1  # --workers N: N node processes on one PostgreSQL (cluster/workers.py)
    # AMQP, HTTP and SQS bind with SO_REUSEPORT, so several node processes on one machine
    # share their ports (--workers sets it for every worker; Kafka keeps a port per node)
    reuse_port: bool = False
    shutdown_grace_ms: int = 10_000
    tls: TlsConfig | None = None  # the global [tls] section (each listener has its own copy)
    internal: InternalConfig = field(default_factory=InternalConfig)  # cluster nodes only
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


def tls_config(section: Mapping[str, Any], base: TlsConfig | None, where: str
               ) -> TlsConfig | None:
    """``base`` with the keys of a ``[tls]``-shaped section over it; None when no
    certificate is configured or the section says ``enabled = false``."""
    values = dict(section)
    enabled = values.pop("enabled", None)
    unknown = sorted(set(values) - set(TLS_KEYS))
    if unknown:
        raise InvalidConfigError(f"unknown {where} settings", names=unknown)
    if enabled is False:
        return None
    merged: dict[str, Any] = {} if base is None else {
        "cert_file": base.cert_file, "key_file": base.key_file, "ca_file": base.ca_file}
    if base is not None and "ca_file" not in values:
        merged["verify"] = base.verify
    merged.update({key: value for key, value in values.items() if value not in (None, "")})
    if "cert_file" not in merged or "key_file" not in merged:
        if enabled is True or values:
            raise InvalidConfigError(f"{where} needs both cert_file and key_file")
        return None
    ca_file = merged.get("ca_file")
    verify = str(merged.get("verify") or ("optional" if ca_file else "none")).lower()
    if verify not in TLS_VERIFY_MODES:
        raise InvalidConfigError(f"{where}.verify must be one of {', '.join(TLS_VERIFY_MODES)}",
                                 value=verify)
    if verify != "none" and not ca_file:
        raise InvalidConfigError(f"{where}.verify = {verify} needs ca_file")
    return TlsConfig(Path(merged["cert_file"]), Path(merged["key_file"]),
                     Path(ca_file) if ca_file else None, verify)


def _listener_tls(name: str, section: dict[str, Any], global_tls: TlsConfig | None
                  ) -> tuple[TlsConfig | None, int | None, bool]:
    """Pop the TLS keys of a ``[listeners.X]`` section: (tls, tls_port, plaintext)."""
    override = section.pop("tls", {})
    if not isinstance(override, Mapping):
        raise InvalidConfigError(f"listeners.{name}.tls must be a table")
    tls = tls_config(override, global_tls, f"listeners.{name}.tls")
    plaintext = section.pop("plaintext", True)
    tls_port = section.pop("tls_port", DEFAULT_TLS_PORTS.get(name))
    if name == "kafka":
        protocol = str(section.get("security_protocol") or
                       ("SSL" if tls is not None else "PLAINTEXT")).upper()
        if protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise InvalidConfigError("kafka.security_protocol must be one of "
                                     + ", ".join(KAFKA_SECURITY_PROTOCOLS), value=protocol)
        if protocol.endswith("SSL") and tls is None:
            raise InvalidConfigError(f"kafka.security_protocol = {protocol} needs a certificate"
                                     " ([tls] cert_file and key_file, or --tls-cert/--tls-key)")
        section["security_protocol"] = protocol
        # Kafka names one security protocol per listener port (listeners=SSL://:9093).
        tls = tls if protocol.endswith("SSL") else None
        if tls_port is not None:
            raise InvalidConfigError("kafka has no tls_port: choose its security_protocol")
    if not isinstance(plaintext, bool):
        raise InvalidConfigError(f"listeners.{name}.plaintext must be true or false")
    if tls_port is not None and (isinstance(tls_port, bool) or not isinstance(tls_port, int)
                                 or not 0 <= tls_port <= 65535):
        raise InvalidConfigError("listener tls_port out of range", listener=name, port=tls_port)
    if tls is None and not plaintext:
        raise InvalidConfigError(f"listeners.{name}.plaintext = false needs TLS configured")
    return tls, tls_port if tls is not None else None, plaintext


def _internal_config(section: Mapping[str, Any], global_tls: TlsConfig | None,
                     environ: Mapping[str, str], flags: Mapping[str, Any]) -> InternalConfig:
    """``[listeners.internal]``: ``port`` (< ``CONVEYOR_INTERNAL_PORT`` < ``--internal-port``)
    and a ``tls`` table over the global ``[tls]``."""
    if not isinstance(section, Mapping):
        raise InvalidConfigError("listeners.internal must be a table")
    values = dict(section)
    override = values.pop("tls", {})
    port: Any = values.pop("port", 0)
    if values:
        raise InvalidConfigError("unknown listeners.internal settings", names=sorted(values))
    if not isinstance(override, Mapping):
        raise InvalidConfigError("listeners.internal.tls must be a table")
    if "CONVEYOR_INTERNAL_PORT" in environ:
        port = _coerce(environ["CONVEYOR_INTERNAL_PORT"], 0, "CONVEYOR_INTERNAL_PORT")
    if flags.get("internal_port") is not None:
        port = flags["internal_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidConfigError("listeners.internal.port out of range", port=port)
    tls = tls_config(override, global_tls, "listeners.internal.tls")
    if tls is not None:
        tls = dataclasses.replace(tls, verify="required" if tls.ca_file else "none")
    return InternalConfig(port, tls)


def _listeners_from(
    sections: Mapping[str, Any], enabled_names: list[str] | None, ports: Mapping[str, int],
    global_tls: TlsConfig | None = None,
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
        tls, tls_port, plaintext = _listener_tls(name, section, global_tls)
        result.append(ListenerConfig(name, enabled, host, port, section, tls, tls_port,
                                     plaintext))
    unknown = set(sections) - set(names)
    if unknown:
        raise InvalidConfigError("unknown listeners", names=sorted(unknown))
    return tuple(result)


def _check_security_settings(top: Mapping[str, Any]) -> None:
    if top.get("auth", "off") not in ("required", "off"):
        raise InvalidConfigError("auth must be required or off", value=top["auth"])
    if not isinstance(top.get("insecure", False), bool):
        raise InvalidConfigError("insecure must be a boolean", value=top["insecure"])


# Top-level settings taken from the file, flags and (all but ``insecure``) the environment.
_TOP_KEYS: tuple[str, ...] = ("data_dir", "storage", "host", "advertised_host", "log_level",
                              "log_format", "node_id", "workers", "reuse_port", "auth",
                              "insecure")
_TOP_KEYS_FROM_ENV: tuple[str, ...] = _TOP_KEYS[:-1]
def _tls_section(document: Mapping[str, Any], environ: Mapping[str, str],
                 flags: Mapping[str, Any]) -> dict[str, Any]:
    """The global ``[tls]`` keys: file < environment < flags (--tls-cert, ...)."""
    section: dict[str, Any] = dict(document.get("tls", {}))
    sources = (("cert_file", "CONVEYOR_TLS_CERT", "tls_cert"),
               ("key_file", "CONVEYOR_TLS_KEY", "tls_key"),
               ("ca_file", "CONVEYOR_TLS_CA", "tls_ca"),
               ("verify", "CONVEYOR_TLS_VERIFY", "tls_verify"))
    for key, env_name, flag in sources:
        if flags.get(flag) is not None:
            section[key] = flags[flag]
        elif env_name in environ:
            section[key] = environ[env_name]
    return section


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
    top: dict[str, Any] = {key: document[key] for key in _TOP_KEYS if key in document}
    broker_overrides: dict[str, Any] = dict(document.get("broker", {}))
    listener_sections: dict[str, Any] = dict(document.get("listeners", {}))
    enabled_names: list[str] | None = None
    ports: dict[str, int] = {}

    for key in _TOP_KEYS_FROM_ENV:
        env_name = f"CONVEYOR_{key.upper()}"
        if env_name in environ:
            top[key] = environ[env_name]
    if "CONVEYOR_INSECURE" in environ:
        top["insecure"] = _coerce(environ["CONVEYOR_INSECURE"], False, "CONVEYOR_INSECURE")
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

    unknown_top = set(document) - {*_TOP_KEYS, "broker", "listeners", "tls"}
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
    _check_security_settings(top)
    global_tls = tls_config(_tls_section(document, environ, flags), None, "tls")
    return ServerConfig(
        **top,
        tls=global_tls,
        internal=_internal_config(listener_sections.pop("internal", {}), global_tls, environ,
                                  flags),
        broker=_broker_settings(BrokerSettings(), broker_overrides),
        listeners=_listeners_from(listener_sections, enabled_names, ports, global_tls),
    )


def check_workers(workers: int, storage: str) -> None:
    """``--workers N``: 1..64 node processes, more than one only on PostgreSQL storage."""
    if workers < 1 or workers > 64:
        raise InvalidConfigError("--workers must be between 1 and 64", workers=workers)
    if workers > 1 and not storage.startswith(("postgresql:", "postgres:")):
        raise InvalidConfigError(
            "--workers needs --storage postgresql://... : the workers are cluster nodes "
            "sharing one database (file storage belongs to one process)")


def _cluster_settings(top: dict[str, Any]) -> None:
    """``workers`` and ``node_id``: several nodes need PostgreSQL storage; ``reuse_port``."""
    if isinstance(top.get("reuse_port"), str):
        top["reuse_port"] = _coerce(top["reuse_port"], False, "reuse_port")
    if not isinstance(top.get("reuse_port", False), bool):
        raise InvalidConfigError("reuse_port must be a boolean", value=top["reuse_port"])
    storage = str(top.get("storage", "file:"))
    if "workers" in top:
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
