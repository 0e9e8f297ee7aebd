"""Prometheus metrics: the registry, the scrape-time collector, and the exposition.

Owns: every metric family Conveyor exports (names, types, labels, help), turning
``Broker.stats()`` snapshots and ``ListenerCounters`` into metric families when a
scraper asks (so the hot paths only bump plain integers), the storage histograms
(fsync latency, writes per fdatasync, fed by ``MeasuredFileSystem``), the
event-loop lag histogram, process metrics (prometheus_client's ProcessCollector:
RSS, CPU, open files), and content negotiation (text format 0.0.4, or
OpenMetrics 1.0 when the Accept header asks for it).

Must not know: protocols' wire formats, how the HTTP listener routes. The broker
never imports this module; it exposes plain stats and this side reads them.

Cardinality: per-queue, per-partition and per-group-partition series are capped by
``MetricsLimits`` (first by name); ``conveyor_metrics_series_omitted{family}`` says how
many were left out. Request types and error codes are capped per listener by
``conveyor.server.counters.KINDS_MAX``.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from conveyor import __version__
from conveyor.broker.stats import BrokerStats, StatsLimits
from conveyor.server.counters import ListenerCounters
from conveyor.storage.fs import OsFileSystem
from conveyor.tasks import Supervisor

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

# Seconds; fdatasync on NVMe is ~0.1-2 ms, on SATA SSDs a few ms, on cloud disks tens of ms.
FSYNC_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                          0.1, 0.25, 0.5, 1.0, 2.5)
# Writes (appends) one fdatasync made durable: the group-commit batch size.
GROUP_COMMIT_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Seconds a timer fired late: above ~10 ms clients start to notice.
LOOP_LAG_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                             1.0, 2.5)
LOOP_LAG_INTERVAL_S: Final = 0.5  # how often the loop-lag probe sleeps and measures
OPENMETRICS_EOF: Final = b"# EOF\n"


@dataclass(frozen=True, slots=True)
class MetricsLimits:
    """Series caps (``metrics_*`` in ``[listeners.http]``); past them series are omitted,
    and counted in ``conveyor_metrics_series_omitted``."""

    queues_max: int = 1_000  # RabbitMQ's per-object metrics get slow in the thousands too
    partitions_max: int = 2_000
    group_partitions_max: int = 2_000

    @classmethod
    def from_settings(cls, settings: Mapping[str, object]) -> MetricsLimits:
        def number(name: str, default: int) -> int:
            value = settings.get(name, default)
            return value if isinstance(value, int) and value >= 0 else default

        defaults = cls()
        return cls(number("queues_max", defaults.queues_max),
                   number("partitions_max", defaults.partitions_max),
                   number("group_partitions_max", defaults.group_partitions_max))


# fdatasyncs noted and not yet observed: a scrape observes them, and so does the sync
# thread that notes the 1,024th (~60 KB held at most between scrapes)
FSYNCS_HELD_MAX: Final = 1024


class StorageHistograms:
    """The two storage histograms, fed by fdatasync worker threads.

    A sync thread only notes an fdatasync (one ``deque.append``, thread-safe); the
    histograms observe the notes when scraped (``observe_held``). Two ``observe`` calls
    (a lock and a bucket walk each) sat between an fdatasync's return and the hand-over
    that answers the publishers waiting for it (bench/README.md, "Sixth pass
    (httppub)")."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.fsync_seconds = Histogram(
            "conveyor_storage_fsync_seconds", "Time of one fdatasync of a segment file",
            buckets=FSYNC_BUCKETS_S, registry=registry)
        self.group_commit_writes = Histogram(
            "conveyor_storage_group_commit_writes",
            "Appends one fdatasync made durable (group-commit batch size)",
            buckets=GROUP_COMMIT_BUCKETS, registry=registry)
        self._held: collections.deque[tuple[float, int]] = collections.deque()

    def note_fsync(self, seconds: float, writes: int) -> None:
        """In a sync thread: one fdatasync that took ``seconds`` and covered ``writes``."""
        held = self._held
        held.append((seconds, writes))
        if len(held) >= FSYNCS_HELD_MAX:
            self.observe_held()

    def observe_held(self) -> None:
        """Observe every noted fdatasync (any thread; each note is taken once)."""
        held = self._held
        while True:
            try:
                seconds, writes = held.popleft()
            except IndexError:
                return
            self.fsync_seconds.observe(seconds)
            if writes:
                self.group_commit_writes.observe(writes)


class MeasuredFileSystem(OsFileSystem):
    """The OS file system, timing fdatasync and counting the appends each one covers.

    The counts are per handle and approximate under one race (a write landing while a
    sync of the same handle runs in its thread is counted in this sync or the next)."""

    def __init__(self, histograms: StorageHistograms) -> None:
        self._histograms = histograms
        self._writes: dict[int, int] = {}  # handle -> writes since its last fdatasync

    def pwrite(self, handle: int, data: bytes | bytearray | memoryview, position: int) -> None:
        super().pwrite(handle, data, position)
        writes = self._writes
        writes[handle] = writes.get(handle, 0) + 1

    def fdatasync(self, handle: int) -> None:
        started = time.perf_counter()
        super().fdatasync(handle)
        self._histograms.note_fsync(time.perf_counter() - started,
                                    self._writes.pop(handle, 0))

    def close(self, handle: int) -> None:
        self._writes.pop(handle, None)
        super().close(handle)


class LoopLagProbe:
    """A task that sleeps ``LOOP_LAG_INTERVAL_S`` and records how late it woke up."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "conveyor_event_loop_lag_seconds",
            "How late a timer fired on the event loop (sampled every 0.5 s)",
            buckets=LOOP_LAG_BUCKETS_S, registry=registry)
        self._tasks = Supervisor("loop-lag-probe")

    def start(self) -> None:
        self._tasks.start(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LOOP_LAG_INTERVAL_S)
            self.histogram.observe(max(0.0, loop.time() - started - LOOP_LAG_INTERVAL_S))

    async def stop(self) -> None:
        await self._tasks.close(cancel=True)


class ConveyorCollector(Collector):
    """Reads the broker and the listeners' counters at scrape time."""

    def __init__(self, broker: Callable[[], Broker | None],
                 listeners: Mapping[str, ListenerCounters], data_dir: Path,
                 limits: MetricsLimits) -> None:
        self._broker = broker
        self._listeners = listeners
        self._data_dir = data_dir
        self._limits = StatsLimits(limits.partitions_max, limits.queues_max,
                                   limits.group_partitions_max)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        info = GaugeMetricFamily("conveyor_build_info", "Conveyor version (always 1)",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        broker = self._broker()
        if broker is not None:
            stats = broker.stats(self._limits)
            yield from _queue_families(stats)
            yield from _partition_families(stats)
            yield from _group_families(stats)
            yield from self._storage_families(stats)
            yield from _transaction_families(stats)
            omitted = GaugeMetricFamily(
                "conveyor_metrics_series_omitted",
                "Series left out of this scrape by the metrics limits", labels=["family"])
            for family, count in sorted(stats.omitted.items()):
                omitted.add_metric([family], count)
            yield omitted
        yield from _listener_families(self._listeners)
        duration = GaugeMetricFamily(
            "conveyor_metrics_collect_seconds", "Time this scrape spent reading the broker")
        duration.add_metric([], time.perf_counter() - started)
        yield duration

    def _storage_families(self, stats: BrokerStats) -> Iterator[Metric]:
        yield GaugeMetricFamily("conveyor_storage_segments", "Segment files over all partitions",
                                value=stats.segments_total)
        yield GaugeMetricFamily("conveyor_storage_size_bytes",
                                "Bytes of segment files over all partitions",
                                value=stats.size_bytes_total)
        try:
            usage = shutil.disk_usage(self._data_dir)
        except OSError:
            return  # the data directory is gone: /ready reports it
        yield GaugeMetricFamily("conveyor_storage_disk_free_bytes",
                                "Free bytes on the data directory's file system",
                                value=usage.free)
        yield GaugeMetricFamily("conveyor_storage_disk_size_bytes",
                                "Size of the data directory's file system", value=usage.total)


def _transaction_families(stats: BrokerStats) -> Iterator[Metric]:
    yield GaugeMetricFamily("conveyor_transactions_ongoing",
                            "Kafka transactions open now", value=stats.transactions_ongoing)
    yield GaugeMetricFamily("conveyor_transactions_hanging",
                            "Open transactions in partition logs that no ongoing transaction "
                            "accounts for (KIP-890 hanging transactions)",
                            value=stats.transactions_hanging)
    yield CounterMetricFamily("conveyor_transactions_timed_out",
                              "Kafka transactions aborted by their timeout",
                              value=stats.transactions_timed_out)


def _queue_families(stats: BrokerStats) -> Iterator[Metric]:
    labels = ["queue"]
    gauges = {
        "ready": GaugeMetricFamily("conveyor_queue_messages_ready",
                                   "Messages ready to be delivered", labels=labels),
        "unacked": GaugeMetricFamily("conveyor_queue_messages_unacked",
                                     "Messages delivered and not acknowledged yet",
                                     labels=labels),
        "delayed": GaugeMetricFamily("conveyor_queue_messages_delayed",
                                     "Messages not due yet (delay, deliver-at, backoff)",
                                     labels=labels),
        "consumers": GaugeMetricFamily(
            "conveyor_queue_consumers",
            "Consumers holding a message or polling within the last 60 s", labels=labels),
    }
    counters = {
        "published": CounterMetricFamily("conveyor_queue_messages_published",
                                         "Messages appended to the queue", labels=labels),
        "delivered": CounterMetricFamily("conveyor_queue_messages_delivered",
                                         "Deliveries (first and repeated)", labels=labels),
        "redelivered": CounterMetricFamily("conveyor_queue_messages_redelivered",
                                           "Deliveries after the first", labels=labels),
        "acked": CounterMetricFamily("conveyor_queue_messages_acked",
                                     "Deliveries acknowledged", labels=labels),
        "dead_lettered": CounterMetricFamily(
            "conveyor_queue_messages_dead_lettered",
            "Messages that died (rejected, expired, out of deliveries)", labels=labels),
    }
    for queue in stats.queues:
        for name, family in gauges.items():
            family.add_metric([queue.name], getattr(queue, name))
        for name, counter in counters.items():
            counter.add_metric([queue.name], getattr(queue, name))
    yield from gauges.values()
    yield from counters.values()


def _partition_families(stats: BrokerStats) -> Iterator[Metric]:
    labels = ["topic", "partition"]
    start = GaugeMetricFamily("conveyor_partition_log_start_offset",
                              "First offset still in the log", labels=labels)
    end = GaugeMetricFamily("conveyor_partition_log_end_offset",
                            "Next offset to be written (high watermark)", labels=labels)
    size = GaugeMetricFamily("conveyor_partition_size_bytes", "Bytes of the partition's segments",
                             labels=labels)
    segments = GaugeMetricFamily("conveyor_partition_segments", "Segment files", labels=labels)
    damaged = GaugeMetricFamily(
        "conveyor_partition_damaged_batches",
        "Corrupt batches set aside since start (skipped by readers, logged with file and "
        "position; docs/operations.md)", labels=labels)
    failed = GaugeMetricFamily(
        "conveyor_partition_failed",
        "1 when the partition refuses appends after an fsync failure", labels=labels)
    counters = {
        "records_in": CounterMetricFamily("conveyor_partition_records_in",
                                          "Records appended", labels=labels),
        "bytes_in": CounterMetricFamily("conveyor_partition_bytes_in",
                                        "Record batch bytes appended", labels=labels),
        "records_out": CounterMetricFamily(
            "conveyor_partition_records_out",
            "Records handed out by shared-group deliveries and record reads", labels=labels),
        "bytes_out": CounterMetricFamily("conveyor_partition_bytes_out",
                                         "Record batch bytes served by fetches (Kafka)",
                                         labels=labels),
    }
    for item in stats.partitions:
        values = [item.topic, str(item.partition)]
        start.add_metric(values, item.log_start_offset)
        end.add_metric(values, item.log_end_offset)
        size.add_metric(values, item.size_bytes)
        segments.add_metric(values, item.segments)
        damaged.add_metric(values, item.damaged_batches)
        failed.add_metric(values, 1 if item.failed else 0)
        for name, counter in counters.items():
            counter.add_metric(values, getattr(item.counters, name))
    yield from (start, end, size, segments, damaged, failed)
    yield from counters.values()


def _group_families(stats: BrokerStats) -> Iterator[Metric]:
    members = GaugeMetricFamily("conveyor_group_members", "Members of an ordered consumer group",
                                labels=["group", "state"])
    for group in stats.groups:
        members.add_metric([group.group, group.state], group.members)
    labels = ["group", "topic", "partition"]
    committed = GaugeMetricFamily("conveyor_group_committed_offset",
                                  "Committed offset of an ordered group", labels=labels)
    lag = GaugeMetricFamily("conveyor_group_lag",
                            "Records between the committed offset and the log end",
                            labels=labels)
    for item in stats.group_partitions:
        values = [item.group, item.topic, str(item.partition)]
        committed.add_metric(values, item.committed_offset)
        lag.add_metric(values, item.lag)
    yield from (members, committed, lag)


def _listener_families(listeners: Mapping[str, ListenerCounters]) -> Iterator[Metric]:
    labels = ["listener"]
    connections = GaugeMetricFamily("conveyor_listener_connections", "Open connections",
                                    labels=labels)
    opened = CounterMetricFamily("conveyor_listener_connections_opened",
                                 "Connections accepted", labels=labels)
    received = CounterMetricFamily("conveyor_listener_received_bytes",
                                   "Bytes read from clients", labels=labels)
    sent = CounterMetricFamily("conveyor_listener_sent_bytes", "Bytes written to clients",
                               labels=labels)
    requests = CounterMetricFamily("conveyor_listener_requests",
                                   "Requests by type (Kafka API, AMQP method, SQS action, "
                                   "HTTP operation)", labels=["listener", "request"])
    errors = CounterMetricFamily("conveyor_listener_errors",
                                 "Error answers by the protocol's own code",
                                 labels=["listener", "code"])
    for name, counters in sorted(listeners.items()):
        connections.add_metric([name], counters.connections_open)
        opened.add_metric([name], counters.connections_total)
        received.add_metric([name], counters.bytes_received)
        sent.add_metric([name], counters.bytes_sent)
        for kind, count in sorted(counters.requests.items()):
            requests.add_metric([name, kind], count)
        for code, count in sorted(counters.errors.items()):
            errors.add_metric([name, code], count)
    yield from (connections, opened, received, sent, requests, errors)


class Metrics:
    """The server's registry: collector, storage histograms, loop-lag probe, process."""

    def __init__(self, broker: Callable[[], Broker | None], data_dir: Path,
                 limits: MetricsLimits | None = None) -> None:
        # no *_created series: they would double the histograms' output
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self.listeners: dict[str, ListenerCounters] = {}
        self.storage = StorageHistograms(self.registry)
        self.loop_lag = LoopLagProbe(self.registry)
        ProcessCollector(registry=self.registry)
        self.collector = ConveyorCollector(broker, self.listeners, data_dir,
                                           limits or MetricsLimits())
        # (OpenMetrics?, sample name, labels, value, timestamp) -> its formatted line,
        # for the samples of the last scrape
        self._lines: dict[tuple[object, ...], bytes] = {}

    def counters(self, listener: str) -> ListenerCounters:
        counters = self.listeners.get(listener)
        if counters is None:
            counters = self.listeners[listener] = ListenerCounters(listener)
        return counters

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for this Accept header, and its Content-Type.

        prometheus_client formats every line (~10 us a sample on the reference machine).
        A sample with the same name, labels and value as at the last scrape (idle queues
        and partitions: most of them on a large broker) reuses the line formatted then;
        the cache holds one scrape's lines, so it is bounded by the series limits."""
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        previous, self._lines = self._lines, {}
        self.storage.observe_held()
        parts: list[bytes] = []
        for family in (*self.registry.collect(), *self.collector.collect()):
            header = self._format(encoder, openmetrics, family, [])
            parts.append(header)
            for sample in family.samples:
                # labels come in one order per family (the collectors build them so)
                key = (openmetrics, sample.name, tuple(sample.labels.items()), sample.value,
                       sample.timestamp)
                line = previous.get(key) or self._lines.get(key)
                if line is None:
                    line = self._format(encoder, openmetrics, family, [sample])
                    assert line.startswith(header), (line, header)
                    line = line[len(header):]
                self._lines[key] = line
                parts.append(line)
        if openmetrics:
            parts.append(OPENMETRICS_EOF)
        return b"".join(parts), content_type

    @staticmethod
    def _format(encoder: Callable[[Collector], bytes], openmetrics: bool, family: Metric,
                samples: list[Sample]) -> bytes:
        """The library's text of ``family`` holding only ``samples`` (no "# EOF")."""
        part = copy.copy(family)
        part.samples = samples
        text = encoder(FamiliesCollector([part]))
        return text.removesuffix(OPENMETRICS_EOF) if openmetrics else text


class FamiliesCollector(Collector):
    """Families already collected, for an encoder."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
