"""BrokerConfig: the broker-wide limits every peer reads, and the open/closing gate.

Owns: ``BrokerConfig`` (frozen; every limit a named field, unit last) and ``Gate``,
the one flag a closing broker flips so every peer refuses new work the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.errors import UnavailableError


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    auto_create_topics: bool = True
    default_partitions: int = 1
    # Broker-wide ceiling on one record batch: AMQP's largest configurable message (128 MiB)
    # plus room for its properties. Each topic's max.message.bytes (1 MiB by default, as
    # Kafka's) applies below it; queues take what their listener accepts.
    record_bytes_max: int = 129 << 20
    retention_check_interval_ms: int = 60_000  # Kafka's log.retention.check.interval.ms is 5 min
    group_check_interval_ms: int = 100  # session-expiry resolution
    fetch_wait_ms_max: int = 30_000  # Kafka clients default fetch.max.wait.ms to 500
    read_bytes_max: int = 4 << 20  # read_records' slice per call
    session_timeout_ms_min: int = 1_000  # Kafka: group.min.session.timeout.ms = 6 s
    session_timeout_ms_max: int = 30 * 60_000  # Kafka: group.max.session.timeout.ms
    # an Empty group whose last commit is this old is deleted with its offsets
    offsets_retention_ms: int = 7 * 24 * 3600 * 1000  # Kafka offsets.retention.minutes=10080
    # a transactional id with no transaction for this long is forgotten (Kafka's
    # transactional.id.expiration.ms), and an idle producer id (producer.id.expiration.ms)
    transactional_id_expiration_ms: int = 7 * 24 * 3600 * 1000
    producer_id_expiration_ms: int = 24 * 3600 * 1000


class Gate:
    """Closed once ``Broker.close`` starts: new appends and reads are refused."""

    def __init__(self) -> None:
        self.closing = False

    def check(self) -> None:
        if self.closing:
            raise UnavailableError("broker is shutting down")
