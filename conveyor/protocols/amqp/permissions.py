"""AMQP authorization, as RabbitMQ does it: which permission each method needs, and the
ACCESS_REFUSED (403) channel error when the connection's user lacks it.

Owns: the method -> (action, resource kind, name) table (RabbitMQ's access-control
guide, "How Permissions Work"):

- exchange.declare / exchange.delete, queue.declare / queue.delete: ``configure`` on the
  exchange / queue (a passive declare only looks: no check);
- queue.bind / queue.unbind: ``write`` on the queue and ``read`` on the exchange;
- exchange.bind / exchange.unbind: ``write`` on the destination, ``read`` on the source;
- basic.publish: ``write`` on the exchange (the default exchange is ``amq.default``), and
  for a topic exchange RabbitMQ's topic permission on the routing key;
- basic.consume, basic.get, queue.purge: ``read`` on the queue.

The refusal text is RabbitMQ's: ``ACCESS_REFUSED - access to queue 'b' in vhost '/'
refused for user 'alice'``. Each check is one call into the model (compiled regexes
held there); the connection keeps its principal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from pamqp import commands

from . import frames as f
from .link import ChannelError, method_ids

if TYPE_CHECKING:
    from conveyor.security.api import Action, Principal, SecurityModel

DEFAULT_EXCHANGE: Final = "amq.default"
Need = tuple["Action", str, str]  # action, "queue" | "exchange", name


def _needs(method: Any) -> list[Need]:
    if isinstance(method, commands.Queue.Declare):
        return [] if method.passive or not method.queue else [("configure", "queue",
                                                               method.queue)]
    if isinstance(method, commands.Queue.Delete):
        return [("configure", "queue", method.queue)] if method.queue else []
    if isinstance(method, commands.Exchange.Declare):
        return [] if method.passive else [("configure", "exchange", method.exchange)]
    if isinstance(method, commands.Exchange.Delete):
        return [("configure", "exchange", method.exchange)]
    if isinstance(method, commands.Queue.Bind | commands.Queue.Unbind):
        needs: list[Need] = [("read", "exchange", method.exchange or DEFAULT_EXCHANGE)]
        if method.queue:
            needs.insert(0, ("write", "queue", method.queue))
        return needs
    if isinstance(method, commands.Exchange.Bind | commands.Exchange.Unbind):
        return [("write", "exchange", method.destination),
                ("read", "exchange", method.source)]
    if isinstance(method, commands.Basic.Consume | commands.Basic.Get | commands.Queue.Purge):
        return [("read", "queue", method.queue)] if method.queue else []
    return []


BASIC_PUBLISH: Final = (60, 40)


def refusal(kind: str, name: str, vhost: str, user: str,
            ids: tuple[int, int]) -> ChannelError:
    return ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - access to {kind} '{name}' in "
                        f"vhost '{vhost}' refused for user '{user}'", *ids)


def authorize(security: SecurityModel | None, principal: Principal | None, vhost: str,
              method: Any) -> None:
    """Raise ACCESS_REFUSED unless the principal may run ``method``."""
    if security is None or principal is None:
        return
    for action, kind, name in _needs(method):
        if not security.check(principal, vhost, action, kind, name):  # type: ignore[arg-type]
            raise refusal(kind, name, vhost, principal.name, method_ids(method))


def authorize_publish(security: SecurityModel | None, principal: Principal | None,
                      vhost: str, exchange: str, routing_key: str,
                      topic_exchange: bool) -> None:
    """basic.publish: write on the exchange; topic permissions on the routing key."""
    if security is None or principal is None:
        return
    name = exchange or DEFAULT_EXCHANGE
    if not security.check(principal, vhost, "write", "exchange", name):
        raise refusal("exchange", name, vhost, principal.name, BASIC_PUBLISH)
    if topic_exchange and not security.check_routing_key(principal, vhost, name, routing_key,
                                                         "write"):
        raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - write access to topic "
                           f"'{routing_key}' in exchange '{name}' in vhost '{vhost}' refused "
                           f"for user '{principal.name}'", *BASIC_PUBLISH)
