"""SCRAM-SHA-256 / SCRAM-SHA-512 server exchange (RFC 5802, RFC 7677), sans-IO.

Owns: parsing the three client messages a SCRAM exchange has (client-first,
client-final), the server's answers (server-first with nonce, salt and
iteration count; server-final with the server signature), and verifying the
client proof against stored credentials (StoredKey, ServerKey: the server never
sees or keeps the password). No sockets, no clock; the nonce source is injected.

Rules (what Kafka's ScramSaslServer accepts, and RFC 5802 section 5):
- client-first is ``gs2-header client-first-bare``; the gs2 channel-binding flag
  must be ``n`` or ``y`` (``p=`` asks for channel binding, which a Kafka SASL
  exchange cannot offer: refused); an authzid, if present, must name the same user.
- The client nonce is printable ASCII without ``,``; the server appends its own
  random part. client-final must echo the gs2 header base64-encoded (``c=``) and the
  combined nonce (``r=``) exactly: anything else (a replayed client-final from an
  earlier exchange, whose nonce lacks this exchange's server part) is refused.
- An unknown user gets a server-first with a salt derived from a per-server secret,
  so the exchange fails only at the proof, the same way a wrong password does (no
  user enumeration; RFC 5802 section 9).
- One exchange per ``ScramServer``: any message after the end, or out of order, is an
  error. Errors carry the RFC's ``e=`` value for the server-final message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

MECHANISMS: Final[dict[str, str]] = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
# RFC 7677 asks for at least 4096 iterations; Kafka refuses fewer too.
ITERATIONS_MIN: Final = 4096
# Kafka's ScramMessages bound nothing, but a SASL token is at most one request frame;
# a SCRAM message is a few hundred bytes: anything over this is not a client we serve.
MESSAGE_BYTES_MAX: Final = 4096
NONCE_BYTES: Final = 24
_SERVER_SALT_SECRET: Final = secrets.token_bytes(32)


class ScramCredentialLike(Protocol):
    """What the security model stores per user and mechanism."""

    @property
    def salt(self) -> bytes: ...

    @property
    def iterations(self) -> int: ...

    @property
    def stored_key(self) -> bytes: ...

    @property
    def server_key(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class ScramError(Exception):
    """The exchange failed; ``reason`` is the RFC 5802 server-error value."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def server_final(self) -> bytes:
        return f"e={self.reason}".encode()


def derive_credential(mechanism: str, password: str, salt: bytes,
                      iterations: int) -> ScramCredential:
    """StoredKey and ServerKey from a password (RFC 5802 section 3)."""
    digest = MECHANISMS[mechanism]
    salted = hashlib.pbkdf2_hmac(digest, password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", digest)
    stored_key = hashlib.new(digest, client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", digest)
    return ScramCredential(salt, iterations, stored_key, server_key)


def decode_saslname(value: str) -> str:
    """RFC 5802: ``=2C`` is ``,`` and ``=3D`` is ``=``; any other ``=`` is malformed."""
    out: list[str] = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == ",":
            raise ScramError("invalid-encoding", "',' in a user name")
        if char == "=":
            escape = value[index:index + 3]
            if escape == "=2C":
                out.append(",")
            elif escape == "=3D":
                out.append("=")
            else:
                raise ScramError("invalid-username-encoding", "bad '=' escape in a user name")
            index += 3
            continue
        out.append(char)
        index += 1
    return "".join(out)


def _attributes(text: str, names: str) -> list[str]:
    """Split ``a=1,b=2`` and check the attribute letters are ``names`` in that order."""
    parts = text.split(",")
    if len(parts) < len(names):
        raise ScramError("other-error", "missing SCRAM attributes")
    values: list[str] = []
    for name, part in zip(names, parts, strict=False):
        if not part.startswith(name + "="):
            raise ScramError("other-error", f"expected SCRAM attribute {name!r}")
        values.append(part[2:])
    values.extend(parts[len(names):])
    return values


def _valid_nonce(nonce: str) -> bool:
    return bool(nonce) and all(0x21 <= ord(char) <= 0x7E and char != "," for char in nonce)


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ScramError("other-error", f"{what} is not base64") from None


class ScramServer:
    """One SCRAM exchange: ``receive(client_first)`` -> server-first,
    ``receive(client_final)`` -> server-final; then ``user`` is authenticated."""

    def __init__(self, mechanism: str,
                 lookup: Callable[[str], ScramCredentialLike | None],
                 nonce: Callable[[], str] | None = None) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown SCRAM mechanism {mechanism!r}")
        self.mechanism = mechanism
        self._digest = MECHANISMS[mechanism]
        self._lookup = lookup
        self._nonce = nonce or (lambda: secrets.token_urlsafe(NONCE_BYTES))
        self._step = 0  # 0: expect client-first, 1: expect client-final, 2: done/failed
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._combined_nonce = ""
        self._credential: ScramCredentialLike | None = None
        self._username = ""
        self.user: str | None = None  # set once the proof checks out
        self.tokenauth = False  # KIP-48 delegation tokens: refused by the caller

    @property
    def username(self) -> str:
        """The user the client claims (known after client-first)."""
        return self._username

    @property
    def done(self) -> bool:
        return self._step == 2

    def receive(self, message: bytes) -> bytes:
        step, self._step = self._step, 2  # any failure ends the exchange
        if len(message) > MESSAGE_BYTES_MAX:
            raise ScramError("other-error", "SCRAM message too long")
        try:
            text = bytes(message).decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("invalid-encoding", "SCRAM message is not UTF-8") from None
        if step == 0:
            reply = self._client_first(text)
            self._step = 1
            return reply
        if step == 1:
            return self._client_final(text)
        raise ScramError("other-error", "SCRAM exchange already finished")

    def _client_first(self, text: str) -> bytes:
        flag, _, rest = text.partition(",")
        if flag.startswith("p="):
            raise ScramError("channel-binding-not-supported", "channel binding is not offered")
        if flag not in ("n", "y"):
            raise ScramError("other-error", "bad gs2 channel-binding flag")
        authzid_part, comma, bare = rest.partition(",")
        if not comma:
            raise ScramError("other-error", "malformed gs2 header")
        if authzid_part and not authzid_part.startswith("a="):
            raise ScramError("other-error", "malformed gs2 authzid")
        self._gs2_header = f"{flag},{authzid_part},"
        if bare.startswith("m="):
            raise ScramError("extensions-not-supported", "mandatory extension not supported")
        values = _attributes(bare, "nr")
        user = decode_saslname(values[0])
        nonce = values[1]
        if not user:
            raise ScramError("other-error", "empty user name")
        if not _valid_nonce(nonce):
            raise ScramError("other-error", "bad client nonce")
        if authzid_part and decode_saslname(authzid_part[2:]) != user:
            raise ScramError("invalid-username-encoding",
                             "authorization id differs from the user name")
        for extension in values[2:]:
            key, equals, value = extension.partition("=")
            if not equals or not key:
                raise ScramError("other-error", "malformed SCRAM extension")
            if key == "tokenauth" and value.lower() == "true":
                self.tokenauth = True
        self._username = user
        self._client_first_bare = bare
        credential = self._lookup(user)
        self._credential = credential
        if credential is None:  # a plausible salt, so failure looks like a bad password
            salt = hmac.digest(_SERVER_SALT_SECRET, user.encode(), "sha256")[:16]
            iterations = ITERATIONS_MIN
        else:
            salt, iterations = credential.salt, credential.iterations
        self._combined_nonce = nonce + self._nonce()
        self._server_first = (f"r={self._combined_nonce},"
                              f"s={base64.b64encode(salt).decode()},i={iterations}")
        return self._server_first.encode()

    def _client_final(self, text: str) -> bytes:
        without_proof, separator, proof_text = text.rpartition(",p=")
        if not separator:
            raise ScramError("other-error", "client-final without a proof")
        values = _attributes(without_proof, "cr")
        binding = _b64decode(values[0], "channel binding")
        if binding != self._gs2_header.encode():
            raise ScramError("channel-bindings-dont-match", "channel binding differs")
        if not hmac.compare_digest(values[1].encode(), self._combined_nonce.encode()):
            raise ScramError("other-error", "nonce mismatch (replayed or forged)")
        proof = _b64decode(proof_text, "client proof")
        credential = self._credential
        auth_message = ",".join(
            (self._client_first_bare, self._server_first, without_proof)).encode()
        if credential is None or len(proof) != hashlib.new(self._digest).digest_size:
            raise ScramError("invalid-proof", "authentication failed")
        signature = hmac.digest(credential.stored_key, auth_message, self._digest)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.new(self._digest, client_key).digest(),
                                   credential.stored_key):
            raise ScramError("invalid-proof", "authentication failed")
        self.user = self._username
        server_signature = hmac.digest(credential.server_key, auth_message, self._digest)
        return b"v=" + base64.b64encode(server_signature)
