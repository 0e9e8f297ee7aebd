"""ReceiptSeal: a sealed receipt opens for its owner only, and its tag is HMAC-SHA-256.

Method: seal receipts with a known key, check the tag against the standard library's
HMAC object (the first 128 bits, hex), and open them as the owner, as another user,
with a changed tag or receipt, with a non-ASCII tag, and without a separator.
"""

from __future__ import annotations

import hashlib
import hmac

from conveyor.protocols.http.receipts import SEPARATOR, TAG_HEX_CHARACTERS, ReceiptSeal

KEY = bytes(range(32))
RECEIPT = "orders:0:41:7731:orders"


def test_the_tag_is_the_hmac_sha256_of_owner_and_receipt() -> None:
    sealed = ReceiptSeal(KEY).seal("alice", RECEIPT)
    receipt, _, tag = sealed.rpartition(SEPARATOR)
    expected = hmac.new(KEY, f"alice\x00{RECEIPT}".encode(), hashlib.sha256).hexdigest()
    assert receipt == RECEIPT
    assert tag == expected[:TAG_HEX_CHARACTERS]


def test_a_sealed_receipt_opens_for_its_owner_only() -> None:
    seal = ReceiptSeal(KEY)
    sealed = seal.seal("alice", RECEIPT)
    assert seal.open("alice", sealed) == RECEIPT
    assert seal.open("bob", sealed) is None
    assert ReceiptSeal(bytes(32)).open("alice", sealed) is None  # another key (a restart)
    flipped = sealed[:-1] + ("0" if sealed[-1] != "0" else "1")
    assert seal.open("alice", flipped) is None
    assert seal.open("alice", RECEIPT.replace("41", "42") + sealed[len(RECEIPT):]) is None
    assert seal.open("alice", sealed[:-1] + "é") is None
    assert seal.open("alice", RECEIPT) is None
