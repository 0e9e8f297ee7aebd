"""Goal: TLS configuration resolves as documented, bad files are clear errors, a failed
reload keeps the old context, refusals are rate-limited, and TLS is told from
plaintext by its first bytes.

Method: load_config with TOML files, environment and flags; ServerTls on certificates
made with the test PKI; RefusalLog with a tiny window and pytest's log capture.
"""

from __future__ import annotations

import logging
import ssl
import sys
from pathlib import Path

import pytest

from conveyor.config import TlsConfig, load_config
from conveyor.errors import InvalidConfigError
from conveyor.server.tls import RefusalLog, ServerTls, TlsRegistry, build_context
from conveyor.server.tls_gate import looks_like_tls
from conveyor.testing.tls import TestPki


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


def test_flags_put_tls_on_every_listener_amqps_beside_amqp(tmp_path: Path) -> None:
    config = load_config(environ={}, flags={"tls_cert": "c.pem", "tls_key": "k.pem"})
    by_name = {item.name: item for item in config.listeners}
    expected = TlsConfig(Path("c.pem"), Path("k.pem"))
    assert {name: item.tls for name, item in by_name.items()} == dict.fromkeys(by_name, expected)
    assert by_name["amqp"].tls_port == 5671 and by_name["amqp"].plaintext
    assert by_name["http"].tls_port is None  # HTTPS on the HTTP port itself
    assert by_name["kafka"].settings["security_protocol"] == "SSL"


def test_no_certificate_means_no_tls() -> None:
    config = load_config(environ={})
    assert config.tls is None
    assert all(item.tls is None and item.tls_port is None for item in config.listeners)
    kafka = config.listener("kafka")
    assert kafka is not None and kafka.settings["security_protocol"] == "PLAINTEXT"


def test_file_sections_and_per_listener_overrides(tmp_path: Path) -> None:
    path = tmp_path / "conveyor.toml"
    path.write_text(
        '[tls]\ncert_file = "a.pem"\nkey_file = "a.key"\nca_file = "ca.pem"\n'
        '[listeners.http]\ntls_port = 8443\n'
        '[listeners.http.tls]\ncert_file = "web.pem"\nkey_file = "web.key"\n'
        '[listeners.sqs.tls]\nenabled = false\n'
        '[listeners.amqp]\nplaintext = false\n[listeners.amqp.tls]\nverify = "required"\n'
        '[listeners.kafka]\nsecurity_protocol = "SASL_PLAINTEXT"\n')
    config = load_config(path, environ={})
    http, sqs, amqp, kafka = (config.listener(name) for name in ("http", "sqs", "amqp", "kafka"))
    assert http is not None and sqs is not None and amqp is not None and kafka is not None
    assert http.tls == TlsConfig(Path("web.pem"), Path("web.key"), Path("ca.pem"), "optional")
    assert http.tls_port == 8443 and http.plaintext
    assert sqs.tls is None
    assert amqp.tls == TlsConfig(Path("a.pem"), Path("a.key"), Path("ca.pem"), "required")
    assert not amqp.plaintext
    assert kafka.tls is None and kafka.settings["security_protocol"] == "SASL_PLAINTEXT"


def test_environment_names_the_files() -> None:
    config = load_config(environ={"CONVEYOR_TLS_CERT": "e.pem", "CONVEYOR_TLS_KEY": "e.key",
                                  "CONVEYOR_TLS_CA": "ca.pem", "CONVEYOR_TLS_VERIFY": "required"})
    assert config.tls == TlsConfig(Path("e.pem"), Path("e.key"), Path("ca.pem"), "required")


@pytest.mark.parametrize(("document", "message"), [
    ('[tls]\ncert_file = "a.pem"\n', "needs both cert_file and key_file"),
    ('[tls]\ncert_file = "a"\nkey_file = "b"\nverify = "required"\n', "needs ca_file"),
    ('[tls]\ncert_file = "a"\nkey_file = "b"\nverify = "sometimes"\n', "verify must be"),
    ('[tls]\ncert = "a"\n', "unknown tls settings"),
    ('[listeners.kafka]\nsecurity_protocol = "SSL"\n', "needs a certificate"),
    ('[listeners.kafka]\nsecurity_protocol = "TLS"\n', "security_protocol must be"),
    ('[listeners.amqp]\nplaintext = false\n', "needs TLS configured"),
    ('[tls]\ncert_file = "a"\nkey_file = "b"\n[listeners.kafka]\ntls_port = 9093\n',
     "kafka has no tls_port"),
])
def test_bad_tls_settings_are_config_errors(tmp_path: Path, document: str, message: str) -> None:
    path = tmp_path / "conveyor.toml"
    path.write_text(document)
    with pytest.raises(InvalidConfigError, match=message):
        load_config(path, environ={})


def test_context_is_tls12_or_later_and_asks_for_client_certificates(pki: TestPki) -> None:
    context = build_context(pki.tls_config(verify="required"))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert build_context(pki.tls_config()).verify_mode == ssl.CERT_NONE


def test_unreadable_files_are_clear_config_errors(pki: TestPki, tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="cannot load TLS certificate and key"):
        build_context(TlsConfig(tmp_path / "missing.pem", tmp_path / "missing.key"))
    other = pki.issue("other", "other", server=True)
    with pytest.raises(InvalidConfigError, match="cannot load TLS certificate and key"):
        build_context(TlsConfig(pki.tls_config().cert_file, other.key_file))  # mismatched


def test_failed_reload_keeps_the_previous_context(pki: TestPki) -> None:
    config = pki.tls_config()
    tls = ServerTls(config)
    before = tls.context
    assert tls.reload() and tls.context is not before and tls.reloads == 1
    current = tls.context
    config.key_file.write_text("garbage")
    assert not tls.reload()
    assert tls.context is current and tls.reloads == 1


def test_registry_shares_one_context_per_configuration(pki: TestPki) -> None:
    registry = TlsRegistry()
    config = pki.tls_config()
    assert registry.get(config) is registry.get(TlsConfig(config.cert_file, config.key_file))
    assert registry.get(None) is None


def test_refusals_are_rate_limited_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(lines_max=2, window_s=3600)
    with caplog.at_level(logging.WARNING, logger="conveyor.tls"):
        for index in range(5):
            log.refused("kafka", "plaintext on a TLS port", f"10.0.0.{index}:5000")
        log.refused("kafka", "TLS handshake failed", "10.0.0.9:5000", "certificate required")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "kafka listener refused 10.0.0.0:5000: plaintext on a TLS port",
        "kafka listener refused 10.0.0.1:5000: plaintext on a TLS port",
        "kafka listener refused 10.0.0.9:5000: TLS handshake failed (certificate required)",
    ]
    assert log.counts == {"plaintext on a TLS port": 5, "TLS handshake failed": 1}


def test_first_bytes_tell_tls_from_plaintext() -> None:
    assert looks_like_tls(b"\x16\x03\x01")
    assert looks_like_tls(b"\x16")  # one byte so far: the handshake will tell
    assert not looks_like_tls(b"\x16\x00")
    assert not looks_like_tls(b"AMQ")
    assert not looks_like_tls(b"GET")
    assert not looks_like_tls(b"\x00\x00\x00")  # a Kafka frame size
    assert not looks_like_tls(b"")


def test_serve_with_an_unreadable_certificate_exits_with_a_message(tmp_path: Path) -> None:
    import subprocess

    completed = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--listeners", "http", "--http-port", "0", "--tls-cert", str(tmp_path / "no.pem"),
         "--tls-key", str(tmp_path / "no.key")],
        capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 2
    assert "cannot load TLS certificate and key" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_tls_port_binds_every_address_of_its_host_on_one_port() -> None:
    from conveyor.server.tls_gate import _bind

    sockets = _bind("localhost", 0)
    try:
        assert sockets
        assert len({listening.getsockname()[1] for listening in sockets}) == 1
    finally:
        for listening in sockets:
            listening.close()
