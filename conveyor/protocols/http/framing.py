"""HTTP/1.1 message framing, sans-IO: bytes in -> RawRequest events; responses -> bytes.

Owns: driving the httptools (llhttp) parser, per-request limits (header and body
sizes), keep-alive and ``Expect: 100-continue``, and serialising responses.
Must not know: routes, JSON, the broker, sockets.

Rules:
- ``receive_data`` returns the requests completed by those bytes, in order, plus
  any bytes to send at once (``100 Continue``).
- A body larger than ``body_bytes_max`` (announced by Content-Length, or seen
  while a chunked body arrives) raises ``RecordTooLargeError`` (-> 413) and the
  connection must close after that response: the rest of the body is unread.
- Unparseable bytes raise ``InvalidRequestError`` (-> 400, then close).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import httptools

from conveyor.errors import InvalidRequestError, RecordTooLargeError

BODY_BYTES_MAX: Final = 16 << 20  # 16 MiB: a 10,000-message batch of 1 KiB values, base64
HEADERS_BYTES_MAX: Final = 64 << 10  # nginx's large_client_header_buffers is 4 x 8 KiB
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class RawRequest:
    method: str
    target: str  # path + query, still percent-encoded
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    keep_alive: bool
    header_list: list[tuple[str, str]] = field(default_factory=list)


class RequestFramer:
    """One connection's parser state. Not reusable after it raised."""

    def __init__(self, body_bytes_max: int = BODY_BYTES_MAX) -> None:
        self.body_bytes_max = body_bytes_max
        self._parser = httptools.HttpRequestParser(self)
        self._completed: list[RawRequest] = []
        self._immediate: list[bytes] = []
        self._reset_message()

    @property
    def partial_bytes(self) -> int:
        """Bytes of the request being received (what an unfinished request holds)."""
        return len(self._url) + self._headers_bytes + self._body_bytes if self.in_message else 0

    def _reset_message(self) -> None:
        self.in_message = False
        self._url = b""
        self._header_list: list[tuple[str, str]] = []
        self._headers: dict[str, str] = {}  # built once the headers are complete
        self._headers_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    def receive_data(self, data: bytes) -> tuple[list[RawRequest], bytes]:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise InvalidRequestError("protocol upgrades are not supported") from None
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, RecordTooLargeError):
                raise error.__context__ from None
            raise InvalidRequestError("malformed HTTP request", reason=str(error)) from None
        completed, self._completed = self._completed, []
        if not self._immediate:
            return completed, b""
        immediate, self._immediate = b"".join(self._immediate), []
        return completed, immediate

    # --- parser callbacks (httptools calls these from feed_data) ----------------------
    def on_message_begin(self) -> None:
        self._reset_message()
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers_bytes += len(name) + len(value)
        if self._headers_bytes > HEADERS_BYTES_MAX:
            raise RecordTooLargeError("request headers too large", limit=HEADERS_BYTES_MAX)
        self._header_list.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def _count_header_bytes(self, size: int) -> None:
        self._headers_bytes += size
        if self._headers_bytes > HEADERS_BYTES_MAX:
            raise RecordTooLargeError("request headers too large", limit=HEADERS_BYTES_MAX)

    def on_headers_complete(self) -> None:
        headers = self._headers = dict(self._header_list)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.body_bytes_max:
            raise RecordTooLargeError(
                "request body too large", size_bytes=int(length), limit=self.body_bytes_max
            )
        if "expect" in headers and headers["expect"].lower() == "100-continue":
            self._immediate.append(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.body_bytes_max:
            raise RecordTooLargeError("request body too large", limit=self.body_bytes_max)
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii", "replace")
        self._completed.append(RawRequest(
            method=method,
            target=self._url.decode("latin-1"),
            headers=self._headers,
            body=self._body[0] if len(self._body) == 1 else b"".join(self._body),
            keep_alive=self._parser.should_keep_alive(),
            header_list=self._header_list,
        ))
        self._reset_message()


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Status"
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


# every status line the server may send, built once (an unknown status is built per use)
_STATUS_LINES: Final = {int(status): _status_line(int(status)) for status in HTTPStatus}
_JSON_TYPE: Final = b"Content-Type: application/json\r\n"


def encode_response(
    status: int,
    body: bytes,
    content_type: str | None = "application/json",
    keep_alive: bool = True,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """One complete HTTP/1.1 response with Content-Length."""
    line = _STATUS_LINES.get(status) or _status_line(status)
    if status in (204, 304):
        head = line
        body = b""
    elif content_type == "application/json":
        head = b"%s%sContent-Length: %d\r\n" % (line, _JSON_TYPE, len(body))
    elif content_type is not None:
        head = b"%sContent-Type: %s\r\nContent-Length: %d\r\n" % (
            line, content_type.encode("latin-1"), len(body))
    else:
        head = b"%sContent-Length: %d\r\n" % (line, len(body))
    if not keep_alive:
        head += b"Connection: close\r\n"
    for name, value in extra_headers:
        head += f"{name}: {value}\r\n".encode("latin-1")
    return head + b"\r\n" + body
