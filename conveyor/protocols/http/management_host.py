"""What the management routes need from ManagementApi, as a Protocol, so that the route
modules (management_objects, management_conveyor) do not import the module that
imports them (tests/test_tidy.py forbids import cycles, TYPE_CHECKING ones included)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.connections import ConnectionRegistry
    from conveyor.protocols.http.rates import RateSampler


class ManagementHost(Protocol):
    broker: Broker
    sampler: RateSampler
    node: str  # the node name RabbitMQ's documents carry ("conveyor@host")
    registry: ConnectionRegistry | None  # live connections (None until started)
