"""Certificates for the TLS tests, made fresh by each test (never committed).

Needs the `cryptography` package (the dev extra); only tests import this module.

A private CA, a server certificate for localhost / 127.0.0.1 signed by it, and client
certificates whose subject CN is the user name (mTLS). Keys are EC P-256: fast to make.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conveyor.config import TlsConfig

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert_file: Path
    key_file: Path
    serial: int


class TestPki:
    """A CA in ``directory`` that issues server and client certificates."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Conveyor test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256()))
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, stem: str, *, server: bool, serial: int | None = None,
              cert_file: Path | None = None, key_file: Path | None = None,
              client_too: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        serial = serial or x509.random_serial_number()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._certificate.subject).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - _DAY).not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                + ([ExtendedKeyUsageOID.CLIENT_AUTH] if server and client_too else [])),
                critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        cert_file = cert_file or self.directory / f"{stem}.pem"
        key_file = key_file or self.directory / f"{stem}.key"
        key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return Issued(cert_file, key_file, serial)

    def server(self, serial: int | None = None) -> Issued:
        return self.issue("localhost", "server", server=True, serial=serial)

    def node(self, stem: str) -> Issued:
        """A cluster node's certificate: it serves its internal port and connects to the
        other nodes' with it (both key usages; localhost / 127.0.0.1)."""
        return self.issue("localhost", stem, server=True, client_too=True)

    def client(self, user: str) -> Issued:
        return self.issue(user, f"client-{user}", server=False)

    def tls_config(self, verify: str = "none") -> TlsConfig:
        """The server's configuration (issues its certificate when not yet done)."""
        server = self.directory / "server.pem"
        if not server.exists():
            self.server()
        return TlsConfig(server, self.directory / "server.key",
                         self.ca_file if verify != "none" else None, verify)

    def client_context(self, user: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if user is not None:
            issued = self.client(user)
            context.load_cert_chain(str(issued.cert_file), str(issued.key_file))
        return context


def served_serial(port: int, ca_file: Path) -> int:
    """The serial number of the certificate a new handshake on ``port`` gets."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def refused_after_plaintext(port: int, payload: bytes) -> bytes:
    """Send ``payload`` in the clear and read until the server closes; returns what it
    answered (the close must come: the socket timeout fails the test otherwise)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(payload)
        received = b""
        while True:
            try:
                chunk = raw.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def tls_hello_to_plain_port(port: int) -> None:
    """Start a TLS handshake on a plaintext port: it must fail with the connection closed."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            context.wrap_socket(raw, server_hostname="localhost").close()
        except (ssl.SSLError, ConnectionResetError, OSError) as error:
            assert not isinstance(error, TimeoutError), "the server hung instead of closing"
            return
    raise AssertionError("a TLS handshake succeeded on a plaintext port")
