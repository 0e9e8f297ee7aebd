"""Stage probes inside a Conveyor broker process: where a Kafka record's latency goes.

Bench only (never imported by Conveyor): ``python -m bench.kafka.stage_probes --stats FILE
serve ARGS...`` wraps a few methods of the Kafka adapter, the fetcher, the partition log,
the group committer and the durability barrier with timers, then runs ``conveyor serve
ARGS``. SIGUSR1 clears what was recorded (the driver sends it when its measured phase
starts); when the server stops (SIGTERM) the histograms go to FILE as JSON, in µs.

Stages of one acks=all produce and of the long-polling fetch that delivers it:
- ``produce.queued``: its frame read (``data_received``) -> the produce handler starts;
- ``produce.write``: ``PartitionLog.write`` (offsets, ``pwrite``);
- ``barrier.wait_idle`` / ``barrier.wait_behind_pass``: a partition's first unsynced
  write -> the barrier pass that takes it starts, split by whether a pass was already
  running when the write came (then it waits for that pass to end first);
- ``barrier.submit_to_thread``, ``barrier.thread_jobs``, ``barrier.thread_to_loop``: the
  executor hand-off, the fdatasyncs in the worker thread, the hand-back to the loop;
- ``fs.fdatasync``: one fdatasync, in its thread;
- ``barrier.pass``: a whole pass (prepare -> every source told);
- ``produce.durable_to_resume``: the pass told the partition -> the append resumes;
- ``produce.handler``: the handler starts -> its answer is encoded;
- ``produce.answer_to_write``: answer encoded -> handed to the transport;
- ``fetch.wake_to_answer``: an append woke a waiting fetch -> its answer is encoded
  (the adapter sends record bytes in the same turn);
- counts: ``bytes.written`` (record batch bytes appended), ``barrier.passes`` and
  ``barrier.jobs`` (passes started, fdatasyncs and directory fsyncs they ran),
  ``barrier.overlaps`` (passes started beside a running one),
  ``barrier.busy_us`` (time a pass of the partitions was running: the disk's busy
  time as the broker sees it), ``produce.in_flight_cap_hit`` (a produce waited for the
  connection's ``PRODUCES_IN_FLIGHT_MAX``), ``produce.flow_pushbacks`` (the memory
  high-water mark pushed a producer back); ``produce.in_flight`` (a "histogram" of
  the produces in flight on the connection as each one starts, a count, not µs);
- ``loop.lag``: lateness of a 2 ms timer (long loop turns, GC, CPU starvation);
- ``gc.genN``: each garbage collection's pause.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

now = time.perf_counter
PERCENTILES = (50, 90, 99, 99.9)
LAG_TIMER_S = 0.002


class Stages:
    """Samples (µs) per stage name; ``summary`` gives count, percentiles and max."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, seconds: float) -> None:
        self.samples[name].append(seconds * 1e6)

    def count(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount

    def clear(self) -> None:
        self.samples.clear()
        self.counts.clear()

    def summary(self) -> dict[str, Any]:
        return {"stages_us": {name: histogram(values) for name, values
                              in sorted(self.samples.items())},
                "counts": dict(sorted(self.counts.items()))}


def histogram(values: list[float], digits: int = 1) -> dict[str, float]:
    """count, p50/p90/p99/p99.9 and max of ``values`` (nearest rank), rounded."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    result: dict[str, float] = {"count": len(ordered)}
    for percentile in PERCENTILES:
        rank = min(len(ordered) - 1, int(len(ordered) * percentile / 100))
        result[f"p{percentile:g}"] = round(ordered[rank], digits)
    result["max"] = round(ordered[-1], digits)
    return result


STAGES = Stages()
_arrived: dict[int, float] = {}  # id(request) -> its frame's read
_answered: dict[int, float] = {}  # id(response bytes) -> encoded
_woken: dict[tuple[str, int], float] = {}  # partition -> last wake of a waiting fetch
_lag_task: list[asyncio.Task[None]] = []
_busy_since: list[float] = [0.0]  # when the running pass of the partitions started


def _passes_running(barrier: Any) -> bool:
    """A pass of the partitions runs (the barrier's ``_running``: a pass or None before
    kafkalat, a list of passes after; ``passes_running`` in some versions)."""
    if getattr(barrier, "passes_running", 0) > 0:
        return True
    running = getattr(barrier, "_running", None)
    return running is not None and running != [] and running != set()


def _wrap_method(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    setattr(owner, name, make(getattr(owner, name)))


def _probe_adapter() -> None:
    from conveyor.protocols.kafka import adapter, data_handlers

    def data_received(original: Any) -> Any:
        def wrapper(self: Any, data: bytes) -> None:
            before, stamp = len(self._queue), now()
            original(self, data)
            for item in list(self._queue)[before:]:
                header = getattr(item, "header", None)
                if header is not None and header.api_key in (0, 1):  # Produce, Fetch
                    _arrived[id(item)] = stamp
            if not _lag_task:
                _lag_task.append(asyncio.get_running_loop().create_task(_loop_lag()))
        return wrapper

    def flush(original: Any) -> Any:
        def wrapper(self: Any) -> None:
            stamp = now()
            for piece in self._output:
                encoded = _answered.pop(id(piece), None)
                if encoded is not None:
                    STAGES.add("produce.answer_to_write", stamp - encoded)
            original(self)
        return wrapper

    def start_produce(original: Any) -> Any:
        async def wrapper(self: Any, item: Any) -> None:
            if len(self._produces) >= adapter.PRODUCES_IN_FLIGHT_MAX:
                STAGES.count("produce.in_flight_cap_hit")
            pushbacks = self._shared.flow.pushbacks
            await original(self, item)
            STAGES.count("produce.flow_pushbacks", self._shared.flow.pushbacks - pushbacks)
            STAGES.add("produce.in_flight", len(self._produces) * 1e-6)  # a count, not µs
        return wrapper

    _wrap_method(adapter.KafkaConnection, "data_received", data_received)
    _wrap_method(adapter.KafkaConnection, "_start_produce", start_produce)
    _wrap_method(adapter.KafkaConnection, "_flush", flush)

    original_produce = data_handlers.handle_produce
    original_fetch = data_handlers.handle_fetch

    async def handle_produce(broker: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        started = now()
        arrived = _arrived.pop(id(request), None)
        if arrived is not None:
            STAGES.add("produce.queued", started - arrived)
        response = await original_produce(broker, request, *args, **kwargs)
        encoded = now()
        STAGES.add("produce.handler", encoded - started)
        if arrived is not None:
            STAGES.add("produce.read_to_answer", encoded - arrived)
        if response is not None:
            _answered[id(response)] = encoded
        return response

    async def handle_fetch(broker: Any, settings: Any, request: Any, *args: Any,
                           **kwargs: Any) -> Any:
        started = now()
        _arrived.pop(id(request), None)
        pieces = await original_fetch(broker, settings, request, *args, **kwargs)
        answered = now()
        woken = [_woken[(topic.topic, partition.partition)]
                 for topic in request.body.topics for partition in topic.partitions
                 if _woken.get((topic.topic, partition.partition), 0.0) >= started]
        if woken:
            STAGES.add("fetch.wake_to_answer", answered - min(woken))
        else:
            STAGES.count("fetch.answered_unwoken")
        return pieces

    data_handlers.handle_produce = handle_produce  # type: ignore[assignment]
    data_handlers.handle_fetch = handle_fetch  # type: ignore[assignment]


def _probe_fetcher() -> None:
    from conveyor.broker import fetcher

    def wake(original: Any) -> Any:
        def wrapper(self: Any, key: tuple[str, int]) -> None:
            if self._append_waiters.get(key):
                _woken[key] = now()
            original(self, key)
        return wrapper

    _wrap_method(fetcher.Fetcher, "wake", wake)


def _probe_storage() -> None:
    from conveyor.storage import durability, fs, group_commit, partition_log

    def write(original: Any) -> Any:
        def wrapper(self: Any, batches: Any) -> Any:
            started = now()
            result = original(self, batches)
            STAGES.add("produce.write", now() - started)
            STAGES.count("bytes.written", len(batches))
            return result
        return wrapper

    async def append_timed(original: Any, self: Any, batches: Any) -> Any:
        info = await original(self, batches)
        done = getattr(self.committer, "_probe_done", None)
        if done is not None and self.committer.policy == "always":
            STAGES.add("produce.durable_to_resume", now() - done)
        return info

    def append(original: Any) -> Any:
        async def wrapper(self: Any, batches: Any) -> Any:
            return await append_timed(original, self, batches)
        return wrapper

    def wrote(original: Any) -> Any:
        def wrapper(self: Any, handle: int, token: Any) -> Any:
            if self.policy == "always" and getattr(self, "_probe_first", None) is None:
                self._probe_first = now()
                self._probe_behind = _passes_running(self.barrier)
            return original(self, handle, token)
        return wrapper

    def prepare_sync(original: Any) -> Any:
        def wrapper(self: Any) -> Any:
            first = getattr(self, "_probe_first", None)
            if first is not None:
                stage = "barrier.wait_behind_pass" if self._probe_behind else "barrier.wait_idle"
                STAGES.add(stage, now() - first)
                self._probe_first = None
            return original(self)
        return wrapper

    def sync_done(original: Any) -> Any:
        def wrapper(self: Any, error: BaseException | None) -> None:
            self._probe_done = now()
            original(self, error)
        return wrapper

    def fdatasync(original: Any) -> Any:
        def wrapper(self: Any, handle: int) -> None:
            started = now()
            try:
                original(self, handle)
            finally:
                STAGES.add("fs.fdatasync", now() - started)  # list.append: GIL-safe
        return wrapper

    def run_pass(original: Any) -> Any:
        async def wrapper(self: Any, *arguments: Any) -> None:
            started = now()
            await original(self, *arguments)
            STAGES.add("barrier.pass", now() - started)
        return wrapper

    def start(original: Any) -> Any:
        def wrapper(self: Any, *arguments: Any, **keywords: Any) -> None:
            passes, jobs = self.pass_count, self.job_count
            overlaps = getattr(self, "overlap_count", 0)
            original(self, *arguments, **keywords)
            if self.pass_count > passes:
                STAGES.count("barrier.passes")
                STAGES.count("barrier.jobs", self.job_count - jobs)
                STAGES.count("barrier.overlaps", getattr(self, "overlap_count", 0) - overlaps)
                if _passes_running(self) and not _busy_since[0]:
                    _busy_since[0] = now()
        return wrapper

    def jobs_ended(original: Any) -> Any:
        def wrapper(self: Any, *arguments: Any) -> None:
            running = _passes_running(self)
            original(self, *arguments)
            if running and not _passes_running(self) and _busy_since[0]:
                # a pass of the partitions ran from _busy_since to now (the next can start)
                STAGES.count("barrier.busy_us", int((now() - _busy_since[0]) * 1e6))
                _busy_since[0] = 0.0
        return wrapper

    original_call_in_thread = durability.call_in_thread

    def call_in_thread(function: Any, *arguments: Any) -> Any:
        submitted = now()
        marks: dict[str, float] = {}

        def timed(*inner: Any) -> Any:
            marks["start"] = now()
            try:
                return function(*inner)
            finally:
                marks["end"] = now()

        future = original_call_in_thread(timed, *arguments)

        def done(_: Any) -> None:
            if "end" in marks:
                STAGES.add("barrier.submit_to_thread", marks["start"] - submitted)
                STAGES.add("barrier.thread_jobs", marks["end"] - marks["start"])
                STAGES.add("barrier.thread_to_loop", now() - marks["end"])
        future.add_done_callback(done)
        return future

    durability.call_in_thread = call_in_thread  # type: ignore[assignment]
    _wrap_method(partition_log.PartitionLog, "write", write)
    _wrap_method(partition_log.PartitionLog, "append", append)
    _wrap_method(group_commit.GroupCommitter, "wrote", wrote)
    # the barrier of kafkalat and after starts passes (also beside a running one, from
    # its overlap timer) in _start_pass
    _wrap_method(durability.DurabilityBarrier, "_start_pass" if hasattr(
        durability.DurabilityBarrier, "_start_pass") else "_start", start)
    _wrap_method(durability.DurabilityBarrier, "_jobs_ended", jobs_ended)
    _wrap_method(group_commit.GroupCommitter, "prepare_sync", prepare_sync)
    _wrap_method(group_commit.GroupCommitter, "sync_done", sync_done)
    if hasattr(durability.DurabilityBarrier, "_pass"):  # the barrier of ca29c26 and before
        _wrap_method(durability.DurabilityBarrier, "_pass", run_pass)
    _wrap_method(fs.OsFileSystem, "fdatasync", fdatasync)


async def _loop_lag() -> None:
    while True:
        started = now()
        await asyncio.sleep(LAG_TIMER_S)
        STAGES.add("loop.lag", max(0.0, now() - started - LAG_TIMER_S))


_gc_started: list[float] = [0.0]


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started[0] = now()
    else:
        STAGES.add(f"gc.gen{info['generation']}", now() - _gc_started[0])


def install() -> None:
    """Wrap the probed methods (before the server starts) and record GC pauses."""
    _probe_adapter()
    _probe_fetcher()
    _probe_storage()
    gc.callbacks.append(_gc_callback)
    signal.signal(signal.SIGUSR1, lambda *_: STAGES.clear())


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "--stats":
        print("usage: python -m bench.kafka.stage_probes --stats FILE serve ARGS...",
              file=sys.stderr)
        return 2
    stats = Path(argv[1])
    install()
    from conveyor import cli

    try:
        return cli.main(argv[2:])
    finally:
        stats.write_text(json.dumps(STAGES.summary(), indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
