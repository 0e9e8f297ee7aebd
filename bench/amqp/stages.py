"""Where AMQP end-to-end latency goes: a histogram per stage at a fixed publish rate.

Run: ``python bench/amqp/stages.py --sources A[,B] [--rounds N] [--seconds S] [--rate R]``
(a plain script). Each run is a child process of this script with ``PYTHONPATH`` at
one checkout; with two sources the runs alternate (A, B, A, B, ...), so the machine's
load falls on both. A run starts that checkout's ``conveyor serve`` (its defaults:
fsync=always) with a ``sitecustomize`` that loads this file into the server process,
and the suite's own clients as processes (``bench/amqp/clients.py``: one pika
publisher paced at ``--rate`` with confirms, window 1000; one consumer, prefetch
1000, ack each). In the server it wraps, without changing them, the points every
message and every fsync passes (samples are kept with their time and written out
when the server exits; the run keeps those of the measured phase):

- per message, by the publisher's ``CLOCK_MONOTONIC`` stamp in the body (one clock for
  every process of the machine): ``read`` (the channel starts its publish batch),
  ``stored`` (``Broker.publish`` returned: written, fsynced, its task woken),
  ``deliver`` (the Basic.Deliver is encoded), ``e2e`` (the consumer has it);
- per append: ``pass_wait`` (``GroupCommitter.wrote`` → the pass that takes it starts)
  and ``pass_run`` (→ the committer is told its fsync ended: thread hand-offs included);
  the state store's pass (``wal_pass``) likewise;
- per fsync, in its worker thread: ``fdatasync_log`` / ``fdatasync_wal``;
- ``loop_lag``: a 2 ms timer's lateness (long loop turns);
- SQLite checkpoints and the garbage collector's pauses (``gc_young``: generations 0
  and 1, ``gc_full``: 2), and how many of the ``deliver`` tail samples (above its p99)
  came while a checkpoint, a WAL fdatasync or a full collection ran or within 20 ms
  after it ended.

Prints one JSON line per run (p50/p90/p99/max in ms per stage, broker CPU µs per
message, fsyncs per message) and a table of the medians per source at the end.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import itertools
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGES = ("read", "stored", "deliver", "e2e", "pass_wait", "pass_run", "wal_pass",
          "fdatasync_log", "fdatasync_wal", "loop_lag", "checkpoint", "gc_young", "gc_full")
LAG_TICK_S = 0.002  # the loop-lag timer's period (a wake-up per tick costs the broker a little)


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))], 3)

    return {"n": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "max": round(ordered[-1], 3)}


class Recorder:
    """Samples (when, ms) per stage; event start times for the tail's neighbours."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, float]]] = {stage: [] for stage in STAGES}
        # (start, "checkpoint" | "wal" | "gc", seconds it lasted)
        self.events: list[tuple[float, str, float]] = []
        self.lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        self.samples[stage].append((time.monotonic(), ms))


def install(recorder: Recorder) -> None:
    """Wrap the stage points of the imported checkout (its names, as they are)."""
    from conveyor.broker.broker import Broker
    from conveyor.protocols.amqp import channel as channel_module
    from conveyor.protocols.amqp import frames
    from conveyor.storage.group_commit import GroupCommitter
    from conveyor.storage.sqlite_engine import SqliteEngine

    stamp = struct.Struct(">d")  # the publisher's time.monotonic(), bench/amqp/clients.py
    now = time.monotonic

    def stamp_of(body: bytes | None) -> float | None:
        if body is None or len(body) < stamp.size:
            return None
        return float(stamp.unpack_from(body)[0])

    original_batch = channel_module.publish_batch

    async def publish_batch(channel: Any, store: Any) -> None:
        at = now()
        for event in store.publishes:
            sent = stamp_of(event.body)
            if sent is not None:
                recorder.add("read", (at - sent) * 1000)
        await original_batch(channel, store)

    channel_module.publish_batch = publish_batch  # type: ignore[assignment]

    original_publish = Broker.publish

    async def publish(self: Any, topic: str, messages: Any, partition: int | None = None
                      ) -> Any:
        result = await original_publish(self, topic, messages, partition)
        at = now()
        for message in messages:
            sent = stamp_of(message.value)
            if sent is not None:
                recorder.add("stored", (at - sent) * 1000)
        return result

    Broker.publish = publish  # type: ignore[method-assign]

    original_add = frames.DeliverEncoder.add

    def add(self: Any, parts: list[bytes], delivery_tag: int, redelivered: bool,
            exchange: str, routing_key: str, properties: bytes, body: bytes,
            frame_bytes_max: int) -> None:
        sent = stamp_of(body)
        if sent is not None:
            recorder.add("deliver", (now() - sent) * 1000)
        original_add(self, parts, delivery_tag, redelivered, exchange, routing_key,
                     properties, body, frame_bytes_max)

    frames.DeliverEncoder.add = add  # type: ignore[method-assign]

    written: dict[int, list[float]] = {}  # committer -> write times not taken yet
    taken: dict[int, tuple[float, list[float]]] = {}  # source -> (pass start, its writes)
    original_wrote = GroupCommitter.wrote

    def wrote(self: Any, handle: int, token: Any) -> Any:
        written.setdefault(id(self), []).append(now())
        return original_wrote(self, handle, token)

    GroupCommitter.wrote = wrote  # type: ignore[method-assign]
    _wrap_source(GroupCommitter, "pass_run", recorder, written, taken, now)
    _wrap_source(SqliteEngine, "wal_pass", recorder, None, taken, now)

    original_checkpoint = SqliteEngine._run_checkpoint

    def run_checkpoint(self: Any) -> None:
        started = now()
        original_checkpoint(self)
        lasted = now() - started
        with recorder.lock:
            recorder.events.append((started, "checkpoint", lasted))
        recorder.add("checkpoint", lasted * 1000)

    SqliteEngine._run_checkpoint = run_checkpoint  # type: ignore[method-assign]

    original_fdatasync = os.fdatasync

    def fdatasync(descriptor: int) -> None:
        started = now()
        original_fdatasync(descriptor)
        lasted = now() - started
        ms = lasted * 1000
        try:
            name = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            name = ""
        wal = name.endswith("-wal")
        if wal:
            with recorder.lock:
                recorder.events.append((started, "wal", lasted))
        recorder.add("fdatasync_wal" if wal else "fdatasync_log", ms)

    os.fdatasync = fdatasync

    collecting: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collecting[:] = [now()]
            return
        if not collecting:
            return
        started = collecting[0]
        full = info.get("generation") == 2
        lasted = now() - started
        recorder.add("gc_full" if full else "gc_young", lasted * 1000)
        if full:
            with recorder.lock:
                recorder.events.append((started, "gc", lasted))

    gc.callbacks.append(on_gc)


def _wrap_source(cls: Any, stage: str, recorder: Recorder,
                 written: dict[int, list[float]] | None,
                 taken: dict[int, tuple[float, list[float]]], now: Callable[[], float]
                 ) -> None:
    original_prepare, original_done = cls.prepare_sync, cls.sync_done

    def prepare_sync(self: Any) -> Any:
        jobs = original_prepare(self)
        at = now()
        writes = written.pop(id(self), []) if written is not None else []
        if jobs:
            for write in writes:
                recorder.add("pass_wait", (at - write) * 1000)
            taken[id(self)] = (at, writes)
        return jobs

    def sync_done(self: Any, error: BaseException | None) -> None:
        started = taken.pop(id(self), None)
        if started is not None:
            recorder.add(stage, (now() - started[0]) * 1000)
        original_done(self, error)

    cls.prepare_sync, cls.sync_done = prepare_sync, sync_done


def serve_hook(out: str) -> None:
    """In the ``conveyor serve`` child (from its sitecustomize): wrap the stage points,
    run the loop-lag timer once the server started, write the samples at exit."""
    import asyncio
    import atexit

    from conveyor.server.app import Server

    recorder = Recorder()
    install(recorder)
    original_start = Server.start

    async def start(self: Any) -> None:
        await original_start(self)

        async def lag_monitor() -> None:
            loop = asyncio.get_running_loop()
            while True:
                due = loop.time() + LAG_TICK_S
                await asyncio.sleep(LAG_TICK_S)
                recorder.add("loop_lag", (loop.time() - due) * 1000)

        self._stages_lag = asyncio.get_running_loop().create_task(lag_monitor())

    Server.start = start  # type: ignore[method-assign]

    def dump() -> None:
        Path(out).write_text(json.dumps({"samples": recorder.samples,
                                         "events": recorder.events}))

    atexit.register(dump)


HOOK = """import importlib.util, os
_out = os.environ.get("CONVEYOR_STAGES_OUT")
if _out:
    _spec = importlib.util.spec_from_file_location("conveyor_bench_stages", {path!r})
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.serve_hook(_out)
"""


def one_run(options: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    import psutil

    from bench.amqp.clients import WorkerSpec
    from bench.amqp.runner import LATENCY_QUEUE, run_phase
    from conveyor.testing.server import BrokerProcess

    source = os.environ["PYTHONPATH"]
    with tempfile.TemporaryDirectory(prefix="conveyor-stages-") as work:
        hook, out = Path(work) / "hook", Path(work) / "samples.json"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(HOOK.format(path=str(Path(__file__).resolve())))
        broker = BrokerProcess(Path(work) / "data", listeners=("amqp",),
                               extra_args=("--log-level", "warning"),
                               environ={"PYTHONPATH": f"{hook}:{source}",
                                        "CONVEYOR_STAGES_OUT": str(out)}, cwd=Path(source))
        broker.start()
        try:
            assert broker.process is not None
            server = psutil.Process(broker.process.pid)

            class Cpu:
                @staticmethod
                def cpu_s() -> float:
                    times = server.cpu_times()
                    return float(times.user + times.system)

            base = WorkerSpec(role="publisher", client="pika", host="127.0.0.1",
                              port=broker.ports["amqp"], queue=LATENCY_QUEUE)
            publisher = replace(base, seconds=options.seconds, rate_per_s=options.rate)
            consumer = replace(base, role="consumer", record_latency=True)
            phase = run_phase(Cpu(), [consumer, publisher])
        finally:
            broker.stop()
        dumped = json.loads(out.read_text())
    window = (phase["started"], phase["started"] + phase["wall_s"])
    samples: dict[str, list[tuple[float, float]]] = {
        stage: [(at, ms) for at, ms in dumped["samples"].get(stage, [])
                if window[0] <= at <= window[1]] for stage in STAGES}
    events = [(at, what, lasted) for at, what, lasted in dumped["events"]
              if window[0] <= at <= window[1]]
    received = next(r for r in phase["workers"] if r["role"] == "consumer")
    count = max(1, received["received"])
    stages = {stage: quantiles([ms for _, ms in values]) for stage, values in samples.items()}
    stages["e2e"] = quantiles(list(received["latency_ms"]))
    fsyncs = len(samples["fdatasync_log"]) + len(samples["fdatasync_wal"])
    return {
        "source": source, "rate": options.rate, "received": received["received"],
        "broker_cpu_us_per_msg": round(phase["broker_cpu_pct"] / 100 * phase["wall_s"]
                                       / count * 1e6, 1),
        "broker_cpu_pct": phase["broker_cpu_pct"], "host_cpu_pct": phase["host_cpu_pct"],
        "fsyncs_per_msg": round(fsyncs / count, 3),
        "stages": stages,
        "deliver_tail_near": _tail_neighbours(samples["deliver"], events),
        "load": round(os.getloadavg()[0], 2),
    }


def _tail_neighbours(deliver: list[tuple[float, float]],
                     events: list[tuple[float, str, float]], window_s: float = 0.020
                     ) -> dict[str, Any]:
    """Of the deliver samples above the p99: how many came while a checkpoint, a WAL
    fdatasync or a full collection ran, or within ``window_s`` after it ended."""
    if not deliver:
        return {}
    cut = sorted(ms for _, ms in deliver)[int(len(deliver) * 0.99)]
    tail = [at for at, ms in deliver if ms > cut]
    found: dict[str, Any] = {"tail": len(tail), "p99_ms": round(cut, 3)}
    for kind in ("checkpoint", "wal", "gc"):
        spans = sorted((at, at + lasted + window_s) for at, what, lasted in events
                       if what == kind)
        starts = [start for start, _ in spans]
        ends_max = list(itertools.accumulate((end for _, end in spans), max))
        near = 0
        for at in tail:
            index = bisect.bisect_right(starts, at)
            if index and at <= ends_max[index - 1]:
                near += 1
        found[f"after_{kind}"] = near
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sources", help="checkouts, comma-separated (runs alternate)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(one_run(options)), flush=True)
        return
    sources = [str(Path(source).resolve()) for source in options.sources.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {source: [] for source in sources}
    for _ in range(options.rounds):
        for source in sources:
            output = subprocess.run(
                [sys.executable, __file__, "--one", "--seconds", str(options.seconds),
                 "--rate", str(options.rate)], env={**os.environ, "PYTHONPATH": source},
                cwd=source, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            runs[source].append(result)
            print(json.dumps(result), flush=True)
    print(f"{'stage (median of runs, ms)':<28}" + "".join(f"{Path(s).name:>28}" for s in sources))
    for stage in STAGES:
        cells = []
        for source in sources:
            p50 = [r["stages"][stage].get("p50") for r in runs[source]]
            p99 = [r["stages"][stage].get("p99") for r in runs[source]]
            if None in p50:
                cells.append(f"{'-':>28}")
                continue
            cells.append(f"{statistics.median(p50):>12.3f} / {statistics.median(p99):>11.3f}")
        print(f"{stage + ' p50 / p99':<28}" + "".join(cells))
    for field in ("broker_cpu_us_per_msg", "fsyncs_per_msg"):
        print(f"{field:<28}" + "".join(
            f"{statistics.median(r[field] for r in runs[s]):>28}" for s in sources))


if __name__ == "__main__":
    main()
