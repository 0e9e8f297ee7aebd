"""Receipts over HTTP bound to the user they were issued to.

Owns: sealing a broker receipt with a MAC of the receipt under the user's own key
(``<receipt>|<32 hex>``), and opening it again for the same user only. The user's key
is keyed BLAKE2b of the user name under the listener's key (drawn from ``secrets``
when the listener starts, or derived from the cluster secret so that every node opens
what another sealed); the tag is keyed BLAKE2b of the receipt under the user's key,
128 bits. Keyed BLAKE2b is a MAC by design (RFC 7693) and one C call: ~0.7 us per
receipt against ~1.8 us for ``hmac.new(..., sha256)``, which an acquire + ack of 1,000
messages pays 2,000 times (bench/README.md, "HTTP latency and acquire + ack").
The broker's token already makes a receipt unguessable; the seal also refuses a
receipt that leaked to another user (an ack, release or extend with someone else's
receipt is ``unknown_delivery``). A restart draws a new key, which costs nothing: a
restart releases every lock, so no receipt outlives it anyway.
Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SEPARATOR = "|"
TAG_BYTES = 16  # 128 bits
TAG_HEX_CHARACTERS = 2 * TAG_BYTES
OWNER_KEYS_MAX = 4096  # cached user keys; past it the cache starts over
_KEY_PERSON = b"conveyor-rcpt"  # domain separation of the user keys


class ReceiptSeal:
    def __init__(self, key: bytes | None = None) -> None:
        key = key if key is not None else secrets.token_bytes(32)
        if len(key) > hashlib.blake2b.MAX_KEY_SIZE:
            key = hashlib.sha256(key).digest()
        self._key = key
        self._owner_keys: dict[str, bytes] = {}

    def _owner_key(self, owner: str) -> bytes:
        key = self._owner_keys.get(owner)
        if key is None:
            if len(self._owner_keys) >= OWNER_KEYS_MAX:
                self._owner_keys.clear()
            key = hashlib.blake2b(owner.encode(), key=self._key, person=_KEY_PERSON,
                                  digest_size=32).digest()
            self._owner_keys[owner] = key
        return key

    def _tag(self, owner_key: bytes, receipt: str) -> str:
        # surrogatepass: a receipt is wire input, and a lone surrogate must not raise
        return hashlib.blake2b(receipt.encode(errors="surrogatepass"), key=owner_key,
                               digest_size=TAG_BYTES).hexdigest()

    def seal(self, owner: str, receipt: str) -> str:
        return f"{receipt}{SEPARATOR}{self._tag(self._owner_key(owner), receipt)}"

    def open(self, owner: str, sealed: str) -> str | None:
        """The broker receipt, or None when it was not sealed for ``owner``."""
        receipt, separator, tag = sealed.rpartition(SEPARATOR)
        if not separator or len(tag) != TAG_HEX_CHARACTERS or not hmac.compare_digest(
                tag.encode(errors="surrogatepass"),
                self._tag(self._owner_key(owner), receipt).encode()):
            return None
        return receipt
