"""The server: config -> storage -> broker -> listeners, and the way back down.

This is the one place that chooses concrete classes (FileLogStore on the OS file
system; SQLite or PostgreSQL state, chosen by ``--storage`` in server/storage.py).
Start order: lock the data directory, recover the log store, open the state store
and broker, start listeners. Stop order (SIGINT / SIGTERM): stop accepting and close
connections, let the broker finish in-flight appends and fsync, close the stores,
release the lock. SIGHUP reloads the TLS certificates and keys: new handshakes use
the new files, open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import random
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.clock import Clock, SystemClock
from conveyor.config import ServerConfig
from conveyor.connections import ConnectionRegistry
from conveyor.errors import UnavailableError
from conveyor.limits import DiskAlarm, ServerLimits
from conveyor.protocols.amqp.names import topic_name_for as amqp_topic_name_for
from conveyor.server.health import readiness_checks
from conveyor.server.listeners import ListenerContext, RunningListener, find_listener
from conveyor.server.metrics import Metrics, MetricsLimits
from conveyor.server.security_setup import (
    advertised_host_for,
    refuse_open_bind,
    start_security,
)
from conveyor.server.state_recovery import rebuild_orphans
from conveyor.server.tls import RefusalLog, TlsRegistry

if TYPE_CHECKING:
    from collections.abc import Mapping

    from conveyor.broker.broker import Broker
    from conveyor.cluster.node import ClusterNode
    from conveyor.security.model import Security

logger = logging.getLogger("conveyor.server")


class DataDirectoryLock:
    """An exclusive flock on ``<data_dir>/.lock`` so two servers never share a directory."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UnavailableError(
                "data directory is in use by another server", path=str(self._path)
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Server:
    def __init__(
        self, config: ServerConfig, clock: Clock | None = None, rng: random.Random | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ  # CONVEYOR_ADMIN_*
        self._security: Security | None = None
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.ports: dict[str, int] = {}
        self._broker: Broker | None = None
        self._listeners: dict[str, RunningListener] = {}
        self._lock = DataDirectoryLock(config.data_dir)
        settings = config.broker
        self.limits = ServerLimits(settings.partial_request_bytes_max,
                                   settings.memory_high_watermark_bytes)
        self.connections = ConnectionRegistry()  # live connections, for the management API
        self.disk_alarm = DiskAlarm(config.data_dir, settings.disk_free_limit_bytes,
                                    settings.disk_check_interval_ms, self.limits.flow)
        http = config.listener("http")
        metrics_settings = {  # [listeners.http] metrics_queues_max = ... (docs/observability.md)
            key.removeprefix("metrics_"): value
            for key, value in (http.settings if http is not None else {}).items()
            if key.startswith("metrics_")}
        self.metrics = Metrics(lambda: self._broker, config.data_dir,
                               MetricsLimits.from_settings(metrics_settings))
        self._stopping = False
        self.tls = TlsRegistry()  # one context per certificate; SIGHUP reloads them
        self.refusals = RefusalLog()  # wrong protocol on a port, failed TLS handshakes
        self.cluster: ClusterNode | None = None  # several nodes on one PostgreSQL

    def reload_tls(self) -> bool:
        """Re-read every listener's certificate, key and CA files (SIGHUP); False when
        one could not be loaded (that listener keeps its previous certificate)."""
        return self.tls.reload()

    @property
    def security(self) -> Security:
        assert self._security is not None, "server not started"
        return self._security

    @property
    def broker(self) -> Broker:
        assert self._broker is not None, "server not started"
        return self._broker

    async def start(self) -> None:
        from conveyor.broker.broker import Broker, BrokerConfig
        from conveyor.server.metrics import MeasuredFileSystem
        from conveyor.server.storage import open_storage, parse_storage

        refuse_open_bind(self.config)
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        self._stopping = False
        try:
            file_system = MeasuredFileSystem(self.metrics.storage)  # fsync latency metrics
            storage = open_storage(
                parse_storage(self.config.storage), data_dir, file_system, self.clock,
                queue_bytes_max=self.config.broker.storage_queue_bytes_max,
                queue_appends_max=self.config.broker.storage_queue_appends_max)
            log_store, state_store = storage.log_store, storage.state_store
            engine = getattr(state_store, "engine", None)
            if self.config.node_id is not None and hasattr(engine, "writer"):
                # a cluster node: a commit-sequence row of its own (postgres_engine.py)
                engine.writer = random.SystemRandom().randrange(2, 2**31)  # type: ignore[union-attr]
            settings = self.config.broker
            broker_config = BrokerConfig(
                auto_create_topics=settings.auto_create_topics,
                default_partitions=settings.default_partitions,
                record_bytes_max=settings.record_bytes_max,
                transactional_id_expiration_ms=settings.transactional_id_expiration_ms,
                producer_id_expiration_ms=settings.producer_id_expiration_ms,
            )
            self._broker = Broker(log_store, state_store, self.clock, self.rng, broker_config,
                                  queue_alias=amqp_topic_name_for)
            await self._broker.open()
            self._security = await start_security(self.config, state_store, self.clock,
                                                  self.environ)
            await rebuild_orphans(self._broker)
            self.disk_alarm.start()
            self.metrics.loop_lag.start()
            await self._open_cluster(storage.location.dsn)
            await self._start_listeners()
            if self.cluster is not None:
                await self.cluster.advertise(self._advertised_addresses())
        except BaseException:
            await self.stop()
            raise
        logger.info("conveyor started", extra={"data_dir": str(data_dir), "ports": self.ports,
                                               "storage": storage.location.describe()})

    async def _open_cluster(self, dsn: str | None) -> None:
        """With ``node_id`` set: register this node (docs/cluster.md)."""
        if self.config.node_id is None or dsn is None:
            return
        from conveyor.cluster.membership import ClusterSettings
        from conveyor.cluster.node import ClusterNode, InternalChannel

        node_id = None if self.config.node_id == "auto" else int(self.config.node_id)
        settings = self.config.broker
        self.cluster = ClusterNode(self.broker, ClusterSettings(
            dsn, node_id, settings.cluster_heartbeat_ms, settings.cluster_lease_ms), self.clock,
            internal_host=self.config.host, advertised_host=self._advertised_host(),
            internal=InternalChannel(
                self.config.internal.port, self.tls.get(self.config.internal.tls),
                self.config.internal.tls, self.refusals))
        await self.cluster.open()

    def _advertised_addresses(self) -> dict[str, str]:
        host = self._advertised_host()
        return {name: f"{host}:{port}" for name, port in self.ports.items()}

    def _advertised_host(self) -> str:
        return advertised_host_for(self.config)

    def cluster_status(self) -> dict[str, Any] | None:
        return self.cluster.status() if self.cluster is not None else None

    async def cluster_lag(self) -> dict[str, Any] | None:
        return await self.cluster.lag() if self.cluster is not None else None

    def listener(self, name: str) -> RunningListener:
        """A running listener by name (tests and metrics look inside)."""
        return self._listeners[name]

    async def _start_listeners(self) -> None:
        advertised_host = self._advertised_host()
        logger.info("kafka advertises %s", advertised_host,
                    extra={"advertised_host": advertised_host, "bound": self.config.host})
        for listener_config in self.config.listeners:
            if not listener_config.enabled:
                continue
            start = find_listener(listener_config.name)
            tls = self.tls.get(listener_config.tls)  # bad files: InvalidConfigError
            context = ListenerContext(
                host=listener_config.host or self.config.host,
                port=listener_config.port,
                settings=listener_config.settings,
                advertised_host=advertised_host,
                limits=self.limits,
                counters=self.metrics.counters(listener_config.name),
                observability=self,
                connections=self.connections,
                security=self._security,
                tls=tls,
                tls_port=listener_config.tls_port,
                plaintext=listener_config.plaintext,
                refusals=self.refusals,
                cluster=self.cluster,
                # Kafka clients are sent to one node's own port (Metadata): never shared
                reuse_port=self.config.reuse_port and listener_config.name != "kafka",
            )
            running = await start(self.broker, context)
            self._listeners[listener_config.name] = running
            self.ports[listener_config.name] = running.port
            tls_port = getattr(running, "tls_port", None)
            if tls_port is not None and tls_port != running.port:
                self.ports[f"{listener_config.name}_tls"] = tls_port
            logger.info(
                "listening",
                extra={
                    "listener": listener_config.name, "host": context.host, "port": running.port,
                    "tls_port": tls_port,
                },
            )

    # --- /metrics and /ready (the Observability protocol of the HTTP listener) ----------
    async def render_metrics(self, accept: str) -> tuple[bytes, str]:
        return self.metrics.render(accept)

    def readiness(self) -> dict[str, str]:
        expected = [listener.name for listener in self.config.listeners if listener.enabled]
        checks = readiness_checks(self._broker, self.config.data_dir, expected,
                                  set(self._listeners), self._stopping)
        if self.cluster is not None:
            checks["cluster"] = ("ok" if self.cluster.membership.serving()
                                 else "no live lease in the cluster database")
        return checks

    async def stop(self) -> None:
        self._stopping = True
        if self.cluster is not None:  # drain: hand the leases over before closing
            cluster, self.cluster = self.cluster, None
            try:
                await cluster.close()
            except Exception:
                logger.exception("cluster drain failed")
        for name, listener in list(self._listeners.items()):
            try:
                await listener.close()
            except Exception:
                logger.exception("listener failed to close", extra={"listener": name})
            del self._listeners[name]
        await self.disk_alarm.stop()
        await self.metrics.loop_lag.stop()
        if self._broker is not None:
            await self._broker.close()
            self._broker = None
        self._lock.release()


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    server = Server(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop_requested.set)

    def reload_tls() -> None:  # SIGHUP; stdout says how it went (tests wait on the line)
        done = server.reload_tls()
        print("conveyor tls reloaded" if done else
              "conveyor tls reload failed: previous certificates kept (see the log)", flush=True)

    loop.add_signal_handler(signal.SIGHUP, reload_tls)
    await server.start()
    # what start() loaded (modules, configuration, windows) lives as long as the process:
    # out of the collector's reach, a full collection no longer walks it (it paused the
    # loop for 16-135 ms under load, once per ~8 s at 2,000 AMQP msg/s: the e2e p99)
    gc.freeze()
    print(
        "conveyor ready: "
        + ", ".join(f"{name}={config.host}:{port}" for name, port in server.ports.items()),
        flush=True,
    )
    try:
        await stop_requested.wait()
        logger.info("shutting down")
    finally:
        await server.stop()
        logger.info("stopped")


def run(config: ServerConfig) -> None:
    import uvloop

    uvloop.run(serve(config))
