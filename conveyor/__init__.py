"""Conveyor: one durable message broker for Kafka, AMQP, SQS and HTTP clients."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from conveyor.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import conveyor` (the server, the CLI) does not pay for httpx.
    if name in ("Client", "AsyncClient"):
        from conveyor import client

        return getattr(client, name)
    raise AttributeError(f"module 'conveyor' has no attribute {name!r}")
