"""AMQP 0-9-1 benchmark: Conveyor beside RabbitMQ, driven by the same client processes.

``python -m bench.amqp`` (see ``bench.amqp.runner``); workers in ``bench.amqp.clients``,
brokers in ``bench.amqp.brokers``.
"""
