"""Where one HTTP publish of batch 1 spends its time (issue 17), Conveyor alone.

One fresh broker (fsync=always) whose process carries timestamps at each step of a
publish — bytes received, handler entered, log write made, durability pass started,
its worker thread started and ended, pass ended, handler returned, response encoded,
response written — and three clients taking turns on it (rounds interleaved) for
``--seconds`` each: ``conveyor.Client`` (httpx, what bench/http/run.py drives),
``http.client`` from the standard library and a raw socket sending one prebuilt
request (both keep-alive, TCP_NODELAY), plus ``GET /health`` over the raw socket
(the floor: the same HTTP path without an append or an fsync). Per client: requests/s,
wall p50/p99, the client's CPU and the broker's CPU per request (user and system),
which a shared machine disturbs least; per step: median and mean in ms.

Run:  .venv/bin/python -m bench.http.latency_breakdown [--seconds 4] [--rounds 2]
Writes bench/results/http_latency_breakdown.json.

The broker runs as ``python -m bench.http.latency_breakdown serve ...`` (the CLI with
the hooks below installed first); the hooks wrap methods with timestamp recorders, one
request at a time (one client connection), so they add a few microseconds per step.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.measure import provenance
from conveyor import Client
from conveyor.client import encode_message
from conveyor.testing.server import BrokerProcess

RESULTS = Path(__file__).resolve().parent.parent / "results" / "http_latency_breakdown.json"
VALUE = b"x" * 1024
STEPS = ("received", "handler", "log_write", "pass_start", "sync_thread_start",
         "sync_thread_end", "pass_end", "handler_done", "encoded", "written")
OUTPUT_ENV = "CONVEYOR_BREAKDOWN_OUT"


# --- inside the broker ------------------------------------------------------------------
def install_hooks(output: str) -> None:
    """Wrap the publish path's steps with recorders; dump the records at exit."""
    from conveyor.protocols.http import listener
    from conveyor.storage import durability, group_commit

    now = time.perf_counter
    current: dict[str, float] = {}
    records: list[dict[str, float]] = []

    def mark(step: str) -> None:
        current.setdefault(step, now())

    def wrap_sync(owner: Any, name: str, before: str, after: str | None = None) -> None:
        original = getattr(owner, name)

        def wrapped(*arguments: Any, **keywords: Any) -> Any:
            mark(before)
            result = original(*arguments, **keywords)
            if after is not None:
                mark(after)
            return result
        setattr(owner, name, wrapped)

    def wrap_async(owner: Any, name: str, before: str, after: str) -> None:
        original = getattr(owner, name)

        async def wrapped(*arguments: Any, **keywords: Any) -> Any:
            mark(before)
            result = await original(*arguments, **keywords)
            mark(after)
            return result
        setattr(owner, name, wrapped)

    wrap_sync(listener.HttpConnection, "data_received", "received")
    wrap_async(listener.HttpListener, "respond", "handler", "handler_done")
    wrap_sync(group_commit.GroupCommitter, "wrote", "log_write")
    wrap_async(durability.DurabilityBarrier, "_pass", "pass_start", "pass_end")
    wrap_sync(durability, "_run_jobs", "sync_thread_start", "sync_thread_end")
    original_encode = listener.encode_response

    def encode_response(*arguments: Any, **keywords: Any) -> bytes:
        mark("encoded")
        return original_encode(*arguments, **keywords)
    listener.encode_response = encode_response  # type: ignore[assignment]
    original_made = listener.HttpConnection.connection_made

    class TimedTransport:
        def __init__(self, transport: Any) -> None:
            self._transport = transport

        def write(self, data: bytes) -> None:
            self._transport.write(data)
            mark("written")
            records.append(dict(current))
            current.clear()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._transport, name)

    def connection_made(self: Any, transport: Any) -> None:
        original_made(self, transport)
        self.transport = TimedTransport(transport)
    listener.HttpConnection.connection_made = connection_made  # type: ignore[method-assign]

    def dump() -> None:
        Path(output).write_text(json.dumps(records))
    atexit.register(dump)


def serve_with_hooks() -> None:
    install_hooks(os.environ[OUTPUT_ENV])
    from conveyor.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))


# --- the clients ------------------------------------------------------------------------
def publish_request(port: int, body: bytes) -> bytes:
    return (f"POST /topics/q/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


class RawClient:
    """One keep-alive socket, TCP_NODELAY, a prebuilt request, the answer read whole."""

    def __init__(self, port: int, request: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = request

    def __call__(self) -> None:
        self.sock.sendall(self.request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += self._recv()
        if not head.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(head.decode(errors="replace"))

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        return chunk

    def close(self) -> None:
        self.sock.close()


def measure(step: Callable[[], object], seconds: float, broker: psutil.Process
            ) -> dict[str, Any]:
    for _ in range(20):
        step()
    samples: list[float] = []
    me = psutil.Process()
    client_before, broker_before = me.cpu_times(), broker.cpu_times()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        step()
        samples.append(time.perf_counter() - begin)
    wall = time.perf_counter() - started
    client_after, broker_after = me.cpu_times(), broker.cpu_times()
    count = len(samples)
    cuts = statistics.quantiles(samples, n=100)

    def per_request_us(after: float, before: float) -> float:
        return round((after - before) / count * 1e6, 1)
    return {
        "requests": count, "per_s": round(count / wall),
        "p50_ms": round(cuts[49] * 1e3, 3), "p99_ms": round(cuts[98] * 1e3, 3),
        "client_cpu_us": per_request_us(client_after.user + client_after.system,
                                        client_before.user + client_before.system),
        "broker_user_us": per_request_us(broker_after.user, broker_before.user),
        "broker_system_us": per_request_us(broker_after.system, broker_before.system),
    }


def steps_summary(records: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per step pair: median and mean in ms over the publishes that had every step."""
    complete = [r for r in records if all(step in r for step in STEPS)]
    summary: dict[str, dict[str, float]] = {"publishes": {"count": len(complete)}}
    for first, second in zip(("received", *STEPS[1:-1]), STEPS[1:], strict=True):
        spans = [(r[second] - r[first]) * 1e3 for r in complete]
        if spans:
            summary[f"{first}->{second}"] = {"p50_ms": round(statistics.median(spans), 3),
                                             "mean_ms": round(statistics.mean(spans), 3)}
    totals = [(r["written"] - r["received"]) * 1e3 for r in complete]
    if totals:
        summary["received->written"] = {"p50_ms": round(statistics.median(totals), 3),
                                        "mean_ms": round(statistics.mean(totals), 3)}
    return summary


def run(seconds: float, rounds: int) -> dict[str, Any]:
    clients: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        output = root / "steps.json"
        (root / "conveyor").mkdir()
        broker = BrokerProcess(root / "conveyor", listeners=("http",),
                               launcher=("-m", "bench.http.latency_breakdown"),
                               environ={OUTPUT_ENV: str(output)})
        broker.start()
        assert broker.process is not None
        try:
            port = broker.ports["http"]
            document = encode_message(VALUE)
            body = json.dumps({"messages": [document]}).encode()
            process = psutil.Process(broker.process.pid)
            with Client(f"http://127.0.0.1:{port}") as client:
                client.create_queue("q")
                standard = http.client.HTTPConnection("127.0.0.1", port)
                standard.connect()
                assert standard.sock is not None
                standard.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

                def with_standard_library() -> None:
                    standard.request("POST", "/topics/q/messages", body=body,
                                     headers={"Content-Type": "application/json"})
                    answer = standard.getresponse()
                    answer.read()
                    if answer.status != 200:
                        raise RuntimeError(answer.status)
                raw = RawClient(port, publish_request(port, body))
                health = RawClient(port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}"
                                         "\r\n\r\n".encode())
                kinds: dict[str, Callable[[], object]] = {
                    "conveyor_client_publish": lambda: client.publish_batch("q", [document]),
                    "http_client_publish": with_standard_library,
                    "raw_socket_publish": raw,
                    "raw_socket_get_health": health,
                }
                for index in range(rounds):
                    for name, step in kinds.items():
                        result = measure(step, seconds, process)
                        result["load_average_1m"] = round(os.getloadavg()[0], 2)
                        clients.setdefault(name, []).append(result)
                        print(f"round {index} {name}: {json.dumps(result)}", flush=True)
                raw.close()
                health.close()
                standard.close()
        finally:
            broker.stop()
        records = json.loads(output.read_text()) if output.exists() else []
    return {"clients": clients, "server_steps": steps_summary(records)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve_with_hooks()
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="per client per round")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    result = run(options.seconds, options.rounds)
    document = {
        "benchmark": "bench/http/latency_breakdown.py",
        **provenance([sys.executable, "-m", "bench.http.latency_breakdown", *sys.argv[1:]]),
        "settings": {"value_bytes": len(VALUE), "seconds": options.seconds,
                     "rounds": options.rounds, "conveyor_fsync": "always"},
        **result,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(result["server_steps"], indent=2))


if __name__ == "__main__":
    main()
