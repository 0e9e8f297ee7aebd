"""SigV4 verification against requests signed by botocore's own signer.

botocore signs (header form with SigV4Auth, presigned form with SigV4QueryAuth)
exactly what boto3 sends; the verifier must accept those, and answer AWS's error
for every way a signature can be wrong, missing, garbled, or out of date.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conveyor.protocols.sqs import sigv4
from conveyor.protocols.sqs.errors import SqsError

KEYS = {"AKIDALICE": "alice-secret/with+chars", "AKIDBOB": "bob-secret"}
ENDPOINT = "http://127.0.0.1:9324"


def _signed(auth: SigV4Auth, method: str = "POST", path: str = "/000000000000/a",
            body: bytes = b"Action=SendMessage&MessageBody=hello%20world",
            params: dict[str, str] | None = None,
            headers: dict[str, str] | None = None) -> tuple[str, str, dict[str, str], bytes]:
    request = AWSRequest(method=method, url=ENDPOINT + path, data=body, params=params or {},
                         headers={"Content-Type": "application/x-www-form-urlencoded",
                                  **(headers or {})})
    auth.add_auth(request)
    prepared = request.prepare()
    split = urlsplit(prepared.url)
    target = split.path + ("?" + split.query if split.query else "")
    wire_headers = {name.lower(): value.decode() if isinstance(value, bytes) else value
                    for name, value in prepared.headers.items()}
    wire_headers.setdefault("host", split.netloc)
    data = prepared.body or b""
    return prepared.method, target, wire_headers, data if isinstance(data, bytes) else \
        data.encode()


def _verify(method: str, target: str, headers: dict[str, str], body: bytes,
            now: float | None = None) -> sigv4.Verified:
    return sigv4.verify(method, target, headers, body, time.time() if now is None else now,
                        KEYS.get)


def _auth(key: str = "AKIDALICE", secret: str | None = None) -> SigV4Auth:
    return SigV4Auth(Credentials(key, secret or KEYS.get(key, "x")), "sqs", "us-east-1")


def _error(call: object) -> SqsError:
    with pytest.raises(SqsError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_header_form_verifies() -> None:
    verified = _verify(*_signed(_auth()))
    assert verified == sigv4.Verified("AKIDALICE", "us-east-1")


def test_json_protocol_and_query_params_verify() -> None:
    request = _signed(_auth("AKIDBOB"), body=b'{"QueueUrl": "x"}',
                      params={"a b": "c/d", "z": "", "Action": "List"},
                      headers={"X-Amz-Target": "AmazonSQS.SendMessage",
                               "Content-Type": "application/x-amz-json-1.0"})
    assert _verify(*request).access_key_id == "AKIDBOB"


def test_presigned_form_verifies() -> None:
    auth = SigV4QueryAuth(Credentials("AKIDALICE", KEYS["AKIDALICE"]), "sqs", "us-east-1",
                          expires=300)
    method, target, headers, body = _signed(auth, method="GET", body=b"",
                                            params={"Action": "ListQueues"})
    assert "X-Amz-Signature=" in target and "authorization" not in headers
    assert _verify(method, target, headers, body).access_key_id == "AKIDALICE"
    expired = _error(lambda: _verify(method, target, headers, body, time.time() + 301))
    assert expired.code == "RequestExpired" and expired.http_status == 400


def test_wrong_secret_unknown_key_and_tampering() -> None:
    wrong = _error(lambda: _verify(*_signed(_auth(secret="not-the-secret"))))
    assert (wrong.code, wrong.http_status) == ("SignatureDoesNotMatch", 403)
    unknown = _error(lambda: _verify(*_signed(_auth("AKIDNOBODY"))))
    assert (unknown.code, unknown.http_status) == ("InvalidClientTokenId", 403)
    method, target, headers, body = _signed(_auth())
    tampered = _error(lambda: _verify(method, target, headers, body + b"x"))
    assert tampered.code == "SignatureDoesNotMatch"
    moved = _error(lambda: _verify(method, "/000000000000/b", headers, body))
    assert moved.code == "SignatureDoesNotMatch"
    other_host = _error(lambda: _verify(method, target, {**headers, "host": "evil:1"}, body))
    assert other_host.code == "SignatureDoesNotMatch"


@pytest.mark.parametrize("skew_s", [-16 * 60, 16 * 60])
def test_clock_skew_outside_window(skew_s: int) -> None:
    request = _signed(_auth())
    error = _error(lambda: _verify(*request, now=time.time() + skew_s))
    assert error.code == "SignatureDoesNotMatch" and error.http_status == 403
    assert "Signature expired" in error.aws_message or "not yet current" in error.aws_message


@pytest.mark.parametrize("skew_s", [-14 * 60, 14 * 60])
def test_clock_skew_inside_window(skew_s: int) -> None:
    assert _verify(*_signed(_auth()), now=time.time() + skew_s).access_key_id == "AKIDALICE"


def test_missing_signature() -> None:
    error = _error(lambda: _verify("POST", "/", {"host": "h"}, b"Action=ListQueues"))
    assert (error.code, error.http_status) == ("MissingAuthenticationToken", 403)


@pytest.mark.parametrize("mutate", [
    lambda value: "AWS4-HMAC-SHA1" + value[len("AWS4-HMAC-SHA256"):],
    lambda value: value.split(", Signature=")[0],
    lambda value: value.replace("SignedHeaders=", "Signed="),
    lambda value: value.replace("/aws4_request", "/aws5_request"),
    lambda value: value.replace("Credential=AKIDALICE/", "Credential=AKIDALICE"),
    lambda value: value.replace("SignedHeaders=", "SignedHeaders=x;"
                                ).replace("host;", "nohost;"),
    lambda value: "garbage",
    lambda value: "",
])
def test_garbled_authorization(mutate: object) -> None:
    method, target, headers, body = _signed(_auth())
    headers = {**headers, "authorization": mutate(headers["authorization"])}  # type: ignore[operator]
    error = _error(lambda: _verify(method, target, headers, body))
    assert error.code in ("IncompleteSignature", "SignatureDoesNotMatch")
    assert error.http_status in (400, 403)


def test_garbled_dates_and_signatures() -> None:
    method, target, headers, body = _signed(_auth())
    no_date = {name: value for name, value in headers.items() if name != "x-amz-date"}
    assert _error(lambda: _verify(method, target, no_date, body)).code == "IncompleteSignature"
    bad_date = {**headers, "x-amz-date": "20261399T999999Z"}
    assert _error(lambda: _verify(method, target, bad_date, body)).code in (
        "IncompleteSignature", "SignatureDoesNotMatch")
    short = {**headers, "authorization": headers["authorization"][:-10]}
    assert _error(lambda: _verify(method, target, short, body)).code == "SignatureDoesNotMatch"


def test_signing_key_matches_aws_example() -> None:
    """The AWS SigV4 docs' example key derivation (secret wJalrXUtnFEMI/K7MDENG+bPxRfiCY
    EXAMPLEKEY, 20120215, us-east-1, iam)."""
    key = sigv4.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215",
                            "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
