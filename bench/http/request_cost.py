"""The broker's cost of one HTTP request, without a client library in the way (issue 17).

For a shared machine: CPU time and syscall counts per request, not throughput. One fresh
broker (fsync=always) per run and one raw keep-alive socket (TCP_NODELAY) sending a
prebuilt request and reading its answer in lockstep: ``publish`` (batch 1, 1 KiB value,
JSON) or ``health`` (``GET /health``, the floor of any request). Prints requests/s, the
broker's user and system µs per request and, with ``--strace``, the broker's syscalls
per request (``strace -c -f``; counts only: strace slows the run). ``e2e`` instead runs
bench.http.run's e2e phase (a paced publisher, a long-polled acquire + ack consumer,
both ``conveyor.Client``) and counts the broker's syscalls per message: its
``epoll_pwait`` calls are the event loop's turns (uvloop polls once per turn). ``turns``
runs that phase under ``strace -f -e trace=epoll_pwait,write,fdatasync`` and counts, for
each acquire answer (a 200 of more than 1,000 bytes written by the loop thread), the loop
thread's turns since the last fdatasync returned in a sync thread: the turns between a
publish becoming durable and the waiting consumer's answer.

Run:  .venv/bin/python -m bench.http.request_cost {publish,health,e2e,turns}
      [--seconds 5] [--strace] [--rate 200]   (turns: --rate 50 --seconds 3)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from conveyor import Client
from conveyor.testing.server import BrokerProcess

VALUE = "x" * 1024
SYSCALLS = ("epoll_pwait", "futex", "read", "write", "pwrite64", "fdatasync", "getpid")


def request_bytes(mode: str, port: int) -> bytes:
    if mode == "health":
        return f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    body = json.dumps({"messages": [{"value": VALUE}]}).encode()
    return (f"POST /topics/q/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


@contextmanager
def traced(pid: int, enabled: bool, counts: dict[str, int]) -> Iterator[None]:
    """``strace -c -f -p pid`` around the block; its counts per syscall into ``counts``."""
    if not enabled:
        yield
        return
    with tempfile.NamedTemporaryFile(suffix=".strace") as output:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", output.name, "-p", str(pid)],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached to every thread
        try:
            yield
        finally:
            tracer.send_signal(2)
            tracer.wait()
        for line in Path(output.name).read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[-1] in SYSCALLS and fields[3].isdigit():
                counts[fields[-1]] = int(fields[3])


def lockstep(mode: str, port: int, seconds: float, process: psutil.Process,
             trace: bool) -> dict[str, Any]:
    data = request_bytes(mode, port)
    connection = socket.create_connection(("127.0.0.1", port))
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def one() -> None:
        connection.sendall(data)
        answer = connection.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]

    for _ in range(300):  # warm: caches, the first segment
        one()
    counts: dict[str, int] = {}
    with traced(process.pid, trace, counts):
        before, started, handled = process.cpu_times(), time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            one()
            handled += 1
        wall_s, after = time.perf_counter() - started, process.cpu_times()
    connection.close()
    return {"requests": handled, "requests_per_s": round(handled / wall_s),
            "broker_user_us": round((after.user - before.user) / handled * 1e6, 1),
            "broker_system_us": round((after.system - before.system) / handled * 1e6, 1),
            "syscalls_per_request": {name: round(count / handled, 2)
                                     for name, count in sorted(counts.items())}}


def e2e(url: str, rate: int, seconds: float, process: psutil.Process, trace: bool
        ) -> dict[str, Any]:
    import bench.http.run as runner

    counts: dict[str, int] = {}
    with traced(process.pid, trace, counts):
        latency = runner.conveyor_latency(url, rate, seconds)
    messages = max(1, latency.get("samples", 0))
    return {"e2e": latency, "syscalls_per_message": {
        name: round(count / messages, 2) for name, count in sorted(counts.items())}}


def turns(url: str, rate: int, seconds: float, pid: int) -> dict[str, Any]:
    import bench.http.run as runner

    with tempfile.NamedTemporaryFile(suffix=".strace") as output:
        tracer = subprocess.Popen(
            ["strace", "-f", "-e", "trace=epoll_pwait,write,fdatasync", "-s", "24",
             "-o", output.name, "-p", str(pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        try:
            runner.conveyor_latency(url, rate, seconds)
        finally:
            tracer.send_signal(2)
            tracer.wait()
        lines = [line.split(None, 1) for line in Path(output.name).read_text().splitlines()]
    polls = collections.Counter(thread for thread, call in lines if call.startswith("epoll"))
    loop_thread = polls.most_common(1)[0][0]
    counts: list[int] = []
    since: int | None = None  # loop turns since the last fdatasync returned
    for thread, call in lines:
        if thread != loop_thread:
            if (call.startswith("fdatasync(") and "= 0" in call) or call.startswith(
                    "<... fdatasync resumed>"):
                since = 0
        elif since is not None and call.startswith("epoll_pwait"):
            since += 1
        elif since is not None:
            answer = re.match(r'write\(\d+, "HTTP/1.1 200.*= (\d+)$', call)
            if answer and int(answer.group(1)) > 1000:  # an acquire's answer, not a publish's
                counts.append(since)
                since = None
    return {"answers": len(counts),
            "turns_median": statistics.median(counts) if counts else None,
            "turns_histogram": dict(sorted(collections.Counter(counts).items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("publish", "health", "e2e", "turns"))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=200, help="e2e: messages per second")
    parser.add_argument("--strace", action="store_true", help="count the broker's syscalls")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        broker = BrokerProcess(Path(directory) / "conveyor", listeners=("http",))
        broker.data_dir.mkdir()
        broker.start()
        assert broker.process is not None
        try:
            port = broker.ports["http"]
            url = f"http://127.0.0.1:{port}"
            with Client(url) as client:
                client.create_queue("q")
            process = psutil.Process(broker.process.pid)
            if options.mode == "e2e":
                result = e2e(url, options.rate, options.seconds, process, options.strace)
            elif options.mode == "turns":
                result = turns(url, options.rate, options.seconds, process.pid)
            else:
                result = lockstep(options.mode, port, options.seconds, process, options.strace)
        finally:
            broker.stop()
    print(json.dumps({"mode": options.mode, **result,
                      "load_average_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
