"""The security model bound to one AMQP socket: what ``negotiation.Login`` calls.

Owns: the peer's address (the model's loopback rule for guest), the client
certificate's subject CN for EXTERNAL (the TLS layer verified the chain; asyncio's
``transport.get_extra_info("peercert")`` is empty without a verified certificate),
the vhost check on connection.open, and the PLAIN / AMQPLAIN password check done
before negotiation (``password_login``: the model's slow hash off the event loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from pamqp import commands

from .negotiation import Login, credentials

if TYPE_CHECKING:
    from conveyor.security.api import Principal, SecurityModel


def peer_host(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


def certificate_cn(peercert: Any) -> str | None:
    """The subject's commonName of ``ssl.SSLSocket.getpeercert()``'s dict, if any."""
    if not isinstance(peercert, dict):
        return None
    for entry in peercert.get("subject", ()):
        for name, value in entry:
            if name == "commonName" and isinstance(value, str) and value:
                return value
    return None


def has_certificate(transport: asyncio.BaseTransport | None) -> bool:
    return transport is not None and certificate_cn(transport.get_extra_info("peercert")) \
        is not None


def login_for(security: SecurityModel, transport: asyncio.BaseTransport | None) -> Login:
    host = peer_host(transport)

    def password(user: str, secret: str) -> Principal | None:
        return security.verify_password(user, secret, host)

    def certificate() -> Principal | None:
        name = certificate_cn(transport.get_extra_info("peercert")) if transport else None
        return security.principal_for_certificate(name) if name else None

    def may_open(principal: Principal, vhost: str) -> bool:
        return security.may_use_vhost(principal, vhost)

    return Login(password, certificate, may_open)


async def password_login(security: SecurityModel, transport: asyncio.BaseTransport | None,
                         method: commands.Connection.StartOk) -> Login:
    """A ``Login`` whose password check is already done: the model's
    ``authenticate_password`` (the scrypt hash in a worker thread) when it has one."""
    host = peer_host(transport)
    found = credentials(method.mechanism, method.response)
    principal = None
    if found is not None:
        slow = getattr(security, "authenticate_password", None)
        principal = (await slow(found[0], found[1], host) if slow is not None
                     else security.verify_password(found[0], found[1], host))
    return dataclasses.replace(login_for(security, transport),
                               password=lambda user, password: principal)
