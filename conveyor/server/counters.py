"""ListenerCounters: what a protocol listener counts about its own traffic, protocol-neutral.

Owns: plain integer counters a listener increments where events happen —
connections opened and open now, requests by type, errors by code, bytes
received and sent — and the bound on how many distinct request types and error
codes are kept. The Prometheus side (``conveyor.server.metrics``) reads these at
scrape time; nothing here imports it, so listeners stay free of metrics libraries.

Must not know: any protocol's wire format, Prometheus.

Cost rule: every method is O(1) (a dict lookup and an add). Listeners call them once
per read, per flush, per request or per batch of requests, not per record where a
batch is at hand.
"""

from __future__ import annotations

from typing import Final

# Distinct request types / error codes kept per listener: every protocol's vocabulary
# (Kafka's ~70 API names, AMQP's ~50 methods, SQS's ~20 actions, HTTP's routes) fits;
# names beyond it are counted under OTHER so a hostile client cannot grow the series.
KINDS_MAX: Final = 256
OTHER: Final = "other"


class ListenerCounters:
    """One listener's traffic counters (read by the metrics collector at scrape time)."""

    __slots__ = ("bytes_received", "bytes_sent", "connections_open", "connections_total",
                 "errors", "name", "requests")

    def __init__(self, name: str) -> None:
        self.name = name  # the listener: kafka, amqp, http, sqs
        self.connections_open = 0  # admitted and not closed yet
        self.connections_total = 0  # admitted since start
        self.bytes_received = 0
        self.bytes_sent = 0
        # request type -> requests answered (Kafka API name, AMQP method, SQS action, route)
        self.requests: dict[str, int] = {}
        # error code -> errors answered (protocol's own code: Kafka error name, AMQP reply
        # code, SQS error code, HTTP error code)
        self.errors: dict[str, int] = {}

    def opened(self) -> None:
        self.connections_open += 1
        self.connections_total += 1

    def closed(self) -> None:
        self.connections_open -= 1

    def request(self, kind: str, count: int = 1) -> None:
        requests = self.requests
        if kind in requests:
            requests[kind] += count
        elif len(requests) < KINDS_MAX:
            requests[kind] = count
        else:
            requests[OTHER] = requests.get(OTHER, 0) + count

    def error(self, code: str, count: int = 1) -> None:
        errors = self.errors
        if code in errors:
            errors[code] += count
        elif len(errors) < KINDS_MAX:
            errors[code] = count
        else:
            errors[OTHER] = errors.get(OTHER, 0) + count
