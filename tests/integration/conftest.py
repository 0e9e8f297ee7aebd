"""Fixtures for the integration tests: the AMQP ones live in ``amqp_support.py``."""

from amqp_support import amqp_target, conveyor_multi, conveyor_thread

__all__ = ["amqp_target", "conveyor_multi", "conveyor_thread"]
