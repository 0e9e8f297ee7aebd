"""Management endpoints of the security model (RabbitMQ's paths where they exist).

Owns: ``/api/whoami``, ``/api/users[/NAME[/permissions]]``, ``/api/vhosts[/NAME]``,
``/api/permissions[/VHOST/USER]``, ``/api/topic-permissions[/VHOST/USER]`` (RabbitMQ's
management API shapes: ``PUT`` with ``{"password", "tags"}`` /
``{"configure", "write", "read"}`` / ``{"exchange", "write", "read"}``), and Conveyor's own
``/api/conveyor/tokens[/ID]``, ``/api/conveyor/users/NAME/keys[/ID]`` and
``/api/conveyor/acls``. Who may call what: users, vhosts and permissions need the
``administrator`` tag (a user may read itself and its own permissions); tokens and
access keys: a user manages its own, an administrator anyone's; the ACL view needs
``administrator`` or ``monitoring``. Errors: 403 and ``/api/conveyor/`` use Conveyor's
JSON error shape, other failures on RabbitMQ's paths RabbitMQ's (as management.py).
Must not know: sockets, password hashing (conveyor/security/admin.py).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from conveyor.errors import AuthorizationError, ConveyorError, InvalidRequestError, NotFoundError
from conveyor.protocols.http.codec import ApiResponse, error_response
from conveyor.protocols.http.framing import RawRequest
from conveyor.protocols.http.management import rabbit_error_response
from conveyor.security.api import TAGS, AclFilter, Principal
from conveyor.security.model import Security

Handler = Callable[[Principal, dict[str, str], dict[str, Any]], Awaitable[ApiResponse]]
ADMIN: Final = ("administrator",)
MANAGEMENT_TAGS: Final = ("management", "monitoring", "administrator")


def _parts(raw: RawRequest) -> list[str] | None:
    path = urlsplit(raw.target).path
    try:
        return [unquote(part, errors="strict") for part in path.strip("/").split("/")]
    except UnicodeDecodeError:
        return None


def _body(raw: RawRequest) -> dict[str, Any]:
    if not raw.body:
        return {}
    try:
        document = json.loads(raw.body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("body is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequestError("body must be a JSON object")
    return document


def _text(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{key} must be a string", field=key)
    return value


def _tags(value: Any) -> tuple[str, ...]:
    """RabbitMQ sends tags as "a,b"; a JSON list is accepted too."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(t, str) for t in items):
        raise InvalidRequestError("tags must be a comma-separated string or a list",
                                  known=list(TAGS))
    return tuple(t.strip() for t in items if t.strip())


def _require(principal: Principal, tags: tuple[str, ...], self_name: str | None = None) -> None:
    if self_name is not None and principal.name == self_name and not principal.is_anonymous:
        return
    if not principal.has_tag(*tags):
        raise AuthorizationError(f"{principal.name} needs one of the tags {', '.join(tags)}",
                                 user=principal.name, tags=list(tags))


class SecurityRoutes:
    def __init__(self, security: Security) -> None:
        self.security = security
        self.admin = security.admin
        self.routes: list[tuple[str, tuple[str, ...], Handler]] = [
            ("GET", ("whoami",), self.whoami),
            ("GET", ("users",), self.users),
            ("GET", ("users", "{user}"), self.user),
            ("PUT", ("users", "{user}"), self.put_user),
            ("DELETE", ("users", "{user}"), self.delete_user),
            ("GET", ("users", "{user}", "permissions"), self.user_permissions),
            ("GET", ("vhosts",), self.vhosts),
            ("GET", ("vhosts", "{vhost}"), self.vhost),
            ("PUT", ("vhosts", "{vhost}"), self.put_vhost),
            ("DELETE", ("vhosts", "{vhost}"), self.delete_vhost),
            ("GET", ("permissions",), self.permissions),
            ("GET", ("permissions", "{vhost}", "{user}"), self.permission),
            ("PUT", ("permissions", "{vhost}", "{user}"), self.put_permission),
            ("DELETE", ("permissions", "{vhost}", "{user}"), self.delete_permission),
            ("GET", ("topic-permissions",), self.topic_permissions),
            ("PUT", ("topic-permissions", "{vhost}", "{user}"), self.put_topic_permission),
            ("GET", ("conveyor", "tokens"), self.tokens),
            ("POST", ("conveyor", "tokens"), self.create_token),
            ("DELETE", ("conveyor", "tokens", "{token}"), self.delete_token),
            ("GET", ("conveyor", "users", "{user}", "keys"), self.keys),
            ("POST", ("conveyor", "users", "{user}", "keys"), self.create_key),
            ("DELETE", ("conveyor", "users", "{user}", "keys", "{key}"), self.delete_key),
            ("GET", ("conveyor", "acls"), self.acls),
        ]

    def match(self, raw: RawRequest) -> tuple[Handler, dict[str, str]] | None:
        parts = _parts(raw)
        if not parts or parts[0] != "api":
            return None
        method = raw.method.upper()
        for route_method, pattern, handler in self.routes:
            if route_method != method or len(pattern) != len(parts) - 1:
                continue
            params: dict[str, str] = {}
            for template, part in zip(pattern, parts[1:], strict=True):
                if template.startswith("{"):
                    params[template[1:-1]] = part
                elif template != part:
                    break
            else:
                return handler, params
        return None

    async def respond(self, handler: Handler, params: dict[str, str], raw: RawRequest,
                      principal: Principal) -> ApiResponse:
        try:
            return await handler(principal, params, _body(raw))
        except ConveyorError as error:
            # 401/403 and Conveyor's own routes: Conveyor's error shape; other failures
            # on RabbitMQ's paths: RabbitMQ's, as the rest of the management API answers
            extension = raw.target.startswith("/api/conveyor/")
            if extension or isinstance(error, AuthorizationError):
                return error_response(error)
            return rabbit_error_response(error)

    # --- users ----------------------------------------------------------------------------
    async def whoami(self, principal: Principal, *_: Any) -> ApiResponse:
        return ApiResponse(200, {"name": principal.name, "tags": sorted(principal.tags),
                                 "anonymous": principal.is_anonymous})

    async def users(self, principal: Principal, *_: Any) -> ApiResponse:
        _require(principal, ADMIN)
        return ApiResponse(200, self.admin.list_users())

    async def user(self, principal: Principal, params: dict[str, str], _: Any) -> ApiResponse:
        _require(principal, ADMIN, params["user"])
        for user in self.admin.list_users():
            if user["name"] == params["user"]:
                return ApiResponse(200, user)
        raise NotFoundError("no such user", user=params["user"])

    async def put_user(self, principal: Principal, params: dict[str, str],
                       body: dict[str, Any]) -> ApiResponse:
        name = params["user"]
        exists = self.security.principal(name) is not None
        if exists and set(body) <= {"password"}:
            _require(principal, ADMIN, name)  # a user may change its own password
        else:
            _require(principal, ADMIN)
        tags = _tags(body.get("tags")) if "tags" in body else None
        if not exists:
            await self.admin.add_user(name, _text(body, "password"), tags or ())
            return ApiResponse(201, {"name": name, "tags": list(tags or ())})
        if "password" in body:
            await self.admin.set_password(name, _text(body, "password"))
        if tags is not None:
            await self.admin.set_tags(name, tags)
        return ApiResponse(204)

    async def delete_user(self, principal: Principal, params: dict[str, str],
                          _: Any) -> ApiResponse:
        _require(principal, ADMIN)
        await self.admin.delete_user(params["user"])
        return ApiResponse(204)

    async def user_permissions(self, principal: Principal, params: dict[str, str],
                               _: Any) -> ApiResponse:
        _require(principal, ADMIN, params["user"])
        return ApiResponse(200, self.admin.list_permissions(user=params["user"]))

    # --- vhosts and permissions ---------------------------------------------------------------
    async def vhosts(self, principal: Principal, *_: Any) -> ApiResponse:
        names = [v for v in self.admin.list_vhosts()
                 if self.security.may_use_vhost(principal, v)]
        return ApiResponse(200, [{"name": name} for name in names])

    async def vhost(self, principal: Principal, params: dict[str, str], _: Any) -> ApiResponse:
        name = params["vhost"]
        if name not in self.admin.list_vhosts() or not self.security.may_use_vhost(
                principal, name):
            raise NotFoundError("no such vhost", vhost=name)
        return ApiResponse(200, {"name": name})

    async def put_vhost(self, principal: Principal, params: dict[str, str],
                        _: Any) -> ApiResponse:
        _require(principal, ADMIN)
        created = params["vhost"] not in self.admin.list_vhosts()
        await self.admin.add_vhost(params["vhost"])
        return ApiResponse(201 if created else 204, {"name": params["vhost"]} if created
                           else None)

    async def delete_vhost(self, principal: Principal, params: dict[str, str],
                           _: Any) -> ApiResponse:
        _require(principal, ADMIN)
        if params["vhost"] == "/":
            raise InvalidRequestError("the default vhost / cannot be deleted")
        await self.admin.delete_vhost(params["vhost"])
        return ApiResponse(204)

    async def permissions(self, principal: Principal, *_: Any) -> ApiResponse:
        _require(principal, ADMIN)
        return ApiResponse(200, self.admin.list_permissions())

    async def permission(self, principal: Principal, params: dict[str, str],
                         _: Any) -> ApiResponse:
        _require(principal, ADMIN, params["user"])
        found = self.admin.list_permissions(params["user"], params["vhost"])
        if not found:
            raise NotFoundError("no permissions", user=params["user"], vhost=params["vhost"])
        return ApiResponse(200, found[0])

    async def put_permission(self, principal: Principal, params: dict[str, str],
                             body: dict[str, Any]) -> ApiResponse:
        _require(principal, ADMIN)
        await self.admin.set_permissions(params["user"], params["vhost"],
                                         _text(body, "configure", ""), _text(body, "write", ""),
                                         _text(body, "read", ""))
        return ApiResponse(204)

    async def delete_permission(self, principal: Principal, params: dict[str, str],
                                _: Any) -> ApiResponse:
        _require(principal, ADMIN)
        await self.admin.clear_permissions(params["user"], params["vhost"])
        return ApiResponse(204)

    async def topic_permissions(self, principal: Principal, *_: Any) -> ApiResponse:
        _require(principal, ADMIN)
        return ApiResponse(200, self.admin.list_topic_permissions())

    async def put_topic_permission(self, principal: Principal, params: dict[str, str],
                                   body: dict[str, Any]) -> ApiResponse:
        """RabbitMQ's ``{"exchange", "write", "read"}``: routing-key patterns."""
        _require(principal, ADMIN)
        await self.admin.set_topic_permissions(params["user"], params["vhost"],
                                               _text(body, "exchange"), _text(body, "write", ""),
                                               _text(body, "read", ""))
        return ApiResponse(204)

    # --- tokens, access keys, ACLs ------------------------------------------------------------
    async def tokens(self, principal: Principal, *_: Any) -> ApiResponse:
        owner = None if principal.is_administrator else principal.name
        return ApiResponse(200, self.admin.list_tokens(owner))

    async def create_token(self, principal: Principal, _: dict[str, str],
                           body: dict[str, Any]) -> ApiResponse:
        owner = _text(body, "user", principal.name)
        _require(principal, ADMIN, owner)
        token_id, token = await self.admin.create_token(owner, _text(body, "name", ""))
        return ApiResponse(201, {"id": token_id, "user": owner, "token": token})

    async def delete_token(self, principal: Principal, params: dict[str, str],
                           _: Any) -> ApiResponse:
        owner = None if principal.is_administrator else principal.name
        await self.admin.delete_token(params["token"], owner)
        return ApiResponse(204)

    async def keys(self, principal: Principal, params: dict[str, str], _: Any) -> ApiResponse:
        _require(principal, ADMIN, params["user"])
        return ApiResponse(200, self.admin.list_access_keys(params["user"]))

    async def create_key(self, principal: Principal, params: dict[str, str],
                         _: Any) -> ApiResponse:
        _require(principal, ADMIN, params["user"])
        key_id, secret = await self.admin.create_access_key(params["user"])
        return ApiResponse(201, {"id": key_id, "user": params["user"], "secret": secret})

    async def delete_key(self, principal: Principal, params: dict[str, str],
                         _: Any) -> ApiResponse:
        _require(principal, ADMIN, params["user"])
        await self.admin.delete_access_key(params["key"], params["user"])
        return ApiResponse(204)

    async def acls(self, principal: Principal, *_: Any) -> ApiResponse:
        _require(principal, ("administrator", "monitoring"))
        return ApiResponse(200, [
            {"principal": b.principal, "resource_type": b.resource_type,
             "resource_name": b.resource_name, "pattern_type": b.pattern_type,
             "operation": b.operation, "permission": b.permission, "host": b.host}
            for b in self.security.describe_acls(AclFilter())])
