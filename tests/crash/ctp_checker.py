"""Consume-transform-produce under kill -9: the exactly-once checker (Jepsen's property).

A real ``conveyor serve`` child (BrokerProcess) holds topic ``ctp-in`` (inputs
``i-<n>``) and ``ctp-out``. A confluent-kafka worker reads ``ctp-in`` read_committed
(partitions assigned, positions from its group's committed offsets), and for each
batch opens a transaction, produces ``o-<n>`` per input, sends its consumer positions
to the transaction and commits; one transaction in five is aborted on purpose after
producing ``x-<n>-<attempt>`` values. Meanwhile a killer thread SIGKILLs the broker at
random moments and starts it again on the same directory and ports. A retriable error
of send_offsets_to_transaction / commit_transaction calls it again; any other error
aborts the transaction (or, when the producer is fenced or fatal, builds a new one: its
InitProducerId aborts what the old one left open) and rewinds the consumer to the
group's committed offsets. The transactional producer runs without librdkafka's
re-bootstrap (``TXN_CLIENT``; docs/kafka.md, "librdkafka and a restarted broker").

The check, once every input's offset is committed: a read_committed read of
``ctp-out`` holds ``o-<n>`` exactly once for every input n, and no ``x-`` value
(aborted outputs are never visible).

    python tests/crash/ctp_checker.py --inputs 5000 --kills 20 --seed 7   # the long form

tests/crash/test_ctp_kill9.py runs a short form. Seed: printed, or --seed / CONVEYOR_SEED.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conveyor.testing.server import BrokerProcess

INPUT, OUTPUT, GROUP, PARTITIONS = "ctp-in", "ctp-out", "ctp-group", 2
WAIT_S = 30
RETRIES = 100  # of a call while the broker restarts: a hang becomes a failure
# long enough that the coordinator's timeout (which fences the worker) is not what ends
# the worker's transactions under kills
TRANSACTION_TIMEOUT_MS = 60_000
# librdkafka (2.16) re-bootstraps when every broker is down (KIP-899/KIP-1102) and retires
# ("decommissions") the broker handle it had learned, but its group-coordinator cache keeps
# pointing at the retired handle: the next send_offsets_to_transaction then waits for that
# handle to come up, never sends its TxnOffsetCommit and ignores its own timeout (see
# docs/kafka.md, "librdkafka and a restarted broker"). With one broker, whose address is the
# bootstrap address, re-bootstrapping brings nothing: the worker turns it off, as an
# application in front of a single-node cluster should.
TXN_CLIENT = {"metadata.recovery.strategy": "none"}
STALL_S = 180
QUIET = {"log_level": 0, "socket.connection.setup.timeout.ms": 3000,
         "reconnect.backoff.max.ms": 200, "topic.metadata.refresh.interval.ms": 1000}
# CTP_DEBUG=1: librdkafka's eos/protocol/broker debug log of the transactional producer on
# stderr (the broker's request log, `--log-level debug`, is always in <dir>.serve.log)
DEBUG = os.environ.get("CTP_DEBUG", "") not in ("", "0")
PRODUCER_DEBUG = {"debug": "eos,protocol,broker", "log_level": 7} if DEBUG else {}


@dataclass
class Outcome:
    inputs: int
    kills: int
    committed_transactions: int = 0
    aborted_on_purpose: int = 0
    recoveries: int = 0
    outputs: Counter[str] = field(default_factory=Counter)

    def problems(self) -> list[str]:
        found = []
        for number in range(self.inputs):
            count = self.outputs.get(f"o-{number}", 0)
            if count != 1:
                found.append(f"input {number}: output seen {count} times")
        aborted = [value for value in self.outputs if value.startswith("x-")]
        if aborted:
            found.append(f"aborted outputs visible: {sorted(aborted)[:5]}")
        return found


def bootstrap(broker: BrokerProcess) -> str:
    return f"127.0.0.1:{broker.ports['kafka']}"


def prepare(broker: BrokerProcess, inputs: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap(broker), **QUIET})
    for name in (INPUT, OUTPUT):
        admin.create_topics([NewTopic(name, PARTITIONS, 1)])[name].result(WAIT_S)
    producer = Producer({"bootstrap.servers": bootstrap(broker), "enable.idempotence": True,
                         **QUIET})
    for number in range(inputs):
        producer.produce(INPUT, f"i-{number}".encode(), partition=number % PARTITIONS)
    assert producer.flush(WAIT_S) == 0


class Worker:
    def __init__(self, broker: BrokerProcess, rng: random.Random, outcome: Outcome) -> None:
        self.broker, self.rng, self.outcome = broker, rng, outcome
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap(broker), "group.id": GROUP,
            "isolation.level": "read_committed", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", **QUIET})
        # called before every retried call: the watchdog times one call, not a retry loop
        self.beat: Callable[[], None] = lambda: None
        self.producer = self._new_producer()
        self.attempt = 0

    def _new_producer(self) -> Producer:
        for _ in range(RETRIES):
            self.beat()
            producer = Producer({"bootstrap.servers": bootstrap(self.broker),
                                 "transactional.id": "ctp-worker",
                                 "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
                                 **TXN_CLIENT, **QUIET, **PRODUCER_DEBUG})
            try:
                producer.init_transactions(WAIT_S)
                return producer
            except KafkaException as exception:
                print(f"init_transactions: {exception}", file=sys.stderr, flush=True)
                time.sleep(0.2)  # the broker is down: its restart is not ours to await
        raise RuntimeError("no transactional producer after retries")

    def rewind(self) -> None:
        """Positions from the group's committed offsets (what a restarted worker does)."""
        wanted = [TopicPartition(INPUT, partition) for partition in range(PARTITIONS)]
        for _ in range(RETRIES):
            self.beat()
            try:
                committed = self.consumer.committed(wanted, WAIT_S)
                break
            except KafkaException as exception:
                print(f"committed: {exception}", file=sys.stderr, flush=True)
                time.sleep(0.2)
        else:
            raise RuntimeError("no committed offsets after retries")
        self.consumer.assign([TopicPartition(INPUT, tp.partition,
                                             tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                              for tp in committed])

    def step(self) -> None:
        messages = [m for m in self.consumer.consume(50, 0.5) if not m.error()]
        if not messages:
            return
        self.attempt += 1
        abort = self.rng.random() < 0.2
        try:
            self.producer.begin_transaction()
            for message in messages:
                number = message.value().decode().split("-")[1]
                value = f"x-{number}-{self.attempt}" if abort else f"o-{number}"
                self.producer.produce(OUTPUT, value.encode(), partition=message.partition())
            if abort:
                self.producer.abort_transaction(WAIT_S)
                self.outcome.aborted_on_purpose += 1
                self.rewind()
                return
            positions = self.consumer.position(self.consumer.assignment())
            metadata = self.consumer.consumer_group_metadata()
            self._until_done(lambda: self.producer.send_offsets_to_transaction(
                positions, metadata, WAIT_S))
            self._until_done(lambda: self.producer.commit_transaction(WAIT_S))
            self.outcome.committed_transactions += 1
        except KafkaException as exception:
            self.recover(exception.args[0])

    def _until_done(self, call: Callable[[], None]) -> None:
        """A transactional call again while it fails retriably (librdkafka's contract for
        send_offsets_to_transaction, commit_transaction and abort_transaction: a retriable
        error leaves the transaction as it was); any other error is the caller's."""
        for _ in range(RETRIES):
            self.beat()
            try:
                call()
                return
            except KafkaException as exception:
                error = exception.args[0]
                if not error.retriable() or error.fatal() or error.txn_requires_abort():
                    raise
                print(f"retrying after {error}", file=sys.stderr, flush=True)
        call()

    def recover(self, error: Any) -> None:
        """What an application does on a failed transaction: abort it (a fatal error, or
        an abort that fails, needs a new producer instance: its InitProducerId fences the
        old one and aborts what it left open), then rewind to the committed offsets."""
        self.outcome.recoveries += 1
        print(f"recovering from {error} (retriable {error.retriable()}, requires abort "
              f"{error.txn_requires_abort()}, fatal {error.fatal()})", file=sys.stderr,
              flush=True)
        recovered = False
        if not error.fatal():
            try:
                self._until_done(lambda: self.producer.abort_transaction(WAIT_S))
                recovered = True
            except KafkaException as failure:
                print(f"abort failed: {failure}", file=sys.stderr, flush=True)
        if not recovered:
            self.producer = self._new_producer()
        self.rewind()

    def report(self) -> None:
        """A progress line every 5 s (stderr), for the long form."""
        now = time.monotonic()
        if now - getattr(self, "_reported", 0.0) < 5:
            return
        self._reported = now
        positions = [(tp.partition, tp.offset)
                     for tp in self.consumer.position(self.consumer.assignment())]
        print(f"positions {positions}, committed transactions "
              f"{self.outcome.committed_transactions}", file=sys.stderr, flush=True)

    def done(self) -> bool:
        try:
            committed = self.consumer.committed(
                [TopicPartition(INPUT, p) for p in range(PARTITIONS)], 5)
            ends = [self.consumer.get_watermark_offsets(TopicPartition(INPUT, p), 5)[1]
                    for p in range(PARTITIONS)]
        except KafkaException:
            return False
        return all(tp.offset == end for tp, end in zip(committed, ends, strict=True))


class Watchdog:
    """A client call blocked for STALL_S (librdkafka without its own timeout) ends the
    process with the Python stacks, instead of a run that never finishes."""

    def __init__(self, broker: BrokerProcess) -> None:
        self._broker = broker  # killed first, so no server outlives the exit
        self._last = time.monotonic()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(5):
            if time.monotonic() - self._last > STALL_S:
                print(f"STALLED: a client call blocked for {STALL_S} s", file=sys.stderr,
                      flush=True)
                faulthandler.dump_traceback(file=sys.stderr)
                if self._broker.process is not None:
                    self._broker.process.kill()
                os._exit(3)


def killer(broker: BrokerProcess, rng: random.Random, kills: int,
           stop: threading.Event) -> None:
    for _ in range(kills):
        if stop.wait(rng.uniform(0.3, 1.5)):
            return
        broker.kill()
        broker.start()


def read_outputs(broker: BrokerProcess) -> Counter[str]:
    consumer = Consumer({"bootstrap.servers": bootstrap(broker), "group.id": "ctp-checker",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True, **QUIET})
    consumer.assign([TopicPartition(OUTPUT, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    values: Counter[str] = Counter()
    at_end: set[int] = set()
    deadline = time.monotonic() + 120
    while len(at_end) < PARTITIONS and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            at_end.add(message.partition())
            continue
        values[message.value().decode()] += 1
    consumer.close()
    return values


def run(directory: Path, inputs: int, kills: int, seed: int) -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome(inputs, kills)
    # every request and the error codes of its answer (Produce and Fetch aside) in the
    # broker's log, data.serve.log beside the data directory: what a stalled client waited on
    broker = BrokerProcess(directory, listeners=("kafka",), extra_args=("--log-level", "debug"))
    broker.start()
    try:
        prepare(broker, inputs)
        worker = Worker(broker, rng, outcome)
        worker.rewind()
        stop = threading.Event()
        chaos = threading.Thread(target=killer, args=(broker, random.Random(seed + 1), kills,
                                                      stop))
        chaos.start()
        deadline = time.monotonic() + 60 + inputs / 20
        watchdog = Watchdog(broker)
        worker.beat = watchdog.beat
        try:
            while (chaos.is_alive() or not worker.done()) and time.monotonic() < deadline:
                watchdog.beat()
                worker.step()
                worker.report()
        finally:
            watchdog.stop()
            stop.set()
            chaos.join()
        worker.consumer.close()
        worker.producer.flush(5)
        outcome.outputs = read_outputs(broker)
    finally:
        if broker.process is not None and broker.process.poll() is None:
            broker.stop()
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int,
                        default=int(os.environ.get("CONVEYOR_SEED", random.randrange(2**32))))
    parser.add_argument("--dir", type=Path, default=None)
    arguments = parser.parse_args()
    import tempfile
    with tempfile.TemporaryDirectory() as scratch:
        directory = arguments.dir or Path(scratch) / "data"
        print(f"CONVEYOR_SEED={arguments.seed}", flush=True)
        outcome = run(directory, arguments.inputs, arguments.kills, arguments.seed)
    print(f"inputs {outcome.inputs}, kills {outcome.kills}, committed transactions "
          f"{outcome.committed_transactions}, aborted on purpose {outcome.aborted_on_purpose}, "
          f"recoveries {outcome.recoveries}")
    problems = outcome.problems()
    for problem in problems[:20]:
        print("PROBLEM", problem)
    print("OK: every input's output exactly once, no aborted output" if not problems
          else f"FAILED: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
