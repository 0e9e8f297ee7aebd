"""One AMQP connection above its bytes: channel 0, the channels, flow and limits.

Owns: everything of a connection that is not the socket. ``Session`` takes each
event the connection machine decoded and hands it on: publishes and methods to
their channel's inbox (the channel table, number -> ``Channel``), after the flow
decision of ``inbox_flow.py`` for each publish; channel 0 to the ``Handshake``;
channel errors (Channel.Close, then the channel releases what it holds) and
connection errors to the link. It keeps the connection's request watch (request and
idle timeouts) and its share of the listener's memory budget, waits for the channels
to finish what they received, and releases everything at the end: every channel and
the queues this connection declared exclusive. ``Handshake`` carries out
``negotiation.py``'s steps (login through ``login.py``, tune, vhost, close) and runs
the handshake and heartbeat timers. The adapter owns the socket; this module asks it
(``ConnectionLink``) to write, pause or close and never touches bytes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pamqp import base as pamqp_base
from pamqp import commands

from conveyor.errors import OperatingError
from conveyor.limits import RequestWatch

from . import frames as f
from .basic_handlers import dispatch
from .channel import Channel
from .inbox_flow import InboxFlow, Release
from .link import ChannelLink
from .login import has_certificate, login_for, password_login, peer_host
from .machine import (
    AcksReceived,
    ChannelFault,
    ConnectionFault,
    ConnectionMachine,
    ConnectionState,
    HeaderAccepted,
    HeaderRejected,
    HeartbeatReceived,
    MethodReceived,
    PublishReceived,
)
from .negotiation import (
    CloseConfirmed,
    CloseRequested,
    HeartbeatClock,
    Identified,
    LoggedIn,
    LoginFailed,
    Opened,
    Refused,
    Send,
    Step,
    Tuned,
    negotiate,
    start_method,
)

if TYPE_CHECKING:
    from conveyor.security.api import Principal

log = logging.getLogger("conveyor.amqp")


class ConnectionLink(ChannelLink, Protocol):
    """The connection as its session sees it: the socket's side (the adapter)."""

    machine: ConnectionMachine
    transport: asyncio.Transport | None
    heartbeats: HeartbeatClock
    client_properties: dict[str, Any]
    principal: Principal | None

    def flush(self) -> None: ...

    def drop(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close_socket(self, last: bytes = b"") -> None: ...

    def close_requested(self) -> None: ...

    def shed_memory(self) -> None: ...


class Handshake:
    """Channel 0: negotiation's steps carried out, and the handshake/heartbeat timers."""

    def __init__(self, link: ConnectionLink) -> None:
        self.link = link
        self.heartbeat_s = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def start_timer(self) -> None:
        """A client must finish the handshake in time (RabbitMQ's handshake_timeout)."""
        self._timer = self._loop.call_later(
            self.link.server.settings.handshake_timeout_ms / 1000, self._handshake_timeout)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def start(self) -> None:
        self.link.send_method(0, start_method(has_certificate(self.link.transport)))

    def method(self, method: pamqp_base.Frame) -> None:
        link = self.link
        security = link.server.security
        if security is not None and isinstance(method, commands.Connection.StartOk) \
                and method.mechanism in ("PLAIN", "AMQPLAIN"):
            # the password hash (scrypt) runs in a worker thread, not on the event loop
            link.server.tasks.start(self._password_login(method), name="amqp-login")
            return
        login = login_for(security, link.transport) if security is not None else None
        self._negotiated(negotiate(method, link.server.settings, login, link.principal))

    async def _password_login(self, method: commands.Connection.StartOk) -> None:
        link = self.link
        security = link.server.security
        assert security is not None
        login = await password_login(security, link.transport, method)
        if link.machine.state is not ConnectionState.CLOSED:
            self._negotiated(negotiate(method, link.server.settings, login, link.principal))
            link.flush()

    def _negotiated(self, steps: list[Step]) -> None:
        link = self.link
        security = link.server.security
        for step in steps:
            if isinstance(step, Send):
                link.send_method(0, step.method)
            elif isinstance(step, Refused):
                link.fail(step.reply_code, step.text, step.class_id, step.method_id)
            elif isinstance(step, Identified):
                link.client_properties = step.client_properties
            elif isinstance(step, LoggedIn):
                link.user = step.user
                link.principal = step.principal
                if security is not None:
                    security.login_succeeded(peer_host(link.transport))
            elif isinstance(step, LoginFailed):
                link.machine.close_connection()  # only Close / Close-Ok are read now
                link.server.tasks.start(self._login_failed(step), name="amqp-login-failed")
            elif isinstance(step, Tuned):
                link.frame_bytes_max, self.heartbeat_s = step.frame_bytes_max, step.heartbeat_s
                link.machine.tuned(step.frame_bytes_max, step.channel_max)
            elif isinstance(step, Opened):
                link.vhost = step.vhost
                self._start_heartbeats()
            elif isinstance(step, CloseRequested):
                link.close_requested()
            elif isinstance(step, CloseConfirmed):
                link.close_socket()

    async def _login_failed(self, step: LoginFailed) -> None:
        """The model's per-peer back-off, then 403 and close (RabbitMQ closes the
        connection after a refused login)."""
        security = self.link.server.security
        if security is not None:
            await security.login_failed(peer_host(self.link.transport), step.user, "amqp")
        refused = step.refused
        self.link.fail(refused.reply_code, refused.text, refused.class_id, refused.method_id,
                       machine_closing=True)

    def _start_heartbeats(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.heartbeat_s:
            self._timer = self._loop.call_later(self.heartbeat_s / 2, self._heartbeat)

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.link.machine.state is not ConnectionState.OPEN:
            self.link.close_socket()

    def _heartbeat(self) -> None:
        """Every heartbeat/2 s: send one if idle; close after two silent heartbeats."""
        link = self.link
        if link.transport is None or link.transport.is_closing():
            return
        beat = link.heartbeats.tick()
        if beat == "close":
            log.info("amqp connection %s missed heartbeats", link.connection_id)
            link.close_socket()
            return
        if beat == "send":
            link.write_parts([f.heartbeat_frame()])
            link.heartbeats.sent = False  # a heartbeat is not traffic of its own
        self._timer = self._loop.call_later(self.heartbeat_s / 2, self._heartbeat)


class Session:
    def __init__(self, link: ConnectionLink) -> None:
        self.link = link
        self.server = link.server
        self.channels: dict[int, Channel] = {}
        self.handshake = Handshake(link)
        self.flow = InboxFlow(link, link.server)
        self._watch: RequestWatch | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # --- the connection's life ---------------------------------------------------------
    def opened(self) -> None:
        """The connection was admitted: watch its requests, follow the server's flow."""
        self._watch = RequestWatch(self.server.limits, self._expired, self.busy)
        self._unsubscribe = self.server.shared.flow.on_change(self._flow_changed)
        self.handshake.start_timer()

    def lost(self) -> None:
        """The socket is gone: stop watching, leave the budget and the flow."""
        if self._watch is not None:
            self._watch.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        shared = self.server.shared
        shared.budget.forget(self.link)
        shared.flow.forget(self.link)
        self.handshake.stop()

    # --- events ------------------------------------------------------------------------
    def event(self, event: Any) -> None:
        """One event of the connection machine, handed on."""
        if isinstance(event, PublishReceived):
            channel = self.channels.get(event.channel)
            if channel is not None:
                link = self.link
                hold = self.flow.received(event, link.transport is not None)
                if hold.pause_reading:
                    link.pause_reading()  # this producer fills memory: it waits
                if hold.block_reason is not None and link.capability("connection.blocked"):
                    link.send_method(0, commands.Connection.Blocked(reason=hold.block_reason))
                channel.push(event)
        elif isinstance(event, AcksReceived):
            found = self.channels.get(event.channel)
            if found is not None:
                found.push(event)
        elif isinstance(event, MethodReceived):
            if event.channel == 0:
                self.handshake.method(event.method)
            else:
                self.method(event)
        elif isinstance(event, HeartbeatReceived):
            return
        elif isinstance(event, HeaderAccepted):
            self.handshake.start()
        elif isinstance(event, ChannelFault):
            self.fault(event)
        elif isinstance(event, ConnectionFault):
            self.link.fail(event.reply_code, event.text, event.class_id, event.method_id,
                           machine_closing=True)
        elif isinstance(event, HeaderRejected):
            self.link.close_socket(f.PROTOCOL_HEADER)

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
            self.server.tasks.start(channel.close(), name="amqp-channel-close")

    def forget(self, number: int, channel: object) -> None:
        if self.channels.get(number) is channel:
            del self.channels[number]

    def wake_consumers(self) -> None:
        for channel in self.channels.values():
            channel.wake_consumers()

    # --- flow and limits ---------------------------------------------------------------
    def inbox_drained(self, batch: list[PublishReceived]) -> None:
        self._apply(self.flow.drained(batch))

    def _flow_changed(self) -> None:
        """The server's flow may have let go of this connection."""
        if self.flow.holding():
            self._apply(self.flow.release())

    def _apply(self, release: Release) -> None:
        if release.unblock and self.link.capability("connection.blocked"):
            self.link.send_method(0, commands.Connection.Unblocked())
        if release.resume_reading:
            self.link.resume_reading()

    def received(self, before: int) -> None:
        """After a read: ``before`` bytes were buffered with it, what is left now."""
        machine = self.link.machine
        buffered = machine.reader.buffered_bytes
        if self._watch is not None:
            self._watch.received(buffered > 0, buffered < before)
        if machine.state is ConnectionState.OPEN:
            self.server.shared.budget.hold(self.link, buffered + self._content_bytes())

    def _content_bytes(self) -> int:
        """Bytes of messages whose content is still arriving, over all channels."""
        return sum(state.body_received for state in self.link.machine.channels.values())

    def busy(self) -> bool:
        return bool(self.flow.inbox_bytes) or any(
            channel.worker is not None and not channel.worker.done()
            for channel in self.channels.values())

    def _expired(self, reason: str) -> None:
        log.info("amqp connection %s closed: %s timeout", self.link.connection_id, reason)
        self.server.shared.budget.forget(self.link)
        self.link.fail(f.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason} timeout")
        self.link.drop()

    def shed_memory(self) -> None:
        """Over the server's partial-request budget and holding the most: 506, close."""
        for state in self.link.machine.channels.values():
            state.body_parts = []
            state.body_received = 0
        self.link.fail(f.RESOURCE_ERROR, "RESOURCE_ERROR - unfinished messages over the "
                       "server's memory budget (partial_request_bytes_max)")
        self.link.drop()

    # --- the end -----------------------------------------------------------------------
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
        server = self.server
        exclusive = self.link.exclusive_queues
        for topic in list(exclusive):
            use = server.queues.get(topic)
            if use is not None and use.exclusive_owner is owner:
                with contextlib.suppress(OperatingError):
                    await server.broker.delete_queue(topic)
                await server.queue_gone(topic)
        exclusive.clear()
