"""SQLAlchemy models of the outbox and of the relay's own state."""

from models.outbox import (
    EVENTS_TABLE,
    INSTANCES_TABLE,
    LANES_TABLE,
    NOTIFY_CHANNEL,
    SCHEMA,
    SETTINGS_TABLE,
    TOPIC_PATTERN,
    Base,
    EventState,
    OutboxEvent,
    RelayInstance,
    RelayLane,
    RelaySettings,
    metadata,
)

__all__ = [
    "EVENTS_TABLE",
    "INSTANCES_TABLE",
    "LANES_TABLE",
    "NOTIFY_CHANNEL",
    "SCHEMA",
    "SETTINGS_TABLE",
    "TOPIC_PATTERN",
    "Base",
    "EventState",
    "OutboxEvent",
    "RelayInstance",
    "RelayLane",
    "RelaySettings",
    "metadata",
]
