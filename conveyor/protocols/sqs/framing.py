"""HTTP/1.1 framing for the SQS listener, sans-IO: bytes in -> HttpRequest; responses -> bytes.

Owns: driving the httptools (llhttp) parser, the body and header size limits,
keep-alive and ``Expect: 100-continue``, and serialising a response.
Must not know: SQS actions, JSON, XML, the broker, sockets.

The HTTP API has its own framer; protocols do not import each other, so the SQS
listener keeps this small one on the same parser (httptools), chosen there by
measurement (bench/results/http_stack.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import httptools

from conveyor.errors import InvalidRequestError, RecordTooLargeError

# A SendMessageBatch of ten 1 MiB bodies (AWS's 1 MiB payload limit) JSON-escaped stays
# under this; AWS rejects a request over the payload limit with 413 as well.
BODY_BYTES_MAX: Final = 16 << 20
HEADERS_BYTES_MAX: Final = 64 << 10  # nginx's large_client_header_buffers is 4 x 8 KiB
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class HttpRequest:
    method: str
    target: str  # path + query, still percent-encoded
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool


class RequestFramer:
    """One connection's parser state. Not reusable after it raised."""

    def __init__(self, body_bytes_max: int = BODY_BYTES_MAX) -> None:
        self.body_bytes_max = body_bytes_max
        self._parser = httptools.HttpRequestParser(self)
        self._completed: list[HttpRequest] = []
        self._immediate: list[bytes] = []
        self._reset_message()

    def _reset_message(self) -> None:
        self._in_message = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._headers_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    def receive_data(self, data: bytes) -> tuple[list[HttpRequest], bytes]:
        """Requests completed by ``data`` and bytes to send at once (100 Continue)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise InvalidRequestError("protocol upgrades are not supported") from None
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, RecordTooLargeError):
                raise error.__context__ from None
            raise InvalidRequestError("malformed HTTP request", reason=str(error)) from None
        completed, self._completed = self._completed, []
        immediate, self._immediate = b"".join(self._immediate), []
        return completed, immediate

    def speaks_json(self) -> bool:
        """Whether the request being parsed named an ``X-Amz-Target`` (for the error's shape
        when it fails before it is complete)."""
        return "x-amz-target" in self._headers

    # --- parser callbacks -------------------------------------------------------------
    @property
    def partial_bytes(self) -> int:
        """Bytes of the request being received (what an unfinished request holds)."""
        return len(self._url) + self._headers_bytes + self._body_bytes if self._in_message else 0

    def on_message_begin(self) -> None:
        self._reset_message()
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def _count_header_bytes(self, size: int) -> None:
        self._headers_bytes += size
        if self._headers_bytes > HEADERS_BYTES_MAX:
            raise RecordTooLargeError("request headers too large", limit=HEADERS_BYTES_MAX)

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.body_bytes_max:
            raise RecordTooLargeError(
                "request body too large", size_bytes=int(length), limit=self.body_bytes_max
            )
        if self._headers.get("expect", "").lower() == "100-continue":
            self._immediate.append(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.body_bytes_max:
            raise RecordTooLargeError("request body too large", limit=self.body_bytes_max)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._completed.append(HttpRequest(
            method=self._parser.get_method().decode("ascii", "replace"),
            target=self._url.decode("latin-1"),
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self._parser.should_keep_alive(),
        ))
        self._reset_message()


def encode_response(
    status: int,
    body: bytes,
    headers: tuple[tuple[str, str], ...] = (),
    keep_alive: bool = True,
) -> bytes:
    """One complete HTTP/1.1 response with Content-Length."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
