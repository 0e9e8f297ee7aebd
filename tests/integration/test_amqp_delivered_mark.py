"""Goal: a Basic.Deliver never leaves the broker before its record's delivered mark is
committed, so a broker killed (-9) right after writing the frame redelivers the message
with redelivered=True (the race behind a once-seen failure of
test_amqp_aiopika.py::test_robust_connection_recovers_after_kill_9).

Method: a broker with the amqp listener in the test's event loop (``run_broker``, file
storage), aio-pika as the client. The server side of the consuming connection gets a
transport wrapper that, at the first write holding a Basic.Deliver method frame, copies
the data directory before the bytes go out: everything the process has written so far
(the page cache, which a kill -9 keeps) and nothing it writes later, i.e. the disk
image of a kill -9 at that instant. The instant is chosen by the write itself, not by
timing, so the test is deterministic. A second broker started on the copy must deliver
the message again, flagged redelivered. Before the fix the mark was committed one loop
turn after the frame was written, and the copy had none (redelivered=False). The
second case takes the image at the second Deliver, of a message published after the
first was delivered: the mark saved ahead with the first (DELIVERED_MARK_AHEAD_RECORDS)
covers it without a commit of its own, and both come back flagged.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from amqp_support import WAIT_S, amqp_url

from conveyor.protocols.amqp.adapter import AmqpConnection
from conveyor.protocols.amqp.listener import AmqpListener
from conveyor.testing.server import run_broker

# copies the data directory: the image of file storage (segments and state.sqlite3)
pytestmark = [pytest.mark.asyncio, pytest.mark.file_storage]

# A method frame (type 1) whose payload starts with class 60 (basic), method 60 (deliver)
DELIVER_METHOD = b"\x00\x3c\x00\x3c"


def holds_deliver(data: bytes) -> bool:
    """Whether ``data`` (whole frames, as the connection writes them) holds a Deliver."""
    view = memoryview(data)
    position = 0
    while position + 7 <= len(view):
        kind = view[position]
        size = int.from_bytes(view[position + 3:position + 7], "big")
        if kind == 1 and bytes(view[position + 7:position + 11]) == DELIVER_METHOD:
            return True
        position += 7 + size + 1
    return False


class WriteWatch:
    """Stands in for the server side's transport: runs ``before_deliver`` once, right
    before the ``nth`` write that holds a Basic.Deliver, then passes every call on."""

    def __init__(self, transport: Any, before_deliver: Callable[[], None],
                 nth: int = 1) -> None:
        self._transport = transport
        self._before_deliver: Callable[[], None] | None = before_deliver
        self._delivers_left = nth

    def write(self, data: bytes) -> None:
        if self._before_deliver is not None and holds_deliver(data):
            self._delivers_left -= 1
            if self._delivers_left == 0:
                before, self._before_deliver = self._before_deliver, None
                before()
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def first_messages(url: str, queue_name: str, count: int
                         ) -> list[AbstractIncomingMessage]:
    connection = await aio_pika.connect(url, timeout=WAIT_S)
    received: list[AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                received.append(message)
                if len(received) == count:
                    return received
    finally:
        await connection.close()
    raise AssertionError("the queue iterator ended without a message")


@pytest.mark.parametrize("imaged_deliver", [1, 2])
async def test_deliver_frame_leaves_after_its_delivered_mark_is_committed(
        tmp_path: Path, imaged_deliver: int) -> None:
    data_dir, image_dir = tmp_path / "data", tmp_path / "killed"
    async with run_broker(data_dir, listeners=("amqp",)) as server:
        url = amqp_url(server.ports["amqp"])
        connection = await aio_pika.connect(url, timeout=WAIT_S)
        channel = await connection.channel()
        queue = await channel.declare_queue("marked", durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"j1", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name)  # confirmed: in the log, fsynced

        listener = server.listener("amqp")
        assert isinstance(listener, AmqpListener)
        (amqp_connection,) = listener.state.connections
        assert isinstance(amqp_connection, AmqpConnection)
        images: list[Path] = []
        amqp_connection.transport = WriteWatch(  # type: ignore[assignment]
            amqp_connection.transport,
            lambda: images.append(shutil.copytree(data_dir, image_dir)), imaged_deliver)

        arrivals: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            arrivals.put_nowait(message)

        await queue.consume(on_message)  # manual ack, never acked here
        first = await asyncio.wait_for(arrivals.get(), WAIT_S)
        assert (first.body, first.redelivered) == (b"j1", False)
        bodies = [b"j1"]
        if imaged_deliver == 2:  # published once j1 was delivered: under the saved mark
            await channel.default_exchange.publish(
                aio_pika.Message(b"j2", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name)
            second = await asyncio.wait_for(arrivals.get(), WAIT_S)
            assert (second.body, second.redelivered) == (b"j2", False)
            bodies.append(b"j2")
        assert images == [image_dir]
        await connection.close()

    # the killed broker's disk image: each message was delivered once, never acked
    async with run_broker(image_dir, listeners=("amqp",)) as restarted:
        again = await first_messages(amqp_url(restarted.ports["amqp"]), "marked",
                                     len(bodies))
    assert [message.body for message in again] == bodies
    assert all(message.redelivered for message in again), \
        "the delivered mark was not committed when Deliver left"
