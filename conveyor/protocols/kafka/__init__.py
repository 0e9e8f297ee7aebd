"""The Kafka protocol: sans-IO codec (framing, messages, encoders, codec), handlers
(typed request -> Broker call -> response) and the asyncio adapter and listener.
See docs/kafka.md."""
