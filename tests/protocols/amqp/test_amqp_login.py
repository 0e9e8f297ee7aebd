"""AMQP logins against the security model (sans-IO): PLAIN, AMQPLAIN, EXTERNAL, vhosts.

Goal: with a ``Login`` bound to the real model, good PLAIN and AMQPLAIN credentials log
in as the model's principal; bad ones (wrong password, unknown user, guest from a
non-loopback peer, malformed responses) yield ``LoginFailed`` with RabbitMQ's 403 text;
EXTERNAL maps a verified client certificate's CN to its user and fails without one;
Connection.Open refuses a vhost the user may not use with 530 NOT_ALLOWED. The
certificate CN comes from ``getpeercert()``'s dict, as asyncio's SSL transport gives it
(TLS sockets themselves are the tls branch's tests).
Method: ``negotiate`` with pamqp methods and a ``Login`` from ``login.login_for`` over a
stand-in transport that answers ``get_extra_info`` (peer address, peer certificate).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pamqp import commands
from pamqp import encode as pamqp_encode

from conveyor.protocols.amqp import frames as f
from conveyor.protocols.amqp.login import certificate_cn, has_certificate, login_for
from conveyor.protocols.amqp.negotiation import (
    LoggedIn,
    LoginFailed,
    Opened,
    Refused,
    negotiate,
    start_method,
)
from conveyor.protocols.amqp.settings import AmqpSettings
from conveyor.security.model import Security, open_model

SETTINGS = AmqpSettings()
CERTIFICATE = {"subject": ((("countryName", "NL"),), (("commonName", "carol"),)),
               "issuer": ((("commonName", "test ca"),),)}


class Transport:
    """What the login reads of a transport: the peer address and certificate."""

    def __init__(self, host: str = "127.0.0.1", peercert: Any = None) -> None:
        self.extra = {"peername": (host, 40000), "peercert": peercert}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


@pytest.fixture(scope="module")
def security() -> Security:
    model = open_model()

    async def users() -> None:
        await model.admin.add_user("alice", "alice-pw")
        await model.admin.set_permissions("alice", "/", ".*", ".*", ".*")
        await model.admin.add_user("carol", "unused-password")
        await model.admin.set_permissions("carol", "/", ".*", ".*", ".*")
        await model.admin.add_vhost("other")

    asyncio.run(users())
    return model


def _start_ok(mechanism: str, response: Any) -> commands.Connection.StartOk:
    return commands.Connection.StartOk(client_properties={}, mechanism=mechanism,
                                       response=response)


def _amqplain(user: str, password: str) -> bytes:
    table = pamqp_encode.field_table({"LOGIN": user, "PASSWORD": password})
    return table[4:]  # AMQPLAIN's response is the table without its length prefix


def _login(security: Security, method: Any, transport: Transport | None = None) -> list[Any]:
    login = login_for(security, transport or Transport())  # type: ignore[arg-type]
    return negotiate(method, SETTINGS, login)


@pytest.mark.parametrize("method", [_start_ok("PLAIN", "\x00alice\x00alice-pw"),
                                    _start_ok("AMQPLAIN", _amqplain("alice", "alice-pw"))])
def test_good_credentials_log_in_as_the_model_principal(security: Security,
                                                        method: Any) -> None:
    steps = _login(security, method)
    logged = [step for step in steps if isinstance(step, LoggedIn)]
    assert logged and logged[0].user == "alice" and logged[0].principal is not None
    assert logged[0].principal.name == "alice"


@pytest.mark.parametrize("method, peer", [
    (_start_ok("PLAIN", "\x00alice\x00wrong"), "127.0.0.1"),
    (_start_ok("PLAIN", "\x00nobody\x00x"), "127.0.0.1"),
    (_start_ok("PLAIN", "\x00guest\x00guest"), "192.0.2.7"),  # guest: loopback only
    (_start_ok("PLAIN", "garbage"), "127.0.0.1"),
    (_start_ok("AMQPLAIN", b"\xff\x00"), "127.0.0.1"),
    (_start_ok("EXTERNAL", ""), "127.0.0.1"),  # no certificate
    (_start_ok("SCRAM-SHA-1", "x"), "127.0.0.1"),
])
def test_refused_logins(security: Security, method: Any, peer: str) -> None:
    steps = _login(security, method, Transport(peer))
    failed = [step for step in steps if isinstance(step, LoginFailed)]
    assert failed, steps
    assert failed[0].refused.reply_code == f.ACCESS_REFUSED
    assert failed[0].refused.text.startswith("ACCESS_REFUSED - Login was refused")
    assert not any(isinstance(step, LoggedIn) for step in steps)


def test_guest_from_loopback_logs_in(security: Security) -> None:
    steps = _login(security, _start_ok("PLAIN", "\x00guest\x00guest"))
    assert any(isinstance(step, LoggedIn) for step in steps)


def test_external_maps_the_certificate_cn(security: Security) -> None:
    transport = Transport(peercert=CERTIFICATE)
    assert certificate_cn(CERTIFICATE) == "carol"
    assert has_certificate(transport)  # type: ignore[arg-type]
    assert "EXTERNAL" in start_method(external=True).mechanisms
    assert "EXTERNAL" not in start_method().mechanisms
    steps = _login(security, _start_ok("EXTERNAL", ""), transport)
    logged = [step for step in steps if isinstance(step, LoggedIn)]
    assert logged and logged[0].user == "carol"
    unknown = Transport(peercert={"subject": ((("commonName", "mallory"),),)})
    assert any(isinstance(step, LoginFailed)
               for step in _login(security, _start_ok("EXTERNAL", ""), unknown))


def test_open_checks_the_vhost(security: Security) -> None:
    login = login_for(security, Transport())  # type: ignore[arg-type]
    alice = security.principal("alice")
    assert alice is not None
    opened = negotiate(commands.Connection.Open("/"), SETTINGS, login, alice)
    assert any(isinstance(step, Opened) for step in opened)
    refused = negotiate(commands.Connection.Open("other"), SETTINGS, login, alice)
    assert refused == [Refused(f.NOT_ALLOWED, "NOT_ALLOWED - access to vhost 'other' "
                               "refused for user 'alice'", 10, 40)]
    missing = negotiate(commands.Connection.Open("nowhere"), SETTINGS, login, alice)
    assert isinstance(missing[0], Refused) and missing[0].reply_code == f.NOT_ALLOWED
