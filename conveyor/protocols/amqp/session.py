"""The channels of one AMQP connection: opened, fed, faulted, drained and released.

Owns: the connection's channel table (number -> ``Channel``), handing each decoded
event to its channel's inbox, the channel errors the connection machine raises
(Channel.Close, then the channel releases what it holds), waiting for the channels
to finish what they received, and releasing everything at the end: every channel
and the queues this connection declared exclusive. The adapter owns the socket;
this module never touches bytes.
"""

from __future__ import annotations

import asyncio
import contextlib

from pamqp import commands

from conveyor.errors import OperatingError

from .basic_handlers import dispatch
from .channel import Channel
from .link import ChannelLink
from .machine import ChannelFault, MethodReceived


class Session:
    def __init__(self, link: ChannelLink) -> None:
        self.link = link
        self.channels: dict[int, Channel] = {}

    def method(self, event: MethodReceived) -> None:
        """A method for channel ``event.channel`` (not 0): Channel.Open makes it."""
        if isinstance(event.method, commands.Channel.Open):
            channel = self.channels[event.channel] = Channel(self.link, event.channel, dispatch)
        else:
            found = self.channels.get(event.channel)
            if found is None:
                return
            channel = found
        channel.push(event)

    def fault(self, event: ChannelFault) -> None:
        """The machine closed a channel (a soft error): tell the client, release it."""
        self.link.send_method(event.channel, commands.Channel.Close(
            event.reply_code, event.text[:255], event.class_id, event.method_id))
        channel = self.channels.get(event.channel)
        if channel is not None:
            self.link.server.tasks.start(channel.close(), name="amqp-channel-close")

    def forget(self, number: int, channel: object) -> None:
        if self.channels.get(number) is channel:
            del self.channels[number]

    def wake_consumers(self) -> None:
        for channel in self.channels.values():
            channel.wake_consumers()

    def busy(self) -> bool:
        return any(channel.worker is not None and not channel.worker.done()
                   for channel in self.channels.values())

    async def drain(self) -> None:
        """Wait until every channel has worked through what it received."""
        for channel in list(self.channels.values()):
            worker = channel.worker
            if worker is not None and not worker.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker

    async def release(self, owner: object) -> None:
        """Close every channel (releasing what they hold) and delete the queues
        ``owner`` (the connection) declared exclusive."""
        for channel in list(self.channels.values()):
            await channel.close()
        self.channels.clear()
        server = self.link.server
        exclusive = self.link.exclusive_queues
        for topic in list(exclusive):
            use = server.queues.get(topic)
            if use is not None and use.exclusive_owner is owner:
                with contextlib.suppress(OperatingError):
                    await server.broker.delete_queue(topic)
                await server.queue_gone(topic)
        exclusive.clear()
