"""SQLAlchemy models of the outbox and of the relay's own state."""

from outbox_relay.models.outbox import (
    EVENTS_TABLE,
    INSTANCES_TABLE,
    LANE_INDEX_PREFIX,
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
    "LANE_INDEX_PREFIX",
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
