"""A broker with ``--auth required`` for the protocol security tests, and its users.

Users (made through the model's admin, as the CLI and HTTP API do):
- ``root`` (administrator, the first admin from CONVEYOR_ADMIN_USER / _PASSWORD);
- ``alice``: in vhost ``/`` may read ``a`` only (configure and write nothing; read
  ``^a$``), and has an SQS access key;
- ``writer``: may configure, write and read ``a`` and ``b`` in ``/``;
- vhost ``other`` exists; only root may use it.
Queues ``a`` and ``b`` exist, each with messages.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

from conveyor.broker.types import Message
from conveyor.server.app import Server
from conveyor.testing.server import BrokerThread, test_config

ROOT = ("root", "root-password")
ALICE = ("alice", "alice-password")
WRITER = ("writer", "writer-password")


class SecureBroker(BrokerThread):
    """A broker thread whose server runs with ``auth = "required"``."""

    def __init__(self, data_dir: Path, listeners: tuple[str, ...],
                 settings: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(data_dir, listeners, settings)
        self.alice_key: tuple[str, str] = ("", "")

    def _start_server(self) -> None:
        config = dataclasses.replace(
            test_config(self.data_dir, self.listener_names, self.settings, self.ports,
                        self.broker_settings), auth="required")
        self._server = Server(config, environ={"CONVEYOR_ADMIN_USER": ROOT[0],
                                               "CONVEYOR_ADMIN_PASSWORD": ROOT[1]})
        self._submit(self._server.start()).result(timeout=30)
        self.ports = dict(self._server.ports)

    def setup_users(self, messages: int = 3) -> None:
        self.alice_key = self.call(self._setup, messages)

    async def _setup(self, messages: int) -> tuple[str, str]:
        admin = self.server.security.admin
        await admin.add_user(ALICE[0], ALICE[1])
        await admin.set_permissions(ALICE[0], "/", "", "", "^a$")
        await admin.add_user(WRITER[0], WRITER[1])
        await admin.set_permissions(WRITER[0], "/", "^(a|b)$", "^(a|b|amq\\.default)$",
                                    "^(a|b)$")
        await admin.add_vhost("other")
        broker = self.server.broker
        for name in ("a", "b"):
            await broker.declare_queue(name)
            await broker.publish(name, [Message(value=f"{name}-{index}".encode())
                                        for index in range(messages)])
        return await admin.create_access_key(ALICE[0])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
