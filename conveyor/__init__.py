"""Conveyor: one durable message broker for Kafka, AMQP, SQS and HTTP clients."""

__version__ = "0.1.0"
