"""The AMQP connection: the asyncio glue that moves bytes.

Owns: one ``AmqpConnection`` (an ``asyncio.Protocol``) per client socket: bytes in
through the sans-IO ``ConnectionMachine`` (``machine.py``), its events to the
connection's channels (``session.py``) or to channel-0 negotiation
(``negotiation.py``, whose steps it carries out); batched writes; the heartbeat and
handshake timers; admission, request timeouts and the memory budget; and the flow
hooks: the decisions of ``inbox_flow.py`` applied to the transport (a connection only
stops reading its own socket when it has too much unprocessed input, so one fast
producer never blocks the others). What a channel does with its methods lives in
``channel.py``, ``channel_machine.py``, ``publishing.py`` and the handlers; the
listener-wide state in ``server.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pamqp import base as pamqp_base
from pamqp import commands

from conveyor.limits import RequestWatch
from conveyor.server.listeners import peer_principal_name

from . import frames as f
from .channel import Channel
from .inbox_flow import InboxFlow, Release
from .login import has_certificate, login_for, peer_host
from .machine import (
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
    REPLY_NAMES,
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
    credentials,
    negotiate,
    start_method,
)
from .server import AmqpServer, Consumer
from .session import Session

if TYPE_CHECKING:
    from conveyor.security.api import Principal

log = logging.getLogger("conveyor.amqp")
PUBLISH = "Basic.Publish"


class AmqpConnection(asyncio.Protocol):
    def __init__(self, server: AmqpServer) -> None:
        settings = server.settings
        self.server = server
        server.next_connection_id += 1
        self.connection_id = server.next_connection_id
        self.machine = ConnectionMachine(settings.frame_bytes_max, settings.channel_max,
                                         settings.message_bytes_max)
        self.transport: asyncio.Transport | None = None
        self.session = Session(self)
        self.exclusive_queues: set[str] = set()
        self.frame_bytes_max = settings.frame_bytes_max
        self.heartbeat_s = 0
        self.user = ""
        self.principal: Principal | None = None  # who the connection acts as (security)
        self.vhost = "/"
        # CN of the client certificate the TLS handshake verified (AMQP EXTERNAL), or None
        self.certificate_user: str | None = None
        self.client_properties: dict[str, Any] = {}
        self.writing_paused = False
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.flow = InboxFlow(self, server)
        self.heartbeats = HeartbeatClock()
        self._heartbeat_handle: asyncio.TimerHandle | None = None
        self._closing_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._admitted = False
        self._watch: RequestWatch | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._abort_handle: asyncio.TimerHandle | None = None  # the close_timeout_ms timer

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=4 << 20)
        if not self.server.gate.admit():
            self.machine.state = ConnectionState.CLOSED
            self.transport.abort()  # over connections_max: refused before reading anything
            return
        self._admitted = True
        self.certificate_user = peer_principal_name(transport)
        self.server.counters.opened()
        self._watch = RequestWatch(self.server.limits, self._expired, self._is_busy)
        self._unsubscribe = self.server.shared.flow.on_change(self._flow_changed)
        self.server.connections.add(self)
        # A client must finish the handshake in time (RabbitMQ's handshake_timeout).
        self._heartbeat_handle = self._loop.call_later(
            self.server.settings.handshake_timeout_ms / 1000, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        self.server.counters.bytes_received += len(data)
        self.heartbeats.received = True
        reader = self.machine.reader
        before = reader.buffered_bytes + len(data)
        # requests are counted per run of one kind (a run of acks or publishes: one
        # counter call), not per method; pamqp's names are class constants (``is``)
        kind: str | None = None
        run = 0
        for event in self.machine.receive(data):
            this: str | None = None
            if isinstance(event, MethodReceived):
                this = event.method.name
            elif isinstance(event, PublishReceived):
                this = PUBLISH
            if this is not kind:
                if run and kind is not None:
                    self.server.counters.request(kind, run)
                kind, run = this, 0
            if this is not None:
                run += 1
            self._event(event)
        if run and kind is not None:
            self.server.counters.request(kind, run)
        buffered = reader.buffered_bytes
        if self._watch is not None:
            self._watch.received(buffered > 0, buffered < before)
        if self.machine.state is ConnectionState.OPEN:
            self.server.shared.budget.hold(self, buffered + self._content_bytes())

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.session.wake_consumers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._admitted:
            self._admitted = False
            self.server.gate.release()
            self.server.counters.closed()
        if self._watch is not None:
            self._watch.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        shared = self.server.shared
        shared.budget.forget(self)
        shared.flow.forget(self)
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
        if self._abort_handle is not None:  # the socket is gone: release the connection now
            self._abort_handle.cancel()
            self._abort_handle = None
        self.machine.state = ConnectionState.CLOSED
        self._closing_task = self.server.tasks.start(self._cleanup(), name="amqp-cleanup")

    # --- events ---------------------------------------------------------------------------
    def _event(self, event: Any) -> None:
        if isinstance(event, PublishReceived):
            channel = self.session.channels.get(event.channel)
            if channel is not None:
                hold = self.flow.received(event, self.transport is not None)
                if hold.pause_reading and self.transport is not None:
                    self.transport.pause_reading()  # this producer fills memory: it waits
                if hold.block_reason is not None and self.capability("connection.blocked"):
                    self.send_method(0, commands.Connection.Blocked(reason=hold.block_reason))
                channel.push(event)
        elif isinstance(event, MethodReceived):
            if event.channel == 0:
                self._connection_method(event.method)
            else:
                self.session.method(event)
        elif isinstance(event, HeartbeatReceived):
            return
        elif isinstance(event, HeaderAccepted):
            self._start()
        elif isinstance(event, ChannelFault):
            self.session.fault(event)
        elif isinstance(event, ConnectionFault):
            self.fail(event.reply_code, event.text, event.class_id, event.method_id,
                      machine_closing=True)
        elif isinstance(event, HeaderRejected):
            if self.transport is not None:
                self.transport.write(f.PROTOCOL_HEADER)
                self.transport.close()

    def inbox_drained(self, batch: list[PublishReceived]) -> None:
        self._apply(self.flow.drained(batch))

    def _flow_changed(self) -> None:
        """The server's flow may have let go of this connection."""
        if self.flow.holding():
            self._apply(self.flow.release())

    def _apply(self, release: Release) -> None:
        if release.unblock and self.capability("connection.blocked"):
            self.send_method(0, commands.Connection.Unblocked())
        if (release.resume_reading and self.transport is not None
                and not self.transport.is_closing()):
            self.transport.resume_reading()

    # --- limits ---------------------------------------------------------------------------
    def _content_bytes(self) -> int:
        """Bytes of messages whose content is still arriving, over all channels."""
        return sum(state.body_received for state in self.machine.channels.values())

    def _is_busy(self) -> bool:
        return bool(self.flow.inbox_bytes) or self.session.busy()

    def _expired(self, reason: str) -> None:
        log.info("amqp connection %s closed: %s timeout", self.connection_id, reason)
        self.server.shared.budget.forget(self)
        self.fail(f.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason} timeout")
        self._drop()

    def shed_memory(self) -> None:
        """Over the server's partial-request budget and holding the most: 506, close."""
        for state in self.machine.channels.values():
            state.body_parts = []
            state.body_received = 0
        self.fail(f.RESOURCE_ERROR, "RESOURCE_ERROR - unfinished messages over the "
                  "server's memory budget (partial_request_bytes_max)")
        self._drop()

    def _drop(self) -> None:
        """Write what is pending (the Close) and drop the socket without waiting for a
        peer that may not be reading."""
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.abort()

    def capability(self, name: str) -> bool:
        capabilities = self.client_properties.get("capabilities")
        return isinstance(capabilities, dict) and bool(capabilities.get(name))

    def channel_closing(self, number: int) -> None:
        self.machine.close_channel(number)

    def forget_channel(self, number: int, channel: object) -> None:
        self.session.forget(number, channel)

    # --- negotiation ----------------------------------------------------------------------
    def _start(self) -> None:
        self.send_method(0, start_method(has_certificate(self.transport)))

    def _connection_method(self, method: pamqp_base.Frame) -> None:
        security = self.server.security
        if security is not None and isinstance(method, commands.Connection.StartOk) \
                and method.mechanism in ("PLAIN", "AMQPLAIN"):
            # the password hash (scrypt) runs in a worker thread, not on the event loop
            self.server.tasks.start(self._password_login(method), name="amqp-login")
            return
        login = login_for(security, self.transport) if security is not None else None
        self._negotiated(negotiate(method, self.server.settings, login, self.principal))

    async def _password_login(self, method: commands.Connection.StartOk) -> None:
        security = self.server.security
        assert security is not None
        host = peer_host(self.transport)
        found = credentials(method.mechanism, method.response)
        principal = None
        if found is not None:
            slow = getattr(security, "authenticate_password", None)
            principal = (await slow(found[0], found[1], host) if slow is not None
                         else security.verify_password(found[0], found[1], host))
        login = dataclasses.replace(login_for(security, self.transport),
                                    password=lambda user, password: principal)
        if self.machine.state is not ConnectionState.CLOSED:
            self._negotiated(negotiate(method, self.server.settings, login, self.principal))
            self._flush()

    def _negotiated(self, steps: list[Step]) -> None:
        security = self.server.security
        for step in steps:
            if isinstance(step, Send):
                self.send_method(0, step.method)
            elif isinstance(step, Refused):
                self.fail(step.reply_code, step.text, step.class_id, step.method_id)
            elif isinstance(step, Identified):
                self.client_properties = step.client_properties
            elif isinstance(step, LoggedIn):
                self.user = step.user
                self.principal = step.principal
                if security is not None:
                    security.login_succeeded(peer_host(self.transport))
            elif isinstance(step, LoginFailed):
                self.machine.close_connection()  # only Close / Close-Ok are read now
                self.server.tasks.start(self._login_failed(step), name="amqp-login-failed")
            elif isinstance(step, Tuned):
                self.frame_bytes_max, self.heartbeat_s = step.frame_bytes_max, step.heartbeat_s
                self.machine.tuned(step.frame_bytes_max, step.channel_max)
            elif isinstance(step, Opened):
                self.vhost = step.vhost
                self._start_heartbeats()
            elif isinstance(step, CloseRequested):
                self.machine.state = ConnectionState.CLOSED
                self._closing_task = self.server.tasks.start(self._close_requested(),
                                                             name="amqp-close")
            elif isinstance(step, CloseConfirmed) and self.transport is not None:
                self.transport.close()

    async def _login_failed(self, step: LoginFailed) -> None:
        """The model's per-peer back-off, then 403 and close (RabbitMQ closes the
        connection after a refused login)."""
        security = self.server.security
        if security is not None:
            await security.login_failed(peer_host(self.transport), step.user, "amqp")
        refused = step.refused
        self.fail(refused.reply_code, refused.text, refused.class_id, refused.method_id,
                  machine_closing=True)

    def _start_heartbeats(self) -> None:
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
            self._heartbeat_handle = None
        if self.heartbeat_s:
            self._heartbeat_handle = self._loop.call_later(self.heartbeat_s / 2,
                                                           self._heartbeat)

    def _handshake_timeout(self) -> None:
        self._heartbeat_handle = None
        if self.machine.state is not ConnectionState.OPEN and self.transport is not None:
            self.transport.close()

    def _heartbeat(self) -> None:
        """Every heartbeat/2 s: send one if idle; close after two silent heartbeats."""
        if self.transport is None or self.transport.is_closing():
            return
        beat = self.heartbeats.tick()
        if beat == "close":
            log.info("amqp connection %s missed heartbeats", self.connection_id)
            self.transport.close()
            return
        if beat == "send":
            self.write_parts([f.heartbeat_frame()])
            self.heartbeats.sent = False  # a heartbeat is not traffic of its own
        self._heartbeat_handle = self._loop.call_later(self.heartbeat_s / 2, self._heartbeat)

    # --- output ---------------------------------------------------------------------------
    def send_method(self, channel: int, method: pamqp_base.Frame) -> None:
        if isinstance(method, commands.Channel.Close | commands.Connection.Close):
            code = method.reply_code or 0
            if code != f.REPLY_SUCCESS:
                self.server.counters.error(REPLY_NAMES.get(code, str(code)))
        self.write_parts([f.encode_method(channel, method)])

    def write_parts(self, parts: list[bytes]) -> None:
        self._out += parts
        self.heartbeats.sent = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            # one join is cheaper than summing the lengths of thousands of small frames
            # and handing each to the transport (measured: 40 vs 116 us per 3,000 parts)
            data = b"".join(self._out)
            self.server.counters.bytes_sent += len(data)
            self.transport.write(data)
        self._out = []

    def fail(self, reply_code: int, text: str, class_id: int = 0, method_id: int = 0,
             machine_closing: bool = False) -> None:
        """A hard error: Connection.Close, then wait for Close-Ok (or time out)."""
        if self.machine.state in (ConnectionState.CLOSING, ConnectionState.CLOSED) \
                and not machine_closing:
            return
        log.info("amqp connection %s closed: %s %s", self.connection_id, reply_code, text)
        self.machine.close_connection()
        self.send_method(0, commands.Connection.Close(reply_code, text[:255], class_id,
                                                      method_id))
        self._abort_handle = self._loop.call_later(
            self.server.settings.close_timeout_ms / 1000, self._abort)

    def _abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()

    async def close(self) -> None:
        """Server shutdown: Connection.Close 320, then drop the socket."""
        if self.transport is not None and not self.transport.is_closing():
            self.send_method(0, commands.Connection.Close(
                f.CONNECTION_FORCED, "CONNECTION_FORCED - broker shutdown", 0, 0))
            self._flush()
            self.transport.close()
        if self._closing_task is not None:
            await self._closing_task

    async def _close_requested(self) -> None:
        """Connection.Close from the client: finish what its channels received first
        (publishes sent before the close are stored), then Close-Ok."""
        await self.session.drain()
        await self.session.release(self)  # exclusive queues are gone when Close-Ok arrives
        self.send_method(0, commands.Connection.CloseOk())
        self._flush()
        if self.transport is not None:
            self.transport.close()

    async def _cleanup(self) -> None:
        if self._closing_task is not None and self._closing_task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._closing_task
        await self.session.drain()
        await self.session.release(self)

def make_protocol_factory(server: AmqpServer) -> Callable[[], AmqpConnection]:
    return lambda: AmqpConnection(server)


__all__ = ["AmqpConnection", "AmqpServer", "Channel", "Consumer", "make_protocol_factory"]
