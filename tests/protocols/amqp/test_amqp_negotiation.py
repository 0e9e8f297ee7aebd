"""Channel-0 negotiation (sans-IO): each Connection method -> the steps for the adapter.

Goal: a right PLAIN / AMQPLAIN login answers Tune with the server's limits, a wrong
one refuses with 403 (10, 11); Tune-Ok takes the smaller frame and channel limits and
refuses a frame_max below the spec's minimum (530); Open answers Open-Ok for a known
vhost and refuses an unknown one (530); Close / Close-Ok / Update-Secret map to
their steps. Method: ``negotiate`` called with pamqp methods; steps compared.
"""

from __future__ import annotations

from pamqp import commands
from pamqp import encode as pamqp_encode

from conveyor.protocols.amqp import frames as f
from conveyor.protocols.amqp.negotiation import (
    CloseConfirmed,
    CloseRequested,
    HeartbeatClock,
    Identified,
    LoggedIn,
    Opened,
    Refused,
    Send,
    Tuned,
    authenticate,
    negotiate,
)
from conveyor.protocols.amqp.settings import AmqpSettings

SETTINGS = AmqpSettings(users={"guest": "secret"}, frame_bytes_max=131072, channel_max=64,
                        heartbeat_s=30)


def start_ok(mechanism: str, response: str) -> commands.Connection.StartOk:
    return commands.Connection.StartOk(client_properties={"product": "test"},
                                       mechanism=mechanism, response=response)


def test_plain_login_answers_tune_with_the_server_limits() -> None:
    steps = negotiate(start_ok("PLAIN", "\x00guest\x00secret"), SETTINGS)
    assert steps[:2] == [Identified({"product": "test"}), LoggedIn("guest")]
    [send] = steps[2:]
    assert isinstance(send, Send) and isinstance(send.method, commands.Connection.Tune)
    assert (send.method.channel_max, send.method.frame_max, send.method.heartbeat) == (
        64, 131072, 30)


def test_wrong_password_is_refused_with_access_refused() -> None:
    steps = negotiate(start_ok("PLAIN", "\x00guest\x00wrong"), SETTINGS)
    assert steps[0] == Identified({"product": "test"})
    assert steps[1] == Refused(f.ACCESS_REFUSED, "ACCESS_REFUSED - Login was refused using "
                               "authentication mechanism PLAIN", 10, 11)


def test_amqplain_credentials() -> None:
    table = pamqp_encode.field_table({"LOGIN": "guest", "PASSWORD": "secret"})[4:]
    assert authenticate("AMQPLAIN", table, {"guest": "secret"}) == "guest"
    assert authenticate("AMQPLAIN", b"\xff\xff", {"guest": "secret"}) is None
    assert authenticate("EXTERNAL", b"", {"guest": "secret"}) is None


def test_tune_ok_takes_the_smaller_limits_and_refuses_tiny_frames() -> None:
    assert negotiate(commands.Connection.TuneOk(channel_max=1000, frame_max=4096,
                                                heartbeat=10), SETTINGS) == [
        Tuned(4096, 64, 10)]
    assert negotiate(commands.Connection.TuneOk(channel_max=0, frame_max=0, heartbeat=0),
                     SETTINGS) == [Tuned(131072, 64, 0)]
    [refused] = negotiate(commands.Connection.TuneOk(frame_max=512), SETTINGS)
    assert isinstance(refused, Refused)
    assert (refused.reply_code, refused.class_id, refused.method_id) == (
        f.NOT_ALLOWED, 10, 31)


def test_open_knows_the_vhosts() -> None:
    send, opened = negotiate(commands.Connection.Open(virtual_host="/"), SETTINGS)
    assert isinstance(send, Send) and isinstance(send.method, commands.Connection.OpenOk)
    assert opened == Opened("/")
    [refused] = negotiate(commands.Connection.Open(virtual_host="other"), SETTINGS)
    assert refused == Refused(f.NOT_ALLOWED, "NOT_ALLOWED - vhost other not found", 10, 40)


def test_close_close_ok_and_update_secret() -> None:
    assert negotiate(commands.Connection.Close(), SETTINGS) == [CloseRequested()]
    assert negotiate(commands.Connection.CloseOk(), SETTINGS) == [CloseConfirmed()]
    [send] = negotiate(commands.Connection.UpdateSecret(new_secret="s", reason="r"), SETTINGS)
    assert isinstance(send, Send)
    assert isinstance(send.method, commands.Connection.UpdateSecretOk)


def test_heartbeat_clock_sends_when_idle_and_closes_after_two_silent_intervals() -> None:
    clock = HeartbeatClock()
    clock.received, clock.sent = True, True
    assert clock.tick() == "idle"  # traffic both ways: nothing to do
    clock.received = True
    assert clock.tick() == "send"  # nothing went out: a heartbeat
    assert [clock.tick() for _ in range(3)] == ["send", "send", "send"]
    assert clock.tick() == "close"  # four ticks (two heartbeats) without a byte
