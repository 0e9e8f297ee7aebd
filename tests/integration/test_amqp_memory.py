"""Goal: malformed AMQP connections leave nothing behind (issue 9, item 6: "AMQP memory
grew under fuzzing from 50 to 116 MiB after ~370 malformed inputs and stayed there").

Method: mutations of a real client session (the frames pika sends: handshake, channel,
queue.declare, confirm.select, publish, qos, consume, ack, get), cut short, with wrong
frame types and sizes, huge content-header body sizes, unfinished messages on many
channels, methods in the wrong state and flipped bytes, each on its own connection,
closed by the client or by the server. In-process: once every connection is gone
(``ConnectionGate.until_open(0)``, an awaited event), no AmqpConnection, Channel or
Consumer is alive and the listener's maps are empty. Against a real ``conveyor serve``:
RSS stays within a bound after the same inputs. Seeds are fixed (CONVEYOR_SEED offsets).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import socket
import struct
from pathlib import Path

from limits_support import rss_bytes
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header

from conveyor.protocols.amqp import adapter
from conveyor.testing.server import BrokerProcess, BrokerThread

MIB = 1 << 20
SEED = int(os.environ.get("CONVEYOR_SEED", "0"))
CONNECTIONS = 64
READ_WAIT_S = 0.2  # how long a client waits for the server's close before closing itself


def _method(channel: int, value: object) -> bytes:
    return pamqp_frame.marshal(value, channel)  # type: ignore[arg-type]


def _header(channel: int, body_bytes: int) -> bytes:
    return pamqp_frame.marshal(
        pamqp_header.ContentHeader(0, body_bytes, commands.Basic.Properties()), channel)


def _session(rnd: random.Random) -> list[bytes]:
    """What a pika client sends in a short publish-and-consume session."""
    queue = f"memory-{rnd.randrange(4)}"
    body = rnd.randbytes(rnd.choice([10, 3000, 60_000]))
    return [
        b"AMQP\x00\x00\x09\x01",
        _method(0, commands.Connection.StartOk(
            client_properties={"product": "pika", "capabilities": {
                "publisher_confirms": True, "connection.blocked": True,
                "consumer_cancel_notify": True}},
            mechanism="PLAIN", response="\x00guest\x00guest", locale="en_US")),
        _method(0, commands.Connection.TuneOk(channel_max=2047, frame_max=131072,
                                              heartbeat=60)),
        _method(0, commands.Connection.Open(virtual_host="/")),
        _method(1, commands.Channel.Open()),
        _method(1, commands.Queue.Declare(queue=queue)),
        _method(1, commands.Confirm.Select()),
        _method(1, commands.Basic.Publish(exchange="", routing_key=queue)),
        _header(1, len(body)),
        pamqp_frame.marshal(pamqp_body.ContentBody(body), 1),
        _method(1, commands.Basic.Qos(prefetch_count=10)),
        _method(1, commands.Basic.Consume(queue=queue)),
        _method(1, commands.Basic.Ack(delivery_tag=1)),
        _method(1, commands.Basic.Get(queue=queue)),
        _method(2, commands.Channel.Open()),
        _method(2, commands.Basic.Publish(exchange="", routing_key=queue)),
        _header(2, 200_000),
        pamqp_frame.marshal(pamqp_body.ContentBody(b"x" * 1000), 2),
    ]


def malformed(index: int) -> bytes:
    """The ``index``-th malformed input: one of eight kinds of damage to a session."""
    rnd = random.Random(SEED * 1_000_003 + index)
    parts = _session(rnd)
    kind = index % 8
    if kind == 0:  # cut inside a frame
        data = b"".join(parts[:rnd.randrange(4, len(parts))])
        return data[:-rnd.randrange(1, 7)]
    if kind == 1:  # a bad frame type
        at = rnd.randrange(4, len(parts))
        parts[at] = bytes([rnd.choice([0, 4, 5, 9, 77])]) + parts[at][1:]
        return b"".join(parts[:at + 1])
    if kind == 2:  # a wrong frame size
        at = rnd.randrange(1, len(parts))
        frame = bytearray(parts[at])
        struct.pack_into(">I", frame, 3, rnd.randrange(1 << 20))
        return b"".join(parts[:at]) + bytes(frame)
    if kind == 3:  # a huge content-header body size
        return (b"".join(parts[:8]) + _header(1, rnd.choice([1 << 40, 16 * MIB, 5 * MIB]))
                + b"y" * 100_000)
    if kind == 4:  # a channel storm, each channel with an unfinished message
        data = b"".join(parts[:4])
        for channel in range(1, rnd.randrange(20, 120)):
            data += (_method(channel, commands.Channel.Open())
                     + _method(channel, commands.Basic.Publish(exchange="", routing_key="q"))
                     + _header(channel, 500_000)
                     + pamqp_frame.marshal(pamqp_body.ContentBody(b"z" * 20_000), channel))
        return data
    if kind == 5:  # methods in the wrong state
        return (parts[0] + parts[3] + parts[1]
                + _method(1, commands.Basic.Ack(delivery_tag=99)) + parts[2])
    if kind == 6:  # flipped bytes anywhere after the protocol header
        data = bytearray(b"".join(parts))
        for _ in range(rnd.randrange(1, 6)):
            data[rnd.randrange(8, len(data))] = rnd.randrange(256)
        return bytes(data)
    # a whole session with an unknown delivery tag, dropped with a message unfinished
    return (b"".join(parts[:12]) + _method(1, commands.Basic.Ack(delivery_tag=5000))
            + b"".join(parts[12:]))


def send(port: int, index: int) -> None:
    """One connection: the input, then a close by the client (now, or after a short wait
    for the server's own close)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(READ_WAIT_S)
        try:
            sock.sendall(malformed(index))
            if index % 3:
                while sock.recv(1 << 16):
                    pass
        except OSError:
            pass  # closed by the server, or it did not close within the wait


def _live() -> dict[str, int]:
    gc.collect()
    kinds = (adapter.AmqpConnection, adapter.Channel, adapter.Consumer)
    counts = dict.fromkeys((kind.__name__ for kind in kinds), 0)
    for item in gc.get_objects():
        name = type(item).__name__
        if name in counts and isinstance(item, kinds):
            counts[name] += 1
    return counts


async def _cleanups_finished() -> None:
    """Await the cleanup tasks of the connections whose sockets are gone."""
    names = ("AmqpConnection._cleanup", "AmqpConnection._close_requested")
    pending = [task for task in asyncio.all_tasks()
               if task.get_coro().__qualname__ in names]  # type: ignore[union-attr]
    await asyncio.gather(*pending, return_exceptions=True)


def test_malformed_connections_release_every_per_connection_object(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", listeners=("amqp",)) as broker:
        state = broker.server.listener("amqp").state  # type: ignore[attr-defined]
        port = broker.ports["amqp"]
        for index in range(CONNECTIONS):
            send(port, index)
        broker.call(state.gate.until_open, 0, timeout_s=30)
        broker.call(_cleanups_finished, timeout_s=30)

        leftover = broker.call_sync(_live)
        assert leftover == {"AmqpConnection": 0, "Channel": 0, "Consumer": 0}, leftover
        assert not state.connections and not state.reply_channels
        assert all(not use.consumers and use.exclusive_owner is None
                   for use in state.queues.values())
        assert state.inbox_bytes == 0
        shared = state.shared
        assert shared.budget.total == 0 and shared.flow.total == 0


def test_rss_of_a_real_server_stays_bounded_after_malformed_connections(
        tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "data", listeners=("amqp",)) as broker:
        assert broker.process is not None
        port = broker.ports["amqp"]
        for index in range(16):  # warm-up: the first of each kind loads code and caches
            send(port, 10_000 + index)
        baseline = rss_bytes(broker.process.pid)
        for index in range(CONNECTIONS):
            send(port, index)
        grown = rss_bytes(broker.process.pid) - baseline
        assert broker.process.poll() is None
        # The issue saw +66 MiB after ~370 inputs; measured here ~+0.2 MiB after 200 (and 400).
        assert grown < 24 * MIB, f"RSS grew {grown / MIB:.1f} MiB"
