"""Definitions export and import in RabbitMQ's format (``GET/POST /api/definitions``).

Owns: the definitions document — ``queues``, ``exchanges``, ``bindings`` as RabbitMQ
writes them, plus Conveyor's ``topics`` (partitions and Kafka-named config) and
each queue's full config under ``"conveyor"`` so a round trip loses nothing — and
the import rule: every entry is checked first (shape, vhost, arguments, conflicts
with what exists, references between entries); one wrong entry and nothing is
imported, and the answer names each wrong entry (``queues[2] 'jobs': ...``).
``users``, ``permissions``, ``topic_permissions``, ``policies`` and ``parameters``
are exported empty and, on import, accepted and ignored (counted in the answer)
until Conveyor has a security model (ARCHITECTURE §6).
Must not know: sockets, HTTP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from conveyor import __version__
from conveyor.broker.topics import config_from_mapping
from conveyor.broker.types import QueueConfig
from conveyor.errors import ConveyorError, InvalidRequestError
from conveyor.protocols.http.management_documents import (
    VHOST,
    exchange_document,
    queue_arguments,
    queue_config,
)

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

IGNORED_SECTIONS: Final = ("users", "permissions", "topic_permissions", "policies",
                           "parameters", "global_parameters")
EXCHANGE_TYPES: Final = ("direct", "fanout", "topic", "headers")
ENTRIES_MAX: Final = 100_000  # per section: a definitions file bigger than this is refused
ERRORS_SHOWN_MAX: Final = 100
CONSUMER_TIMEOUT_MS: Final = 30 * 60 * 1000  # as queues the AMQP listener declares


class DefinitionsError(InvalidRequestError):
    code = "bad_request"


async def export_definitions(broker: Broker) -> dict[str, Any]:
    queues = await broker.list_queues()
    queue_names = {queue.name for queue in queues}
    exchanges = [exchange_document(info) for info in broker.list_exchanges()
                 if info.name and not info.name.startswith("amq.")]
    for exchange in exchanges:
        exchange.pop("user_who_performed_action", None)
    return {
        "product_name": "Conveyor", "product_version": __version__,
        "users": [], "vhosts": [{"name": VHOST}], "permissions": [], "topic_permissions": [],
        "parameters": [], "global_parameters": [], "policies": [],
        "queues": [
            {"name": queue.name, "vhost": VHOST, "durable": queue.config.durable,
             "auto_delete": False, "arguments": queue_arguments(queue.config),
             "conveyor": dataclasses.asdict(queue.config)}
            for queue in queues
        ],
        "exchanges": exchanges,
        "bindings": [
            {"source": b.source, "vhost": VHOST, "destination": b.destination,
             "destination_type": "exchange" if b.destination_kind == "exchange" else "queue",
             "routing_key": b.routing_key, "arguments": dict(b.arguments)}
            for b in broker.list_bindings()
        ],
        "topics": [
            {"name": info.name, "partitions": info.partitions,
             "config": broker.topic_config(info.name)}
            for info in broker.list_topics()
            if info.kind == "topic" and info.name not in queue_names
        ],
    }


class _Plan:
    """What an import will do, built while checking; applied only when error-free."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []
        self.topics: list[tuple[str, int, dict[str, str | None]]] = []
        self.exchanges: list[dict[str, Any]] = []
        self.queues: list[tuple[str, QueueConfig]] = []
        self.bindings: list[tuple[str, str, str, str, dict[str, str]]] = []
        self.known_exchanges: set[str] = set()
        self.known_queues: set[str] = set()
        self.known_topics: set[str] = set()

    def fail(self, entry: str, name: Any, reason: str) -> None:
        self.errors.append({"entry": entry, "name": str(name)[:200], "reason": reason})


def _section(document: Mapping[str, Any], name: str, plan: _Plan) -> list[Any]:
    section = document.get(name, [])
    if section is None:
        return []
    if not isinstance(section, list):
        plan.fail(name, "", "must be a list")
        return []
    if len(section) > ENTRIES_MAX:
        plan.fail(name, "", f"more than {ENTRIES_MAX} entries")
        return []
    return section


def _entry(plan: _Plan, where: str, item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict) or not isinstance(item.get("name", item.get("source")), str):
        plan.fail(where, "", "must be an object with a name")
        return None
    if item.get("vhost", VHOST) != VHOST:
        plan.fail(where, item.get("name", ""), f"unknown vhost {item.get('vhost')!r} "
                  f"(Conveyor has one vhost, '/')")
        return None
    return item


def _check_topics(broker: Broker, document: Mapping[str, Any], plan: _Plan) -> None:
    for index, raw in enumerate(_section(document, "topics", plan)):
        where = f"topics[{index}]"
        item = _entry(plan, where, raw)
        if item is None:
            continue
        name, partitions = item["name"], item.get("partitions", 1)
        config = item.get("config") or {}
        try:
            if not isinstance(partitions, int) or isinstance(partitions, bool):
                raise InvalidRequestError("partitions must be an integer")
            if not isinstance(config, dict):
                raise InvalidRequestError("config must be an object")
            existing = broker.find_topic(name)
            if existing is not None:
                if existing.kind != "topic" or existing.partitions != partitions:
                    raise InvalidRequestError(
                        f"exists with {existing.partitions} partitions ({existing.kind})")
                plan.known_topics.add(name)
                continue
            broker.validate_topic(name, partitions, {str(k): v for k, v in config.items()})
            config_from_mapping(config)
        except (ConveyorError, TypeError, ValueError) as error:
            plan.fail(where, name, str(error))
            continue
        plan.topics.append((name, partitions, config))
        plan.known_topics.add(name)


def _check_exchanges(broker: Broker, document: Mapping[str, Any], plan: _Plan) -> None:
    plan.known_exchanges = {""} | {info.name for info in broker.list_exchanges()}
    for index, raw in enumerate(_section(document, "exchanges", plan)):
        where = f"exchanges[{index}]"
        item = _entry(plan, where, raw)
        if item is None:
            continue
        name, exchange_type = item["name"], item.get("type")
        arguments = item.get("arguments") or {}
        if exchange_type not in EXCHANGE_TYPES:
            plan.fail(where, name, f"unknown exchange type {exchange_type!r}")
        elif not isinstance(arguments, dict):
            plan.fail(where, name, "arguments must be an object")
        elif name in plan.known_exchanges and name:
            if broker.routing.exists(name) and broker.get_exchange(name).type != exchange_type:
                plan.fail(where, name, f"exists with type {broker.get_exchange(name).type}")
        elif name == "" or name.startswith("amq."):
            plan.fail(where, name, "names starting with 'amq.' are reserved")
        else:
            plan.exchanges.append(item)
            plan.known_exchanges.add(name)


def _check_queues(broker: Broker, document: Mapping[str, Any], plan: _Plan) -> None:
    for index, raw in enumerate(_section(document, "queues", plan)):
        where = f"queues[{index}]"
        item = _entry(plan, where, raw)
        if item is None:
            continue
        name = broker.queue_alias(item["name"])
        try:
            full = item.get("conveyor")
            if isinstance(full, dict):
                known = {f.name for f in dataclasses.fields(QueueConfig)}
                unknown = sorted(set(full) - known)
                if unknown:
                    raise InvalidRequestError(f"unknown conveyor settings {unknown}")
                config = QueueConfig(**full)
            else:
                config = queue_config(item.get("arguments"), bool(item.get("durable", True)),
                                      CONSUMER_TIMEOUT_MS)
        except (ConveyorError, TypeError) as error:
            plan.fail(where, item["name"], str(error))
            continue
        shared = broker.shared_groups
        if shared is not None and broker.queue_exists(name):
            existing = shared.group_state(name, name)
            if existing is not None and existing.config != config:
                plan.fail(where, item["name"], "exists with a different config")
                continue
        elif broker.find_topic(name) is not None or name in plan.known_topics:
            plan.fail(where, item["name"], "a topic of this name exists")
            continue
        else:
            plan.queues.append((name, config))
        plan.known_queues.add(name)


def _check_bindings(broker: Broker, document: Mapping[str, Any], plan: _Plan) -> None:
    for index, raw in enumerate(_section(document, "bindings", plan)):
        where = f"bindings[{index}]"
        item = _entry(plan, where, raw)
        if item is None:
            continue
        source, destination = item.get("source"), item.get("destination")
        kind = item.get("destination_type")
        routing_key, arguments = item.get("routing_key", ""), item.get("arguments") or {}
        label = f"{source} -> {destination}"
        if not isinstance(destination, str) or not isinstance(routing_key, str) or \
                not isinstance(arguments, dict) or kind not in ("queue", "exchange"):
            plan.fail(where, label, "needs source, destination, destination_type "
                      "(queue|exchange), a string routing_key and object arguments")
            continue
        if source not in plan.known_exchanges or source == "":
            plan.fail(where, label, f"unknown source exchange {source!r}")
            continue
        if kind == "exchange":
            if destination not in plan.known_exchanges:
                plan.fail(where, label, f"unknown destination exchange {destination!r}")
                continue
            destination_kind = "exchange"
        else:
            destination = broker.queue_alias(destination)
            if destination in plan.known_queues or (
                    broker.queue_exists(destination)):
                destination_kind = "queue"
            elif destination in plan.known_topics or broker.find_topic(destination):
                destination_kind = "topic"
            else:
                plan.fail(where, label, f"unknown destination queue {destination!r}")
                continue
        plan.bindings.append((source, destination_kind, destination, routing_key,
                              {str(k): str(v) for k, v in arguments.items()}))


async def import_definitions(broker: Broker, document: Any) -> dict[str, Any]:
    """Check everything, then apply everything; raise DefinitionsError naming each
    wrong entry (and change nothing) when any entry is wrong."""
    if not isinstance(document, dict):
        raise DefinitionsError("definitions must be a JSON object")
    plan = _Plan()
    for index, vhost in enumerate(_section(document, "vhosts", plan)):
        if not isinstance(vhost, dict) or vhost.get("name") != VHOST:
            name = vhost.get("name", "") if isinstance(vhost, dict) else ""
            plan.fail(f"vhosts[{index}]", name, "Conveyor has one vhost, '/'")
    _check_topics(broker, document, plan)
    _check_exchanges(broker, document, plan)
    _check_queues(broker, document, plan)
    _check_bindings(broker, document, plan)
    if plan.errors:
        first = plan.errors[0]
        raise DefinitionsError(
            f"{len(plan.errors)} wrong entries, nothing imported; first: {first['entry']} "
            f"{first['name']!r}: {first['reason']}", errors=plan.errors[:ERRORS_SHOWN_MAX])
    for name, partitions, settings in plan.topics:
        await broker.create_topic(name, partitions, settings)
    for item in plan.exchanges:
        arguments = dict(item.get("arguments") or {})
        alternate = arguments.pop("alternate-exchange", None)
        await broker.declare_exchange(
            item["name"], item["type"], bool(item.get("durable", True)),
            bool(item.get("auto_delete", False)), bool(item.get("internal", False)),
            None if alternate is None else str(alternate),
            {str(k): str(v) for k, v in arguments.items()})
    for name, config in plan.queues:
        await broker.declare_queue(name, config)
    for source, kind, destination, routing_key, arguments in plan.bindings:
        await broker.bind(source, kind, destination, routing_key, arguments)  # type: ignore[arg-type]
    return {
        "imported": {"topics": len(plan.topics), "exchanges": len(plan.exchanges),
                     "queues": len(plan.queues), "bindings": len(plan.bindings)},
        "ignored": {section: len(document.get(section) or [])
                    for section in IGNORED_SECTIONS if document.get(section)},
    }
