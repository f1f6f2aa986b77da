"""outbox-relay: a transactional outbox for PostgreSQL, relayed to Kafka exactly once.

Application code needs one import::

    from outbox_relay import enqueue
"""

from outbox_relay.errors import InvalidEvent, OutboxError
from outbox_relay.inbox import Inbox, InboxEvent
from outbox_relay.write import Event, Outbox, default_serializer, encode_key, enqueue, enqueue_many

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
