"""Configuration precedence: defaults < TOML file < environment < flags, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.config import load_config
from conveyor.errors import InvalidConfigError


def test_defaults_listen_on_the_documented_ports() -> None:
    config = load_config(environ={})
    assert config.data_dir == Path("conveyor-data")
    enabled = {listener.name: listener.port for listener in config.listeners if listener.enabled}
    assert enabled == {"kafka": 9092, "amqp": 5672, "http": 8080, "sqs": 9324}
    assert config.broker.record_bytes_max == 129 << 20  # AMQP 128 MiB ceiling + properties


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "conveyor.toml"
    path.write_text(
        'data_dir = "/from/file"\nlog_level = "debug"\n'
        "[broker]\nauto_create_topics = false\ndefault_partitions = 3\n"
        "[listeners.kafka]\nport = 19092\n[listeners.amqp]\nenabled = false\n"
        '[listeners.http]\nport = 18080\nusers = {"ada" = "secret"}\n'
    )
    environ = {"CONVEYOR_DATA_DIR": "/from/env", "CONVEYOR_HTTP_PORT": "28080",
               "CONVEYOR_BROKER__DEFAULT_PARTITIONS": "5"}
    config = load_config(path, environ=environ, flags={"data_dir": "/from/flag"})
    assert config.data_dir == Path("/from/flag")
    assert config.log_level == "debug"
    assert config.broker.auto_create_topics is False
    assert config.broker.default_partitions == 5
    kafka, amqp, http = (config.listener(name) for name in ("kafka", "amqp", "http"))
    assert kafka is not None and kafka.port == 19092
    assert amqp is not None and not amqp.enabled
    assert http is not None and http.port == 28080 and http.settings == {"users": {"ada": "secret"}}


def test_listener_selection_from_environment() -> None:
    config = load_config(environ={"CONVEYOR_LISTENERS": "http"})
    assert [listener.name for listener in config.listeners if listener.enabled] == ["http"]


@pytest.mark.parametrize(
    ("document", "environ"),
    [
        ("bogus = 1\n", {}),
        ("[broker]\nno_such_setting = 1\n", {}),
        ("[broker]\ndefault_partitions = 'many'\n", {}),
        ("[listeners.gopher]\nport = 70\n", {}),
        ("[listeners.kafka]\nport = 70000\n", {}),
        ("", {"CONVEYOR_KAFKA_PORT": "ninety"}),
        ("", {"CONVEYOR_BROKER__AUTO_CREATE_TOPICS": "maybe"}),
        ("not toml at all [", {}),
    ],
)
def test_bad_configuration_is_a_clear_error(
    tmp_path: Path, document: str, environ: dict[str, str]
) -> None:
    path = tmp_path / "conveyor.toml"
    path.write_text(document)
    with pytest.raises(InvalidConfigError):
        load_config(path, environ=environ)


def test_the_internal_channel_takes_the_tls_section_unless_overridden(tmp_path: Path) -> None:
    flags = {"tls_cert": "/c.pem", "tls_key": "/c.key", "tls_ca": "/ca.pem"}
    config = load_config(environ={}, flags=flags)
    tls = config.internal.tls
    assert tls is not None and (str(tls.cert_file), str(tls.ca_file)) == ("/c.pem", "/ca.pem")
    assert tls.verify == "required" and config.internal.port == 0  # peers always verified
    path = tmp_path / "conveyor.toml"
    path.write_text("[listeners.internal]\nport = 7500\n[listeners.internal.tls]\n"
                    "enabled = false\n")
    plain = load_config(path, environ={"CONVEYOR_INTERNAL_PORT": "7600"}, flags=flags)
    assert plain.internal.tls is None and plain.internal.port == 7600
    assert load_config(path, environ={}, flags={**flags, "internal_port": 7700}
                       ).internal.port == 7700
    assert load_config(environ={}).internal.tls is None  # no TLS anywhere: plain
    path.write_text('[listeners.internal.tls]\ncert_file = "/n.pem"\nkey_file = "/n.key"\n')
    own = load_config(path, environ={}).internal.tls
    assert own is not None and own.ca_file is None and own.verify == "none"
    for bad in ("[listeners.internal]\nhost = 'x'\n", "[listeners.internal]\nport = -1\n",
                "[listeners.internal]\nport = 'x'\n"):
        path.write_text(bad)
        with pytest.raises(InvalidConfigError):
            load_config(path, environ={})
