"""The brokers under test, each a child process on free loopback ports in a fresh directory.

- ``rabbitmq_node``: RabbitMQ from Debian's package (``/usr/lib/rabbitmq/bin/rabbitmq-server``),
  its own node name, AMQP and distribution ports, its own ``epmd`` on a private port (so a
  RabbitMQ another process runs on this machine is never touched), no plugins, mnesia and
  logs in the temporary directory. Stopped by SIGTERM to the node's PID.
- ``conveyor_node``: ``python -m conveyor.cli serve --listeners amqp`` through
  ``conveyor.testing.server.BrokerProcess``.

Both yield a ``RunningBroker`` with the AMQP URL and ``cpu_s()``: CPU seconds of the broker
process and its descendants (Erlang's helper processes are a few of them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from conveyor.testing.server import BrokerProcess, free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
ERTS_GLOB = "/usr/lib/erlang/erts-*/bin/epmd"
START_TIMEOUT_S = 60.0


@dataclass
class RunningBroker:
    name: str
    port: int
    pid: int
    version: str

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the broker process and its descendants so far."""
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total


def rabbitmq_available() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists()


def _epmd_binary() -> str:
    found = shutil.which("epmd")
    if found:
        return found
    candidates = sorted(Path("/").glob(ERTS_GLOB.lstrip("/")))
    if not candidates:
        raise RuntimeError("epmd not found: apt-get install rabbitmq-server (pulls erlang)")
    return str(candidates[-1])


def wait_for_amqp(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until the port answers an AMQP protocol header with a Connection.Start frame."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as probe:
                probe.sendall(b"AMQP\x00\x00\x09\x01")
                if probe.recv(1)[:1] == b"\x01":  # method frame: Connection.Start
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no AMQP answer on port {port} after {timeout_s} s")


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _rabbitmq_version() -> str:
    try:
        output = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return output.strip()


@contextmanager
def rabbitmq_node(workdir: Path, tag: str) -> Iterator[RunningBroker]:
    """A fresh RabbitMQ node in ``workdir``; ``tag`` goes into its node name."""
    workdir.mkdir(parents=True, exist_ok=True)
    amqp_port, dist_port, epmd_port = free_port(), free_port(), free_port()
    (workdir / "enabled_plugins").write_text("[].\n")
    (workdir / "rabbitmq.conf").write_text(
        f"listeners.tcp.1 = 127.0.0.1:{amqp_port}\n"
        # The bench fills queues with ~100 MB: keep RabbitMQ from throttling publishers.
        "vm_memory_high_watermark.relative = 0.6\n"
        "disk_free_limit.absolute = 50MB\n"
    )
    node_name = f"bench-{tag}-{os.getpid()}@localhost"
    environment = {
        **os.environ,
        "RABBITMQ_NODENAME": node_name,
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "log"),
        "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq"),
        "HOME": str(workdir),  # the Erlang cookie lands here, not in the caller's home
    }
    # Our own epmd as a child, so the node does not spawn a daemon we could not stop by PID.
    epmd = subprocess.Popen([_epmd_binary(), "-port", str(epmd_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = open(workdir / "server.log", "wb")  # closed in the finally below
    server: subprocess.Popen[bytes] | None = None
    try:
        server = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=environment,
                                  stdout=log, stderr=subprocess.STDOUT)
        wait_for_amqp(amqp_port, server, START_TIMEOUT_S)
        beam = [child for child in psutil.Process(server.pid).children(recursive=True)
                if child.name().startswith("beam")]
        pid = beam[0].pid if beam else server.pid
        yield RunningBroker(f"rabbitmq-{tag}", amqp_port, pid, _rabbitmq_version())
    finally:
        if server is not None:
            _stop(server)
        _stop(epmd)
        log.close()


@contextmanager
def conveyor_node(workdir: Path, storage: str | None = None,
                  name: str = "conveyor") -> Iterator[RunningBroker]:
    """A fresh ``conveyor serve --listeners amqp`` child with its defaults (fsync=always);
    ``storage``: its ``--storage`` (default: file storage in ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    process = BrokerProcess(workdir / "data", listeners=("amqp",),
                            extra_args=("--log-level", "warning",
                                        *(("--storage", storage) if storage else ())))
    process.start()
    try:
        assert process.process is not None
        from importlib.metadata import version

        yield RunningBroker(name, process.ports["amqp"], process.process.pid,
                            version("conveyor"))
    finally:
        if process.process is not None and process.process.poll() is None:
            process.stop()
