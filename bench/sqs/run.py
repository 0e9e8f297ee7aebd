"""SQS benchmark: Conveyor's SQS API beside moto server (and Conveyor's own HTTP API).

What, with 1 KiB bodies and batches of 10 (the SQS maximum):
- send: SendMessageBatch throughput;
- receive+delete: ReceiveMessage (10, long poll) + DeleteMessageBatch throughput;
- the same two on Conveyor's HTTP API (publish; acquire+ack) at the same batch size;
- end-to-end latency p50/p99 at a fixed send rate with one long-polling receiver.
Load: ``--processes`` raw-HTTP load-generator processes with ``--connections`` each
(bench/sqs/loadgen.py) against Conveyor; moto gets one process with
``--moto-connections`` (4): under Conveyor's load its server stops answering. Each phase runs
``--seconds`` (10 by default), the whole set ``--rounds`` times (3); medians are
reported, with the CPU seconds per wall second of the server and of the clients.

Durability: Conveyor runs with its defaults (fsync=always, group commit); moto keeps
everything in memory.

Run: ``.venv/bin/python -m bench.sqs [--seconds 10] [--rounds 3]``; writes
bench/results/sqs.json. moto comes from the ``bench`` extra (``moto[server]``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.sqs.latency import measure_latency
from bench.sqs.loadgen import Job, run_worker
from conveyor.testing.server import BrokerProcess, free_port

RESULTS = Path(__file__).resolve().parent.parent / "results" / "sqs.json"
BATCH = 10
BODY_BYTES = 1024


def sqs_call(port: int, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=json.dumps(payload).encode(), method="POST",
        headers={"X-Amz-Target": f"AmazonSQS.{action}",
                 "Content-Type": "application/x-amz-json-1.0",
                 "Authorization": "AWS4-HMAC-SHA256 Credential=bench/20260101/us-east-1/sqs/"
                                  "aws4_request, SignedHeaders=host, Signature=0"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer: dict[str, Any] = json.loads(response.read() or b"{}")
        return answer


def start_moto(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            sqs_call(port, "ListQueues", {})
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("moto server exited") from None
            time.sleep(0.2)  # a child process starting: nothing to await
    process.kill()
    raise RuntimeError("moto server did not answer within 60 s")


def run_phase(pool: concurrent.futures.ProcessPoolExecutor, jobs: list[Job],
              server_pid: int) -> dict[str, Any]:
    server = psutil.Process(server_pid)
    cpu_before = sum(server.cpu_times()[:2])
    started = time.monotonic()
    outcomes = list(pool.map(run_worker, [job.__dict__ for job in jobs]))
    wall_s = time.monotonic() - started
    server_cpu_s = sum(server.cpu_times()[:2]) - cpu_before
    messages = sum(o["messages"] for o in outcomes)
    active_s = max([o["last_message_s"] for o in outcomes] + [1e-9])
    return {
        "msg_per_s": round(messages / active_s),
        "messages": messages,
        "requests": sum(o["requests"] for o in outcomes),
        "errors": sum(o["errors"] for o in outcomes),
        "active_s": round(active_s, 2),
        "server_cpu_per_s": round(server_cpu_s / wall_s, 2),
        "client_cpu_per_s": round(sum(o["cpu_s"] for o in outcomes) / wall_s, 2),
    }


def jobs_for(options: argparse.Namespace, operation: str, port: int, queue: str,
             queue_url: str, light: bool = False) -> list[Job]:
    """The phase's jobs: one per load-generator process (``light``: moto's load, one
    process with ``--moto-connections``: under the full load its threaded server stops
    answering within minutes)."""
    seconds = options.seconds if operation.endswith("send") else options.seconds * 1.5
    processes, connections = ((1, options.moto_connections) if light
                              else (options.processes, options.connections))
    return [Job(operation, "127.0.0.1", port, queue, queue_url, BATCH, seconds,
                connections, BODY_BYTES) for _ in range(processes)]


def one_round(options: argparse.Namespace, pool: concurrent.futures.ProcessPoolExecutor,
              targets: dict[str, dict[str, Any]], round_index: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, target in targets.items():
        queue = f"bench-{name}-{round_index}"
        if target["kind"] == "sqs":
            url = sqs_call(target["port"], "CreateQueue", {"QueueName": queue})["QueueUrl"]
        else:
            url = ""
            sqs_call(target["sqs_port"], "CreateQueue", {"QueueName": queue})
        kind, light = target["kind"], name == "moto"
        send = run_phase(pool, jobs_for(options, f"{kind}-send", target["port"], queue, url,
                                        light), target["pid"])
        consume = run_phase(pool, jobs_for(options, f"{kind}-consume", target["port"], queue,
                                           url, light), target["pid"])
        results[name] = {"send": send, "receive_delete": consume}
        print(f"  round {round_index} {name}: send {send['msg_per_s']:,} msg/s, "
              f"receive+delete {consume['msg_per_s']:,} msg/s "
              f"(server CPU {send['server_cpu_per_s']}/{consume['server_cpu_per_s']}, "
              f"clients {send['client_cpu_per_s']}/{consume['client_cpu_per_s']})",
              flush=True)
    return results


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for target in rounds[0]:
        summary[target] = {}
        for phase in rounds[0][target]:
            summary[target][phase] = {
                key: statistics.median(r[target][phase][key] for r in rounds)
                for key in rounds[0][target][phase]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sqs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase (10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=3, help="load-generator processes")
    parser.add_argument("--connections", type=int, default=32, help="per process")
    parser.add_argument("--moto-connections", type=int, default=4,
                        help="moto's load: one process with this many connections (4)")
    parser.add_argument("--latency-rate", type=float, default=50.0, help="messages/s")
    parser.add_argument("--no-moto", action="store_true")
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-sqs-") as directory:
        data_dir = Path(directory) / "conveyor"
        data_dir.mkdir()
        conveyor = BrokerProcess(data_dir, listeners=("sqs", "http"))
        conveyor.start()
        moto = None if options.no_moto else start_moto(moto_port := free_port())
        try:
            assert conveyor.process is not None
            targets: dict[str, dict[str, Any]] = {
                "conveyor_sqs": {"kind": "sqs", "port": conveyor.ports["sqs"],
                                 "pid": conveyor.process.pid},
                "conveyor_http": {"kind": "http", "port": conveyor.ports["http"],
                                  "sqs_port": conveyor.ports["sqs"],
                                  "pid": conveyor.process.pid},
            }
            if moto is not None:
                targets["moto"] = {"kind": "sqs", "port": moto_port, "pid": moto.pid}
            latency = {name: measure_latency(target["port"], f"latency-{name}",
                                             options.latency_rate, options.seconds, sqs_call)
                       for name, target in targets.items() if target["kind"] == "sqs"}
            rounds = []
            with concurrent.futures.ProcessPoolExecutor(options.processes) as pool:
                for round_index in range(options.rounds):
                    rounds.append(one_round(options, pool, targets, round_index))
        finally:
            conveyor.stop()
            if moto is not None:
                moto.terminate()
                moto.wait(timeout=30)
    document = report(options, rounds, latency)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["summary"], indent=2))
    print(f"wrote {RESULTS}")
    return 0


def report(options: argparse.Namespace, rounds: list[dict[str, Any]],
           latency: dict[str, Any]) -> dict[str, Any]:
    summary = medians(rounds)
    ours = summary["conveyor_sqs"]
    ratios: dict[str, Any] = {}
    for phase in ("send", "receive_delete"):
        if "moto" in summary and summary["moto"][phase]["msg_per_s"]:
            ratios[f"{phase}_vs_moto"] = round(
                ours[phase]["msg_per_s"] / summary["moto"][phase]["msg_per_s"], 1)
        http = summary["conveyor_http"][phase]["msg_per_s"]
        if http:
            ratios[f"{phase}_vs_conveyor_http"] = round(ours[phase]["msg_per_s"] / http, 2)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    return {
        "suite": "sqs",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "settings": {"seconds": options.seconds, "rounds": options.rounds,
                     "processes": options.processes, "connections": options.connections,
                     "moto_load": f"1 process x {options.moto_connections} connections",
                     "batch": BATCH, "body_bytes": BODY_BYTES,
                     "latency_rate_per_s": options.latency_rate,
                     "durability": {"conveyor": "fsync=always (group commit)",
                                    "moto": "memory only"}},
        "summary": summary,
        "ratios": ratios,
        "latency": latency,
        "rounds": rounds,
    }


if __name__ == "__main__":
    sys.exit(main())
