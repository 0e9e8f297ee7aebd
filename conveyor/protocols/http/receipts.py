"""Receipts over HTTP bound to the user they were issued to.

Owns: sealing a broker receipt with an HMAC of (user, receipt) under a key drawn from
``secrets`` when the listener starts (``<receipt>|<32 hex>``), and opening it again for
the same user only. The broker's token already makes a receipt unguessable; the seal
also refuses a receipt that leaked to another user (an ack, release or extend with
someone else's receipt is ``unknown_delivery``). A restart draws a new key, which costs
nothing: a restart releases every lock, so no receipt outlives it anyway.
Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SEPARATOR = "|"
TAG_HEX_CHARACTERS = 32  # 128 bits of HMAC-SHA-256


class ReceiptSeal:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        # the keyed state once; a tag copies it (a tag for every delivery of an acquire
        # and every receipt of an ack: ~15 % of the broker at batch 1000). Per tag,
        # medians of 7 interleaved rounds at load ~5.5: hmac.new 4.14 us, the one-shot
        # hmac.digest(key, msg, "sha256") 3.66 us, a copy of this state 2.78 us
        self._keyed = hmac.new(self._key, digestmod=hashlib.sha256)

    def _tag(self, owner: str, receipt: str) -> str:
        tag = self._keyed.copy()
        tag.update(f"{owner}\x00{receipt}".encode())
        return tag.hexdigest()[:TAG_HEX_CHARACTERS]

    def seal(self, owner: str, receipt: str) -> str:
        return f"{receipt}{SEPARATOR}{self._tag(owner, receipt)}"

    def open(self, owner: str, sealed: str) -> str | None:
        """The broker receipt, or None when it was not sealed for ``owner``."""
        receipt, separator, tag = sealed.rpartition(SEPARATOR)
        if not separator or not tag.isascii() or not hmac.compare_digest(
                tag, self._tag(owner, receipt)):
            return None
        return receipt
