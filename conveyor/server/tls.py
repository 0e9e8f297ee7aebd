"""TLS for every listener: the server's SSLContext, its reload, and who the peer is.

Owns: building an ``ssl.SSLContext`` from a ``TlsConfig`` (TLS 1.2 at least, the
client-certificate policy), ``ServerTls`` (the context a listener hands each new
handshake; ``reload()`` swaps in a context built from the files as they are now,
so connections already open keep theirs and new handshakes get the new
certificate: SIGHUP), ``RefusalLog`` (a rate-limited log of refused connections
with the peer address) and ``peer_principal_name`` (the verified client
certificate's common name, for AMQP EXTERNAL and Kafka's ``User:CN`` principal).
Must not know: any protocol, or how sockets are accepted (tls_gate.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Final

from conveyor.config import TlsConfig
from conveyor.errors import InvalidConfigError

logger = logging.getLogger("conveyor.tls")

_VERIFY_MODES: Final = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def build_context(config: TlsConfig) -> ssl.SSLContext:
    """A server context from the files as they are now; unreadable or mismatched files
    are an ``InvalidConfigError`` naming the file and OpenSSL's reason."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.0/1.1 are deprecated (RFC 8996); Kafka, RabbitMQ and nginx default to 1.2+.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    except (OSError, ssl.SSLError) as error:
        raise InvalidConfigError("cannot load TLS certificate and key",
                                 cert_file=str(config.cert_file),
                                 key_file=str(config.key_file), error=str(error)) from None
    if config.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(config.ca_file))
        except (OSError, ssl.SSLError) as error:
            raise InvalidConfigError("cannot load TLS CA file", ca_file=str(config.ca_file),
                                     error=str(error)) from None
    context.verify_mode = _VERIFY_MODES[config.verify]
    return context


def build_client_context(config: TlsConfig) -> ssl.SSLContext:
    """A client context for a cluster node connecting to another node's internal port
    (conveyor/cluster/internal_api.py): it presents this node's certificate and verifies
    the peer's against ``ca_file``, host name included. Without a ``ca_file`` the trust
    anchors are the system's CAs and the certificates of this node's own ``cert_file``
    (partial chains allowed): nodes sharing one certificate, or certificates issued by an
    intermediate that ``cert_file`` carries, trust each other. Files that cannot be
    loaded are an ``InvalidConfigError``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
        if config.ca_file is not None:
            context.load_verify_locations(cafile=str(config.ca_file))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            context.load_verify_locations(cafile=str(config.cert_file))
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    except (OSError, ssl.SSLError) as error:
        raise InvalidConfigError("cannot load the TLS files of the internal channel",
                                 cert_file=str(config.cert_file), error=str(error)) from None
    return context


class ServerTls:
    """The current server context for one ``TlsConfig``; shared by every listener that
    uses the same files. Reading ``context`` is what each new handshake does."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self.context = build_context(config)
        self.reloads = 0  # successful reloads, for tests and the log

    def reload(self) -> bool:
        """Build a context from the files again and use it for new handshakes; on a
        bad file keep the old one, log why, and return False."""
        try:
            context = build_context(self.config)
        except InvalidConfigError as error:
            logger.error("TLS reload failed, keeping the previous certificate: %s", error,
                         extra={"cert_file": str(self.config.cert_file)})
            return False
        self.context = context
        self.reloads += 1
        logger.info("TLS certificate reloaded", extra={"cert_file": str(self.config.cert_file)})
        return True


class TlsRegistry:
    """One ``ServerTls`` per distinct configuration, so SIGHUP reloads each file once."""

    def __init__(self) -> None:
        self._by_config: dict[TlsConfig, ServerTls] = {}

    def get(self, config: TlsConfig | None) -> ServerTls | None:
        if config is None:
            return None
        found = self._by_config.get(config)
        if found is None:
            found = self._by_config[config] = ServerTls(config)
        return found

    def reload(self) -> bool:
        """Reload every context; True when all of them took the new files."""
        results = [tls.reload() for tls in self._by_config.values()]
        return all(results)


# --- who is on the other end ---------------------------------------------------------
def peer_certificate(transport: asyncio.BaseTransport | None) -> dict[str, Any] | None:
    """The client certificate, as ``ssl.SSLSocket.getpeercert()`` decodes it, when the
    handshake verified one against the CA (None on plaintext or without a certificate)."""
    if transport is None:
        return None
    certificate = transport.get_extra_info("peercert")
    return certificate if isinstance(certificate, dict) and certificate else None


def peer_principal_name(transport: asyncio.BaseTransport | None) -> str | None:
    """The verified client certificate's subject common name (CN): the user name of
    AMQP's EXTERNAL mechanism and of Kafka's ``User:CN`` principal. None without one.

    Only a certificate the handshake verified is returned: with ``verify = none`` the
    context asks for none, so a client cannot claim a name with a self-made one."""
    certificate = peer_certificate(transport)
    if certificate is None:
        return None
    for relative_name in certificate.get("subject", ()):
        for key, value in relative_name:
            if key == "commonName" and isinstance(value, str) and value:
                return value
    return None


def is_tls(transport: asyncio.BaseTransport | None) -> bool:
    """True when ``transport`` encrypts (so raw socket writes such as sendfile are off)."""
    return transport is not None and transport.get_extra_info("ssl_object") is not None


# --- refused connections ---------------------------------------------------------------
@dataclass(slots=True)
class _Window:
    started_s: float
    logged: int
    suppressed: int


class RefusalLog:
    """Logs refused connections (TLS on a plaintext port, plaintext on a TLS port, failed
    handshakes) with the peer address, at most ``lines_max`` per reason per
    ``window_s``; the rest are counted and the count logged when the window ends, so
    a scanner cannot flood the log."""

    # Precedent: nginx logs each failed handshake at info; a flood of them is the usual
    # symptom of a misconfigured client, so a few lines per minute say enough.
    LINES_MAX: Final = 10
    WINDOW_S: Final = 60.0

    def __init__(self, lines_max: int = LINES_MAX, window_s: float = WINDOW_S) -> None:
        self.lines_max = lines_max
        self.window_s = window_s
        self.counts: dict[str, int] = {}  # refusals per reason since start (tests, metrics)
        self._windows: dict[str, _Window] = {}

    def refused(self, listener: str, reason: str, peer: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now_s = time.monotonic()
        window = self._windows.get(reason)
        if window is None or now_s - window.started_s >= self.window_s:
            if window is not None and window.suppressed:
                logger.warning("%d more connections refused: %s (not logged one by one)",
                               window.suppressed, reason, extra={"listener": listener})
            window = self._windows[reason] = _Window(now_s, 0, 0)
        if window.logged >= self.lines_max:
            window.suppressed += 1
            return
        window.logged += 1
        logger.warning("%s listener refused %s: %s%s", listener, peer, reason,
                       f" ({detail})" if detail else "",
                       extra={"listener": listener, "peer": peer, "reason": reason})
