"""Brokers for tests, on free loopback ports in a temporary directory.

- ``run_broker``: in the running event loop (for asyncio clients).
- ``BrokerThread``: in a background thread with its own uvloop loop (for
  blocking clients such as pika, confluent-kafka, kafka-python, boto3).
- ``BrokerProcess``: a real ``conveyor serve`` child, for kill -9 tests.

With ``CONVEYOR_TEST_POSTGRES_URL`` set (tests/conftest.py sets it when the suite
runs with ``CONVEYOR_TEST_STORAGE=postgresql``), every broker started here keeps
its state in PostgreSQL: one database per data directory, so a restart on the
same directory finds its state again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from conveyor.config import BrokerSettings, ListenerConfig, ServerConfig, TlsConfig
from conveyor.server.app import Server

T = TypeVar("T")

_STARTUP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def storage_for(data_dir: Path, storage: str = "file:") -> str:
    """``storage``, or on a PostgreSQL test pass a database of its own for ``data_dir``."""
    base_url = os.environ.get("CONVEYOR_TEST_POSTGRES_URL")
    if storage != "file:" or not base_url:
        return storage
    from conveyor.testing.postgres import ensure_database

    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:24]
    return ensure_database(base_url, f"conveyor_{digest}")


def test_config(
    data_dir: Path,
    listeners: Iterable[str],
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    ports: Mapping[str, int] | None = None,
    broker: Mapping[str, Any] | None = None,
    storage: str = "file:",
    tls: TlsConfig | None = None,
) -> ServerConfig:
    """``tls``: TLS on every listener; AMQP's amqps on a free port of its own beside the
    plain one (as 5671 beside 5672), the other listeners' ports speak TLS themselves
    (Kafka as SSL unless its settings name another security_protocol)."""
    settings = settings or {}
    ports = ports or {}
    if tls is not None and "kafka" in listeners:
        settings = {**settings, "kafka": {"security_protocol": "SSL", **settings.get("kafka", {})}}
    listener_configs = tuple(
        ListenerConfig(name=name, port=ports.get(name, 0), settings=dict(settings.get(name, {})),
                       tls=_listener_tls(name, settings.get(name, {}), tls),
                       tls_port=ports.get(f"{name}_tls", 0) if tls and name == "amqp" else None)
        for name in listeners
    )
    return ServerConfig(
        data_dir=data_dir,
        storage=storage_for(data_dir, storage),
        host="127.0.0.1",
        broker=BrokerSettings(**dict(broker or {})),
        listeners=listener_configs,
    )


def _listener_tls(name: str, settings: Mapping[str, Any], tls: TlsConfig | None
                  ) -> TlsConfig | None:
    if name == "kafka" and not str(settings.get("security_protocol", "SSL")).endswith("SSL"):
        return None
    return tls


@contextlib.asynccontextmanager
async def run_broker(
    data_dir: Path,
    listeners: Iterable[str] = (),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    broker: Mapping[str, Any] | None = None,
    storage: str = "file:",
    tls: TlsConfig | None = None,
) -> AsyncIterator[Server]:
    server = Server(test_config(data_dir, listeners, settings, broker=broker, storage=storage,
                                tls=tls))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close a stopped loop, but never hang the test session on it: uvloop's close runs
    the loop until every handle is closed, so a socket the server left open (a stop that
    failed or timed out) would block forever. Closed in a daemon thread; past the bound
    it is an error naming the cause, and the loop is left to the process's exit."""
    closer = threading.Thread(target=loop.close, daemon=True, name="conveyor-loop-close")
    closer.start()
    closer.join(timeout=_STARTUP_TIMEOUT_S)
    if closer.is_alive():
        raise RuntimeError("the broker thread's event loop did not close: the server left "
                           "sockets open (a stop that failed or timed out?)")


class BrokerThread:
    """A server running in its own thread and event loop."""

    def __init__(
        self,
        data_dir: Path,
        listeners: Iterable[str] = (),
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        broker: Mapping[str, Any] | None = None,
        storage: str = "file:",
        tls: TlsConfig | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.listener_names = tuple(listeners)
        self.settings = settings
        self.broker_settings = broker
        self.storage = storage
        self.tls = tls
        self.ports: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None

    @property
    def server(self) -> Server:
        assert self._server is not None
        return self._server

    def __enter__(self) -> BrokerThread:
        import uvloop

        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._start_server()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._thread is not None
        try:
            self._stop_server()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=_STARTUP_TIMEOUT_S)
            _close_loop(self._loop)

    def _start_server(self) -> None:
        config = test_config(
            self.data_dir, self.listener_names, self.settings, self.ports, self.broker_settings,
            self.storage,
            self.tls,
        )
        self._server = Server(config)
        self._submit(self._server.start()).result(timeout=_STARTUP_TIMEOUT_S)
        self.ports = dict(self._server.ports)

    def _stop_server(self) -> None:
        if self._server is not None:
            self._submit(self._server.stop()).result(timeout=_STARTUP_TIMEOUT_S)
            self._server = None

    def _submit(self, coroutine: Awaitable[T]) -> Future[T]:
        assert self._loop is not None

        async def wrapper() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop)

    def call(self, function: Callable[..., Awaitable[T]], *args: Any, timeout_s: float = 30) -> T:
        """Run ``function(*args)`` in the broker's loop and return its result."""
        return self._submit(function(*args)).result(timeout=timeout_s)

    def call_sync(self, function: Callable[..., T], *args: Any, timeout_s: float = 30) -> T:
        """Run a plain function in the broker's loop (for non-async broker methods)."""

        async def run() -> T:
            return function(*args)

        return self._submit(run()).result(timeout=timeout_s)

    def restart(self) -> None:
        """Close the broker and open it again on the same directory and ports."""
        self._stop_server()
        self._start_server()


class BrokerProcess:
    """``conveyor serve`` as a child process on fixed free ports."""

    def __init__(
        self,
        data_dir: Path,
        listeners: Iterable[str] = ("http",),
        extra_args: Iterable[str] = (),
        environ: Mapping[str, str] | None = None,
        cwd: Path | None = None,  # relative paths in extra_args (--tls-cert) start here
        launcher: Iterable[str] = ("-m", "conveyor.cli"),  # a bench wraps the CLI in hooks
    ) -> None:
        self.cwd = cwd
        self.launcher = tuple(launcher)
        self.data_dir = data_dir
        self.listener_names = tuple(listeners)
        self.ports = {name: free_port() for name in self.listener_names}
        self.extra_args = tuple(extra_args)
        self.environ = dict(environ or {})
        self.process: subprocess.Popen[str] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.serve.log"

    def start(self) -> None:
        arguments = [
            sys.executable, *self.launcher, "serve",
            "--data-dir", str(self.data_dir),
            "--host", "127.0.0.1",
            "--listeners", ",".join(self.listener_names),
            *(f"--{name}-port={port}" for name, port in self.ports.items()),
            *(() if any(a.startswith("--storage") for a in self.extra_args)
              else ("--storage", storage_for(self.data_dir))),
            *self.extra_args,
        ]
        environment = {**os.environ, **self.environ}
        # The log goes to a file: an unread pipe would block a chatty child.
        with open(self.log_path, "a") as log_file:
            self.process = subprocess.Popen(
                arguments, stdout=subprocess.PIPE, stderr=log_file, text=True, env=environment,
                cwd=self.cwd,
            )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("conveyor ready"):
                return
        self.process.wait(timeout=_STARTUP_TIMEOUT_S)
        raise RuntimeError(
            f"conveyor serve exited with {self.process.returncode}:\n{self.log_path.read_text()}"
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=_STARTUP_TIMEOUT_S)
        self._close_pipes()

    def stop(self) -> int:
        """SIGTERM and wait for the graceful shutdown; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=_STARTUP_TIMEOUT_S)
        self._close_pipes()
        return code

    def _close_pipes(self) -> None:
        assert self.process is not None
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
