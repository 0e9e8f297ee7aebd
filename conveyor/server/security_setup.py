"""Turning security on at start: the bind refusal, the model, the advertised address.

Owns: ``refuse_open_bind`` (a non-loopback bind with auth off refuses to start unless
``insecure``), ``start_security`` (load the model from the StateStore and bootstrap the
first users from ``CONVEYOR_ADMIN_USER`` / ``CONVEYOR_ADMIN_PASSWORD``), and
``advertised_host_for`` (what Kafka Metadata names when bound to all addresses).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Mapping

from conveyor.clock import Clock
from conveyor.config import ServerConfig
from conveyor.errors import InvalidConfigError
from conveyor.security.api import is_loopback
from conveyor.security.model import Security
from conveyor.storage.state_store import StateStore

logger = logging.getLogger("conveyor.security")

ALL_ADDRESSES = ("0.0.0.0", "::", "")


def _is_loopback_bind(host: str) -> bool:
    if host in ALL_ADDRESSES:
        return False
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name: it may resolve anywhere
    return is_loopback(host)


def refuse_open_bind(config: ServerConfig) -> None:
    """Raise InvalidConfigError when a listener would be reachable from other machines
    while any client without credentials may act as guest."""
    if config.auth == "required" or config.insecure:
        return
    for listener in config.listeners:
        host = listener.host or config.host
        if listener.enabled and not _is_loopback_bind(host):
            raise InvalidConfigError(
                f"refusing to listen on {host or 'all addresses'} ({listener.name}) with"
                " authentication off: anyone who can reach this address could read, write"
                " and delete every queue and topic. Start with --auth required (and"
                " CONVEYOR_ADMIN_USER / CONVEYOR_ADMIN_PASSWORD for the first administrator),"
                " or pass --insecure if this network is trusted (guest still works only from"
                " loopback)", listener=listener.name, host=host)


async def start_security(config: ServerConfig, store: StateStore, clock: Clock,
                         environ: Mapping[str, str]) -> Security:
    auth_required = config.auth == "required"
    security = Security(store, clock, auth_required=auth_required)
    security.load()
    done = await security.admin.bootstrap(auth_required, environ.get("CONVEYOR_ADMIN_USER"),
                                          environ.get("CONVEYOR_ADMIN_PASSWORD"))
    for what in done:
        logger.info("security: %s", what)
    logger.info("authentication %s", "required" if auth_required else
                "off: clients without credentials act as guest from loopback only")
    return security


def own_address() -> str:
    """This host's primary non-loopback address: the source address the kernel picks for
    an outside destination (a UDP connect sends nothing), else the host name's address,
    else 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            address: str = probe.getsockname()[0]
            if not is_loopback(address) and address != "0.0.0.0":
                return address
        except OSError:
            pass
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return address


def advertised_host_for(config: ServerConfig) -> str:
    """``--advertised-host`` when given; the host's own address when bound to all
    addresses (so remote Kafka clients get past bootstrap); else the bind address."""
    if config.advertised_host:
        return config.advertised_host
    if config.host in ALL_ADDRESSES:
        return own_address()
    return config.host
