"""The core every other package stands on: settings, clients for Redis, Kafka and Triton,
the local services."""
