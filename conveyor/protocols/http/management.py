"""The management API (``/api/...``, RabbitMQ-compatible where it overlaps) and the web UI.

Owns: routing of ``/api/...`` requests and of the UI's files (``/`` and
``/ui/<file>``, web_files.py), the RabbitMQ error shapes on the compatible routes
(``404 {"error": "Object Not Found", "reason": "Not Found"}``; ``{"error",
"reason"}`` for other failures), Conveyor's error shape on its own extensions
under ``/api/conveyor/``, and the rate sampler's life.
Must not know: sockets (listener.py), the JSON of RabbitMQ objects
(management_documents.py), definitions (definitions.py).

Authentication: the listener checks credentials before a request gets here (auth.py,
docs/security.md): reading needs the ``management``, ``monitoring`` or
``administrator`` tag, changing needs ``administrator``; the security endpoints
(users, vhosts, permissions, tokens, keys, ACLs) are security_routes.py.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from conveyor.errors import ConveyorError, OperatingError
from conveyor.protocols.http.codec import ApiResponse, error_response
from conveyor.protocols.http.framing import RawRequest
from conveyor.protocols.http.management_conveyor import ConveyorExtensions
from conveyor.protocols.http.management_objects import ObjectRoutes
from conveyor.protocols.http.rates import RateSampler
from conveyor.protocols.http.web_files import WebFiles

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.connections import ConnectionRegistry

logger = logging.getLogger("conveyor.http.management")

API_PREFIX: Final = "/api/"
EXTENSION_PREFIX: Final = ("api", "conveyor")
NOT_FOUND: Final = {"error": "Object Not Found", "reason": "Not Found"}

class ManagementApi:
    def __init__(self, broker: Broker, stats_interval_ms: int = 1000) -> None:
        self.broker = broker
        self.sampler = RateSampler(broker, max(10, stats_interval_ms))
        self.node = f"conveyor@{socket.gethostname()}"
        self.registry: ConnectionRegistry | None = None
        self.web = WebFiles()
        self.objects = ObjectRoutes(self)
        self.extensions = ConveyorExtensions(self)

    def start(self, registry: ConnectionRegistry) -> None:
        self.registry = registry
        self.sampler.start()

    async def close(self) -> None:
        await self.sampler.close()

    def handles(self, raw: RawRequest) -> bool:
        path = raw.target.split("?", 1)[0]
        return path.startswith(API_PREFIX) or path == "/api" or self.web.serves(path)

    async def respond(self, raw: RawRequest) -> ApiResponse:
        split = urlsplit(raw.target)
        if not split.path.startswith("/api"):
            return self.web.response(raw.method.upper(), split.path)
        try:
            parts = [unquote(part, errors="strict") for part in split.path.strip("/").split("/")]
        except UnicodeDecodeError:
            return _rabbit_error(400, "bad_request", "path is not valid UTF-8")
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        extension = tuple(parts[:2]) == EXTENSION_PREFIX
        try:
            body = _json_body(raw)
            if extension:
                return await self.extensions.dispatch(raw.method.upper(), parts[2:], query, body)
            return await self.objects.dispatch(raw.method.upper(), parts[1:], query, body, raw)
        except ConveyorError as error:
            if extension:
                return error_response(error)
            return rabbit_error_response(error)
        except Exception:
            logger.exception("management request failed", extra={"target": raw.target[:200]})
            if extension:
                return error_response(ConveyorError("internal error"))
            return _rabbit_error(500, "internal_error", "internal error")


def _json_body(raw: RawRequest) -> Any:
    if not raw.body:
        return None
    try:
        return json.loads(raw.body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidJsonError(f"body is not JSON: {error}") from None


class InvalidJsonError(OperatingError):
    code = "bad_request"


def _rabbit_error(status: int, error: str, reason: str,
                  extra: dict[str, Any] | None = None) -> ApiResponse:
    return ApiResponse(status, {"error": error, "reason": reason, **(extra or {})})


def rabbit_error_response(error: ConveyorError) -> ApiResponse:
    """RabbitMQ's error shape: 404 Object Not Found; others ``{"error", "reason"}``."""
    status = error.http_status if isinstance(error, OperatingError) else 500
    if status == 404:
        return ApiResponse(404, dict(NOT_FOUND))
    if status == 409:
        status = 400  # RabbitMQ answers an inequivalent redeclare with 400
    name = {400: "bad_request", 413: "bad_request", 405: "method_not_allowed"}.get(
        status, error.code)
    extra = {}
    if "errors" in error.details:
        extra["errors"] = error.details["errors"]
    return _rabbit_error(status, name, error.message, extra)
