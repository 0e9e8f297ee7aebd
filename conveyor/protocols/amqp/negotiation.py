"""AMQP connection negotiation on channel 0 (sans-IO), and its tables.

Owns: the Connection.Start the server sends (its properties and capabilities); what
each Connection method the client sends means (``negotiate``: steps for the
adapter, never a socket call): Start-Ok (PLAIN / AMQPLAIN login) -> Tune, Tune-Ok
(frame and channel limits, heartbeat), Open (vhost) -> Open-Ok, Close, Close-Ok,
Update-Secret; and the reply-code names that label ``errors_total{listener="amqp"}``.
Which of these methods may arrive when is ``machine.py``'s table. No I/O.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from pamqp import base as pamqp_base
from pamqp import commands
from pamqp import decode as pamqp_decode

from . import frames as f
from .settings import AmqpSettings

# Reply code -> its name in the spec: the label of errors_total{listener="amqp"}.
# Reply code -> its name in the spec: the label of errors_total{listener="amqp"}.
REPLY_NAMES = {code: name for name, code in (
    ("CONTENT_TOO_LARGE", f.CONTENT_TOO_LARGE), ("CONNECTION_FORCED", f.CONNECTION_FORCED),
    ("INVALID_PATH", f.INVALID_PATH), ("ACCESS_REFUSED", f.ACCESS_REFUSED),
    ("NOT_FOUND", f.NOT_FOUND), ("RESOURCE_LOCKED", f.RESOURCE_LOCKED),
    ("PRECONDITION_FAILED", f.PRECONDITION_FAILED), ("FRAME_ERROR", f.FRAME_ERROR),
    ("SYNTAX_ERROR", f.SYNTAX_ERROR), ("COMMAND_INVALID", f.COMMAND_INVALID),
    ("CHANNEL_ERROR", f.CHANNEL_ERROR), ("UNEXPECTED_FRAME", f.UNEXPECTED_FRAME),
    ("RESOURCE_ERROR", f.RESOURCE_ERROR), ("NOT_ALLOWED", f.NOT_ALLOWED),
    ("NOT_IMPLEMENTED", f.NOT_IMPLEMENTED), ("INTERNAL_ERROR", f.INTERNAL_ERROR))}
CAPABILITIES = {
    "publisher_confirms": True,
    "exchange_exchange_bindings": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "consumer_priorities": False,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
    "direct_reply_to": True,
}


def start_method() -> commands.Connection.Start:
    """The server's opening: who it is, what it can do, how to log in."""
    return commands.Connection.Start(
        version_major=0, version_minor=9,
        server_properties={
            "product": "Conveyor", "version": "0.1.0",
            "platform": f"Python {platform.python_version()}",
            "copyright": "Conveyor developers",
            "information": "https://github.com/conveyor (AMQP 0-9-1)",
            "capabilities": dict(CAPABILITIES),
            "cluster_name": "conveyor",
        },
        mechanisms="PLAIN AMQPLAIN", locales="en_US")


def authenticate(mechanism: str, response: Any, users: dict[str, str]) -> str | None:
    """The user name if PLAIN / AMQPLAIN credentials match a configured user."""
    raw = response.encode("utf-8") if isinstance(response, str) else bytes(response or b"")
    user = password = None
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) == 3:
            user, password = parts[1].decode("utf-8", "replace"), parts[2].decode(
                "utf-8", "replace")
    elif mechanism == "AMQPLAIN":
        try:
            _, table = pamqp_decode.field_table(len(raw).to_bytes(4, "big") + raw)
        except Exception:
            return None
        login, secret = table.get("LOGIN"), table.get("PASSWORD")
        user = login.decode() if isinstance(login, bytes | bytearray) else str(login)
        password = secret.decode() if isinstance(secret, bytes | bytearray) else str(secret)
        if login is None or secret is None:
            return None
    if user is None or password is None:
        return None
    expected = users.get(str(user))
    if expected is None or expected != password:
        return None
    return str(user)



# --- steps -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Send this method on channel 0."""

    method: pamqp_base.Frame


@dataclass(frozen=True, slots=True)
class Refused:
    """Close the connection with this reply (a hard error)."""

    reply_code: int
    text: str
    class_id: int
    method_id: int


@dataclass(frozen=True, slots=True)
class Identified:
    client_properties: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LoggedIn:
    user: str


@dataclass(frozen=True, slots=True)
class Tuned:
    frame_bytes_max: int
    channel_max: int
    heartbeat_s: int


@dataclass(frozen=True, slots=True)
class Opened:
    """The vhost is open: the handshake is over, heartbeats start."""

    vhost: str


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """The client closes: finish the channels' work, then Close-Ok."""


@dataclass(frozen=True, slots=True)
class CloseConfirmed:
    """Close-Ok to our Close: drop the socket."""


Step = Send | Refused | Identified | LoggedIn | Tuned | Opened | CloseRequested | CloseConfirmed


def negotiate(method: pamqp_base.Frame, settings: AmqpSettings) -> list[Step]:
    """What a Connection method on channel 0 means, in order."""
    if isinstance(method, commands.Connection.StartOk):
        user = authenticate(method.mechanism, method.response, settings.users)
        identified = Identified(dict(method.client_properties or {}))
        if user is None:
            return [identified, Refused(f.ACCESS_REFUSED, "ACCESS_REFUSED - Login was refused "
                                        f"using authentication mechanism {method.mechanism}",
                                        10, 11)]
        return [identified, LoggedIn(user), Send(commands.Connection.Tune(
            channel_max=settings.channel_max, frame_max=settings.frame_bytes_max,
            heartbeat=settings.heartbeat_s))]
    if isinstance(method, commands.Connection.TuneOk):
        frame_max = method.frame_max or settings.frame_bytes_max
        if frame_max < f.FRAME_MIN_SIZE:
            return [Refused(f.NOT_ALLOWED, f"NOT_ALLOWED - frame_max {frame_max} below "
                            f"{f.FRAME_MIN_SIZE}", 10, 31)]
        channel_max = method.channel_max or settings.channel_max
        return [Tuned(min(frame_max, settings.frame_bytes_max),
                      min(channel_max, settings.channel_max), method.heartbeat)]
    if isinstance(method, commands.Connection.Open):
        if method.virtual_host not in settings.vhosts:
            return [Refused(f.NOT_ALLOWED, f"NOT_ALLOWED - vhost {method.virtual_host} not "
                            "found", 10, 40)]
        return [Send(commands.Connection.OpenOk()), Opened(method.virtual_host)]
    if isinstance(method, commands.Connection.Close):
        return [CloseRequested()]
    if isinstance(method, commands.Connection.CloseOk):
        return [CloseConfirmed()]
    if isinstance(method, commands.Connection.UpdateSecret):
        return [Send(commands.Connection.UpdateSecretOk())]
    return []


# --- heartbeats ------------------------------------------------------------------------
MISSED_TICKS_MAX = 4  # ticks are heartbeat/2 apart: two heartbeat intervals of silence


@dataclass(slots=True)
class HeartbeatClock:
    """Ticked every heartbeat/2 seconds once the connection is open: "send" a heartbeat
    when nothing else went out, "close" after two heartbeat intervals without a byte
    from the client, else "idle"."""

    received: bool = False  # a byte arrived since the last tick
    sent: bool = False  # a frame went out since the last tick
    missed: int = 0

    def tick(self) -> str:
        if self.received:
            self.received = False
            self.missed = 0
        else:
            self.missed += 1
            if self.missed >= MISSED_TICKS_MAX:
                return "close"
        sent, self.sent = self.sent, False
        return "idle" if sent else "send"
