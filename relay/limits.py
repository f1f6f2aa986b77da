"""Limits the write API and the relay share (a module of its own: the daemon imports it without
the write API's SQLAlchemy)."""

# Kafka's default message.max.bytes (broker) and max.request.size neighbourhood: what the write API
# accepts, the producer sends.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
