"""The RabbitMQ-compatible routes of the management API: ``/api/overview``, queues,
exchanges, bindings, connections, channels, consumers, vhosts, definitions.

Owns: what each compatible route does in terms of the broker facade, the route
table, and the rules RabbitMQ's API has that KEDA, rabbitmqadmin and scripts
rely on: ``%2F`` is the vhost ``/`` (any other vhost is Object Not Found);
``amq.default`` in a URL is the default exchange ``""``; PUT declares (201
created, 204 when it existed the same); ``POST .../get`` reads messages with an
``ackmode``; ``POST .../publish`` answers ``{"routed": bool}``.
Must not know: sockets, HTTP framing, the UI.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from conveyor import __version__
from conveyor.broker.types import DestinationKind, ExchangeType
from conveyor.errors import InvalidRequestError, NotFoundError, UnknownQueueError
from conveyor.protocols.http.codec import ApiResponse
from conveyor.protocols.http.definitions import export_definitions, import_definitions
from conveyor.protocols.http.framing import RawRequest
from conveyor.protocols.http.management_documents import (
    VHOST,
    binding_document,
    channel_document,
    connection_document,
    connection_name,
    consumer_document,
    default_binding_document,
    exchange_document,
    listing,
    properties_key,
    queue_config,
    queue_document,
)
from conveyor.protocols.http.management_messages import (
    argument_text,
    flag,
    get_messages,
    message_from_fields,
)

if TYPE_CHECKING:
    from conveyor.protocols.http.management_host import ManagementHost

CONSUMER_TIMEOUT_MS: Final = 30 * 60 * 1000  # as the AMQP listener's queues (RabbitMQ's)
EXCHANGE_TYPES: Final = ("direct", "fanout", "topic", "headers")

Route = tuple[str, tuple[str, ...], Callable[..., Awaitable[ApiResponse]]]


class ObjectNotFoundError(NotFoundError):
    code = "object_not_found"


def _vhost(name: str) -> None:
    if name != VHOST:
        raise ObjectNotFoundError("unknown vhost", vhost=name)


def _exchange_name(name: str) -> str:
    return "" if name == "amq.default" else name


def _object(body: Any) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidRequestError("body must be a JSON object")
    return body


class ObjectRoutes:
    def __init__(self, api: ManagementHost) -> None:
        self.api = api
        self.broker = api.broker
        self.routes: list[Route] = [
            ("GET", ("overview",), self.overview),
            ("GET", ("vhosts",), self.vhosts),
            ("GET", ("vhosts", "{vhost}"), self.vhost),
            ("GET", ("whoami",), self.whoami),
            ("GET", ("users",), self.empty),
            ("GET", ("permissions",), self.empty),
            ("GET", ("nodes",), self.nodes),
            ("GET", ("queues",), self.queues),
            ("GET", ("queues", "{vhost}"), self.queues),
            ("GET", ("queues", "{vhost}", "{name}"), self.queue),
            ("PUT", ("queues", "{vhost}", "{name}"), self.declare_queue),
            ("DELETE", ("queues", "{vhost}", "{name}"), self.delete_queue),
            ("DELETE", ("queues", "{vhost}", "{name}", "contents"), self.purge_queue),
            ("POST", ("queues", "{vhost}", "{name}", "get"), self.get_messages),
            ("GET", ("queues", "{vhost}", "{name}", "bindings"), self.queue_bindings),
            ("GET", ("exchanges",), self.exchanges),
            ("GET", ("exchanges", "{vhost}"), self.exchanges),
            ("GET", ("exchanges", "{vhost}", "{name}"), self.exchange),
            ("PUT", ("exchanges", "{vhost}", "{name}"), self.declare_exchange),
            ("DELETE", ("exchanges", "{vhost}", "{name}"), self.delete_exchange),
            ("POST", ("exchanges", "{vhost}", "{name}", "publish"), self.publish),
            ("GET", ("exchanges", "{vhost}", "{name}", "bindings", "source"),
             self.exchange_bindings_source),
            ("GET", ("bindings",), self.bindings),
            ("GET", ("bindings", "{vhost}"), self.bindings),
            ("GET", ("bindings", "{vhost}", "e", "{source}", "{kind}", "{destination}"),
             self.bindings_between),
            ("POST", ("bindings", "{vhost}", "e", "{source}", "{kind}", "{destination}"),
             self.bind),
            ("GET", ("bindings", "{vhost}", "e", "{source}", "{kind}", "{destination}",
                     "{props}"), self.binding),
            ("DELETE", ("bindings", "{vhost}", "e", "{source}", "{kind}", "{destination}",
                        "{props}"), self.unbind),
            ("GET", ("connections",), self.connections),
            ("GET", ("connections", "{name}"), self.connection),
            ("GET", ("channels",), self.channels),
            ("GET", ("consumers",), self.consumers),
            ("GET", ("consumers", "{vhost}"), self.consumers),
            ("GET", ("definitions",), self.definitions),
            ("GET", ("definitions", "{vhost}"), self.definitions),
            ("POST", ("definitions",), self.load_definitions),
            ("POST", ("definitions", "{vhost}"), self.load_definitions),
        ]

    async def dispatch(self, method: str, parts: list[str], query: dict[str, str], body: Any,
                       raw: RawRequest) -> ApiResponse:
        allowed = []
        for route_method, pattern, handler in self.routes:
            if len(pattern) != len(parts):
                continue
            params: dict[str, str] = {}
            for template, part in zip(pattern, parts, strict=True):
                if template.startswith("{"):
                    params[template[1:-1]] = part
                elif template != part:
                    break
            else:
                if route_method != method:
                    allowed.append(route_method)
                    continue
                if "vhost" in params:
                    _vhost(params.pop("vhost"))
                return await handler(query=query, body=body, raw=raw, **params)
        if allowed:
            return ApiResponse(405, {"error": "Method Not Allowed",
                                     "reason": f"allowed: {', '.join(sorted(set(allowed)))}"})
        raise ObjectNotFoundError("no such route")

    # --- overview, vhosts, nodes ----------------------------------------------------------
    async def overview(self, query: dict[str, str], **_: Any) -> ApiResponse:
        publish_rate, deliver_rate = self.api.sampler.total_rates()
        queues = await self.broker.list_queues()
        views = self._views()
        latest = self.api.sampler.history(1)
        totals = self.api.sampler.totals_all()
        registry = self.api.registry
        return ApiResponse(200, {
            "management_version": __version__, "product_name": "Conveyor",
            "product_version": __version__, "node": self.api.node,
            "cluster_name": self.api.node,
            "message_stats": {
                "publish": totals[0], "publish_details": {"rate": publish_rate},
                "deliver_get": totals[1], "deliver_get_details": {"rate": deliver_rate},
            },
            "queue_totals": {
                "messages": sum(q.ready + q.in_flight for q in queues),
                "messages_ready": sum(q.ready for q in queues),
                "messages_unacknowledged": sum(q.in_flight for q in queues),
            },
            "object_totals": {
                "connections": len(views), "channels": sum(len(v.channels) for v in views),
                "consumers": sum(len(v.consumers) for v in views), "queues": len(queues),
                "exchanges": len(self.exchange_documents()),
                "topics": sum(1 for t in self.broker.list_topics() if t.kind == "topic"),
            },
            "listeners": [
                {"node": self.api.node, "protocol": listener.protocol, "port": listener.port}
                for listener in (registry.listeners() if registry is not None else [])
            ],
            "sample_time_ms": latest[-1]["time_ms"] if latest else None,
        })

    async def vhosts(self, **_: Any) -> ApiResponse:
        return ApiResponse(200, [{"name": VHOST, "description": "the only vhost"}])

    async def vhost(self, **_: Any) -> ApiResponse:
        return ApiResponse(200, {"name": VHOST, "description": "the only vhost"})

    async def whoami(self, raw: RawRequest, **_: Any) -> ApiResponse:
        user = "guest"
        authorization = raw.headers.get("authorization", "")
        if authorization.lower().startswith("basic "):
            try:
                user = base64.b64decode(authorization[6:], validate=True).decode(
                    "utf-8").split(":", 1)[0]
            except (binascii.Error, UnicodeDecodeError):
                pass
        return ApiResponse(200, {"name": user, "tags": ["administrator"]})

    async def empty(self, **_: Any) -> ApiResponse:
        return ApiResponse(200, [])  # no users or permissions until a security model exists

    async def nodes(self, **_: Any) -> ApiResponse:
        return ApiResponse(200, [{"name": self.api.node, "running": True, "type": "disc"}])

    # --- queues ---------------------------------------------------------------------------
    def _consumer_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for view in self._views():
            for consumer in view.consumers:
                counts[consumer.queue] = counts.get(consumer.queue, 0) + 1
        return counts

    def _queue_name(self, name: str) -> str:
        """The broker queue behind a RabbitMQ queue name (AMQP's name mapping)."""
        if self.broker.queue_exists(name):
            return name
        return self.broker.queue_alias(name)

    async def queue_documents(self) -> list[dict[str, Any]]:
        counts = self._consumer_counts()
        sampler = self.api.sampler
        documents = []
        for info in await self.broker.list_queues():
            sample = sampler.totals(info.name)
            totals = (sample.published, sample.delivered) if sample else (0, 0)
            documents.append(queue_document(info, self.api.node, counts.get(info.name, 0),
                                            totals, sampler.rates(info.name)))
        return documents

    async def queues(self, query: dict[str, str], **_: Any) -> ApiResponse:
        return ApiResponse(200, listing(await self.queue_documents(), query))

    async def queue(self, name: str, query: dict[str, str], **_: Any) -> ApiResponse:
        topic = self._queue_name(name)
        info = await self.broker.get_queue(topic)
        sampler = self.api.sampler
        sample = sampler.totals(topic)
        totals = (sample.published, sample.delivered) if sample else (0, 0)
        document = queue_document(info, self.api.node, self._consumer_counts().get(topic, 0),
                                  totals, sampler.rates(topic))
        if query.get("columns"):
            return ApiResponse(200, listing([document], {"columns": query["columns"]})[0])
        return ApiResponse(200, document)

    async def declare_queue(self, name: str, body: Any, **_: Any) -> ApiResponse:
        fields = _object(body)
        topic = self.broker.queue_alias(name)
        arguments = fields.get("arguments") or {}
        if isinstance(arguments, dict) and arguments.get("x-queue-type") == "stream":
            if self.broker.find_topic(topic) is not None:
                return ApiResponse(204)
            await self.broker.create_topic(topic)
            return ApiResponse(201)
        config = queue_config(arguments, flag(fields, "durable", True),
                              CONSUMER_TIMEOUT_MS)
        existed = self.broker.queue_exists(topic)
        await self.broker.declare_queue(topic, config)
        return ApiResponse(204 if existed else 201)

    async def delete_queue(self, name: str, query: dict[str, str], **_: Any) -> ApiResponse:
        await self.broker.delete_queue(self._queue_name(name),
                                       if_unused=query.get("if-unused") == "true",
                                       if_empty=query.get("if-empty") == "true")
        return ApiResponse(204)

    async def purge_queue(self, name: str, **_: Any) -> ApiResponse:
        await self.broker.purge_queue(self._queue_name(name))
        return ApiResponse(204)

    async def get_messages(self, name: str, body: Any, **_: Any) -> ApiResponse:
        return ApiResponse(200, await get_messages(self.broker, self._queue_name(name),
                                                   _object(body)))

    async def queue_bindings(self, name: str, **_: Any) -> ApiResponse:
        topic = self._queue_name(name)
        await self.broker.get_queue(topic)
        documents = [default_binding_document(topic)] + [
            binding_document(b) for b in self.broker.list_bindings(
                destination_kind="queue", destination=topic)]
        return ApiResponse(200, documents)

    # --- exchanges ------------------------------------------------------------------------
    def exchange_documents(self) -> list[dict[str, Any]]:
        default = exchange_document(self.broker.get_exchange(""))
        return [default] + [exchange_document(info) for info in self.broker.list_exchanges()
                            if info.name]

    async def exchanges(self, query: dict[str, str], **_: Any) -> ApiResponse:
        return ApiResponse(200, listing(self.exchange_documents(), query))

    async def exchange(self, name: str, **_: Any) -> ApiResponse:
        return ApiResponse(200, exchange_document(self.broker.get_exchange(
            _exchange_name(name))))

    async def declare_exchange(self, name: str, body: Any, **_: Any) -> ApiResponse:
        fields = _object(body)
        exchange_type = fields.get("type")
        if exchange_type not in EXCHANGE_TYPES:
            raise InvalidRequestError(f"unknown exchange type {exchange_type!r}")
        arguments = fields.get("arguments") or {}
        if not isinstance(arguments, dict):
            raise InvalidRequestError("arguments must be an object")
        arguments = dict(arguments)
        alternate = arguments.pop("alternate-exchange", None)
        existed = self.broker.routing.exists(name)
        typed: ExchangeType = exchange_type
        await self.broker.declare_exchange(
            name, typed, flag(fields, "durable", True), flag(fields, "auto_delete", False),
            flag(fields, "internal", False),
            None if alternate is None else str(alternate),
            {str(k): str(v) for k, v in arguments.items()})
        return ApiResponse(204 if existed else 201)

    async def delete_exchange(self, name: str, query: dict[str, str], **_: Any) -> ApiResponse:
        if name in ("", "amq.default") or name.startswith("amq."):
            raise InvalidRequestError("predeclared exchanges cannot be deleted")
        await self.broker.delete_exchange(name, if_unused=query.get("if-unused") == "true")
        return ApiResponse(204)

    async def publish(self, name: str, body: Any, **_: Any) -> ApiResponse:
        fields = _object(body)
        exchange = _exchange_name(name)
        self.broker.get_exchange(exchange)
        routing_key = fields.get("routing_key", "")
        if not isinstance(routing_key, str):
            raise InvalidRequestError("routing_key must be a string")
        message = message_from_fields(fields, self.broker.clock.wall_ms())
        if exchange == "":
            topic = self.broker.queue_alias(routing_key)
            if self.broker.find_topic(topic) is None:
                return ApiResponse(200, {"routed": False})
            await self.broker.publish(topic, [message])
            return ApiResponse(200, {"routed": True})
        routed = await self.broker.publish_to_exchange(exchange, routing_key, [message])
        return ApiResponse(200, {"routed": routed.routed})

    async def exchange_bindings_source(self, name: str, **_: Any) -> ApiResponse:
        exchange = _exchange_name(name)
        self.broker.get_exchange(exchange)
        return ApiResponse(200, [binding_document(b)
                                 for b in self.broker.list_bindings(source=exchange)])

    # --- bindings -------------------------------------------------------------------------
    async def binding_documents(self) -> list[dict[str, Any]]:
        defaults = [default_binding_document(q.name) for q in await self.broker.list_queues()]
        return defaults + [binding_document(b) for b in self.broker.list_bindings()]

    async def bindings(self, query: dict[str, str], **_: Any) -> ApiResponse:
        return ApiResponse(200, listing(await self.binding_documents(), query))

    def _destination(self, kind: str, destination: str) -> tuple[DestinationKind, str]:
        if kind == "e":
            self.broker.get_exchange(destination)
            return "exchange", destination
        if kind != "q":
            raise ObjectNotFoundError("unknown destination kind", kind=kind)
        topic = self._queue_name(destination)
        if self.broker.queue_exists(topic):
            return "queue", topic
        if self.broker.find_topic(topic) is not None:
            return "topic", topic
        raise UnknownQueueError("unknown queue", queue=destination)

    def _between(self, source: str, kind: str, destination: str) -> list[Any]:
        self.broker.get_exchange(source)
        destination_kind, name = self._destination(kind, destination)
        return [b for b in self.broker.list_bindings(source=source)
                if b.destination_kind == destination_kind and b.destination == name]

    async def bindings_between(self, source: str, kind: str, destination: str,
                               **_: Any) -> ApiResponse:
        return ApiResponse(200, [binding_document(b)
                                 for b in self._between(source, kind, destination)])

    async def bind(self, source: str, kind: str, destination: str, body: Any,
                   **_: Any) -> ApiResponse:
        fields = _object(body)
        self.broker.get_exchange(source)
        destination_kind, name = self._destination(kind, destination)
        routing_key = fields.get("routing_key", "")
        arguments = fields.get("arguments") or {}
        if not isinstance(routing_key, str) or not isinstance(arguments, dict):
            raise InvalidRequestError("routing_key must be a string, arguments an object")
        binding = await self.broker.bind(source, destination_kind, name, routing_key,
                                         {str(k): argument_text(v) for k, v in arguments.items()})
        location = properties_key(binding.routing_key, binding.arguments)
        return ApiResponse(201, None, (("Location", location),))

    def _find_binding(self, source: str, kind: str, destination: str, props: str) -> Any:
        for binding in self._between(source, kind, destination):
            if properties_key(binding.routing_key, binding.arguments) == props:
                return binding
        raise ObjectNotFoundError("unknown binding", properties_key=props)

    async def binding(self, source: str, kind: str, destination: str, props: str,
                      **_: Any) -> ApiResponse:
        return ApiResponse(200, binding_document(
            self._find_binding(source, kind, destination, props)))

    async def unbind(self, source: str, kind: str, destination: str, props: str,
                     **_: Any) -> ApiResponse:
        binding = self._find_binding(source, kind, destination, props)
        await self.broker.unbind(binding.source, binding.destination_kind, binding.destination,
                                 binding.routing_key, dict(binding.arguments))
        return ApiResponse(204)

    # --- connections, channels, consumers --------------------------------------------------
    def _views(self) -> list[Any]:
        registry = self.api.registry
        return registry.snapshot() if registry is not None else []

    async def connections(self, query: dict[str, str], **_: Any) -> ApiResponse:
        return ApiResponse(200, listing(
            [connection_document(v, self.api.node) for v in self._views()], query))

    async def connection(self, name: str, **_: Any) -> ApiResponse:
        for view in self._views():
            if connection_name(view) == name:
                return ApiResponse(200, connection_document(view, self.api.node))
        raise ObjectNotFoundError("unknown connection", name=name)

    async def channels(self, query: dict[str, str], **_: Any) -> ApiResponse:
        return ApiResponse(200, listing([
            channel_document(view, channel, self.api.node)
            for view in self._views() for channel in view.channels], query))

    async def consumers(self, query: dict[str, str], **_: Any) -> ApiResponse:
        return ApiResponse(200, listing([
            consumer_document(view, consumer)
            for view in self._views() for consumer in view.consumers], query))

    # --- definitions ----------------------------------------------------------------------
    async def definitions(self, **_: Any) -> ApiResponse:
        return ApiResponse(200, await export_definitions(self.broker))

    async def load_definitions(self, body: Any, **_: Any) -> ApiResponse:
        return ApiResponse(200, await import_definitions(self.broker, body))
