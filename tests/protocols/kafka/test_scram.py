"""SCRAM server exchange against a client computed here straight from RFC 5802.

The client side below is written from the RFC's formulas (Hi = PBKDF2, ClientKey,
StoredKey, ClientSignature, ClientProof, ServerSignature), independent of the server
module; the RFC 7677 test vector pins the SHA-256 arithmetic to known bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from conveyor.protocols.kafka.scram import (
    ScramCredential,
    ScramError,
    ScramServer,
    derive_credential,
)

DIGESTS = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}


class RfcClient:
    def __init__(self, mechanism: str, user: str, password: str, nonce: str,
                 gs2: str = "n,,") -> None:
        self.digest = DIGESTS[mechanism]
        self.user, self.password, self.nonce, self.gs2 = user, password, nonce, gs2
        self.first_bare = f"n={user},r={nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return (self.gs2 + self.first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        fields = dict(part.split("=", 1) for part in server_first.decode().split(","))
        salt, iterations = base64.b64decode(fields["s"]), int(fields["i"])
        salted = hashlib.pbkdf2_hmac(self.digest, self.password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", self.digest).digest()
        stored_key = hashlib.new(self.digest, client_key).digest()
        without_proof = f"c={base64.b64encode(self.gs2.encode()).decode()},r={fields['r']}"
        auth = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(stored_key, auth, self.digest).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", self.digest).digest()
        self.server_signature = hmac.new(server_key, auth, self.digest).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def _lookup(mechanism: str, users: dict[str, str]):  # type: ignore[no-untyped-def]
    credentials = {name: derive_credential(mechanism, password, f"salt-{name}".encode(), 4096)
                   for name, password in users.items()}
    return credentials.get


def test_rfc7677_vector() -> None:
    """RFC 7677 section 3: user/pencil, fixed nonces, salt and 4096 iterations."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    credential = derive_credential("SCRAM-SHA-256", "pencil", salt, 4096)
    server = ScramServer("SCRAM-SHA-256", {"user": credential}.get,
                         nonce=lambda: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    first = server.receive(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    assert first == (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    final = server.receive(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                           b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    assert server.user == "user" and server.done


@pytest.mark.parametrize("mechanism", sorted(DIGESTS))
@pytest.mark.parametrize("gs2", ["n,,", "y,,", "n,a=alice,"])
def test_good_exchange(mechanism: str, gs2: str) -> None:
    server = ScramServer(mechanism, _lookup(mechanism, {"alice": "s3cret"}))
    client = RfcClient(mechanism, "alice", "s3cret", "clientnonce123", gs2)
    final = server.receive(client.final(server.receive(client.first())))
    assert final == b"v=" + base64.b64encode(client.server_signature)
    assert server.user == "alice"


@pytest.mark.parametrize("mechanism", sorted(DIGESTS))
def test_wrong_password_and_unknown_user_fail_alike(mechanism: str) -> None:
    for user, password in (("alice", "wrong"), ("mallory", "s3cret")):
        server = ScramServer(mechanism, _lookup(mechanism, {"alice": "s3cret"}))
        client = RfcClient(mechanism, user, password, "abc")
        server_first = server.receive(client.first())
        assert b",s=" in server_first and b",i=4096" in server_first
        with pytest.raises(ScramError) as caught:
            server.receive(client.final(server_first))
        assert caught.value.server_final() == b"e=invalid-proof"
        assert server.user is None


def test_replayed_client_final_is_refused() -> None:
    """A client-final captured from one exchange does not pass in the next one: the
    server's part of the nonce is new each time."""
    lookup = _lookup("SCRAM-SHA-512", {"alice": "s3cret"})
    first = ScramServer("SCRAM-SHA-512", lookup)
    client = RfcClient("SCRAM-SHA-512", "alice", "s3cret", "samenonce")
    captured = client.final(first.receive(client.first()))
    first.receive(captured)
    assert first.user == "alice"
    second = ScramServer("SCRAM-SHA-512", lookup)
    second.receive(client.first())
    with pytest.raises(ScramError, match="nonce"):
        second.receive(captured)
    assert second.user is None
    with pytest.raises(ScramError, match="finished"):
        first.receive(captured)  # the same exchange again


@pytest.mark.parametrize("message", [
    b"p=tls-unique,,n=alice,r=abc",  # channel binding asked for
    b"x,,n=alice,r=abc",  # bad flag
    b"n,,n=alice",  # no nonce
    b"n,,r=abc,n=alice",  # order
    b"n,,n=,r=abc",  # empty user
    b"n,,n=al=ZZice,r=abc",  # bad escape
    b"n,,m=ext,n=alice,r=abc",  # mandatory extension
    b"n,a=bob,n=alice,r=abc",  # authzid for someone else
    b"n,,n=alice,r=a b",  # nonce with a space
    b"\xff\xfe",  # not UTF-8
    b"n",
    b"",
    b"n,," + b"x" * 5000,
])
def test_malformed_client_first(message: bytes) -> None:
    server = ScramServer("SCRAM-SHA-256", _lookup("SCRAM-SHA-256", {"alice": "s3cret"}))
    with pytest.raises(ScramError):
        server.receive(message)
    with pytest.raises(ScramError):
        server.receive(b"c=biws,r=abc,p=AAAA")  # the exchange is over


def _final_variants(good: bytes) -> list[bytes]:
    text = good.decode()
    without, _, proof = text.rpartition(",p=")
    channel, nonce = without.split(",", 1)
    return [
        f"c=eSws,{nonce},p={proof}".encode(),  # binding flag changed to y
        f"{channel},{nonce}x,p={proof}".encode(),  # nonce altered
        f"{channel},{nonce}".encode(),  # no proof
        f"{channel},{nonce},p=!!!".encode(),  # proof not base64
        f"{channel},{nonce},p=AAAA".encode(),  # proof of the wrong size
        f"{nonce},{channel},p={proof}".encode(),  # order
        f"c=%%%,{nonce},p={proof}".encode(),
    ]


@pytest.mark.parametrize("index", range(7))
def test_malformed_client_final(index: int) -> None:
    lookup = _lookup("SCRAM-SHA-256", {"alice": "s3cret"})
    client = RfcClient("SCRAM-SHA-256", "alice", "s3cret", "abc")
    probe = ScramServer("SCRAM-SHA-256", lookup, nonce=lambda: "fixed")
    good = client.final(probe.receive(client.first()))
    server = ScramServer("SCRAM-SHA-256", lookup, nonce=lambda: "fixed")
    server.receive(client.first())
    with pytest.raises(ScramError):
        server.receive(_final_variants(good)[index])
    assert server.user is None


def test_escaped_user_name() -> None:
    credential = derive_credential("SCRAM-SHA-256", "pw", b"salt", 4096)
    lookup = {"a,b=c": credential}.get
    server = ScramServer("SCRAM-SHA-256", lookup)
    client = RfcClient("SCRAM-SHA-256", "a=2Cb=3Dc", "pw", "n1")
    server.receive(client.final(server.receive(client.first())))
    assert server.user == "a,b=c"


def test_credential_type() -> None:
    credential = derive_credential("SCRAM-SHA-512", "pw", b"salt", 4096)
    assert isinstance(credential, ScramCredential)
    assert len(credential.stored_key) == 64 and len(credential.server_key) == 64
