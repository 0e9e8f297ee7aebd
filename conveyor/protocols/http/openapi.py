"""The OpenAPI 3.0 document of the HTTP API, built from routes.ROUTES and schemas.

Owns: turning each Route (path, query, body schema, response schema, status)
into an operation, with the error responses every operation can return.
Must not know: the broker, sockets.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from conveyor.protocols.http.routes import ROUTES, Route
from conveyor.protocols.http.schemas import ERROR, NAME, Schema

ERROR_STATUSES: Final = {
    "400": "Bad request: malformed JSON, wrong types, unknown fields, bad base64",
    "404": "Unknown topic, queue, group, exchange or route",
    "405": "Method not allowed on this path",
    "409": "Conflict: exists already, unknown or expired receipt, wrong state",
    "413": "Body, batch or message too large",
    "415": "Unsupported content type",
    "416": "Offset out of range",
    "429": "Too many requests in flight; retry after Retry-After",
    "503": "Not ready or shutting down; retry after Retry-After",
}


def _openapi_schema(schema: Schema) -> Schema:
    """JSON Schema (draft 2020 subset used here) -> OpenAPI 3.0 schema (nullable)."""
    result: Schema = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, list):
            names = [name for name in value if name != "null"]
            result["type"] = names[0]
            if "null" in value:
                result["nullable"] = True
        elif key == "properties":
            result[key] = {name: _openapi_schema(item) for name, item in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            result[key] = _openapi_schema(value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _operation(route: Route) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _openapi_schema(NAME)}
        for name in route.parameters
    ]
    parameters.extend(
        {"name": name, "in": "query", "required": False, "schema": _openapi_schema(schema)}
        for name, schema in route.query.items()
    )
    success: dict[str, Any] = {"description": "OK"}
    if route.response is not None:
        success["content"] = {media_type: {"schema": _openapi_schema(route.response)}
                              for media_type in route.content_types}
    responses: dict[str, Any] = {str(route.status): success}
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for status, description in ERROR_STATUSES.items():
        responses[status] = {"description": description, "content": error_content}
    operation: dict[str, Any] = {
        "operationId": route.operation,
        "summary": route.summary,
        "tags": [route.tag],
        "parameters": parameters,
        "responses": responses,
    }
    if route.body is not None:
        content: dict[str, Any] = {
            "application/json": {"schema": _openapi_schema(route.body)}
        }
        if route.binary_body:
            content["application/octet-stream"] = {
                "schema": {"type": "string", "format": "binary"}
            }
        operation["requestBody"] = {"required": route.body_required, "content": content}
    return operation


def build_document(server_url: str | None = None) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.template, {})[route.method.lower()] = _operation(route)
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "Conveyor HTTP API",
            "version": "0.1.0",
            "description": "Topics, queues, exchanges, publish, ordered and shared consume.",
        },
        "paths": paths,
        "components": {"schemas": {"Error": _openapi_schema(ERROR)}},
    }
    if server_url is not None:
        document["servers"] = [{"url": server_url}]
    return document
