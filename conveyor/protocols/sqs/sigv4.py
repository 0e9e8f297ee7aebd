"""AWS Signature Version 4 verification for the SQS listener, sans-IO.

Owns: rebuilding the canonical request and the string to sign from an HTTP request
as it arrived, deriving the signing key (the HMAC chain date -> region -> service ->
"aws4_request") from the secret the security model holds for the access key, and
comparing signatures in constant time. Both forms AWS accepts: the ``Authorization``
header and the query string (a presigned URL: ``X-Amz-Algorithm``,
``X-Amz-Credential``, ``X-Amz-Date``, ``X-Amz-Expires``, ``X-Amz-SignedHeaders``,
``X-Amz-Signature``). No clock and no sockets: ``now`` and the key lookup are passed in.

Errors are the ones AWS answers (docs: SQS API Reference, Common Errors):
- no signature at all: MissingAuthenticationToken (403);
- a signature that is not well formed (missing Credential/SignedHeaders/Signature,
  an algorithm other than AWS4-HMAC-SHA256, a bad date, a scope that does not end
  in ``aws4_request``, an unsigned ``host``): IncompleteSignature (400);
- an access key nobody has: InvalidClientTokenId (403);
- a header-signed request dated more than 15 minutes from now: SignatureDoesNotMatch
  (403) "Signature expired" (what AWS's query services answer; botocore retries it
  after correcting its clock skew); a presigned URL past its X-Amz-Expires:
  RequestExpired (400);
- anything else that does not verify: SignatureDoesNotMatch (403).

The canonical forms follow the SigV4 spec as botocore implements it for non-S3
services: the path is dot-segment-normalised and URI-encoded again (so a ``%``
already on the wire becomes ``%25``); query names and values are decoded and
re-encoded with only ``A-Za-z0-9-_.~`` left bare (``+`` decodes as a space, as in
form encoding), then sorted; header values are
trimmed with inner runs of spaces collapsed; the payload hash is the
``X-Amz-Content-SHA256`` header when present, else SHA-256 of the body (a presigned
URL may also sign ``UNSIGNED-PAYLOAD``).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote_plus, urlsplit

from conveyor.protocols.sqs.errors import (
    IncompleteSignature,
    InvalidClientTokenId,
    MissingAuthenticationToken,
    RequestExpired,
    SignatureDoesNotMatch,
)

ALGORITHM: Final = "AWS4-HMAC-SHA256"
SKEW_SECONDS_MAX: Final = 15 * 60  # AWS: "more than 15 minutes" either way
# AWS caps presigned URLs at 7 days (X-Amz-Expires 604800).
EXPIRES_SECONDS_MAX: Final = 7 * 24 * 3600
UNSIGNED_PAYLOAD: Final = "UNSIGNED-PAYLOAD"
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SAFE: Final = "-_.~"
_MISMATCH: Final = ("The request signature we calculated does not match the signature you "
                    "provided. Check your AWS Secret Access Key and signing method. Consult "
                    "the service documentation for details.")


@dataclass(frozen=True, slots=True)
class Verified:
    access_key_id: str
    region: str


@dataclass(frozen=True, slots=True)
class _Signature:
    access_key_id: str
    scope_date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str
    amz_date: str
    expires_seconds: int | None  # presigned only


def _parse_authorization(value: str, headers: Mapping[str, str]) -> _Signature:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise IncompleteSignature(f"Unsupported AWS 'algorithm': '{algorithm[:64]}'")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, equals, field_value = part.strip().partition("=")
        if equals:
            fields[name] = field_value
    missing = [name for name in ("Credential", "SignedHeaders", "Signature")
               if not fields.get(name)]
    if missing:
        raise IncompleteSignature(
            "Authorization header requires " + ", ".join(f"'{name}'" for name in missing)
            + f" parameter. Authorization={value[:200]}")
    amz_date = headers.get("x-amz-date") or ""
    if not amz_date:
        raise IncompleteSignature("Authorization header requires existence of either a "
                                  "'X-Amz-Date' or a 'Date' header.")
    return _signature(fields["Credential"], fields["SignedHeaders"], fields["Signature"],
                      amz_date, None)


def _parse_query(query: Mapping[str, str]) -> _Signature:
    if query.get("X-Amz-Algorithm") != ALGORITHM:
        raise IncompleteSignature("X-Amz-Algorithm only supports 'AWS4-HMAC-SHA256'")
    missing = [name for name in ("X-Amz-Credential", "X-Amz-SignedHeaders", "X-Amz-Signature",
                                 "X-Amz-Date") if not query.get(name)]
    if missing:
        raise IncompleteSignature("AWS query-string parameters must include "
                                  + ", ".join(f"'{name}'" for name in missing) + ".")
    expires_text = query.get("X-Amz-Expires", "")
    if not expires_text.isdigit() or not 0 < int(expires_text) <= EXPIRES_SECONDS_MAX:
        raise IncompleteSignature("X-Amz-Expires must be a number of seconds from 1 to "
                                  f"{EXPIRES_SECONDS_MAX}.")
    return _signature(query["X-Amz-Credential"], query["X-Amz-SignedHeaders"],
                      query["X-Amz-Signature"], query["X-Amz-Date"], int(expires_text))


def _signature(credential: str, signed_headers: str, signature: str, amz_date: str,
               expires_seconds: int | None) -> _Signature:
    parts = credential.split("/")
    if len(parts) != 5 or not parts[0] or parts[4] != "aws4_request":
        raise IncompleteSignature(
            f"Credential should be scoped to a valid region, not '{credential[:128]}'.")
    key_id, scope_date, region, service, _ = parts
    if not _DATE.match(amz_date) or not scope_date.isdigit() or len(scope_date) != 8:
        raise IncompleteSignature(f"Date must be in ISO-8601 'basic format'. Got "
                                  f"'{amz_date[:32]}'.")
    if scope_date != amz_date[:8]:
        raise SignatureDoesNotMatch(
            f"Credential should be scoped to a valid date, not '{scope_date}'.")
    names = tuple(signed_headers.split(";"))
    if "host" not in names or any(not name or name != name.lower() for name in names):
        raise IncompleteSignature("'Host' or ':authority' must be a 'SignedHeader' in the "
                                  "AWS Authorization.")
    return _Signature(key_id, scope_date, region, service, names, signature.lower(), amz_date,
                      expires_seconds)


def _epoch(amz_date: str) -> int:
    match = _DATE.match(amz_date)
    assert match is not None  # checked by _signature
    year, month, day, hour, minute, second = (int(group) for group in match.groups())
    try:
        return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        raise IncompleteSignature(f"Date must be in ISO-8601 'basic format'. Got "
                                  f"'{amz_date}'.") from None


def _check_time(sig: _Signature, now: float) -> None:
    signed_at = _epoch(sig.amz_date)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    if sig.expires_seconds is not None:
        if now > signed_at + sig.expires_seconds or signed_at - now > SKEW_SECONDS_MAX:
            raise RequestExpired("Request has expired.")
        return
    if now - signed_at > SKEW_SECONDS_MAX:
        earliest = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - SKEW_SECONDS_MAX))
        raise SignatureDoesNotMatch(f"Signature expired: {sig.amz_date} is now earlier than "
                                    f"{earliest} ({stamp} - 15 min.)")
    if signed_at - now > SKEW_SECONDS_MAX:
        latest = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + SKEW_SECONDS_MAX))
        raise SignatureDoesNotMatch(f"Signature not yet current: {sig.amz_date} is still "
                                    f"later than {latest} ({stamp} + 15 min.)")


def _query_pairs(query: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for piece in query.split("&") if query else ():
        name, _, value = piece.partition("=")
        pairs.append((unquote_plus(name), unquote_plus(value)))
    return pairs


def _normalize_path(path: str) -> str:
    """RFC 3986 dot-segment removal, keeping a trailing slash (botocore's rule)."""
    if not path:
        return "/"
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    normalized = "/" + "/".join(out)
    if path.endswith("/") and normalized != "/":
        normalized += "/"
    return normalized


def canonical_request(method: str, path: str, pairs: list[tuple[str, str]],
                      headers: Mapping[str, str], signed: tuple[str, ...],
                      payload_hash: str) -> str:
    query = "&".join(f"{name}={value}" for name, value in sorted(
        (quote(name, safe=_SAFE), quote(value, safe=_SAFE)) for name, value in pairs))
    header_lines = "".join(f"{name}:{' '.join(headers.get(name, '').split())}\n"
                           for name in sorted(set(signed)))
    return "\n".join((method.upper(), quote(_normalize_path(path), safe="/~"), query,
                      header_lines, ";".join(sorted(set(signed))), payload_hash))


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = hmac.digest(f"AWS4{secret}".encode(), date.encode(), "sha256")
    key = hmac.digest(key, region.encode(), "sha256")
    key = hmac.digest(key, service.encode(), "sha256")
    return hmac.digest(key, b"aws4_request", "sha256")


def _signature_of(secret: str, sig: _Signature, request_text: str) -> str:
    scope = f"{sig.scope_date}/{sig.region}/{sig.service}/aws4_request"
    to_sign = "\n".join((ALGORITHM, sig.amz_date, scope,
                         hashlib.sha256(request_text.encode()).hexdigest()))
    key = signing_key(secret, sig.scope_date, sig.region, sig.service)
    return hmac.new(key, to_sign.encode(), "sha256").hexdigest()


def verify(method: str, target: str, headers: Mapping[str, str], body: bytes, now: float,
           secret_for: Callable[[str], str | None]) -> Verified:
    """Check a request's SigV4 signature; raises the SqsError AWS would answer."""
    try:
        split = urlsplit(target)
    except ValueError:
        raise IncompleteSignature("The request target is not a valid URL.") from None
    pairs = _query_pairs(split.query)
    query = dict(pairs)
    authorization = headers.get("authorization")
    if authorization is not None:
        sig = _parse_authorization(authorization, headers)
    elif "X-Amz-Signature" in query or "X-Amz-Algorithm" in query:
        sig = _parse_query(query)
        pairs = [pair for pair in pairs if pair[0] != "X-Amz-Signature"]
    else:
        raise MissingAuthenticationToken("Request is missing Authentication Token")
    if not _HEX64.match(sig.signature):
        raise SignatureDoesNotMatch(_MISMATCH)
    _check_time(sig, now)
    secret = secret_for(sig.access_key_id)
    if secret is None:
        raise InvalidClientTokenId("The security token included in the request is invalid.")
    declared = headers.get("x-amz-content-sha256")
    body_hash = hashlib.sha256(body).hexdigest()
    if declared and declared != UNSIGNED_PAYLOAD and declared != body_hash:
        raise SignatureDoesNotMatch("The provided 'x-amz-content-sha256' header does not "
                                    "match what was computed.")
    candidates = [declared or body_hash]
    if sig.expires_seconds is not None and not declared:
        candidates.append(UNSIGNED_PAYLOAD)  # S3-style presigning signs no payload
    for payload_hash in candidates:
        text = canonical_request(method, split.path, pairs, headers, sig.signed_headers,
                                 payload_hash)
        if hmac.compare_digest(_signature_of(secret, sig, text), sig.signature):
            return Verified(sig.access_key_id, sig.region)
    raise SignatureDoesNotMatch(_MISMATCH)

