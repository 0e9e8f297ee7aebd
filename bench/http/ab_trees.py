"""Interleaved A/B of two source trees on the HTTP paths of issue 17, Conveyor alone.

For a shared machine: the figure to trust is the comparison within the same minutes.
Each round runs ``--base`` (e.g. main, unpacked with ``git archive <commit> | tar -x -C
DIR``) and this tree, first one then the other in turn (ABBA), each in a fresh process
with its own ``PYTHONPATH`` (so its broker and its ``conveyor.Client``), each on a fresh
broker: publish batch 1 for ``--seconds`` from one client, then from ``--clients``
client processes at once, each its own connection (``publish_1_clients``; client CPU is
all of them), acquire + ack at batches of 100 and 1000 (``--stored`` messages stored per
queue first, drained or stopped after ``--seconds``) as two requests per cycle and, in a
tree whose client has ``acquire(ack=)``, as one (``acquire_carried_*``), then
``bench.http.run``'s e2e phase at ``--rate``. Per phase: msg/s, broker and client CPU per
message (µs); medians over rounds and each round are printed and written to
bench/results/http_ab_trees.json.

Run:  .venv/bin/python -m bench.http.ab_trees --base DIR [--rounds 3] [--seconds 5]
      [--stored 60000] [--rate 200] [--clients 4]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[2]
RESULTS = HERE / "bench" / "results" / "http_ab_trees.json"
PHASES = ("publish_1", "publish_1_clients", "acquire_ack_100", "acquire_ack_1000",
          "acquire_carried_100", "acquire_carried_1000")


def run_tree(seconds: float, stored: int, rate: int, clients: int) -> dict[str, Any]:
    """In the tree under test (its PYTHONPATH): one broker, every phase."""
    import bench.http.run as runner
    from conveyor import Client
    from conveyor.client import encode_message
    from conveyor.testing.server import BrokerProcess

    def per_message(result: dict[str, Any]) -> dict[str, Any]:
        count = max(1, result["messages"])
        for name, percent in (("broker", result["broker_cpu_pct"]),
                              ("client", sum(result["client_cpu_pct"]))):
            result[f"{name}_cpu_us_per_msg"] = round(
                percent * result["wall_s"] / 100 / count * 1e6, 1)
        return result

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "conveyor").mkdir()
        broker = BrokerProcess(Path(directory) / "conveyor", listeners=("http",))
        broker.start()
        assert broker.process is not None
        runner._BROKER_PID[0] = broker.process.pid
        try:
            url = f"http://127.0.0.1:{broker.ports['http']}"
            with Client(url) as client:
                client.create_queue("p1")
                one = [encode_message(runner.VALUE)]
                out["publish_1"] = per_message(runner.timed(
                    seconds, lambda: len(client.publish_batch("p1", one))))
                if clients > 1:  # one process per client (client CPU: all of them)
                    client.create_queue("p-clients")
                    out["publish_1_clients"] = per_message(runner.clients_phase(
                        "conveyor", url, "p-clients", seconds, clients))
                # acks carried by the acquire: only a tree whose client has ``ack=``
                carries = "ack" in inspect.signature(client.acquire).parameters
                for phase, batch in [("acquire_ack", 100), ("acquire_ack", 1000)] + (
                        [("acquire_carried", 100), ("acquire_carried", 1000)]
                        if carries else []):
                    queue = f"{phase}-{batch}"
                    client.create_queue(queue)
                    documents = [encode_message(runner.VALUE) for _ in range(1000)]
                    for _ in range(stored // 1000):
                        client.publish_batch(queue, documents)
                    out[f"{phase}_{batch}"] = per_message(runner.timed(
                        seconds, cycle(client, queue, batch, phase == "acquire_carried"),
                        drains=True))
            out["e2e"] = runner.conveyor_latency(url, rate, seconds)
        finally:
            broker.stop()
    return out


def cycle(client: Any, queue: str, batch: int, carried: bool) -> Callable[[], int]:
    """One acquire + ack cycle: two requests, or one whose acquire carries the last
    batch's acks (``bench.http.run``'s two rows)."""
    pending: list[str] = []

    def two_requests() -> int:
        messages = client.acquire(queue, limit=batch)
        if messages:
            client.ack(queue, queue, [m.receipt for m in messages if m.receipt])
        return len(messages)

    def one_request() -> int:
        messages = client.acquire(queue, limit=batch, ack=pending)
        assert not messages.ack_failures, messages.ack_failures[:3]
        pending[:] = [m.receipt for m in messages if m.receipt]
        return len(messages)
    return one_request if carried else two_requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="the other tree (e.g. main)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--stored", type=int, default=60_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4,
                        help="publish batch 1 from this many client processes too (1: not)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:  # inside one tree: print its figures
        print("RESULT " + json.dumps(run_tree(options.seconds, options.stored, options.rate,
                                              options.clients)))
        return
    if options.base is None:
        parser.error("--base DIR is required")
    trees = {"base": options.base.resolve(), "this": HERE}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for index in range(options.rounds):
        # ABBA: the tree that runs first alternates (a neighbour's load that rises or
        # falls through a round does not always favour the same tree)
        order = list(trees.items()) if index % 2 == 0 else list(trees.items())[::-1]
        for name, tree in order:
            # the child script is this file, run against the tree under test
            child = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child",
                 "--seconds", str(options.seconds), "--stored", str(options.stored),
                 "--rate", str(options.rate), "--clients", str(options.clients)],
                cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True, text=True, check=False)
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                print(f"round {index} {name} FAILED:\n{child.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(lines[0].removeprefix("RESULT "))
            result["load_average_1m"] = round(os.getloadavg()[0], 2)
            rounds[name].append(result)
            print(f"round {index} {name}: " + " | ".join(
                f"{phase} {result[phase]['msg_per_s']}/s broker "
                f"{result[phase]['broker_cpu_us_per_msg']} us client "
                f"{result[phase]['client_cpu_us_per_msg']} us" for phase in PHASES
                if phase in result)
                + f" | e2e p50 {result['e2e']['p50_ms']} p99 {result['e2e']['p99_ms']}"
                + f" | load {result['load_average_1m']}", flush=True)
    medians: dict[str, dict[str, float]] = {}
    for name, results in rounds.items():
        if not results:
            continue
        medians[name] = {f"{phase}.{field}": statistics.median(r[phase][field]
                                                                for r in results)
                         for phase in PHASES if phase in results[0]
                         for field in ("msg_per_s", "broker_cpu_us_per_msg",
                                       "client_cpu_us_per_msg")}
        for field in ("p50_ms", "p99_ms"):
            medians[name][f"e2e.{field}"] = statistics.median(r["e2e"][field] for r in results)
    print(json.dumps(medians, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "bench/http/ab_trees.py",
                                   "trees": {k: str(v) for k, v in trees.items()},
                                   "settings": vars(options) | {"base": str(options.base)},
                                   "medians": medians, "rounds": rounds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
