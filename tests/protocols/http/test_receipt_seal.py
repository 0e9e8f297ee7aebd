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


def test_a_batch_seals_and_opens_like_one_receipt_at_a_time() -> None:
    seal = ReceiptSeal(KEY)
    receipts = [RECEIPT, RECEIPT.replace("41", "42"), "q:0:1:2:\udc80"]
    sealed = seal.seal_all("alice", receipts)
    assert sealed == [seal.seal("alice", receipt) for receipt in receipts]
    tampered = [sealed[0], sealed[1][:-1] + ("0" if sealed[1][-1] != "0" else "1"),
                sealed[2], sealed[0] + "é", "no separator", sealed[0][:-1] + "é"]
    assert seal.open_all("alice", tampered) == [RECEIPT, None, receipts[2], None, None, None]
    assert seal.open_all("bob", sealed) == [None, None, None]
