"""Password hashes, SCRAM credentials, API tokens and access keys: the cryptography.

Owns: ``hash_password`` / ``check_password`` (scrypt, a memory-hard KDF: N=2^14, r=8,
p=1 is 16 MiB and ~50 ms per check, OWASP's minimum for scrypt), the RFC 5802 / RFC 7677
derivation of SCRAM credentials (``scram_from_salted``), and the random values handed
to people (tokens, access keys) with ``secrets``. Pure apart from randomness; no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from conveyor.errors import InvalidRequestError
from conveyor.security.api import SCRAM_MECHANISMS, ScramCredential, ScramMechanism

SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM_BYTES = 64 << 20  # 128 * r * N = 16 MiB needed; room for a raised N
SALT_BYTES = 16
HASH_BYTES = 32
# Kafka's ScramMechanism: iterations must be within 4096..16384 (KIP-554 too).
SCRAM_ITERATIONS_MIN = 4096
SCRAM_ITERATIONS_MAX = 16384
SCRAM_ITERATIONS_DEFAULT = 4096
TOKEN_PREFIX = "cvt_"
ACCESS_KEY_PREFIX = "AKCV"
PASSWORD_BYTES_MAX = 1024  # a password is read whole; refuse absurd ones before scrypt


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` with a fresh random salt."""
    if len(password.encode("utf-8")) > PASSWORD_BYTES_MAX:
        raise InvalidRequestError("password too long", length_max=PASSWORD_BYTES_MAX)
    if not password:
        raise InvalidRequestError("password is empty")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, maxmem=SCRYPT_MAXMEM_BYTES, dklen=HASH_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, encoded: str) -> bool:
    """Constant-time comparison against a stored hash; False for a malformed hash."""
    encoded_password = password.encode("utf-8")
    if len(encoded_password) > PASSWORD_BYTES_MAX:
        return False
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(encoded_password, salt=_unb64(salt), n=int(n), r=int(r),
                                p=int(p), maxmem=SCRYPT_MAXMEM_BYTES,
                                dklen=len(_unb64(expected)))
    except ValueError:
        return False
    return hmac.compare_digest(digest, _unb64(expected))


def _hash_name(mechanism: str) -> str:
    if mechanism == "SCRAM-SHA-256":
        return "sha256"
    if mechanism == "SCRAM-SHA-512":
        return "sha512"
    raise InvalidRequestError("unknown SCRAM mechanism", mechanism=mechanism,
                              known=list(SCRAM_MECHANISMS))


def scram_from_salted(mechanism: str, salt: bytes, iterations: int,
                      salted_password: bytes) -> ScramCredential:
    """StoredKey = H(HMAC(SaltedPassword, "Client Key")), ServerKey = HMAC(SaltedPassword,
    "Server Key") (RFC 5802 section 3)."""
    name = _hash_name(mechanism)
    if not SCRAM_ITERATIONS_MIN <= iterations <= SCRAM_ITERATIONS_MAX:
        raise InvalidRequestError("SCRAM iterations out of range", iterations=iterations,
                                  minimum=SCRAM_ITERATIONS_MIN, maximum=SCRAM_ITERATIONS_MAX)
    client_key = hmac.new(salted_password, b"Client Key", name).digest()
    stored_key = hashlib.new(name, client_key).digest()
    server_key = hmac.new(salted_password, b"Server Key", name).digest()
    checked: ScramMechanism = "SCRAM-SHA-256" if name == "sha256" else "SCRAM-SHA-512"
    return ScramCredential(checked, salt, iterations, stored_key, server_key)


def scram_from_password(mechanism: str, password: str,
                        iterations: int = SCRAM_ITERATIONS_DEFAULT) -> ScramCredential:
    """A fresh credential: SaltedPassword = Hi(password, salt, i) = PBKDF2-HMAC."""
    name = _hash_name(mechanism)
    salt = secrets.token_bytes(SALT_BYTES)
    salted = hashlib.pbkdf2_hmac(name, password.encode("utf-8"), salt, iterations)
    return scram_from_salted(mechanism, salt, iterations, salted)


def new_token() -> str:
    """An API token: 256 random bits, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What is stored of a token: SHA-256 (the token has 256 bits of entropy, so no slow
    KDF is needed to resist guessing)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_access_key() -> tuple[str, str]:
    """(access key id, secret access key) in AWS's shapes: 20 upper-case characters and
    40 characters of base64-ish secret."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    key_id = ACCESS_KEY_PREFIX + "".join(secrets.choice(alphabet) for _ in range(16))
    secret = secrets.token_urlsafe(30)  # 40 characters
    return key_id, secret


def encode_bytes(data: bytes) -> str:
    return _b64(data)


def decode_bytes(text: str) -> bytes:
    return _unb64(text)
