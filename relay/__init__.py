"""outbox-relay: a transactional outbox for PostgreSQL, relayed to Kafka exactly once.

Application code needs one import::

    from outbox_relay import enqueue

The names below load their modules on first use: the relay daemon imports ``outbox_relay.*``
modules without paying for the write API's or the inbox's SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from outbox_relay.errors import InvalidEvent, OutboxError

if TYPE_CHECKING:
    from outbox_relay.inbox import Inbox, InboxEvent
    from outbox_relay.write import Event, Outbox, default_serializer, encode_key, enqueue, enqueue_many

_LAZY = {
    "Inbox": "outbox_relay.inbox",
    "InboxEvent": "outbox_relay.inbox",
    "Event": "outbox_relay.write",
    "Outbox": "outbox_relay.write",
    "default_serializer": "outbox_relay.write",
    "encode_key": "outbox_relay.write",
    "enqueue": "outbox_relay.write",
    "enqueue_many": "outbox_relay.write",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Event",
    "Inbox",
    "InboxEvent",
    "InvalidEvent",
    "Outbox",
    "OutboxError",
    "default_serializer",
    "encode_key",
    "enqueue",
    "enqueue_many",
]
