"""ReceiptSeal: a sealed receipt opens for its owner only.

Method: seal receipts with a known key and open them as the owner, as another user,
with another key, with a changed tag or receipt, with a non-ASCII tag, and without a
separator (the tag's construction, keyed BLAKE2b, is checked in test_http_receipts.py).
"""

from __future__ import annotations

from conveyor.protocols.http.receipts import ReceiptSeal

KEY = bytes(range(32))
RECEIPT = "orders:0:41:7731:orders"


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
