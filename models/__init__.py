"""SQLAlchemy models of the outbox and of the relay's own state, and the names they use.

The names (plain strings) load at once; the models load SQLAlchemy on first use, so the relay
daemon, which needs only the names, never does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from outbox_relay.models.names import (
    ENQUEUE_TRIGGER,
    EVENTS_READY_INDEX_PREFIX,
    EVENTS_TABLE,
    IDLE_LANES_TABLE,
    INSTANCES_TABLE,
    LANE_INDEX_PREFIX,
    LANES_TABLE,
    NOTIFY_CHANNEL,
    READY_INDEX_PREFIX,
    READY_PREDICATE,
    SCHEMA,
    SENT_TABLE,
    SETTINGS_TABLE,
    STATE_VIEW,
    TOPIC_PATTERN,
    UNSENT_TABLE,
    EventState,
)

if TYPE_CHECKING:
    from outbox_relay.models.outbox import (
        Base,
        IdleLane,
        OutboxEvent,
        RelayInstance,
        RelayLane,
        RelaySettings,
        SentBatch,
        UnsentEvent,
        metadata,
    )

_MODELS = {"Base", "IdleLane", "OutboxEvent", "RelayInstance", "RelayLane", "RelaySettings", "SentBatch", "UnsentEvent",
           "metadata"}


def __getattr__(name: str) -> Any:
    if name in _MODELS:
        return getattr(importlib.import_module("outbox_relay.models.outbox"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENQUEUE_TRIGGER",
    "EVENTS_READY_INDEX_PREFIX",
    "EVENTS_TABLE",
    "IDLE_LANES_TABLE",
    "INSTANCES_TABLE",
    "LANES_TABLE",
    "LANE_INDEX_PREFIX",
    "NOTIFY_CHANNEL",
    "READY_INDEX_PREFIX",
    "READY_PREDICATE",
    "SCHEMA",
    "SENT_TABLE",
    "SETTINGS_TABLE",
    "STATE_VIEW",
    "TOPIC_PATTERN",
    "UNSENT_TABLE",
    "Base",
    "EventState",
    "IdleLane",
    "OutboxEvent",
    "RelayInstance",
    "RelayLane",
    "RelaySettings",
    "SentBatch",
    "UnsentEvent",
    "metadata",
]
