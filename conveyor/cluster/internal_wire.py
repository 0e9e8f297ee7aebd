"""The node-to-node channel's wire: the preamble, frames, the MAC, errors as JSON.

Owns: every bound on what a peer may send (a frame's length before and after the peer
is authenticated, the JSON it holds) and the one decoder every read goes through, so a
malformed frame is a ``FrameError`` and never another exception.
Must not know: sockets beyond reading from an ``asyncio.StreamReader``, the broker.

Wire: a connecting node first sends the 4-byte preamble ``PREAMBLE`` (so a plain client
on a TLS port says something the port can refuse at once, and a stranger's bytes are
refused before anything is answered). Every frame after it is a 4-byte big-endian length
and a JSON object of at most ``HANDSHAKE_BYTES_MAX`` before authentication and
``FRAME_BYTES_MAX`` after. A length is never allocated ahead: ``readexactly`` holds
only the bytes that arrived.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import struct
from typing import Any, Final

from conveyor import errors
from conveyor.errors import OperatingError, UnavailableError

# Not 0x16 0x03 (a TLS record) and not a plausible frame length (1.1 GB > FRAME_BYTES_MAX).
PREAMBLE: Final = b"CVI1"
HANDSHAKE_BYTES_MAX: Final = 4096  # the hello frames: a nonce, or a node id and a MAC
FRAME_BYTES_MAX: Final = 512 << 20  # a batch of deliveries of large AMQP bodies, base64
MAC_LABEL: Final = b"conveyor-internal"


class NotOwnerError(UnavailableError):
    """The node asked does not (or no longer) own the item: ask the owner again."""

    code = "not_owner"


class FrameError(ConnectionError):
    """A peer sent a frame that is not one (too long, not JSON, not an object)."""


def mac(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, MAC_LABEL + nonce, hashlib.sha256).digest()


def decode_frame(body: bytes) -> dict[str, Any]:
    """A frame's JSON object; ``FrameError`` for anything else (invalid UTF-8 or JSON,
    nesting deeper than the decoder's recursion limit, a value that is not an object)."""
    try:
        frame = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise FrameError(f"internal frame is not JSON: {type(error).__name__}") from None
    if not isinstance(frame, dict):
        raise FrameError("internal frame is not an object")
    return frame


async def read_frame(reader: asyncio.StreamReader,
                     size_max: int = FRAME_BYTES_MAX) -> dict[str, Any]:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    if size > size_max:
        raise FrameError(f"internal frame of {size} bytes (at most {size_max})")
    return decode_frame(await reader.readexactly(size))


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def error_to_wire(error: OperatingError) -> dict[str, Any]:
    return {"type": type(error).__name__, "message": error.message,
            "details": {key: str(value) for key, value in error.details.items()}}


def error_from_wire(wire: Any) -> OperatingError:
    """The same error class when it is one of conveyor.errors' operating errors."""
    if not isinstance(wire, dict):
        return UnavailableError("malformed error from another node")
    name = str(wire.get("type", ""))
    found = NotOwnerError if name == "NotOwnerError" else getattr(errors, name, None)
    message = str(wire.get("message", "error at another node"))
    details = wire.get("details")
    details = {str(key): value for key, value in details.items()} \
        if isinstance(details, dict) else {}
    if isinstance(found, type) and issubclass(found, OperatingError):
        return found(message, **details)
    return UnavailableError(message, **details)
