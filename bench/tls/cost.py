"""The throughput cost of TLS on the Kafka and AMQP paths: Conveyor plain vs Conveyor TLS.

Run:  .venv/bin/python -m bench.tls.cost [--seconds 10] [--rounds 2]

Two Conveyor processes in one run, each with its defaults (file storage, fsync=always):
``plain`` (Kafka PLAINTEXT, AMQP on its plain port) and ``tls`` (``--tls-cert/--tls-key``
from a CA made for the run: Kafka SSL, AMQP on its amqps port only). Rounds alternate
plain, tls, plain, tls... so machine noise hits both; the medians are reported. Phases
of ``--seconds`` (10) each:

- kafka produce: confluent-kafka, acks=all, 1 KiB values, linger 5 ms, flat out;
- kafka consume: the same records read back from offset 0 (until all, or the phase ends);
- amqp publish: 2 pika publisher processes, confirms, window 1000, persistent 1 KiB
  (bench/amqp/clients.py, the same workers as the RabbitMQ comparison);
- amqp consume: 2 pika consumers, prefetch 1000, ack each, until the queue is drained.

Kafka fetches over TLS cannot use sendfile (the bytes must be encrypted in user space),
so the consume phase shows the largest cost. Results: bench/results/tls_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.amqp.brokers import RunningBroker
from bench.amqp.clients import WorkerSpec
from bench.amqp.runner import consume_phase, publish_phase
from conveyor.testing.server import BrokerProcess, free_port
from conveyor.testing.tls import TestPki

RESULTS = Path(__file__).resolve().parent.parent / "results" / "tls_cost.json"
VALUE_BYTES = 1024
TIMEOUT_S = 120


@contextmanager
def conveyor(name: str, workdir: Path, pki: TestPki | None) -> Iterator[BrokerProcess]:
    extra: list[str] = ["--log-level", "warning"]
    tls_port = free_port()
    if pki is not None:
        config = workdir / f"{name}.toml"
        config.write_text(f"[listeners.amqp]\ntls_port = {tls_port}\nplaintext = false\n")
        issued = pki.server()
        extra += ["--config", str(config), "--tls-cert", str(issued.cert_file),
                  "--tls-key", str(issued.key_file)]
    process = BrokerProcess(workdir / name, listeners=("kafka", "amqp"), extra_args=extra)
    process.start()
    process.ports["amqp_tls"] = tls_port
    try:
        yield process
    finally:
        process.stop()


def amqp_port(process: BrokerProcess, tls: bool) -> int:
    return process.ports["amqp_tls" if tls else "amqp"]


def kafka_config(process: BrokerProcess, pki: TestPki | None) -> dict[str, Any]:
    config: dict[str, Any] = {"bootstrap.servers": f"localhost:{process.ports['kafka']}"}
    if pki is not None:
        config.update({"security.protocol": "SSL", "ssl.ca.location": str(pki.ca_file)})
    return config


def kafka_produce(config: dict[str, Any], topic: str, seconds: float) -> dict[str, Any]:
    producer = Producer({**config, "acks": "all", "linger.ms": 5, "batch.size": 1 << 20,
                         "queue.buffering.max.messages": 200_000})
    delivered = 0

    def on_delivery(error: Any, _message: Any) -> None:
        nonlocal delivered
        if error is None:
            delivered += 1

    value = b"x" * VALUE_BYTES
    producer.produce(topic, value, on_delivery=on_delivery)  # connect and create first
    assert producer.flush(TIMEOUT_S) == 0
    delivered = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        try:
            producer.produce(topic, value, on_delivery=on_delivery)
        except BufferError:
            producer.poll(0.005)
    assert producer.flush(TIMEOUT_S) == 0
    elapsed = time.perf_counter() - started
    return {"records": delivered + 1, "records_per_s": round(delivered / elapsed),
            "mb_per_s": round(delivered * VALUE_BYTES / elapsed / 1e6, 2),
            "seconds": round(elapsed, 3)}


def kafka_consume(config: dict[str, Any], topic: str, count: int, seconds: float
                  ) -> dict[str, Any]:
    consumer = Consumer({**config, "group.id": f"bench-{topic}", "enable.auto.commit": False,
                         "fetch.max.bytes": 50 << 20})
    consumer.assign([TopicPartition(topic, 0, 0)])
    received = 0
    started = time.perf_counter()
    deadline = started + max(seconds, 1.0) * 3  # consume everything the produce phase made
    while received < count and time.perf_counter() < deadline:
        for message in consumer.consume(10_000, 0.5):
            if message.error() is None:
                received += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return {"records": received, "records_per_s": round(received / elapsed),
            "mb_per_s": round(received * VALUE_BYTES / elapsed / 1e6, 2),
            "seconds": round(elapsed, 3), "complete": received >= count}


def amqp_phases(process: BrokerProcess, tls: bool, pki: TestPki | None,
                options: argparse.Namespace) -> dict[str, Any]:
    assert process.process is not None
    broker = RunningBroker("conveyor-tls" if tls else "conveyor", amqp_port(process, tls),
                           process.process.pid, "")
    base = WorkerSpec(role="publisher", client="pika", host="127.0.0.1", port=broker.port,
                      queue="", ca_file=str(pki.ca_file) if tls and pki else None)
    phase_options = argparse.Namespace(seconds=options.seconds, publishers=2, consumers=2,
                                       window=1000, prefetch=1000, ack_every=1)
    published = publish_phase(broker, base, phase_options)
    consumed = consume_phase(broker, base, phase_options, published["confirmed"])
    return {"publish": published, "consume": consumed}


def one_round(name: str, process: BrokerProcess, pki: TestPki | None, round_number: int,
              options: argparse.Namespace) -> dict[str, Any]:
    config = kafka_config(process, pki)
    topic = f"tls-cost-{name}-{round_number}"
    assert process.process is not None
    server = psutil.Process(process.process.pid)
    produced = with_cpu(server, lambda: kafka_produce(config, topic, options.seconds))
    consumed = with_cpu(server, lambda: kafka_consume(config, topic, produced["records"],
                                                      options.seconds))
    result = {"kafka_produce": produced, "kafka_consume": consumed,
              **{f"amqp_{key}": value for key, value in
                 amqp_phases(process, pki is not None, pki, options).items()}}
    print(f"round {round_number} {name}: " + ", ".join(
        f"{phase} {result[phase].get('records_per_s') or result[phase].get('msg_per_s')}/s"
        for phase in result), flush=True)
    return result


def with_cpu(server: psutil.Process, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result plus the broker's and this process's CPU % over it."""
    client = psutil.Process()

    def busy(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    broker_before, client_before = busy(server), busy(client)
    started = time.perf_counter()
    result = run()
    wall_s = time.perf_counter() - started
    result["broker_cpu_pct"] = round(100 * (busy(server) - broker_before) / wall_s, 1)
    result["client_cpu_pct"] = round(100 * (busy(client) - client_before) / wall_s, 1)
    return result


def rate(phase: dict[str, Any]) -> float:
    return float(phase.get("records_per_s") or phase.get("msg_per_s") or 0)


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for phase in ("kafka_produce", "kafka_consume", "amqp_publish", "amqp_consume"):
        plain = statistics.median(rate(result[phase]) for result in rounds["plain"])
        secure = statistics.median(rate(result[phase]) for result in rounds["tls"])
        # Broker CPU microseconds per record: steadier than the rate on a shared machine
        # (other jobs slow both the clients and the broker, not what each record costs).
        cost = {name: statistics.median(
            float(result[phase].get("broker_cpu_pct", 0)) / 100 / max(rate(result[phase]), 1)
            * 1e6 for result in rounds[name]) for name in ("plain", "tls")}
        summary[phase] = {
            "plain_per_s": round(plain), "tls_per_s": round(secure),
            "tls_over_plain": round(secure / plain, 3) if plain else None,
            "plain_broker_cpu_us_per_record": round(cost["plain"], 2),
            "tls_broker_cpu_us_per_record": round(cost["tls"], 2),
            "tls_cpu_over_plain": round(cost["tls"] / cost["plain"], 2) if cost["plain"] else None}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args()
    rounds: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
    with tempfile.TemporaryDirectory(prefix="conveyor-tls-bench-") as directory, \
            ExitStack() as stack:
        workdir = Path(directory)
        pki = TestPki(workdir / "pki")
        plain = stack.enter_context(conveyor("plain", workdir, None))
        secure = stack.enter_context(conveyor("tls", workdir, pki))
        for round_number in range(options.rounds):
            rounds["plain"].append(one_round("plain", plain, None, round_number, options))
            rounds["tls"].append(one_round("tls", secure, pki, round_number, options))
    document = {
        "suite": "tls_cost", "seconds_per_phase": options.seconds, "rounds": options.rounds,
        "machine": {"python": platform.python_version(), "cpus": _cpus(),
                    "platform": platform.platform()},
        "summary": summarize(rounds), "rounds_detail": rounds,
    }
    options.output.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["summary"], indent=2))


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
