"""broker: the domain (topics, groups, routing, queues) behind one async facade.

Protocol adapters import ``Broker`` and the value types from here or from
``conveyor.broker.types``; everything else in the package is internal.
"""

from conveyor.broker.types import (
    AppendResult,
    Binding,
    Delivery,
    ExchangeInfo,
    Message,
    PartitionOffsets,
    PublishResult,
    QueueConfig,
    QueueInfo,
    RouteResult,
    TopicConfig,
    TopicInfo,
)

__all__ = [
    "AppendResult", "Binding", "Delivery", "ExchangeInfo", "Message", "PartitionOffsets",
    "PublishResult", "QueueConfig", "QueueInfo", "RouteResult", "TopicConfig", "TopicInfo",
]
