"""AMQP connection negotiation on channel 0 (sans-IO), and its tables.

Owns: the Connection.Start the server sends (its properties and capabilities); what
each Connection method the client sends means (``negotiate``: steps for the
adapter, never a socket call): Start-Ok (PLAIN / AMQPLAIN / EXTERNAL login) -> Tune,
Tune-Ok (frame and channel limits, heartbeat), Open (vhost) -> Open-Ok, Close,
Close-Ok, Update-Secret; and the reply-code names that label ``errors_total{listener="amqp"}``.
Which of these methods may arrive when is ``machine.py``'s table. No I/O.

Security (issue 10): ``Login`` is what the adapter knows of the security model and the
socket. A failed login is ACCESS_REFUSED (403) on connection.start-ok, after which the
connection closes (RabbitMQ's authentication_failure_close); a vhost the user may not
use is NOT_ALLOWED (530) on connection.open, as RabbitMQ answers both. EXTERNAL is
offered only when the client presented a certificate (TLS), and maps its subject CN
to a user.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pamqp import base as pamqp_base
from pamqp import commands
from pamqp import decode as pamqp_decode

from . import frames as f
from .settings import AmqpSettings

if TYPE_CHECKING:
    from conveyor.security.api import Principal

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


def start_method(external: bool = False) -> commands.Connection.Start:
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
        mechanisms="PLAIN AMQPLAIN EXTERNAL" if external else "PLAIN AMQPLAIN",
        locales="en_US")


def credentials(mechanism: str, response: Any) -> tuple[str, str] | None:
    """(user, password) from a PLAIN or AMQPLAIN response, None when malformed."""
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
        if login is None or secret is None:
            return None
        try:
            user = login.decode() if isinstance(login, bytes | bytearray) else str(login)
            password = (secret.decode() if isinstance(secret, bytes | bytearray)
                        else str(secret))
        except UnicodeDecodeError:
            return None
    if user is None or password is None:
        return None
    return str(user), str(password)


def authenticate(mechanism: str, response: Any, users: dict[str, str]) -> str | None:
    """The user name if PLAIN / AMQPLAIN credentials match a configured user."""
    found = credentials(mechanism, response)
    if found is None:
        return None
    user, password = found
    expected = users.get(user)
    if expected is None or expected != password:
        return None
    return user


@dataclass(frozen=True, slots=True)
class Login:
    """The adapter's side of authentication: the model's checks bound to this socket."""

    password: Callable[[str, str], Principal | None]  # PLAIN / AMQPLAIN
    certificate: Callable[[], Principal | None]  # EXTERNAL (None: no client certificate)
    may_open: Callable[[Principal, str], bool]  # connection.open's vhost



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
    principal: Principal | None = None


@dataclass(frozen=True, slots=True)
class LoginFailed:
    """Credentials refused: the adapter waits the model's back-off, then closes with 403."""

    user: str
    refused: Refused


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


Step = (Send | Refused | Identified | LoggedIn | LoginFailed | Tuned | Opened | CloseRequested
        | CloseConfirmed)


def _login(method: commands.Connection.StartOk, settings: AmqpSettings,
           login: Login | None) -> tuple[str, Principal | None, bool]:
    """(user, principal, ok) for a Start-Ok."""
    if login is None:  # no security model: the listener's configured users
        user = authenticate(method.mechanism, method.response, settings.users)
        return user or "", None, user is not None
    if method.mechanism == "EXTERNAL":
        principal = login.certificate()
        return (principal.name if principal else ""), principal, principal is not None
    if method.mechanism not in ("PLAIN", "AMQPLAIN"):
        return "", None, False
    found = credentials(method.mechanism, method.response)
    if found is None:
        return "", None, False
    principal = login.password(*found)
    return found[0], principal, principal is not None


def negotiate(method: pamqp_base.Frame, settings: AmqpSettings, login: Login | None = None,
              principal: Principal | None = None) -> list[Step]:
    """What a Connection method on channel 0 means, in order."""
    if isinstance(method, commands.Connection.StartOk):
        user, found, ok = _login(method, settings, login)
        identified = Identified(dict(method.client_properties or {}))
        if not ok:
            refused = Refused(f.ACCESS_REFUSED, "ACCESS_REFUSED - Login was refused using "
                              f"authentication mechanism {method.mechanism}", 10, 11)
            return [identified, LoginFailed(user, refused) if login else refused]
        return [identified, LoggedIn(user, found), Send(commands.Connection.Tune(
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
        vhost = method.virtual_host
        if login is not None and principal is not None:
            if not login.may_open(principal, vhost):
                return [Refused(f.NOT_ALLOWED, f"NOT_ALLOWED - access to vhost '{vhost}' "
                                f"refused for user '{principal.name}'", 10, 40)]
        elif vhost not in settings.vhosts:
            return [Refused(f.NOT_ALLOWED, f"NOT_ALLOWED - vhost {vhost} not "
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
