"""AMQP connection negotiation and its tables, as pure functions.

Owns: the Connection.Start the server sends (its properties and capabilities), the
PLAIN / AMQPLAIN credential check, and the reply-code names that label
``errors_total{listener="amqp"}``. No I/O.
"""

from __future__ import annotations

import platform
from typing import Any

from pamqp import commands
from pamqp import decode as pamqp_decode

from . import frames as f

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

