"""HTTP authentication (Basic, Bearer tokens) and the permission each route needs.

Owns: reading ``Authorization`` into a Principal (or the loopback guest when auth is
off and no credentials were sent), the 401 answer (``WWW-Authenticate: Basic`` and
``Bearer``, Conveyor's JSON error shape), and ``required`` — the table that names, for
every operation of routes.py, the action and resource it needs (declare/delete =
configure, publish = write, consume/ack = read, describe = any of the three).
Must not know: sockets; how passwords are checked (conveyor/security/).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass
from typing import Any, Final

from conveyor.errors import AuthenticationError, AuthorizationError
from conveyor.protocols.http.codec import ApiRequest, ApiResponse, error_response
from conveyor.protocols.http.framing import RawRequest
from conveyor.security.api import (
    DEFAULT_VHOST,
    Action,
    Principal,
    ResourceKind,
    SecurityModel,
    qualify,
    unqualify,
)

VHOST_HEADER: Final = "x-conveyor-vhost"
# Open to anyone: liveness/readiness probes, the API description, the UI's static files.
PUBLIC_OPERATIONS: Final = frozenset({"health", "ready", "openapi"})
CHALLENGE: Final = (("WWW-Authenticate", 'Basic realm="conveyor", charset="UTF-8"'),
                    ("WWW-Authenticate", 'Bearer realm="conveyor"'))
CREDENTIAL_BYTES_MAX: Final = 4096


def unauthorized(message: str) -> ApiResponse:
    response = error_response(AuthenticationError(message))
    return ApiResponse(401, response.document, CHALLENGE)


def forbidden(principal: Principal, action: str, kind: str, name: str,
              vhost: str) -> ApiResponse:
    return error_response(AuthorizationError(
        f"{principal.name} may not {action} {kind} {name!r} in vhost {vhost!r}",
        user=principal.name, action=action, resource=kind, name=name, vhost=vhost))


def forbidden_tag(principal: Principal, tags: tuple[str, ...]) -> ApiResponse:
    return error_response(AuthorizationError(
        f"{principal.name} needs one of the tags {', '.join(tags)}", user=principal.name,
        tags=list(tags)))


@dataclass(frozen=True, slots=True)
class Authenticated:
    principal: Principal | None  # None: refused (see ``response``)
    response: ApiResponse | None = None


async def authenticate(security: SecurityModel, raw: RawRequest,
                       peer_host: str | None) -> Authenticated:
    header = raw.headers.get("authorization", "")
    if not header:
        principal = security.anonymous(peer_host)
        if principal is not None:
            return Authenticated(principal)
        return Authenticated(None, unauthorized("authentication required"))
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip()
    user = ""
    principal = None
    if len(credentials) <= CREDENTIAL_BYTES_MAX:
        if scheme.lower() == "basic":
            user, password = _basic(credentials)
            if user:
                principal = await security.authenticate_password(user, password, peer_host)
        elif scheme.lower() == "bearer":
            user = "token"
            principal = security.verify_token(credentials)
    if principal is not None:
        security.login_succeeded(peer_host)
        return Authenticated(principal)
    await security.login_failed(peer_host, user, "http")
    return Authenticated(None, unauthorized("invalid credentials"))


def _basic(credentials: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    user, separator, password = decoded.partition(":")
    return (user, password) if separator else ("", "")


def vhost_of(raw: RawRequest) -> str:
    return raw.headers.get(VHOST_HEADER, DEFAULT_VHOST) or DEFAULT_VHOST


# operation -> (action, resource kind, where the name is: a path parameter, "body" (its
# name), "body.FIELD", or "destination"). A dead-letter topic is written to: write.
Need = tuple[Action, ResourceKind, str]
REQUIRED: Final[dict[str, tuple[Need, ...]]] = {
    "create_topic": (("configure", "topic", "body"),),
    "describe_topic": (("describe", "topic", "topic"),),
    "alter_topic": (("configure", "topic", "topic"),),
    "delete_topic": (("configure", "topic", "topic"),),
    "publish": (("write", "topic", "topic"),),
    "read": (("read", "topic", "topic"),),
    "fetch": (("read", "topic", "topic"),),
    "create_shared_group": (("read", "topic", "topic"), ("read", "group", "group"),
                            ("write", "topic", "body.dead_letter_topic")),
    "committed_offsets": (("describe", "topic", "topic"), ("describe", "group", "group")),
    "commit_offsets": (("read", "topic", "topic"), ("read", "group", "group")),
    "acquire": (("read", "topic", "topic"), ("read", "group", "group")),
    "ack": (("read", "topic", "topic"), ("read", "group", "group")),
    "release": (("read", "topic", "topic"), ("read", "group", "group")),
    "extend": (("read", "topic", "topic"), ("read", "group", "group")),
    "dlq": (("read", "topic", "topic"),),
    "redrive": (("read", "topic", "topic"), ("write", "topic", "topic")),
    "describe_group": (("describe", "group", "group"),),
    "delete_group": (("configure", "group", "group"),),
    "create_queue": (("configure", "queue", "body"),
                     ("write", "topic", "body.dead_letter_topic")),
    "describe_queue": (("describe", "queue", "queue"),),
    "delete_queue": (("configure", "queue", "queue"),),
    "create_exchange": (("configure", "exchange", "body"),),
    "describe_exchange": (("describe", "exchange", "exchange"),),
    "delete_exchange": (("configure", "exchange", "exchange"),),
    # RabbitMQ: bind = write on the destination + read on the exchange
    "bind": (("read", "exchange", "exchange"), ("write", "queue", "destination")),
    "unbind": (("read", "exchange", "exchange"), ("write", "queue", "destination")),
    "publish_exchange": (("write", "exchange", "exchange"),),
}
# Listings: every principal with access to the vhost; items it may not describe are hidden.
LISTINGS: Final[dict[str, tuple[str, ResourceKind, str]]] = {
    "list_topics": ("topics", "topic", "name"),
    "list_queues": ("queues", "queue", "name"),
    "list_exchanges": ("exchanges", "exchange", "name"),
    "list_groups": ("groups", "group", "group"),
}
MONITORING_OPERATIONS: Final = frozenset({"metrics"})
MONITORING_TAGS: Final = ("monitoring", "administrator")


def authorize(security: SecurityModel, principal: Principal, request: ApiRequest,
              vhost: str) -> ApiResponse | None:
    """None when allowed; else the 403 to send."""
    operation = request.operation
    if operation in PUBLIC_OPERATIONS:
        return None
    if operation in MONITORING_OPERATIONS:
        return None if principal.has_tag(*MONITORING_TAGS) else forbidden_tag(
            principal, MONITORING_TAGS)
    if not security.may_use_vhost(principal, vhost):
        return error_response(AuthorizationError(
            f"{principal.name} has no access to vhost {vhost!r}", user=principal.name,
            vhost=vhost))
    for action, kind, where in REQUIRED.get(operation, ()):
        name = _name(request, where)
        if name is None:
            continue
        if kind == "queue" and where == "destination":
            kind = _destination_kind(request)
        if not security.check(principal, vhost, action, kind, name):
            return forbidden(principal, action, kind, name, vhost)
    if operation == "publish_exchange":  # RabbitMQ topic permissions on routing keys
        exchange, routing_key = request.path["exchange"], request.body.get("routing_key", "")
        if isinstance(routing_key, str) and not security.check_routing_key(
                principal, vhost, exchange, routing_key, "write"):
            return forbidden(principal, "write", "routing key", routing_key, vhost)
    return None


def _name(request: ApiRequest, where: str) -> str | None:
    if where == "body":
        value = request.body.get("name")
    elif where.startswith("body."):
        value = request.body.get(where.removeprefix("body."))
    elif where == "destination":
        value = request.body.get("destination")
    else:
        value = request.path.get(where)
    return value if isinstance(value, str) else None


def _destination_kind(request: ApiRequest) -> ResourceKind:
    kind = request.body.get("destination_kind")
    return "exchange" if kind == "exchange" else "topic" if kind == "topic" else "queue"


# Names the broker sees qualified by the request's vhost (vhost "/" changes nothing).
QUALIFIED_PATH: Final = ("topic", "queue", "exchange")
QUALIFIED_BODY: Final[dict[str, tuple[str, ...]]] = {
    "create_topic": ("name",), "create_queue": ("name", "dead_letter_topic"),
    "create_shared_group": ("dead_letter_topic",),
    "create_exchange": ("name", "alternate_exchange"),
    "bind": ("destination",), "unbind": ("destination",)}


def qualify_request(request: ApiRequest, vhost: str) -> ApiRequest:
    """The request with its resource names prefixed by the vhost (``qualify``)."""
    if vhost == DEFAULT_VHOST:
        return request
    path = {key: qualify(vhost, value) if key in QUALIFIED_PATH else value
            for key, value in request.path.items()}
    body = dict(request.body)
    for field in QUALIFIED_BODY.get(request.operation, ()):
        if isinstance(body.get(field), str):
            body[field] = qualify(vhost, body[field])
    return dataclasses.replace(request, path=path, body=body)


def filter_listing(security: SecurityModel, principal: Principal, operation: str,
                   vhost: str, document: Any) -> Any:
    """The items of a listing in the request's vhost, by their unqualified names, that
    the principal may describe."""
    listing = LISTINGS.get(operation)
    if listing is None or not isinstance(document, dict):
        return document
    key, kind, field = listing
    items = document.get(key)
    if not isinstance(items, list) or kind == "group":
        return document
    kept = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get(field), str):
            continue
        item_vhost, name = unqualify(item[field])
        if item_vhost == vhost and security.check(principal, vhost, "describe", kind, name):
            kept.append({**item, field: name})
    return {**document, key: kept}
