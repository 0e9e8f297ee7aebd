"""SQS action dispatch: the action table over the queue and message actions.

Owns: finding an action's handler and turning every broker error into an SqsError.
Must not know: sockets, HTTP framing, JSON/XML (codec.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import ConveyorError
from conveyor.protocols.sqs.base import ACCOUNT_ID_DEFAULT, REGION_DEFAULT, RequestContext
from conveyor.protocols.sqs.errors import InvalidAction, from_conveyor
from conveyor.protocols.sqs.message_actions import MessageActions
from conveyor.protocols.sqs.queue_actions import QueueActions

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker

ACTIONS: Final = (
    "CreateQueue", "DeleteQueue", "GetQueueUrl", "ListQueues", "GetQueueAttributes",
    "SetQueueAttributes", "PurgeQueue", "TagQueue", "UntagQueue", "ListQueueTags",
    "ListDeadLetterSourceQueues", "AddPermission", "RemovePermission",
    "StartMessageMoveTask", "ListMessageMoveTasks", "CancelMessageMoveTask",
    "SendMessage", "SendMessageBatch", "ReceiveMessage", "DeleteMessage",
    "DeleteMessageBatch", "ChangeMessageVisibility", "ChangeMessageVisibilityBatch",
)


class SqsHandlers(QueueActions, MessageActions):
    def __init__(self, broker: Broker, account_id: str = ACCOUNT_ID_DEFAULT,
                 region: str = REGION_DEFAULT, default_host: str = "127.0.0.1:9324") -> None:
        super().__init__(broker, account_id, region, default_host)
        self._actions: dict[str, Callable[[dict[str, Any], RequestContext],
                                          Awaitable[dict[str, Any]]]] = {
            name: getattr(self, "action_" + name) for name in ACTIONS}

    async def open(self) -> None:
        await self.catalog.open()

    async def handle(self, action: str, params: dict[str, Any],
                     context: RequestContext) -> dict[str, Any]:
        """Run one action; every error comes out as an SqsError."""
        handler = self._actions.get(action)
        if handler is None:
            raise InvalidAction(f"The action {action} is not valid for this endpoint.")
        try:
            return await handler(params, context)
        except ConveyorError as error:
            raise from_conveyor(error) from None
