"""Load-generator worker processes: AMQP publishers and consumers driven by a real client library.

One worker is one OS process with one connection and one channel. Roles:

- publisher: publisher confirms on, ``delivery_mode=2`` (persistent), to the default exchange
  with the queue name as routing key. Keeps at most ``window`` unconfirmed publishes in flight
  (a sliding window: every confirm, single or ``multiple``, lets the next publishes go). Runs
  for ``seconds`` flat out, or paced at ``rate_per_s`` for the latency run, then waits for the
  outstanding confirms. Only confirmed messages are counted.
- consumer: ``basic.qos(prefetch_count)``, manual acknowledgements: ``ack_every == 1`` acks
  each delivery on its own; ``k > 1`` sends one ``basic.ack(multiple=True)`` every k deliveries
  (and one for the rest when stopped). Runs until the parent sets ``stop``.

Every body starts with the publisher's ``time.monotonic()`` as a big-endian double
(CLOCK_MONOTONIC, one clock for all processes of the machine), padded to ``message_bytes``;
a consumer with ``record_latency`` keeps ``receive - send`` in milliseconds per message.

Two client libraries, chosen by ``WorkerSpec.client``: ``pika`` (``SelectConnection``,
callbacks, no per-message future: the default, it was ~3x cheaper per message than aio-pika on
this machine) and ``aio-pika`` (on uvloop) for comparison. Both declare the queue the same way
(``durable=True`` plus ``queue_arguments``), so brokers see the same traffic from either.

The parent (``bench.amqp.runner``) coordinates through ``Coordination``: every worker connects
and declares, waits on ``ready`` (a barrier with the parent), starts when ``start`` is set, and
puts one result dict on ``results``. A consumer also publishes its running count in its
``counter`` so the parent can see when the queue has been drained.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Any

STAMP = struct.Struct(">d")


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # "publisher" or "consumer"
    client: str  # "pika" or "aio-pika"
    host: str
    port: int
    queue: str
    queue_arguments: dict[str, Any] = field(default_factory=dict)
    message_bytes: int = 1024
    # publisher
    seconds: float = 5.0
    window: int = 1000
    rate_per_s: float = 0.0  # 0 = as fast as the window allows
    # consumer
    prefetch: int = 1000
    ack_every: int = 1
    record_latency: bool = False
    # amqps: the CA file that signed the broker's certificate (None: plain AMQP)
    ca_file: str | None = None


@dataclass
class Coordination:
    """multiprocessing primitives shared by the parent and its workers (picklable at spawn)."""

    ready: Any  # multiprocessing.Barrier
    start: Any  # multiprocessing.Event
    stop: Any  # multiprocessing.Event
    results: Any  # multiprocessing.Queue
    counter: Any = None  # multiprocessing.RawValue("q") for a consumer


class ConfirmTracker:
    """Counts confirmed publishes from ``basic.ack``/``basic.nack`` delivery tags (1, 2, ...)."""

    def __init__(self) -> None:
        self.lowest_open = 1  # every tag below this one is settled
        self.settled_above: set[int] = set()
        self.confirmed = 0
        self.rejected = 0

    def settle(self, tag: int, multiple: bool, accepted: bool) -> None:
        newly = 0
        if multiple:
            while self.lowest_open <= tag:
                if self.lowest_open in self.settled_above:
                    self.settled_above.discard(self.lowest_open)
                else:
                    newly += 1
                self.lowest_open += 1
        elif tag >= self.lowest_open and tag not in self.settled_above:
            self.settled_above.add(tag)
            newly = 1
            while self.lowest_open in self.settled_above:
                self.settled_above.discard(self.lowest_open)
                self.lowest_open += 1
        if accepted:
            self.confirmed += newly
        else:
            self.rejected += newly

    @property
    def settled(self) -> int:
        return self.confirmed + self.rejected


def worker_main(spec: WorkerSpec, coordination: Coordination) -> None:
    """Entry point of a worker process."""
    try:
        if spec.client == "pika":
            result = PikaWorker(spec, coordination).run()
        elif spec.client == "aio-pika":
            import uvloop

            result = uvloop.run(aio_pika_worker(spec, coordination))
        else:
            raise ValueError(f"unknown client {spec.client!r}")
    except BaseException as error:  # reported to the parent, which fails the phase
        coordination.ready.abort()
        coordination.results.put({"role": spec.role, "error": repr(error)})
        raise
    coordination.results.put(result)


def _publisher_result(started: float, ended: float, sent: int, tracker: ConfirmTracker,
                      cpu_started: float) -> dict[str, Any]:
    return {"role": "publisher", "started": started, "ended": ended, "sent": sent,
            "confirmed": tracker.confirmed, "rejected": tracker.rejected,
            "cpu_s": time.process_time() - cpu_started}


def _consumer_result(started: float, last_message: float, received: int, cpu_started: float,
                     samples: list[float]) -> dict[str, Any]:
    return {"role": "consumer", "started": started, "ended": last_message,
            "received": received, "cpu_s": time.process_time() - cpu_started,
            "latency_ms": samples}


# --- pika (SelectConnection) ----------------------------------------------------------------
class PikaWorker:
    """One pika ``SelectConnection`` driven by callbacks on its own I/O loop."""

    TICK_S = 0.001  # pacing granularity of the latency publisher
    STOP_POLL_S = 0.01

    def __init__(self, spec: WorkerSpec, coordination: Coordination) -> None:
        import pika

        self.pika = pika
        self.spec = spec
        self.coordination = coordination
        self.padding = b"x" * max(0, spec.message_bytes - STAMP.size)
        self.properties = pika.BasicProperties(delivery_mode=2)
        self.tracker = ConfirmTracker()
        self.result: dict[str, Any] | None = None
        self.failure: str | None = None
        self.channel: Any = None
        self.sent = 0
        self.received = 0
        self.unacked = 0
        self.samples: list[float] = []
        self.started = self.deadline = self.cpu_started = self.last_event = 0.0
        self.draining = False
        self.last_tag = 0
        ssl_options = None
        if spec.ca_file is not None:
            import ssl

            ssl_options = pika.SSLOptions(ssl.create_default_context(cafile=spec.ca_file),
                                          "localhost")
        parameters = pika.ConnectionParameters(spec.host, spec.port, heartbeat=0,
                                               blocked_connection_timeout=None,
                                               ssl_options=ssl_options)
        self.connection = pika.SelectConnection(
            parameters, on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error, on_close_callback=self._on_close)

    def run(self) -> dict[str, Any]:
        self.connection.ioloop.start()
        if self.result is None:
            raise RuntimeError(self.failure or "connection closed before the run ended")
        return self.result

    # connection lifecycle
    def _on_open_error(self, _connection: Any, error: BaseException | str) -> None:
        self.failure = f"connection failed: {error!r}"
        self.connection.ioloop.stop()

    def _on_close(self, _connection: Any, reason: BaseException) -> None:
        if self.result is None and self.failure is None:
            self.failure = f"connection closed: {reason!r}"
        self.connection.ioloop.stop()

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.queue_declare(self.spec.queue, durable=True,
                              arguments=self.spec.queue_arguments or None,
                              callback=self._on_declared)

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if self.result is None:
            self.failure = f"channel closed: {reason!r}"
            if self.connection.is_open:
                self.connection.close()

    def _on_declared(self, _frame: Any) -> None:
        if self.spec.role == "publisher":
            self.channel.confirm_delivery(self._on_confirm, callback=lambda _f: self._begin())
        else:
            self.channel.basic_qos(prefetch_count=self.spec.prefetch,
                                   callback=lambda _f: self._begin())

    def _begin(self) -> None:
        # Blocking here is fine: nothing else needs this loop before the start signal.
        self.coordination.ready.wait()
        self.coordination.start.wait()
        self.started = self.last_event = time.monotonic()
        self.cpu_started = time.process_time()
        if self.spec.role == "publisher":
            self.deadline = self.started + self.spec.seconds
            if self.spec.rate_per_s > 0:
                self._tick()
            else:
                self._pump()
        else:
            self.channel.basic_consume(self.spec.queue, self._on_message)
            self.connection.ioloop.call_later(self.STOP_POLL_S, self._poll_stop)

    # publisher
    def _publish_one(self) -> None:
        self.channel.basic_publish("", self.spec.queue,
                                   STAMP.pack(time.monotonic()) + self.padding, self.properties)
        self.sent += 1

    def _pump(self) -> None:
        if time.monotonic() >= self.deadline:
            self._finish_publishing()
            return
        room = self.spec.window - (self.sent - self.tracker.settled)
        for _ in range(room):
            self._publish_one()

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self.deadline:
            self._finish_publishing()
            return
        due = int((now - self.started) * self.spec.rate_per_s) + 1 - self.sent
        room = self.spec.window - (self.sent - self.tracker.settled)
        for _ in range(max(0, min(due, room))):
            self._publish_one()
        self.connection.ioloop.call_later(self.TICK_S, self._tick)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        accepted = isinstance(method, self.pika.spec.Basic.Ack)
        self.tracker.settle(method.delivery_tag, bool(method.multiple), accepted)
        self.last_event = time.monotonic()
        if self.draining:
            self._finish_publishing()
        elif self.spec.rate_per_s <= 0:
            self._pump()

    def _finish_publishing(self) -> None:
        self.draining = True
        if self.tracker.settled >= self.sent and self.result is None:
            self.result = _publisher_result(self.started, self.last_event, self.sent,
                                            self.tracker, self.cpu_started)
            self.connection.close()

    # consumer
    def _on_message(self, channel: Any, method: Any, _properties: Any, payload: bytes) -> None:
        now = time.monotonic()
        self.last_event = now
        self.received += 1
        if self.spec.record_latency:
            self.samples.append((now - STAMP.unpack_from(payload)[0]) * 1000.0)
        if self.spec.ack_every <= 1:
            channel.basic_ack(method.delivery_tag)
        else:
            self.unacked += 1
            if self.unacked >= self.spec.ack_every:
                channel.basic_ack(method.delivery_tag, multiple=True)
                self.unacked = 0
        self.last_tag = method.delivery_tag
        self.coordination.counter.value = self.received

    def _poll_stop(self) -> None:
        if not self.coordination.stop.is_set():
            self.connection.ioloop.call_later(self.STOP_POLL_S, self._poll_stop)
            return
        if self.unacked:
            self.channel.basic_ack(self.last_tag, multiple=True)
        self.result = _consumer_result(self.started, self.last_event, self.received,
                                       self.cpu_started, self.samples)
        self.connection.close()


# --- aio-pika (asyncio, uvloop) -------------------------------------------------------------
async def aio_pika_worker(spec: WorkerSpec, coordination: Coordination) -> dict[str, Any]:
    import aio_pika

    loop = asyncio.get_running_loop()
    if spec.ca_file is not None:
        connection = await aio_pika.connect(
            f"amqps://guest:guest@localhost:{spec.port}/?cafile={spec.ca_file}")
    else:
        connection = await aio_pika.connect(host=spec.host, port=spec.port)
    try:
        if spec.role == "publisher":
            channel = await connection.channel(publisher_confirms=True)
        else:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=spec.prefetch)
        queue = await channel.declare_queue(spec.queue, durable=True,
                                            arguments=spec.queue_arguments or None)
        await loop.run_in_executor(None, coordination.ready.wait)
        await loop.run_in_executor(None, coordination.start.wait)
        if spec.role == "publisher":
            return await _aio_pika_publish(spec, channel)
        return await _aio_pika_consume(spec, coordination, queue)
    finally:
        await connection.close()


async def _aio_pika_publish(spec: WorkerSpec, channel: Any) -> dict[str, Any]:
    import aio_pika

    padding = b"x" * max(0, spec.message_bytes - STAMP.size)
    exchange = channel.default_exchange
    window = asyncio.Semaphore(spec.window)
    tracker = ConfirmTracker()
    pending: set[asyncio.Task[None]] = set()
    started = last_event = time.monotonic()
    cpu_started = time.process_time()
    deadline = started + spec.seconds
    sent = 0

    async def publish_one(tag: int) -> None:
        nonlocal last_event
        try:
            message = aio_pika.Message(STAMP.pack(time.monotonic()) + padding,
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, spec.queue)
            tracker.settle(tag, False, True)
        except aio_pika.exceptions.DeliveryError:
            tracker.settle(tag, False, False)
        finally:
            last_event = time.monotonic()
            window.release()

    while (now := time.monotonic()) < deadline:
        if spec.rate_per_s > 0:
            due_at = started + sent / spec.rate_per_s
            if due_at > now:
                await asyncio.sleep(due_at - now)
        await window.acquire()
        sent += 1
        task = asyncio.ensure_future(publish_one(sent))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    return _publisher_result(started, last_event, sent, tracker, cpu_started)


async def _aio_pika_consume(spec: WorkerSpec, coordination: Coordination,
                            queue: Any) -> dict[str, Any]:
    samples: list[float] = []
    started = last_event = time.monotonic()
    cpu_started = time.process_time()
    received = unacked = 0
    last_message: Any = None

    async def on_message(message: Any) -> None:
        nonlocal received, unacked, last_event, last_message
        now = time.monotonic()
        last_event = now
        received += 1
        if spec.record_latency:
            samples.append((now - STAMP.unpack_from(message.body)[0]) * 1000.0)
        if spec.ack_every <= 1:
            await message.ack()
        else:
            unacked += 1
            last_message = message
            if unacked >= spec.ack_every:
                unacked = 0
                await message.ack(multiple=True)
        coordination.counter.value = received

    tag = await queue.consume(on_message)
    await asyncio.get_running_loop().run_in_executor(None, coordination.stop.wait)
    await queue.cancel(tag)
    if unacked and last_message is not None:
        await last_message.ack(multiple=True)
    return _consumer_result(started, last_event, received, cpu_started, samples)
