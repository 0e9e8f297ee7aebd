"""Who sends an SQS request and what it may do: SigV4 against the security model's access
keys, then a permission check per queue action.

Owns: choosing the principal of a request (a verified SigV4 signature; without
``--auth required`` the model's anonymous principal for a request from loopback whose key
Conveyor does not know, so the usual test credentials keep working there) and mapping
each action onto the model's actions:

- SendMessage, SendMessageBatch: ``write`` on the queue;
- ReceiveMessage, DeleteMessage(Batch), ChangeMessageVisibility(Batch), PurgeQueue:
  ``read`` on the queue;
- CreateQueue, DeleteQueue, SetQueueAttributes, TagQueue, UntagQueue, AddPermission,
  RemovePermission, StartMessageMoveTask (on its source): ``configure``;
- GetQueueUrl, GetQueueAttributes, ListQueueTags, ListDeadLetterSourceQueues:
  ``describe``; ListQueues lists only the queues the principal may describe.

A refusal is AccessDenied (403), as SQS answers an IAM denial, naming the user and
the action. SQS has no vhosts: the listener acts in the default vhost ``/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from conveyor.protocols.sqs import sigv4
from conveyor.protocols.sqs.errors import (
    AccessDenied,
    InvalidClientTokenId,
    SignatureDoesNotMatch,
    SqsError,
)

if TYPE_CHECKING:
    from conveyor.protocols.sqs.framing import HttpRequest
    from conveyor.security.api import Action, Principal, SecurityModel

ACTIONS: Final[dict[str, Action]] = {
    "SendMessage": "write", "SendMessageBatch": "write",
    "ReceiveMessage": "read", "DeleteMessage": "read", "DeleteMessageBatch": "read",
    "ChangeMessageVisibility": "read", "ChangeMessageVisibilityBatch": "read",
    "PurgeQueue": "read",
    "CreateQueue": "configure", "DeleteQueue": "configure", "SetQueueAttributes": "configure",
    "TagQueue": "configure", "UntagQueue": "configure", "AddPermission": "configure",
    "RemovePermission": "configure", "StartMessageMoveTask": "configure",
    "GetQueueUrl": "describe", "GetQueueAttributes": "describe", "ListQueueTags": "describe",
    "ListDeadLetterSourceQueues": "describe",
}


def queue_named(params: dict[str, Any], path: str) -> str | None:
    """The queue an action names: QueueName, QueueUrl, a SourceArn, or the URL path."""
    name = params.get("QueueName")
    if isinstance(name, str) and name:
        return name
    arn = params.get("SourceArn")
    if isinstance(arn, str) and arn:
        return arn.rsplit(":", 1)[-1]
    url = params.get("QueueUrl")
    if not isinstance(url, str) or not url:
        url = path if path.strip("/") else None
    if url is None:
        return None
    try:
        return urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] if "/" in url else url
    except ValueError:
        return url


class SqsAccess:
    def __init__(self, security: SecurityModel, region: str, account_id: str,
                 vhost: str = "/", clock: Callable[[], float] = time.time) -> None:
        self.security = security
        self.region = region
        self.account_id = account_id
        self.vhost = vhost
        self._clock = clock

    async def principal(self, raw: HttpRequest, peer_host: str) -> Principal:
        """The request's principal; raises the SqsError AWS answers."""
        security = self.security
        known: dict[str, tuple[Principal, str]] = {}

        def secret_for(key_id: str) -> str | None:
            found = security.access_key(key_id)
            if found is not None:
                known[key_id] = found
            return found[1] if found is not None else None

        try:
            verified = sigv4.verify(raw.method, raw.target, raw.headers, raw.body,
                                    self._clock(), secret_for)
        except SqsError as error:
            if not known and not security.auth_required:
                anonymous = security.anonymous(peer_host)
                if anonymous is not None:  # auth off: SDK placeholder keys act as the guest
                    return anonymous
            if isinstance(error, SignatureDoesNotMatch | InvalidClientTokenId):
                await security.login_failed(peer_host, "", "sqs")
            raise
        principal = known[verified.access_key_id][0]
        security.login_succeeded(peer_host)
        return principal

    def may(self, principal: Principal, action: Action, queue: str) -> bool:
        return self.security.check(principal, self.vhost, action, "queue", queue)

    def authorize(self, principal: Principal, action: str, params: dict[str, Any],
                  path: str) -> None:
        """Raise AccessDenied unless the principal may run ``action``."""
        needed = ACTIONS.get(action)
        if needed is None:
            return  # ListQueues (filtered after), move-task listings, unknown actions
        queue = queue_named(params, path)
        if queue is None or self.may(principal, needed, queue):
            return  # a missing queue parameter is answered by the action itself
        raise AccessDenied(
            f"User: arn:aws:iam::{self.account_id}:user/{principal.name} is not authorized "
            f"to perform: sqs:{action} on resource: "
            f"arn:aws:sqs:{self.region}:{self.account_id}:{queue}")

    def visible_urls(self, principal: Principal, result: dict[str, Any]) -> dict[str, Any]:
        """ListQueues: only the queues the principal may describe."""
        urls = result.get("QueueUrls")
        if not isinstance(urls, list):
            return result
        kept = [url for url in urls
                if self.may(principal, "describe", str(url).rstrip("/").rsplit("/", 1)[-1])]
        return {**result, "QueueUrls": kept}
